"""The `remat` command line: parse, call the library, print. No planning logic lives here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from remat.graph import Graph
from remat.units import format_bytes, format_seconds, format_share_above, is_share, parse_size
from remat.zoo import ZOO_NAMES
from solvers.base import FEASIBLE, overhead_of, reported_status
from solvers.baselines import BASELINES

FORMAT_ONLY = 10**18  # a reference size for checking a share's format before the trace gives the real one
EXIT_BAD_INPUT = 2  # bad input and infeasible budgets: the user has something to change
SLOW_BATCH_OVERHEAD = 1.0  # maxbatch hints at --max-overhead past this overhead (twice store-all's step time)

# soft_wrap: a line is printed whole, however long, and a terminal wraps it; rich cut lines at the console's width,
# also into a pipe or a file (the main job's "plan" line, 158 characters, broke at "the split step's / own)")
stderr = Console(stderr=True, emoji=False, soft_wrap=True)  # a factory called `llama` is not :llama:


def fail(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(EXIT_BAD_INPUT)


def _output_file(context: click.Context, parameter: click.Parameter, value: str | None) -> str | None:
    """An option naming a file to write: its folder is made now, and must be writable, so that a long solve does not
    end in a traceback when it writes (a missing folder raised FileNotFoundError after the whole solve)."""
    if value is None:
        return None
    option = parameter.opts[0]
    folder = Path(value).parent
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # the folders this makes, deepest first
    if any(p.exists() and not p.is_dir() for p in (folder, *folder.parents)):
        fail(f"{option}: cannot make its folder {folder}: a file of that name is in the way")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"{option}: cannot make its folder {folder}: {error.strerror}")
    # a command that ends before it writes (remat profile without CUDA) leaves no empty folder behind
    context.call_on_close(lambda: _remove_empty(made))
    if not os.access(folder, os.W_OK):
        fail(f"{option}: cannot write into {folder}")
    path = Path(value)
    existed = path.exists()
    try:  # a folder of that name, a read-only file system (/sys, which os.access allows root): found by opening it
        with open(path, "a"):
            pass
    except OSError as error:
        fail(f"{option}: cannot write {value}: {error.strerror}")
    if not existed:
        path.unlink()  # made only to try: a solve that fails leaves no empty file
    return value


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()  # only if empty
        except OSError:
            return


def _model(context: click.Context, parameter: click.Parameter, value: str) -> str:
    """A --model checked before the command imports torch (a typo took 6 s to be told), as --budget is."""
    from remat.zoo import model_problem

    problem = model_problem(value)
    if problem:
        fail(problem)
    return value


def _device(context: click.Context, parameter: click.Parameter, value: str) -> str:
    """A --device profile read before the command imports torch."""
    from remat.cost import load_profile

    try:
        load_profile(value)
    except ValueError as error:
        fail(str(error))
    return value


# Options that several commands take, written once.
MODEL_OPTION = click.option("--model", required=True, callback=_model,
                            help="Zoo name (gpt2, resnet50, ...) or path/to/file.py:factory.")
BATCH_OPTION = click.option("--batch", default=None, type=click.IntRange(min=1),
                            help="Batch size [default: 16, or a file.py:factory's own batch= default].")
SEQ_OPTION = click.option("--seq", default=None, type=click.IntRange(min=1),
                          help="Sequence length [default: the model's context].")
DEVICE_OPTION = click.option("--device", default="h100", show_default=True, callback=_device,
                             help="Device profile: h100, a100, v100, cpu, or a JSON file.")
PRECISIONS = ["bf16-mixed", "fp32"]
PRECISION_OPTION = click.option("--precision", default="bf16-mixed", show_default=True, type=click.Choice(PRECISIONS),
                                help="bf16-mixed: under bf16 autocast; fp32: no autocast, in the model's own dtypes.")
OPTIMIZERS = ["adamw", "adam", "sgd", "sgd-momentum", "none"]
GRADIENTS = ["held", "set-to-none", "accumulate"]  # remat.lower's GRADIENTS (not imported: it loads torch)
OPTIMIZER_OPTION = click.option("--optimizer", default="adamw", show_default=True, type=click.Choice(OPTIMIZERS),
                                help="The optimizer whose state the step holds.")
GRADIENTS_HELP = ("How the loop keeps gradients between steps. held: fixed memory for the whole step, once per weight; "
                  "set-to-none: freed (optimizer.zero_grad()'s default), each counted from when the backward makes "
                  "it; accumulate: kept (gradient accumulation, zero_grad(set_to_none=False)), fixed memory, and the "
                  "backward's new ones counted beside them until it returns.")
GRADIENTS_OPTION = click.option("--gradients", default="held", show_default=True,
                                type=click.Choice(GRADIENTS), help=GRADIENTS_HELP)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the text.")


@contextlib.contextmanager
def _writing(what: str):
    """What goes wrong writing an output after the work (a PNG beside --md whose name is a folder) is one line."""
    try:
        yield
    except OSError as error:
        fail(f"could not write {what}: {error.strerror}: {error.filename or ''}".rstrip(": "))


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send whatever libraries print to stdout (HiGHS prints a banner from C++) to stderr, so that
    stdout carries only remat's report or its one JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """remat: rematerialization (activation checkpointing) plans for PyTorch training."""


@main.command()
@MODEL_OPTION
@click.option("--budget", required=True,
              help="Whole device memory for the step: 16GB (1e9 bytes), 16GiB (2^30), or 60% of the store-all peak.")
@BATCH_OPTION
@SEQ_OPTION
@DEVICE_OPTION
@PRECISION_OPTION
@OPTIMIZER_OPTION
@click.option("--solver", default="auto", show_default=True,
              help="auto, checkmate, decompose, lp-round, cpsat, or a baseline (store-all, per-block, ...).")
@click.option("--time-limit", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds for the whole solve; the best plan so far is returned when it runs out.")
@click.option("--backend", default="highs", show_default=True, type=click.Choice(["highs", "cbc", "gurobi"]),
              help="MILP back-end.")
@click.option("--out", type=click.Path(dir_okay=False), callback=_output_file,
              help="Write the plan (graph hash + schedule) as JSON.")
@click.option("--outputs", default="loss", show_default=True, type=click.Choice(["loss", "all"]),
              help="What the step hands back beside its loss: nothing, or all of the model's other tensors (a loop "
                   "that reads outputs.logits), held to the step's end; as remat.apply(..., outputs=...).")
@GRADIENTS_OPTION
@JSON_OPTION
def solve(model, budget, batch, seq, device, precision, optimizer, solver, time_limit, backend, out, outputs,
          gradients, as_json) -> None:
    """Plan the training step of MODEL under a memory BUDGET."""
    from solvers.registry import SOLVER_NAMES

    started = time.perf_counter()
    try:
        # a typo fails now, not after the trace; "60%" is resolved after it (any share of FORMAT_ONLY is bytes)
        parse_size(budget, reference_bytes=FORMAT_ONLY)
    except ValueError as error:
        fail(f"--budget: {error}")
    if solver not in SOLVER_NAMES:
        fail(f"unknown solver {solver!r}: choose one of {', '.join(SOLVER_NAMES)}")

    with _stdout_to_stderr():
        plan, traced_peak, traced_s = _solve_split(model, batch, seq, precision, device, optimizer, budget, solver,
                                                   time_limit, backend, outputs, gradients)
    budget_bytes = plan.budget_bytes
    _note_over_device(budget_bytes, device)
    wall_s = time.perf_counter() - started
    # A share is of the step as traced; a plan that splits the head reports its own, lower, store-all peak
    share_of = traced_peak if is_share(budget) else None

    if out and plan.schedule is not None:
        with _writing("the plan"):
            Path(out).write_text(json.dumps(plan.to_json()))
    traced_overhead = overhead_of(plan.compute_s, traced_s)
    if as_json:
        click.echo(json.dumps({**_plan_summary(plan, wall_s), "budget_share_of_bytes": share_of,
                               "traced_store_all_s": traced_s, "traced_overhead": traced_overhead}))
    else:
        _print_plan(plan, wall_s, out, budget if share_of else None, share_of, traced_overhead)
    if plan.schedule is None:
        if budget_bytes < plan.graph.fixed.total_bytes:
            fail(f"no plan fits {format_bytes(budget_bytes)} ({budget_bytes} bytes) for {model}: "
                 f"{_below_fixed_memory(plan.graph)}{_share_above(plan.graph.fixed, share_of)}")
        named = next((c for c in plan.candidates if c.method == solver), None)
        asked = named.simulation if named is not None and named.simulation is not None and named.simulation.valid \
            else None
        if asked is not None and plan.min_feasible_bytes is not None:
            # (where other methods go lower, a budget they fit was named, which this baseline's schedule does not)
            lower = (f", or --solver auto, whose plans go down to {_fmt(plan.min_feasible_bytes)} here"
                     if plan.min_feasible_bytes < asked.peak_bytes else "")
            fail(f"{solver}'s schedule for {model} peaks at {_fmt(asked.peak_bytes)} ({asked.peak_bytes} bytes), over "
                 f"the budget of {format_bytes(budget_bytes)}: use --budget {_ceil_size(asked.peak_bytes)} or more"
                 f"{lower}")
        if solver in BASELINES and named is not None and named.schedule is None and named.message:
            # per-block on a model without repeated blocks: why it made no schedule, not a lowest peak under the budget
            fail(f"no plan fits {format_bytes(budget_bytes)} ({budget_bytes} bytes) for {model} with --solver "
                 f"{solver}: {named.message}; --solver auto plans for any graph")
        more_chunks = (", or a longer --time-limit: it was too short to trace the step split in more chunks, which "
                       "may fit" if plan.graph.meta.get("split_cut") else "")
        # a search cut short names the lowest peak it reached, which a longer one may beat (clip at 975.58 KB: a
        # plan at 970 KB was found with another budget)
        lowest = (f"the minimum feasible budget is {_fmt(plan.min_feasible_bytes)} ({plan.min_feasible_bytes} bytes); "
                  f"use --budget {_ceil_size(plan.min_feasible_bytes)} or more" if plan.min_feasible_proven else
                  f"the lowest peak found in the time limit is {_fmt(plan.min_feasible_bytes)} "
                  f"({plan.min_feasible_bytes} bytes), which --budget {_ceil_size(plan.min_feasible_bytes)} fits; a "
                  f"longer --time-limit may find a lower one, not below {_fmt(plan.min_budget_lower_bound_bytes)} "
                  f"({plan.min_budget_lower_bound_why})")
        fail(f"no plan fits {format_bytes(budget_bytes)} ({budget_bytes} bytes) for {model}: {lowest}"
             f"{', or a smaller --batch' if plan.graph.meta.get('batch', 2) != 1 else ''}{more_chunks}")


def _note_over_device(budget_bytes: int, device: str) -> None:
    """A budget over the device's memory plans for memory the device does not have (an extra zero, or --device left
    at its h100 default for a smaller card): the plan is made, with a note that it will not fit that device."""
    from remat.cost import load_profile

    profile = load_profile(device)
    if budget_bytes > profile.memory_bytes:
        stderr.print(f"note: the budget {format_bytes(budget_bytes)} is more than {escape(profile.name)}'s memory "
                     f"({format_bytes(profile.memory_bytes)}): a plan for it does not fit that device (--device names "
                     f"the one the step runs on)", highlight=False, soft_wrap=True)


def _cut_short(plan) -> bool:
    """The plan is more than 1% from its bound, and the bound is the covering MILP's as far as time let it go."""
    return (plan.status == FEASIBLE and plan.gap is not None and plan.gap > 0.01
            and plan.lower_bound_method.startswith("covering ("))


