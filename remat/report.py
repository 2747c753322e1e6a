"""A Comparison as tables and pictures: a self-contained HTML page (plots inlined as base64 PNG, no network),
Markdown with the PNGs beside it, and the rows as text cells for the terminal.

Plots (matplotlib, Agg): memory over the modelled step time for every method at one budget (Checkmate's
figure), the budget -> overhead curve of every method, and one schedule's R/S matrices as a heat map.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from remat.compare import Comparison, Row
from remat.graph import Graph
from remat.maxbatch import MILP_METHODS
from remat.schedule import COMPUTE, Schedule
from remat.simulate import Simulation
from remat.split import Split
from remat.units import format_bytes, format_seconds

HEADERS = ("method", "budget", "peak", "fits", "step time", "overhead", "max batch", "status", "gap", "schedule",
           "wall")


@dataclass(frozen=True)
class Figure:
    name: str  # file stem suffix: "memory-16GB", "curve", "rs"
    title: str
    png: bytes


def headers(comparison: Comparison) -> list[str]:
    """HEADERS, without "max batch" when it was not computed."""
    return [h for h in HEADERS if h != "max batch" or _with_max_batch(comparison)]


def _with_max_batch(comparison: Comparison) -> bool:
    return any(row.max_batch is not None for row in comparison.rows)


def cells(row: Row, with_max_batch: bool = True) -> list[str]:
    """One table row as text, in HEADERS order (`headers` order without the max batch)."""
    text = [
        row.method,
        format_bytes(row.budget_bytes),
        format_bytes(row.peak_bytes) if row.peak_bytes is not None else "-",
        "yes" if row.fits else "no",
        format_seconds(row.compute_s) if row.compute_s is not None else "-",
        f"{row.overhead:+.1%}" if row.overhead is not None else "-",
        "-" if row.max_batch is None else f"{row.max_batch}{'+' if row.max_batch_capped else ''}",  # + as maxbatch
        row.status,
        f"{row.gap:.1%}" if row.gap is not None else "-",
        row.schedule_from if row.schedule_from != row.method else "",
        f"{row.wall_s:.1f} s",
    ]
    return text if with_max_batch else text[:6] + text[7:]


def summary_lines(comparison: Comparison) -> list[str]:
    graph, fixed = comparison.graph, comparison.graph.fixed
    meta = graph.meta
    split = _any_split(comparison)
    return [
        f"{meta.get('model')}: {meta.get('description', '')}",
        "".join(f"{k} {meta[k]}, " for k in ("batch", "seq") if meta.get(k) is not None)
        + f"{meta.get('precision')}, optimizer {meta.get('optimizer')}"
        + graph.gradients_note
        + f", costed for {meta.get('device')}; {len(graph)} nodes, hash {graph.content_hash}",
        f"fixed memory {format_bytes(fixed.total_bytes)} (parameters {format_bytes(fixed.parameter_bytes)}, gradients "
        f"{graph.gradient_memory}, "
        f"optimizer {format_bytes(fixed.optimizer_bytes)}, inputs "
        f"{format_bytes(fixed.input_bytes)})",
        f"store-all: peak {format_bytes(comparison.store_all.peak_bytes)}, "
        f"{format_seconds(comparison.store_all.compute_s)} per step; no schedule "
        f"{'of the step as traced ' if split else ''}fits below {format_bytes(graph.min_budget_lower_bound())}",
        "every figure is the simulator's (remat/simulate.py), every method on "
        f"{'the step as traced or split (below)' if split else 'this same step'}; "
        "overhead = step time / store-all's - 1",
        *(["remat's plans marked \"head in k chunks\" run on the same step with its loss head split into k chunks "
           "of rows (remat/split.py; see the notes); the others on the step as traced"] if split else []),
    ]


def _any_split(comparison: Comparison) -> bool:
    """Whether a row's plan runs on a split step (its graph is a copy with the split note even where none split)."""
    return any(graph.meta.get("split") for graph in comparison.graphs.values())


