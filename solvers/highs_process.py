"""HiGHS in a process of its own, stopped at its time limit whatever it is doing.

HiGHS checks its clock at some points only. On covering models it has run minutes past its limit: BERT-base's
(100k non-zeros) in the MIP presolve's strengthenInequalities, an LSTM LM's (1M) in the presolve of a RENS sub-MIP,
gpt2-medium's in the MIP's presolve after a restart, and an LP relaxation given 1.8 s took 10 s;
`Highs.cancelSolve()` from another thread did not stop the RENS one (docs/solvers.md, "HiGHS past its time
limit"). A time limit is a promise, so models of LARGE_MODEL_NONZEROS or more are solved in a child process
(`python -m solvers.highs_process`) that sends each improving solution back as it is found and is killed GRACE_S
(or GRACE_SHARE of the limit, if more) after its deadline: the incumbents it sent are kept, and so is the last
dual bound it reported. Smaller models (solved in well under a second) stay in-process, where a child's start-up
(about 0.3 s) would cost more than it guards against.

The child imports highspy and numpy only. Messages on its stdout are pickled tuples:
("incumbent", values) for each improving MIP solution, ("bound", dual bound) at most every BOUND_EVERY_S,
and ("done", result) at the end; HiGHS's own output goes to stderr when verbose, else nowhere.
"""

from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LARGE_MODEL_NONZEROS = 20_000  # models at least this large are solved in a child process
GRACE_S = 1.0  # how long past its deadline the child may run before it is killed...
GRACE_SHARE = 0.1  # ...or this share of its time limit, if more
BOUND_EVERY_S = 0.5
CHILD_COMMAND = (sys.executable, "-m", "solvers.highs_process")


@dataclass
class HighsArrays:
    """A MILP or LP as HiGHS takes it: columns with costs and bounds, rows in compressed sparse row form."""

    costs: np.ndarray  # float64, one per column
    lower: np.ndarray  # float64; -inf / inf where unbounded
    upper: np.ndarray
    integers: np.ndarray  # int32: the integer columns
    row_lower: np.ndarray  # float64, one per row
    row_upper: np.ndarray
    starts: np.ndarray  # int32: where each row's entries start
    columns: np.ndarray  # int32: each entry's column
    coefficients: np.ndarray  # float64: each entry's value

    @property
    def nonzeros(self) -> int:
        return len(self.columns)


@dataclass
class HighsResult:
    """What one HiGHS run ended with, in plain values (the same in-process and from a child)."""

    model_status: str  # HighsModelStatus's name: "kOptimal", "kTimeLimit", "kInfeasible", ...
    status_text: str  # HiGHS's words for it: "Optimal", "Time limit reached", ...
    primal_feasible: bool  # whether values is a feasible solution
    objective: float | None
    dual_bound: float | None  # the MIP's dual bound (an LP's objective); None when not finite or unknown
    values: np.ndarray | None  # column values
    stopped: str = ""  # how a child that sent no result ended: killed past its deadline, or failed


def load(highs, model: HighsArrays, mip: bool) -> None:
    """Add `model` to an empty highspy.Highs, in one call for the columns, one for their integrality and one
    for the rows (one call each took a second on 100 nodes)."""
    import highspy

    no_entries = np.zeros(0, dtype=np.int32)
    highs.addCols(len(model.costs), model.costs, model.lower, model.upper, 0,
                  np.zeros(len(model.costs), dtype=np.int32), no_entries, np.zeros(0, dtype=np.float64))
    if mip and len(model.integers):
        kinds = np.full(len(model.integers), int(highspy.HighsVarType.kInteger), dtype=np.uint8)
        highs.changeColsIntegrality(len(model.integers), model.integers, kinds)
    highs.addRows(len(model.row_lower), model.row_lower, model.row_upper, model.nonzeros, model.starts,
                  model.columns, model.coefficients)


def result_of(highs, mip: bool) -> HighsResult:
    """The outcome of a finished highs.run(), in plain values."""
    import highspy

    info, status = highs.getInfo(), highs.getModelStatus()
    feasible = info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible
    bound = info.mip_dual_bound if mip else info.objective_function_value
    return HighsResult(
        model_status=status.name, status_text=highs.modelStatusToString(status),
        primal_feasible=feasible,
        objective=info.objective_function_value if feasible else None,
        dual_bound=bound if np.isfinite(bound) else None,
        values=np.asarray(highs.getSolution().col_value, dtype=np.float64) if feasible else None)


def grace_s(limit_s: float) -> float:
    return max(GRACE_S, GRACE_SHARE * limit_s)