def _lighter_optimizer(fixed) -> str:
    return "; an optimizer with less state lowers it (--optimizer sgd holds none)" if fixed.optimizer_bytes else ""


def _below_fixed_memory(graph: Graph) -> str:
    """Why a budget below fixed memory fits no plan, and what lowers fixed memory."""
    return (f"fixed memory alone is {graph.describe_fixed()}, whatever is recomputed, and parameters, gradients and "
            f"optimizer state do not shrink with the batch. A budget above it leaves room for activations (one still "
            f"too small gets the minimum feasible budget named){_lighter_optimizer(graph.fixed)}")


def _share_above(fixed, store_all_peak: int | None) -> str:
    """For a budget given as a share: the share fixed memory alone takes (a small model's AdamW state can be most of
    its store-all peak, and "60%" then fits nothing)."""
    if not store_all_peak:
        return ""
    return f"; as a share of the store-all peak ({_fmt(store_all_peak)}), fixed memory alone is " \
           f"{format_share_above(fixed.total_bytes, store_all_peak)}"


def _below_model_state(graph: Graph) -> str:
    """Why a budget below parameters, gradients and optimizer state fits no batch."""
    return (f"parameters, gradients and optimizer state alone are {graph.describe_fixed(inputs=False)}, at every "
            f"batch and whatever is recomputed{_lighter_optimizer(graph.fixed)}")