def notes(comparison: Comparison) -> list[str]:
    """Why a MILP row has no plan (a budget below every schedule found, with the lowest peak found), and which op
    a split plan splits, and why."""
    found = []
    for row in comparison.rows:
        split = comparison.graph_of(row.method, row.budget_bytes).meta.get("split")
        if split and row.peak_bytes is not None:
            what = Split.from_meta(split).describe()
            found.append(f"{row.method} at {format_bytes(row.budget_bytes)}: split {what}: {split.get('reason', '')}")
        elif row.method in MILP_METHODS and row.peak_bytes is None and row.message:
            found.append(f"{row.method} at {format_bytes(row.budget_bytes)}: {row.message}")
    return found


# --- plots ----------------------------------------------------------------------------------------


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def memory_steps(graph: Graph, schedule: Schedule, simulation: Simulation) -> tuple[list[float], list[int]]:
    """(seconds, bytes) to draw as steps: each instruction's memory from the moment it starts, until the next one
    starts, and the step's end last. (Drawn from each op's end, an op's output and workspace showed over the next
    op's time.)"""
    elapsed, times = 0.0, []
    for op in schedule.ops:
        times.append(elapsed)
        if op.kind == COMPUTE:
            elapsed += graph.nodes[op.node].compute_s
    memory = list(simulation.timeline_bytes)
    return [*times, elapsed], [*memory, memory[-1]]


def memory_plot(comparison: Comparison, budget_bytes: int) -> bytes:
    """Memory in use over the modelled step time, one line per method, with the budget as a dashed line."""
    plt = _pyplot()
    graph = comparison.graph
    figure, axes = plt.subplots(figsize=(10, 4.8))
    scale, unit = _scale(max(comparison.store_all.peak_bytes, budget_bytes))
    right_ms = 2.5 * comparison.store_all.compute_s * 1e3  # checkpoint-all's +1000% would squash the others
    colors = _colors(comparison)
    for method in comparison.methods:
        schedule = comparison.schedules.get((method, budget_bytes))
        if schedule is None:
            continue
        simulation = comparison.simulation(method, budget_bytes)
        runs_on = comparison.graph_of(method, budget_bytes)
        times, memory = memory_steps(runs_on, schedule, simulation)
        times = [t * 1e3 for t in times]
        label = method if times[-1] <= right_ms else f"{method} (to {times[-1]:,.0f} ms)"
        axes.plot(times, [b / scale for b in memory], label=label, linewidth=1.1, alpha=0.85, drawstyle="steps-post",
                  color=colors[method])
    axes.set_xlim(left=0, right=right_ms)
    axes.axhline(budget_bytes / scale, color="black", linestyle="--", linewidth=1, label="budget")
    axes.axhline(graph.fixed.total_bytes / scale, color="gray", linestyle=":", linewidth=1, label="fixed memory")
    axes.set_xlabel("modelled step time (ms)")
    axes.set_ylabel(f"memory in use ({unit})")
    axes.set_title(f"memory over the step, budget {format_bytes(budget_bytes)}")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the plot: inside, it hid the peaks
    axes.grid(alpha=0.3)
    return _png(figure)