def solve_in_child(model: HighsArrays, mip: bool, options: dict[str, object], start: Sequence[float] | None,
                   deadline: float, on_incumbent: Callable[[Sequence[float]], None] | None = None,
                   verbose: bool = False) -> HighsResult:
    """Run HiGHS on `model` in a child process until `deadline` (a time.perf_counter() value), with HiGHS's
    `options` (by their HiGHS names) and a starting solution; `on_incumbent` gets each improving solution's
    values here, as they come. The child is killed grace_s() past the deadline: the result is then the last
    incumbent (status "kTimeLimit") and the last dual bound it sent."""
    left = deadline - time.perf_counter()
    request = {"model": model, "mip": mip, "options": options, "start": None if start is None else list(start),
               "deadline": time.monotonic() + left, "verbose": verbose}  # time.monotonic: one clock for both
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(CHILD_COMMAND, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=None if verbose else errors, cwd=root)
        messages: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_read_messages, args=(child.stdout, messages), daemon=True)
        reader.start()
        try:
            pickle.dump(request, child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            child.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the child ended before it read the model: its stderr says why
        best, bound, stop_at = None, None, deadline + grace_s(left)
        finished: HighsResult | None = None
        killed = False
        try:
            while True:
                try:
                    message = messages.get(timeout=max(0.0, stop_at - time.perf_counter()))
                except queue.Empty:
                    killed = True
                    break
                if message is None:  # the child's stdout closed
                    break
                kind, data = message
                if kind == "incumbent":
                    best = data
                    if on_incumbent is not None:
                        on_incumbent(data)
                elif kind == "bound":
                    bound = data
                elif kind == "done":
                    finished = data
                    break
        finally:  # also when this process is interrupted: never leave a solver running behind
            if child.poll() is None:
                child.kill()
            child.wait()
        if finished is not None:
            return finished
        if killed:
            how, status, text = f"stopped {time.perf_counter() - deadline:.1f} s past its time limit", \
                "kTimeLimit", "Time limit reached"
        else:  # it ended without a result: a crash, which the caller treats as HiGHS's solve error
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            how, status, text = f"the HiGHS process failed (exit status {child.returncode}: {tail[0]})", \
                "kSolveError", "Solve error"
    objective = None if best is None else float(np.dot(model.costs, best))
    return HighsResult(status, text, best is not None, objective, bound, best, stopped=how)


def _read_messages(stream, messages: queue.Queue) -> None:
    try:
        while True:
            messages.put(pickle.load(stream))
    except (EOFError, OSError, pickle.UnpicklingError):
        messages.put(None)


# --- the child --------------------------------------------------------------------------------------


def _main() -> None:
    out = os.fdopen(os.dup(1), "wb")  # the messages' stream; HiGHS prints to fd 1 from C++, so that goes elsewhere
    request = pickle.load(sys.stdin.buffer)
    os.dup2(2 if request["verbose"] else os.open(os.devnull, os.O_WRONLY), 1)
    lock = threading.Lock()  # HiGHS may call back from its worker threads

    def send(kind: str, data: object) -> None:
        with lock:
            pickle.dump((kind, data), out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()

    import highspy

    highs = highspy.Highs()
    highs.setOptionValue("output_flag", bool(request["verbose"]))
    for name, value in request["options"].items():
        highs.setOptionValue(name, value)
    model, mip = request["model"], request["mip"]
    load(highs, model, mip)
    if request["start"] is not None:
        solution = highspy.HighsSolution()
        solution.col_value = request["start"]
        solution.value_valid = True
        highs.setSolution(solution)
    last_sent = [0.0, None]

    def on_improving(event) -> None:
        send("incumbent", np.asarray(event.data_out.mip_solution, dtype=np.float64))

    def on_interrupt(event) -> None:  # called often during the MIP: pass on its dual bound now and then
        now, bound = time.monotonic(), event.data_out.mip_dual_bound
        if now - last_sent[0] >= BOUND_EVERY_S and bound != last_sent[1] and np.isfinite(bound):
            last_sent[0], last_sent[1] = now, bound
            send("bound", float(bound))

    if mip:
        highs.cbMipImprovingSolution.subscribe(on_improving)
        highs.cbMipInterrupt.subscribe(on_interrupt)
    highs.setOptionValue("time_limit", max(1e-3, request["deadline"] - time.monotonic()))
    highs.run()
    send("done", result_of(highs, mip))
    out.close()


if __name__ == "__main__":
    from solvers.highs_process import _main as main  # pickled results then name this module, not __main__

    main()