def _solve_split(model, batch, seq, precision, device, optimizer, budget, solver, time_limit, backend,
                 outputs="loss", gradients="held"):
    """Plan with the head split into the chunk count that fits the budget at least cost (remat.split_plan).
    `budget`: as given; a percentage is of the unsplit step's store-all peak."""
    from remat.split_plan import SplitTracer, solve_split

    with _tracing(model, batch) as status:
        tracer = SplitTracer.zoo(model, batch=batch, seq=seq, precision=precision, device=device, optimizer=optimizer,
                                 outputs=outputs, gradients=gradients)
        if outputs == "all" and "returned" not in tracer.unsplit.step.output_kinds:  # the zoo's models, say
            # (a model that returns its logits alone hands them out under --outputs loss already: no loss there)
            stderr.print(f"note: {escape(model)} returns one tensor alone (its loss, or the logits a loss is made "
                         "of): --outputs all has no other tensor to hand out, and plans as --outputs loss",
                         highlight=False)
        chosen = solve_split(tracer, tracer.budget_bytes(budget), solver=solver, time_limit_s=time_limit,
                             backend=backend, progress=lambda stage: status.update(f"planning: {stage}"))
        # the step as traced: its store-all peak (what a share is of) and step time (what the user runs today)
        return chosen.plan, tracer.budget_bytes("100%"), tracer.unsplit.graph.compute_s


@contextlib.contextmanager
def _tracing(model, batch):
    """A status line while the model is traced (and planned), and what goes wrong as one line."""
    with stderr.status(f"tracing {model}{_batch_note(batch)} on fake tensors", spinner="dots") as status, \
            _one_line_errors():
        yield status


@contextlib.contextmanager
def _one_line_errors():
    """What the user's model, its trace or an option gets wrong: one line and exit status 2, not a traceback."""
    from remat.capture import CaptureError
    from remat.models import ModelError

    try:
        yield
    except (ModelError, CaptureError, ValueError) as error:
        fail(str(error))


def _fraction(text: str, option: str) -> float:
    """'25%' or '0.25' -> 0.25; anything else, or a negative value, is a one-line error (exit 2)."""
    try:
        value = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        fail(f"{option}: {text!r} is not a fraction: write 25% or 0.25")
    if not value >= 0:
        fail(f"{option}: {text!r} must be 0 or more")
    if not text.strip().endswith("%") and value >= 1:  # "25" read as +2500%: most likely 25% meant
        fail(f"{option}: {text!r} would be +{value:.0%}: write {text.strip()}% (or {value:.0%} if that is meant)")
    return value


def _ceil_size(num_bytes: int | None) -> str:
    """A --budget of at least `num_bytes`, rounded up to two decimals of its unit ("6.89MB", "11.88GB")."""
    if num_bytes is None:
        return "?"
    unit, scale = next(((u, s) for u, s in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)) if num_bytes >= s), ("B", 1))
    if scale == 1:
        return f"{num_bytes}B"
    step = scale // 100
    return f"{(num_bytes + step - 1) // step / 100:.2f}{unit}"


def _fmt(num_bytes: int | None) -> str:
    return format_bytes(num_bytes) if num_bytes is not None else "unknown"


def _fmt_overhead(overhead: float | None) -> str:
    return f"{overhead:+.1%}" if overhead is not None else "-"


