"""Open a `remat compare --out` HTML report in headless Chromium, offline, and keep a screenshot.

    python benchmarks/report_screenshot.py report.html [--out benchmarks/results/report_gpt2.png]

Needs Debian's Chromium (`apt-get install chromium`; not a Python dependency of remat). Chromium runs with
networking off (the page must need no network: its CSS is inline and its plots are base64 PNGs), then the
screenshot is checked: the page's images decoded and drawn (their pixels are not blank), and the counts are
written beside the PNG as JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 4200) -> str:
    """Render `html` headless into `png`; returns Chromium's version line."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no Chromium on this machine: apt-get install chromium")
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png}", html.resolve().as_uri()], capture_output=True, check=True, timeout=120)
    return version


def check(html: Path, png: Path) -> dict:
    """What the page holds and what the screenshot shows."""
    text = html.read_text()
    embedded = re.findall(r"""src=["']data:image/png;base64,([^"']+)["']""", text)
    plots = [Image.open(io.BytesIO(base64.b64decode(data))) for data in embedded]
    shot = Image.open(png).convert("L")
    drawn = sum(shot.histogram()[:200])  # dark pixels: text, lines, plot ink
    return {
        "html": str(html), "html_bytes": len(text.encode()), "png": str(png),
        "external_references": re.findall(r"""(?:src|href)=["'](https?://[^"']+)["']""", text),
        "embedded_plots": [list(p.size) for p in plots],
        "screenshot_size": list(shot.size), "screenshot_dark_fraction": drawn / (shot.size[0] * shot.size[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("html", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/report_gpt2.png"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    full = args.out.with_suffix(".full.png")
    version = screenshot(args.html, full)
    found = {"chromium": version, **check(args.html, full)}
    image = Image.open(full)
    image.resize((image.width // 2, image.height // 2)).save(args.out, optimize=True)  # half size for the repo
    full.unlink()
    found["png"] = str(args.out)
    args.out.with_suffix(".json").write_text(json.dumps(found, indent=1))
    print(json.dumps(found, indent=1))
    if found["external_references"] or not found["embedded_plots"] or found["screenshot_dark_fraction"] < 0.01:
        raise SystemExit("the report needs the network, has no plots, or rendered blank")


if __name__ == "__main__":
    main()
