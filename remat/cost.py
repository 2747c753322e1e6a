"""Cost model: seconds per op from a device profile.

Roofline: an op takes max(FLOPs / achievable FLOP/s, bytes moved / achievable bandwidth)
plus a launch overhead. FLOPs are counted for matmuls, convolutions and attention (torch's
FlopCounter formulas); every other op is memory-bound and costed by the bytes it reads and
writes. Profiles are JSON files in profiles/ (see profiles/h100.json).

Measured profiles (`remat profile`) add `measured_s`: seconds per op, keyed by the op and its arguments
(`remat.lower.cost_key`); an op found there takes its measured time, any other op the roofline.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
COMPUTE_DTYPES = ("fp64", "fp32", "tf32", "bf16", "fp16")  # the peaks a profile gives (other dtypes take fp32's)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    memory_bytes: int
    memory_bandwidth_bytes_per_s: float
    flops_per_s: dict[str, float]  # peak per compute dtype: COMPUTE_DTYPES
    matmul_efficiency: float = 0.6  # fraction of peak FLOP/s that large matmuls reach
    memory_efficiency: float = 0.75  # fraction of peak bandwidth that elementwise kernels reach
    launch_overhead_s: float = 4e-6
    measured_s: dict[str, float] = field(default_factory=dict)  # cost key -> measured seconds (remat profile)

    def node_seconds(self, key: str, flops: float, bytes_moved: float, dtype: str) -> float:
        """The measured time of the op called `key` if this profile has one, else the roofline's."""
        measured = self.measured_s.get(key)
        return measured if measured is not None else self.op_seconds(flops, bytes_moved, dtype)

    def op_seconds(self, flops: float, bytes_moved: float, dtype: str) -> float:
        peak = self.flops_per_s.get(dtype, self.flops_per_s["fp32"])
        compute_s = flops / (peak * self.matmul_efficiency) if flops else 0.0
        memory_s = bytes_moved / (self.memory_bandwidth_bytes_per_s * self.memory_efficiency)
        return max(compute_s, memory_s) + self.launch_overhead_s


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by name ("h100") from profiles/, or from a JSON file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file() and (Path(name_or_path).suffix or "/" in name_or_path):  # a file named that is not there
        raise ValueError(f"device profile file {name_or_path!r} not found (a device by name: one of "
                         f"{', '.join(available_profiles())})")
    if not path.is_file():
        raise ValueError(f"unknown device {name_or_path!r}: choose one of {', '.join(available_profiles())} "
                         "or give a profile JSON file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"device profile {path} is not valid JSON: {error}") from None
    problem = _profile_problem(data)
    if problem:
        raise ValueError(f"device profile {path} is not valid: {problem} (see profiles/h100.json for the form)")
    data.setdefault("description", data["name"])
    return DeviceProfile(**{k: v for k, v in data.items() if k in DeviceProfile.__dataclass_fields__})


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _profile_problem(data: Any) -> str:
    """What is wrong with a profile's JSON, or "": a negative or zero bandwidth made every step cheaper, or divided
    by zero, and a missing peak for a dtype fell back to fp32's without a word."""
    if not isinstance(data, dict):
        return f"a JSON object is needed, not {type(data).__name__}"
    missing = [k for k in ("name", "memory_bytes", "memory_bandwidth_bytes_per_s", "flops_per_s") if k not in data]
    if missing:
        return f"missing {', '.join(missing)}"
    for key in ("memory_bytes", "memory_bandwidth_bytes_per_s", "launch_overhead_s"):
        if key in data and not (_positive(data[key]) or (key == "launch_overhead_s" and data[key] == 0)):
            return f"{key} must be a positive number, not {data[key]!r}"
    for key in ("matmul_efficiency", "memory_efficiency"):
        if key in data and not (_positive(data[key]) and data[key] <= 1):
            return f"{key} must be a number in (0, 1], not {data[key]!r}"
    peaks = data["flops_per_s"]
    if not isinstance(peaks, dict) or "fp32" not in peaks:
        return "flops_per_s must map compute dtypes to peak FLOP/s, fp32 among them"
    # (a missing bf16 took fp32's peak without a word: GPT-2's step 30% slower on an H100)
    missing = [dtype for dtype in COMPUTE_DTYPES if dtype not in peaks]
    if missing:
        return f"flops_per_s has no peak for {', '.join(missing)} (give each of {', '.join(COMPUTE_DTYPES)})"
    wrong = [f"{dtype}: {value!r}" for dtype, value in peaks.items() if not _positive(value)]
    if wrong:
        return f"flops_per_s must be positive numbers ({', '.join(wrong)})"
    measured = data.get("measured_s", {})
    if not isinstance(measured, dict) or any(not (_positive(v) or v == 0) for v in measured.values()):
        return "measured_s must map op keys to seconds (numbers, 0 or more)"
    return ""