def _plan_summary(plan, wall_s: float) -> dict:
    graph, sim = plan.graph, plan.simulation
    return {
        "model": graph.meta.get("model"),
        "batch": graph.meta.get("batch"),
        "seq": graph.meta.get("seq"),
        "device": graph.meta.get("device"),
        "precision": graph.meta.get("precision"),
        "optimizer": graph.meta.get("optimizer"),
        "gradients": graph.gradients,
        "budget_bytes": plan.budget_bytes,
        "fixed_bytes": graph.fixed.total_bytes,
        "fixed": {"parameters": graph.fixed.parameter_bytes, "gradients": graph.fixed.gradient_bytes,
                  "optimizer": graph.fixed.optimizer_bytes, "inputs": graph.fixed.input_bytes},
        "solver": plan.method if plan.schedule is not None else None,  # infeasible: no method's plan to name
        "status": plan.status,
        "peak_bytes": sim.peak_bytes if sim else None,
        "compute_s": sim.compute_s if sim else None,
        "store_all_s": plan.store_all.compute_s,
        "store_all_peak_bytes": plan.store_all.peak_bytes,
        "overhead": plan.overhead,
        "lower_bound_s": plan.lower_bound_s,
        "lower_bound_method": plan.lower_bound_method or None,
        "gap": plan.gap,
        "wall_s": wall_s,
        "nodes": len(graph),
        "coarse_nodes": plan.coarse_nodes,
        "split": graph.meta.get("split"),
        "split_note": graph.meta.get("split_note"),
        "min_feasible_bytes": plan.min_feasible_bytes,
        "min_budget_lower_bound_bytes": plan.min_budget_lower_bound_bytes,
        "recomputed_nodes": len(plan.schedule.recomputed_nodes()) if plan.schedule else None,
        "graph_hash": graph.content_hash,
        "message": plan.message,
        "candidates": [
            {"method": c.method, "wall_s": c.wall_s,
             "status": reported_status(c.status, c.simulation is not None, c.fits(plan.budget_bytes)),
             "peak_bytes": c.simulation.peak_bytes if c.simulation else None,
             "compute_s": c.simulation.compute_s if c.simulation else None,
             "fits": c.fits(plan.budget_bytes)}
            for c in plan.candidates
        ],
    }


def _print_plan(plan, wall_s: float, out: str | None, share: str | None = None, share_of: int | None = None,
                traced_overhead: float | None = None) -> None:
    from remat.split import Split

    console = _console()
    graph, fixed, sim = plan.graph, plan.graph.fixed, plan.simulation
    meta = graph.meta
    forward = len(graph.forward_nodes)
    console.print(f"[bold]{escape(str(meta.get('model')))}[/]: {escape(meta.get('description', ''))}")
    # image models have no seq; a factory's inputs may have no batch dimension to read its batch from
    shape = "".join(f"{k} {meta[k]}, " for k in ("batch", "seq") if meta.get(k) is not None)
    console.print(f"  {shape}{meta.get('precision')}, "
                  f"optimizer {meta.get('optimizer')}{graph.gradients_note}, costed for {meta.get('device')}")
    of = f" ({share.strip()} of the traced step's store-all peak, {format_bytes(share_of)})" if share else ""
    console.print(f"budget         {format_bytes(plan.budget_bytes)} = {plan.budget_bytes:,} bytes{of}")
    console.print(f"fixed memory   {format_bytes(fixed.total_bytes)} = parameters {format_bytes(fixed.parameter_bytes)}"
                  f" + gradients {graph.gradient_memory} + optimizer {format_bytes(fixed.optimizer_bytes)}"
                  f" + inputs {format_bytes(fixed.input_bytes)}")
    left = plan.budget_bytes - fixed.total_bytes
    console.print(f"activations    {format_bytes(left)} of the budget left for activations" if left >= 0 else
                  f"activations    none: the budget is {format_bytes(-left)} below fixed memory")
    console.print(f"graph          {len(graph)} nodes ({forward} forward, {len(graph) - forward} backward)"
                  + (f", solved as {plan.coarse_nodes} coarse nodes" if plan.coarse_nodes else "")
                  + f", hash {graph.content_hash}")
    split = Split.from_meta(meta["split"]) if meta.get("split") else None
    if meta.get("split_note"):
        console.print(f"split          {split.describe() if split else 'none'} ({escape(meta['split_note'])})")
    with_split = f" with the {split.short()}" if split else ""
    console.print(f"store-all      peak {format_bytes(plan.store_all.peak_bytes)}, "
                  f"{format_seconds(plan.store_all.compute_s)} per step (no rematerialization{with_split})")
    if plan.min_feasible_bytes is None and plan.budget_bytes < fixed.total_bytes:
        console.print(f"minimum budget not searched: the budget is below fixed memory, "
                      f"{format_bytes(fixed.total_bytes)}, which every schedule holds")
    else:
        # the floor is the lowest over the chunk counts traced, which need not be the plan's
        floor_at = meta.get("floor_at", with_split.strip() or "unsplit")
        console.print(f"minimum budget {_fmt(plan.min_feasible_bytes)} is the lowest peak found "
                      f"(no schedule fits below {format_bytes(plan.min_budget_lower_bound_bytes)}: "
                      f"{plan.min_budget_lower_bound_why}{'' if floor_at == 'unsplit' else ' ' + floor_at})")
    if sim is None:
        console.print(f"[bold red]plan           none fits[/]: {escape(plan.message)}")
    else:
        console.print(f"[bold]plan[/]           {plan.method} ({plan.status}): peak {format_bytes(sim.peak_bytes)}, "
                      f"{format_seconds(sim.compute_s)} per step, " + _overhead_words(plan, split, traced_overhead))
        bound = "unknown" if plan.lower_bound_s is None else format_seconds(plan.lower_bound_s)
        gap = "unknown" if plan.gap is None else f"{plan.gap:.2%}"
        proof = f" ({plan.lower_bound_method})" if plan.lower_bound_method else ""
        console.print(f"bound          {bound} lower bound on the optimal step time{proof}, gap {gap}")
        if _cut_short(plan):
            console.print("hint           the time limit cut the lower bound short, so the true gap may be smaller: "
                          "a longer --time-limit tightens the bound and may find a cheaper plan")
        if plan.message:
            console.print(f"note           {escape(plan.message)}")
        _print_recomputed(console, plan)
    # (with a split, the baselines run on the split step too, and overheads are against its store-all: `remat compare`
    # runs them on the step as traced, and a reader took one table's per-block for the other's)
    on = f"the step{with_split}, overheads against its own store-all" if split else "this graph"
    table = Table(title=f"every method on {on} (simulated)", title_justify="left",
                  caption="* the plan" if plan.schedule is not None else None, caption_justify="left")
    for column in ("method", "status", "peak", "step time", "overhead", "fits", "wall"):
        table.add_column(column, justify="left" if column in ("method", "status") else "right")
    runs: Counter[str] = Counter()
    for c in plan.candidates:
        s = c.simulation
        runs[c.method] += 1  # cover-round runs again on the incumbents of the bound's second solve
        label = c.method if runs[c.method] == 1 else f"{c.method} (run {runs[c.method]})"
        chosen = c.schedule is not None and c.schedule is plan.schedule
        # the plan's row says what the bound proves (optimal); the others, what their own solve said
        status = plan.status if chosen else reported_status(c.status, s is not None, c.fits(plan.budget_bytes))
        table.add_row(f"{label} *" if chosen else label, status,
                      _fmt(s.peak_bytes) if s else "-",
                      format_seconds(s.compute_s) if s else "-",
                      _fmt_overhead(overhead_of(s.compute_s if s else None, plan.store_all.compute_s)),
                      "yes" if c.fits(plan.budget_bytes) else "no", f"{c.wall_s:.1f} s")
    if plan.candidates:  # (none below fixed memory: an empty table was printed)
        console.print(table)
    console.print(f"wall time      {wall_s:.1f} s" + (f"; plan written to {out}" if out and plan.schedule else ""))