def curve_plot(comparison: Comparison) -> bytes:
    """Overhead against memory: a MILP method's plans at each budget (a line over the budgets), every other
    method at its simulated peak (the least budget it fits); torch.compile's budgets joined as one curve."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 4.8))
    scale, unit = _scale(max(comparison.store_all.peak_bytes, *comparison.budgets_bytes))
    compile_points = []
    colors = _colors(comparison)
    for method in comparison.methods:
        rows = [r for r in comparison.rows if r.method == method and r.compute_s is not None]
        if method in MILP_METHODS:
            points = sorted((r.budget_bytes / scale, r.overhead * 100) for r in rows if r.fits)
            if points:
                # a plan that fits budget b fits every larger one: its overhead holds until the next budget
                axes.plot(*zip(*points, strict=True), marker="o", linewidth=2, label=f"{method} (remat plan)",
                          color=colors[method], drawstyle="steps-post")
            continue
        if not rows:
            continue
        point = (rows[0].peak_bytes / scale, rows[0].overhead * 100)
        if method.startswith("compile-budget-"):
            compile_points.append((*point, method.removeprefix("compile-budget-"), colors[method]))
        else:
            axes.scatter(*point, marker="s", label=method, zorder=3, color=colors[method])
    if compile_points:
        ordered = sorted(compile_points)
        axes.plot([p[0] for p in ordered], [p[1] for p in ordered], marker="^", linestyle="--",
                  label="torch.compile activation_memory_budget", color=compile_points[0][3])
        for x, y, value, _ in compile_points:
            axes.annotate(value, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for budget in comparison.budgets_bytes:
        axes.axvline(budget / scale, color="gray", linestyle=":", linewidth=0.8)
    overheads = sorted(r.overhead for r in comparison.rows if r.overhead is not None)
    if overheads and overheads[-1] > 2.0:  # checkpoint-all's +500% would flatten every other point
        axes.set_yscale("symlog", linthresh=10)
        axes.set_ylim(bottom=0, top=overheads[-1] * 100 * 2)  # room above the highest point (it sat on the edge)
    axes.set_xlabel(f"memory: budget (remat plan) or simulated peak (fixed schedules), {unit}")
    axes.set_ylabel("overhead vs store-all (%)")
    axes.set_title("budget -> overhead (simulated on the same step" +
                   ("; remat's plans may split its loss head)" if _any_split(comparison) else ")"))
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes.grid(alpha=0.3)
    return _png(figure)


def _colors(comparison: Comparison) -> dict[str, str]:
    """One colour per method, the same in every plot (torch's budgets share one in the curve)."""
    palette = [f"C{i}" for i in range(10)]
    return {method: palette[i % len(palette)] for i, method in enumerate(comparison.methods)}


def _scale(num_bytes: int) -> tuple[float, str]:
    return (1e9, "GB") if num_bytes >= 1e9 else (1e6, "MB")


def stage_matrix(graph: Graph, schedule: Schedule) -> list[list[int]]:
    """Checkmate's stages as one matrix: 2 where node i is computed in stage t (R), 1 where it is only kept in
    memory at the stage's start (S), 0 otherwise. Stage t ends when node t is computed for the first time."""
    n = len(graph)
    matrix = [[0] * n for _ in range(n)]
    seen = [False] * n
    live: set[int] = set()
    stage = 0
    for op in schedule.ops:
        if op.kind != COMPUTE:
            live.discard(op.node)
            continue
        if stage < n:
            matrix[stage][op.node] = 2
        live.add(op.node)
        if not seen[op.node]:
            seen[op.node] = True
            stage += 1
            if stage < n:
                for i in live:
                    matrix[stage][i] = max(matrix[stage][i], 1)
    return matrix


def rs_plot(graph: Graph, schedule: Schedule, title: str) -> bytes:
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    matrix = stage_matrix(graph, schedule)
    size = min(10.0, max(4.0, len(graph) / 100))
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(matrix, cmap=ListedColormap(["white", "#9ecae1", "#d62728"]), vmin=0, vmax=2,
                        interpolation="nearest", aspect="auto")
    colorbar = figure.colorbar(image, ticks=[0, 1, 2], fraction=0.04)
    colorbar.ax.set_yticklabels(["-", "S: in memory", "R: computed"])
    axes.set_xlabel("node (topological order)")
    axes.set_ylabel("stage")
    axes.set_title(title)
    return _png(figure)


def memory_figure_names(budgets_bytes: Sequence[int]) -> list[tuple[str, str]]:
    """(file stem suffix, title) of each budget's memory plot. Budgets that print alike (140MB and 140,000,400 bytes)
    are named by their bytes: the second one's file overwrote the first's."""
    printed = [format_bytes(b) for b in budgets_bytes]
    return [(f"memory-{_slug(b)}", f"Memory over the step at {text}") if printed.count(text) == 1 else
            (f"memory-{b}B", f"Memory over the step at {text} ({b:,} bytes)")
            for b, text in zip(budgets_bytes, printed, strict=True)]


def figures(comparison: Comparison) -> list[Figure]:
    found = [Figure(name, title, memory_plot(comparison, b))
             for b, (name, title) in zip(comparison.budgets_bytes, memory_figure_names(comparison.budgets_bytes),
                                         strict=True)]
    found.append(Figure("curve", "Budget -> overhead", curve_plot(comparison)))
    pick = _rs_pick(comparison)
    if pick is not None:
        method, budget = pick
        title = f"R/S of {method} at {format_bytes(budget)}"
        found.append(Figure("rs", title, rs_plot(comparison.graph_of(*pick), comparison.schedules[pick], title)))
    return found


def _rs_pick(comparison: Comparison) -> tuple[str, int] | None:
    """remat's plan at the smallest budget it fits; else the first schedule that fits; else any schedule."""
    for rows in ([r for r in comparison.rows if r.method in MILP_METHODS and r.fits],
                 [r for r in comparison.rows if r.fits], list(comparison.rows)):
        for row in rows:
            if (row.method, row.budget_bytes) in comparison.schedules:
                return row.method, row.budget_bytes
    return None


def _slug(num_bytes: int) -> str:
    return format_bytes(num_bytes).replace(" ", "").replace(".", "_")


# --- documents ------------------------------------------------------------------------------------


def markdown(comparison: Comparison, images: list[tuple[str, str]]) -> str:
    """Markdown with the table; `images`: (title, PNG path relative to the document) per plot."""
    lines = [f"# remat compare: {comparison.graph.meta.get('model')}", ""]
    lines += [f"- {line}" for line in summary_lines(comparison)]
    columns, with_batch = headers(comparison), _with_max_batch(comparison)
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells(row, with_batch)) + " |" for row in comparison.rows]
    for note in notes(comparison):  # a paragraph each: consecutive lines render as one
        lines += ["", f"Note: {note}"]
    for title, image in images:
        lines += ["", f"## {title}", "", f"![{title}]({image})"]
    lines += ["", f"Compared in {comparison.wall_s:.1f} s (tracing the model not counted).", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}td:first-child{text-align:left}