def _overhead_words(plan, split, traced_overhead: float | None) -> str:
    """A split plan's overhead against the step as traced first: that is what the user runs without remat (the split
    step's own store-all is slower where its chunks are small: gpt2-tiny at 40 MB, +177.3% against +48.25%)."""
    if split is None or traced_overhead is None:
        return f"overhead {plan.overhead:+.2%} vs store-all"
    return f"overhead {traced_overhead:+.2%} vs store-all as traced ({plan.overhead:+.2%} vs the split step's own)"


def _print_recomputed(console: Console, plan) -> None:
    graph, schedule = plan.graph, plan.schedule
    counts = schedule.compute_counts()
    again = [i for i, c in enumerate(counts) if c > 1]
    if not again:
        console.print("recomputed     nothing")
        return
    extra = sum((counts[i] - 1) * graph.nodes[i].compute_s for i in again)
    by_op = Counter(graph.nodes[i].op.removeprefix("aten.").split(".")[0] for i in again)
    ops = ", ".join(f"{op} x{n}" for op, n in by_op.most_common(6))
    console.print(f"recomputed     {len(again)} of {len(graph.forward_nodes)} forward nodes, "
                  f"{sum(counts[i] - 1 for i in again)} extra runs, +{format_seconds(extra)}: {ops}")


def _sizes(text: str) -> list[str]:
    """The comma-separated budgets, each checked now (a typo fails before the trace) and resolved after it: a
    percentage is of the traced step's store-all peak."""
    parts = [part.strip() for part in text.split(",") if part.strip()] or [text]
    try:
        for part in parts:
            parse_size(part, reference_bytes=FORMAT_ONLY)
    except ValueError as error:
        fail(f"--budget: {error}")
    return parts


def _split_tracer(model, batch, seq, precision, device, optimizer, gradients="held"):
    """The step traced on fake tensors, with its split variants traced on demand (remat.split_plan)."""
    from remat.split_plan import SplitTracer

    with _tracing(model, batch):
        return SplitTracer.zoo(model, batch=batch, seq=seq, precision=precision, device=device, optimizer=optimizer,
                               gradients=gradients)


def _trace_step(model, batch, seq, precision, device, optimizer):
    from remat.trace import trace_step

    with _tracing(model, batch):
        return trace_step(model, batch=batch, seq=seq, precision=precision, device=device, optimizer=optimizer)


def _batch_note(batch: int | None) -> str:
    return f" (batch {batch})" if batch is not None else ""


def _console() -> Console:
    """stdout's console: lines printed whole (soft_wrap), tables as wide as the terminal, or 140 columns in a pipe
    (where rich would take 80)."""
    return Console(highlight=False, emoji=False, soft_wrap=True, width=shutil.get_terminal_size((140, 24)).columns)


@main.command()
@MODEL_OPTION
@click.option("--budget", required=True,
              help="One size or several, comma-separated: 12GB,16GB,24GB, or shares of the store-all peak: 60%,80%.")
@BATCH_OPTION
@SEQ_OPTION
@DEVICE_OPTION
@PRECISION_OPTION
@OPTIMIZER_OPTION
@click.option("--solvers", default="auto,store-all,checkpoint-all,chen-sqrtn,per-block,compile-budget",
              show_default=True,
              help="Methods to compare: remat's planners (auto: as remat solve plans; checkmate, decompose, lp-round, "
                   "cpsat), baselines, compile-budget[-B].")
@click.option("--time-limit", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds for each remat planner's plan at each budget, as solve's --time-limit (tracing the "
                   "split steps counts); --max-batch probes get it too, at most 10 s.")
@click.option("--max-batch", "with_max_batch", is_flag=True,
              help="Add each row's largest batch under its budget (traces the model at more batches).")
@click.option("--out", type=click.Path(dir_okay=False), callback=_output_file,
              help="Write a self-contained HTML report (plots inlined).")
@click.option("--md", type=click.Path(dir_okay=False), callback=_output_file,
              help="Write a Markdown report, its PNG plots beside it.")
@GRADIENTS_OPTION
@JSON_OPTION
def compare(model, budget, batch, seq, device, precision, optimizer, solvers, time_limit, with_max_batch, out, md,
            gradients, as_json) -> None:
    """Compare methods (remat's plan, baselines, torch.compile's budgets) on MODEL at one or more BUDGETs."""
    from remat.compare import compare as compare_methods
    from remat.compare import parse_methods
    from remat.maxbatch import BatchTraces

    started = time.perf_counter()
    budgets = _sizes(budget)
    try:
        methods = parse_methods(solvers.split(","))
    except ValueError as error:
        fail(f"--solvers: {error}")
    with _stdout_to_stderr():
        traced = _split_tracer(model, batch, seq, precision, device, optimizer, gradients)  # plans may split the head
        budgets = [traced.budget_bytes(part) for part in budgets]
        _note_over_device(max(budgets), device)
        with stderr.status("comparing", spinner="dots") as status:
            traces = None
            if with_max_batch:
                traces = BatchTraces(model, seq, precision, device, optimizer, gradients=gradients,
                                     on_trace=lambda b: status.update(f"comparing: tracing batch {b}"))
            with _one_line_errors():  # another batch's trace (--max-batch)
                comparison = compare_methods(traced, budgets, methods, time_limit_s=time_limit,
                                             progress=lambda stage: status.update(f"comparing: {stage}"),
                                             batch_traces=traces, probe_time_limit_s=min(time_limit, 10.0))
        written = []
        if out or md:
            from remat.report import write_reports

            with stderr.status("plotting", spinner="dots"), _writing("the report"):
                written = write_reports(comparison, out, md)
    wall_s = time.perf_counter() - started
    if as_json:
        # wall_s: the whole command, tracing included, as every command's JSON; compare_wall_s: the report's figure
        click.echo(json.dumps({**comparison.to_json(), "wall_s": wall_s, "compare_wall_s": comparison.wall_s,
                               "files": [str(p) for p in written]}))
        return
    from remat.report import cells, headers, notes, summary_lines

    console = _console()
    for line in summary_lines(comparison):
        console.print(line)
    table = Table(title="methods x budgets (simulated)", title_justify="left")
    columns = headers(comparison)
    for header in columns:
        table.add_column(header, justify="left" if header in ("method", "status", "schedule") else "right")
    for row in comparison.rows:
        table.add_row(*cells(row, "max batch" in columns), style=None if row.fits else "dim")
    console.print(table)
    for note in notes(comparison):
        console.print(f"note: {escape(note)}")
    console.print(f"wall time {wall_s:.1f} s" + (f"; wrote {', '.join(str(p) for p in written)}" if written else ""))


@main.command()
@MODEL_OPTION
@click.option("--budget", required=True, help="Whole device memory for the step: 16GB (1e9 bytes), 16GiB (2^30).")
@SEQ_OPTION
@click.option("--start-batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="The search doubles from here (or tries 1 where it does not fit).")
@DEVICE_OPTION
@PRECISION_OPTION
@OPTIMIZER_OPTION
@click.option("--solvers", default="store-all,per-block,compile-budget,auto", show_default=True,
              help="Methods: baselines, compile-budget (best of 1.0/0.5/0.2/0.0) or compile-budget-B, "
                   "auto (remat solve's planner) or another of remat's planners.")
@click.option("--time-limit", default=20.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds for a MILP solve at one batch (only where no other method's schedule fits).")
@click.option("--max-overhead", default=None,
              help="Count only schedules at most this much slower than store-all at the same batch: 25% or 0.25.")
@GRADIENTS_OPTION
@JSON_OPTION
def maxbatch(model, budget, seq, start_batch, device, precision, optimizer, solvers, time_limit, max_overhead,
             gradients, as_json) -> None:
    """The largest batch each method fits under BUDGET (fixed memory counted), with its overhead there."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from remat.maxbatch import BatchTraces, max_batch, parse_methods

    started = time.perf_counter()
    if is_share(budget):
        fail(f"--budget: maxbatch needs a size such as 16GB, not a share ({budget}): the store-all peak a share would "
             "be of grows with the batch")
    try:
        budget_bytes = parse_size(budget)
    except ValueError as error:
        fail(f"--budget: {error}")
    _note_over_device(budget_bytes, device)
    try:
        methods = parse_methods(solvers.split(","))
    except ValueError as error:
        fail(f"--solvers: {error}")
    overhead_cap = _fraction(max_overhead, "--max-overhead") if max_overhead is not None else None
    results = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with _stdout_to_stderr(), Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("")
        traces = BatchTraces(model, seq, precision, device, optimizer, gradients=gradients)
        for method in methods:
            progress.update(task, description=f"{method}: searching")
            traces.on_trace = lambda b, m=method: progress.update(task, description=f"{m}: tracing batch {b}")
            with _one_line_errors():
                results.append(max_batch(traces, method, budget_bytes, start=start_batch, time_limit_s=time_limit,
                                         max_overhead=overhead_cap))
    wall_s = time.perf_counter() - started
    graph = next(iter(traces.graphs.values()))
    if as_json:
        click.echo(json.dumps({"model": model, "seq": graph.meta.get("seq"), "device": graph.meta.get("device"),
                               "precision": precision, "optimizer": optimizer, "gradients": gradients,
                               "budget_bytes": budget_bytes,
                               "max_overhead": overhead_cap, "results": [r.to_json() for r in results],
                               "wall_s": wall_s}))
    else:
        _print_max_batches(model, graph, precision, optimizer, budget_bytes, overhead_cap, results, wall_s)
    if budget_bytes < graph.fixed.state_bytes:  # max_batch answered 0 after one trace (it searched 137 s before)
        fail(f"no batch fits {format_bytes(budget_bytes)} ({budget_bytes} bytes) for {model}: "
             f"{_below_model_state(graph)}")


def _probe_mark(probe, budget_bytes: int) -> str:
    """"" for a batch that fits; "s" for one whose schedules fit the memory but not the overhead cap (they were
    marked as not fitting: per-block at batch 1, +26% against a cap of +25%); "x" for one that does not fit."""
    if probe.fits:
        return ""
    return "s" if probe.peak_bytes is not None and probe.peak_bytes <= budget_bytes else "x"


def _print_max_batches(model, graph, precision, optimizer, budget_bytes, overhead_cap, results, wall_s) -> None:
    console = _console()
    console.print(f"[bold]{model}[/]: {graph.meta.get('description', '')}; {precision}, optimizer {optimizer}"
                  f"{graph.gradients_note}, costed for {graph.meta.get('device')}")
    console.print(f"budget {format_bytes(budget_bytes)} = {budget_bytes:,} bytes, fixed memory counted (it grows "
                  "with the batch only through the inputs)")
    if overhead_cap is not None:
        console.print(f"only schedules at most {overhead_cap:+.0%} slower than store-all at the same batch count")
    table = Table(title="largest batch under the budget (simulated)", title_justify="left")
    for column in ("method", "max batch", "schedule", "peak", "step time", "overhead", "samples/s", "batches tried",
                   "wall"):
        table.add_column(column, justify="left" if column in ("method", "schedule", "batches tried") else "right")
    for r in results:
        tried = " ".join(f"{p.batch}{_probe_mark(p, budget_bytes)}" for p in r.probes)
        table.add_row(r.method, f"{r.batch}{'+' if r.capped else ''}", r.schedule_from or "-",
                      _fmt(r.peak_bytes) if r.peak_bytes is not None else "-",
                      format_seconds(r.compute_s) if r.compute_s is not None else "-",
                      _fmt_overhead(r.overhead),
                      f"{r.samples_per_s:,.0f}" if r.samples_per_s else "-", tried, f"{r.wall_s:.1f} s")
    console.print(table)
    slow_mark = "; s = fits, but only over the overhead cap" if overhead_cap is not None else ""
    # a remat planner's x is a search cut short at --time-limit: a probe above it may still fit (a 34-node MLP at
    # 3 s: 4210x, then 5000 fit)
    planners = [r.method for r in results if r.method not in BASELINES and not r.method.startswith("compile-")]
    # (below the model's state nothing is searched: the error after the table says why)
    searched = (f" ({', '.join(planners)}: none found in --time-limit)"
                if planners and budget_bytes >= graph.fixed.state_bytes else "")
    console.print(f"batches tried: x = does not fit{searched}{slow_mark}; overhead is against store-all's step time "
                  f"at the same batch; wall time {wall_s:.1f} s")
    named = [r.method for r in results if r.method in BASELINES]
    if named:  # `remat solve --solver NAME` may split the step where this table's row does not fit
        console.print(f"{', '.join(named)}: {'its' if len(named) == 1 else 'their'} own schedule of the step as "
                      "traced; `remat solve --solver NAME --batch B` also tries it with the loss head in chunks, "
                      "which can fit a larger batch")
    slow = [r for r in results if r.overhead is not None and r.overhead > SLOW_BATCH_OVERHEAD]
    if overhead_cap is None and slow:  # the largest batch can be the one that recomputes everything
        times = ", ".join(f"{1 + r.overhead:,.1f} x for {r.method}" for r in slow)
        console.print(f"hint: the largest batch is not the fastest: a step there takes store-all's time {times}; "
                      "--max-overhead 25% finds the largest batch within +25%")


@main.command()
@MODEL_OPTION
@click.option("--out", required=True, type=click.Path(dir_okay=False), callback=_output_file,
              help="Profile JSON to write.")
@BATCH_OPTION
@SEQ_OPTION
@PRECISION_OPTION
@click.option("--base", default="auto", show_default=True,
              help="Roofline profile for ops without a measurement (h100, a100, v100; auto: from the GPU's name).")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0),
              help="Untimed runs of each op before it is timed.")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1),
              help="Timed runs of each op (CUDA events); the median is kept.")
@JSON_OPTION
def profile(model, out, batch, seq, precision, base, warmup, repeats, as_json) -> None:
    """Measure every op of MODEL's training step on this CUDA GPU; `remat solve --device OUT` then uses it."""
    import torch

    if not torch.cuda.is_available():
        fail("remat profile measures op times on a CUDA GPU and torch sees none here "
             "(torch.cuda.is_available() is False); run it on the GPU you plan for")
    from remat.cost import load_profile
    from remat.profile import base_profile_for, measure_ops, profile_json, write_profile

    started = time.perf_counter()
    gpu = torch.cuda.get_device_name()
    base_name = base_profile_for(gpu) if base == "auto" else base
    try:
        base_profile = load_profile(base_name)
    except ValueError as error:
        fail(f"--base: {error}")
    with _stdout_to_stderr():
        traced = _trace_step(model, batch, seq, precision, base_name, "adamw")
        with stderr.status("measuring", spinner="dots") as status:
            measurement = measure_ops(traced.step, "cuda", warmup, repeats,
                                      progress=lambda done, total: status.update(f"measuring op {done}/{total}"))
    meta = {k: traced.graph.meta.get(k) for k in ("model", "batch", "seq", "precision")}
    name = f"{base_name}-{Path(out).stem}"
    data = profile_json(base_profile, measurement, name, {**meta, "gpu": gpu, "torch": torch.__version__,
                                                            "warmup": warmup, "repeats": repeats})
    with _writing("the profile"):
        write_profile(out, data)
    wall_s = time.perf_counter() - started
    summary = {"profile": str(out), "name": name, "gpu": gpu, "base": base_name, "ops": measurement.ops,
               "measured": len(measurement.measured_s), "unmeasured": len(measurement.failed),
               "measured_s_total": sum(measurement.measured_s.values()), "wall_s": wall_s}
    if as_json:
        click.echo(json.dumps(summary))
        return
    console = _console()
    console.print(f"{gpu}: {len(measurement.measured_s)} distinct ops measured ({measurement.ops} ops in the graph), "
                  f"{len(measurement.failed)} left to the {base_name} roofline; wrote {out} in {wall_s:.1f} s")
    batch_flag = f" --batch {meta['batch']}" if meta.get("batch") is not None else ""
    console.print(f"use it: remat solve --model {model}{batch_flag} --device {out} --budget ...")


@main.command()
@MODEL_OPTION
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False),
              help="A plan file from `remat solve --out` (refused if the model traces to another graph).")
@click.option("--budget", help="Plan here instead: whole step memory, 16GB, 16GiB, or 60% of store-all.")
@click.option("--batch", default=None, type=click.IntRange(min=1),
              help="Batch size [default: the plan file's; else 16, or a file.py:factory's own batch= default].")
@click.option("--seq", default=None, type=click.IntRange(min=1),
              help="Sequence length [default: the plan file's, or the model's context].")
@click.option("--precision", default=None, type=click.Choice(PRECISIONS),
              help="[default: the plan file's, or bf16-mixed]")
@click.option("--optimizer", default=None, type=click.Choice(OPTIMIZERS),
              help="The optimizer stepped, and whose state the plan holds [default: the plan file's, or adamw].")
@click.option("--gradients", default=None, type=click.Choice(GRADIENTS),
              help="As for solve, with --budget [default: the plan file's, or held].")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(min=1), help="Training steps.")
@click.option("--time-limit", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds for the solve, with --budget.")
@JSON_OPTION
def run(model, plan_path, budget, batch, seq, precision, optimizer, gradients, steps, time_limit, as_json) -> None:
    """Train MODEL (a zoo model or a file.py:factory) for a few steps on this machine with a plan, and measure the
    memory it holds.

    CUDA when available (torch.cuda.max_memory_allocated), else CPU (live storages counted as the
    planned graphs run). The first step is measured against the plan's simulated peak.
    """
    import torch

    from remat.capture import Call
    from remat.models import build_model
    from remat.training import PlanFile, apply

    if (plan_path is None) == (budget is None):
        fail("give either --plan FILE or --budget SIZE")
    made_with = {}
    if plan_path is not None:
        with _one_line_errors():
            made_with = PlanFile.load(plan_path).graph_meta
    if plan_path is not None:
        made_with.setdefault("gradients", "held")  # (a plan file names them only where they are not held)
    planned_for = made_with.get("model")
    if planned_for != model and (planned_for in ZOO_NAMES or ":" in str(planned_for)):  # made by `remat solve --out`
        # (its --seq would be taken for this model too: "--seq applies to language models only" for a plan of gpt2)
        fail(f"the plan was made for --model {planned_for}, not {model}: plan this one with `remat solve --out`")
    for name, value in (("precision", precision), ("optimizer", optimizer), ("gradients", gradients)):
        if value is not None and made_with.get(name, value) != value:  # the plan would be refused, or run unasked
            fail(f"the plan was made for --{name} {made_with[name]}: leave --{name} out, or plan again with it")
    precision = precision or made_with.get("precision", "bf16-mixed")
    optimizer = optimizer or made_with.get("optimizer", "adamw")
    gradients = gradients or made_with.get("gradients", "held")  # as solve plans (apply's "auto" would see the loop)
    # the plan's batch and sequence length, unless given (a plan made at --batch 4 was refused for the default 16)
    batch = batch or made_with.get("batch")
    seq = seq or made_with.get("seq")
    where = "cuda" if torch.cuda.is_available() else "cpu"
    with stderr.status(f"building {model}{_batch_note(batch)} on {where}", spinner="dots") as status, \
            _one_line_errors():
        spec = build_model(model, batch=batch, seq=seq)
        spec.model.to(where)
        call = Call.of(spec.example_inputs)  # a factory's inputs, in order or by name
        args, kwargs = call.with_tensors([x.to(where) for x in call.tensors])
        status.update("tracing and planning the step")
        with _stdout_to_stderr():
            planned = apply(spec.model, budget=budget, example_inputs=kwargs or args, plan=plan_path,
                            loss_fn=spec.loss_fn, precision=precision, optimizer=optimizer,
                            gradients=gradients, time_limit=time_limit)
    step = planned.planned
    optimizer = _torch_optimizer(optimizer, spec.model.parameters())
    losses, step_s = [], []
    for index in range(steps):
        started = time.perf_counter()
        if index == 0:
            loss, memory = planned.measure(*args, **kwargs)
        else:  # the loss, whatever the model returns around it (a dict, a Hugging Face output object)
            loss = planned.run_step(*args, **kwargs)
        if optimizer is not None:
            optimizer.step()
        spec.model.zero_grad()
        losses.append(loss.sum().item())  # a model that returns logits: their sum, the loss measure() ran
        step_s.append(time.perf_counter() - started)
    sim = step.simulation
    summary = {"model": model, "batch": spec.batch, "device": where, "method": step.plan.method,
               "nodes": len(step.graph),
               "recomputed_nodes": len(step.plan.schedule.recomputed_nodes()), "planned_peak_bytes": sim.peak_bytes,
               "planned_activation_bytes": sim.activation_peak_bytes, "measured_peak_bytes": memory.peak_bytes,
               "measured_activation_bytes": memory.peak_live_bytes, "losses": losses, "step_s": step_s}
    if as_json:
        click.echo(json.dumps(summary))
        return
    console = _console()
    console.print(f"{model} batch {spec.batch} on {where}: plan {step.plan.method}, {len(step.graph)} nodes, "
                  f"{summary['recomputed_nodes']} recomputed")
    console.print(f"planned peak {_fmt(sim.peak_bytes)} (activations {_fmt(sim.activation_peak_bytes)}); measured "
                  f"{_fmt(memory.peak_bytes)} (activations {_fmt(memory.peak_live_bytes)})")
    for index, (value, seconds) in enumerate(zip(losses, step_s, strict=True)):
        console.print(f"step {index}: loss {value:.4f}  {seconds * 1e3:.0f} ms")


def _torch_optimizer(name: str, parameters):
    """The optimizer `remat run` steps: the one whose state the plan holds (--optimizer)."""
    import torch

    if name == "none":
        return None
    if name in ("adamw", "adam"):
        return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(parameters, lr=1e-4)
    return torch.optim.SGD(parameters, lr=1e-3, momentum=0.9 if name == "sgd-momentum" else 0.0)


if __name__ == "__main__":
    main()