tr.no td{color:#999}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}li{margin:0.2em 0}"""


def html_page(comparison: Comparison, figure_list: list[Figure]) -> str:
    """One self-contained page: inline CSS, plots as data: URIs, nothing fetched."""
    title = f"remat compare: {comparison.graph.meta.get('model')}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>"]
    parts += [f"<li>{html.escape(line)}</li>" for line in summary_lines(comparison)]
    with_batch = _with_max_batch(comparison)
    parts.append("</ul><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers(comparison)) + "</tr>")
    for row in comparison.rows:
        parts.append(f"<tr class='{'yes' if row.fits else 'no'}'>"
                     + "".join(f"<td>{html.escape(c)}</td>" for c in cells(row, with_batch)) + "</tr>")
    parts.append("</table>")
    parts += [f"<p>Note: {html.escape(note)}</p>" for note in notes(comparison)]
    for figure in figure_list:
        data = base64.b64encode(figure.png).decode("ascii")
        parts.append(f"<h2>{html.escape(figure.title)}</h2><img alt='{html.escape(figure.title)}' "
                     f"src='data:image/png;base64,{data}'>")
    parts.append(f"<p>Compared in {comparison.wall_s:.1f} s (tracing the model not counted).</p></body></html>")
    return "\n".join(parts)


def write_reports(comparison: Comparison, html_path: str | Path | None = None,
                  markdown_path: str | Path | None = None) -> list[Path]:
    """Write the HTML page and/or the Markdown file with its PNGs beside it; the paths written."""
    if html_path is None and markdown_path is None:
        return []
    figure_list = figures(comparison)
    written = []
    if html_path is not None:
        path = Path(html_path)
        path.write_text(html_page(comparison, figure_list))
        written.append(path)
    if markdown_path is not None:
        path = Path(markdown_path)
        images = []
        for figure in figure_list:
            image = path.with_name(f"{path.stem}-{figure.name}.png")
            image.write_bytes(figure.png)
            images.append((figure.title, image.name))
            written.append(image)
        path.write_text(markdown(comparison, images))
        written.insert(0, path)
    return written
