"""The largest batch each method fits under a memory budget (fixed memory counted).

Every probe traces the model at that batch (fake tensors: no memory) and simulates the method's
schedule; the search doubles from a start batch until the answer changes (or, where the start does not
fit, tries batch 1), then narrows the bracket, guessing from the peaks probed so far (each step variant's
peak is affine in the batch) with bisection as the safeguard. It returns a batch that fits and a batch + 1
that does not, both probed.

Methods: any baseline by name, `compile-budget` (the best of torch.compile's budgets 1.0, 0.5, 0.2, 0.0),
`compile-budget-B`, and `auto` (the default: `remat solve`'s planner) or another of remat's planners
(checkmate, decompose, lp-round, cpsat): remat's plan, the cheapest schedule found among the MILP, every
baseline and torch's choices, so its largest batch is never below theirs. Like `remat solve`, remat's planners
may split the loss head into chunks (remat.split_plan) where the unsplit step does not fit: a batch fits if
some chunk count fits.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from remat.comparators import COMPILE_BUDGETS, COMPILE_PREFIX, compile_budget_candidate, compile_budget_of
from remat.graph import Graph
from remat.planner import Candidate, baseline_candidate, store_all_simulation
from remat.simulate import Simulation
from remat.split_plan import SplitTracer, Variant, solve_split, streamed_baselines, with_chunks
from remat.trace import TracedStep
from solvers.base import overhead_of
from solvers.baselines import BASELINES
from solvers.registry import MILP_SOLVERS

MAX_BATCH = 1 << 16  # the search stops here
MILP_METHODS = ("auto", *MILP_SOLVERS)  # remat's planners: checkmate, lp-round, cpsat, decompose, and auto


def parse_methods(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Method names for max_batch (`compile-budget` stays one method: the best of its budgets)."""
    methods = []
    for name in (n.strip() for n in names):
        if name not in (*MILP_METHODS, *BASELINES, COMPILE_PREFIX) and compile_budget_of(name) is None:
            known = ", ".join((*MILP_METHODS, *BASELINES, COMPILE_PREFIX, f"{COMPILE_PREFIX}-B"))
            raise ValueError(f"unknown method {name!r}: choose from {known} (B between 0 and 1)")
        methods.append(name)
    return tuple(dict.fromkeys(methods))


UNSPLIT = (1, 1, 1)  # the chunk counts (head, MLPs, attention) of the step as traced
VariantKey = tuple[int, int, int]


@dataclass(frozen=True)
class Probe:
    batch: int
    fits: bool
    peak_bytes: int | None  # the method's lowest peak at this batch, None if unknown
    # the lowest peak on each step variant tried (key: its chunk counts), for the next guess; where empty, the
    # probe's peak_bytes stands for one variant
    variant_peaks: dict[VariantKey, int] = field(default_factory=dict, compare=False)

    @property
    def peaks(self) -> dict[VariantKey, int]:
        if self.variant_peaks:
            return self.variant_peaks
        return {UNSPLIT: self.peak_bytes} if self.peak_bytes is not None else {}


@dataclass(frozen=True)
class MaxBatch:
    method: str
    budget_bytes: int
    batch: int  # 0: not even batch 1 fits
    schedule_from: str  # the method whose schedule runs at that batch ("compile-budget-0.5", "per-block", ...)
    peak_bytes: int | None
    compute_s: float | None
    store_all_s: float | None  # store-all's step time at that batch (the overhead reference)
    probes: tuple[Probe, ...]
    wall_s: float
    capped: bool = False  # the search stopped at MAX_BATCH
    max_overhead: float | None = None  # only schedules at most this much slower than store-all counted

    def to_json(self) -> dict:
        return {"method": self.method, "budget_bytes": self.budget_bytes, "max_batch": self.batch,
                "schedule_from": self.schedule_from, "peak_bytes": self.peak_bytes, "compute_s": self.compute_s,
                "store_all_s": self.store_all_s, "overhead": self.overhead, "samples_per_s": self.samples_per_s,
                "probes": [[p.batch, p.fits] for p in self.probes], "capped": self.capped, "wall_s": self.wall_s,
                "max_overhead": self.max_overhead}

    @property
    def overhead(self) -> float | None:
        return overhead_of(self.compute_s, self.store_all_s)

    @property
    def samples_per_s(self) -> float | None:
        return self.batch / self.compute_s if self.compute_s else None


def largest_batch(probe: Callable[[int], Probe], budget_bytes: int, start: int = 16,
                  cap: int = MAX_BATCH, base_bytes: int = 0) -> tuple[int, dict[int, Probe]]:
    """The largest batch b <= cap with probe(b).fits, where probe(b + 1) does not fit (or b == cap).
    Assumes fitting is monotone in the batch; the returned pair is probed either way. `base_bytes`: the memory
    no batch changes (parameters, gradients, optimizer state), where a variant's peak line starts."""
    probes: dict[int, Probe] = {}

    def at(batch: int) -> Probe:
        if batch not in probes:
            probes[batch] = probe(batch)
        return probes[batch]

    start = max(1, min(start, cap))
    lo, hi = 0, None  # lo fits (0 trivially), hi does not
    if at(start).fits:
        lo = start
        while hi is None:
            if lo == cap:
                return cap, probes
            nxt = min(2 * lo, cap)
            if at(nxt).fits:
                lo = nxt
            else:
                hi = nxt
    else:
        # batch 1 next: the cheapest probe settles "no batch fits" at once (a budget that leaves no room for
        # activations), and otherwise brackets the answer for the guesses below
        hi = start
        if start > 1 and at(1).fits:
            lo = 1
        else:
            return 0, probes
    # A guess is followed by bisection where its verdict was not the line's (wrong) or it did not halve the bracket
    # (slow), except that a slow guess's line may put the answer at an end of the bracket, which one probe settles:
    # an exact guess fits and leaves the bracket wide, and its neighbour above ends the search.
    wrong = slow = False
    while hi - lo > 1:
        guess = _guess(probes, lo, hi, budget_bytes, base_bytes)
        settles = guess is not None and (guess <= lo or guess >= hi - 1)
        if guess is None or wrong or (slow and not settles):
            mid, predicted = (lo + hi) // 2, None
        else:
            mid = min(max(guess, lo + 1), hi - 1)
            predicted = mid <= guess  # the line's verdict at mid
        width = hi - lo
        fits = at(mid).fits
        lo, hi = (mid, hi) if fits else (lo, mid)
        wrong = predicted is not None and fits != predicted
        slow = predicted is not None and hi - lo > width / 2
    return lo, probes


def _guess(probes: dict[int, Probe], lo: int, hi: int, budget_bytes: int, base_bytes: int) -> int | None:
    """The largest batch where some step variant's peak line stays within the budget. A variant's peak is affine in
    the batch (GPT-2's reaches and floors to the byte), but the variants differ: the lowest peak at one batch is on
    a variant another probe never tried (the walk stops at the first that fits), so one line through the lowest
    peaks at the bracket's ends mixed variants (gpt2 at 16 GB: 668, 846x, 776x before 706). A variant's line goes
    through its two probes nearest the bracket, or through its one probe and `base_bytes`.
    None where the peaks do not explain the verdicts: with --max-overhead a batch whose peak fits the memory fails
    for its step time, and guesses from peaks under the budget probed hi - 1 again and again (127x, 94x, 78x)."""
    low, high = probes[lo].peaks, probes[hi].peaks
    if not low or not high or min(low.values()) > budget_bytes or min(high.values()) <= budget_bytes:
        return None

    def distance(batch: int) -> int:
        return max(lo - batch, batch - hi, 0)

    guesses = []
    for key in {key for p in probes.values() for key in p.peaks}:
        points = sorted(((p.batch, p.peaks[key]) for p in probes.values() if key in p.peaks),
                        key=lambda point: distance(point[0]))[:2]
        (b1, p1), (b2, p2) = points if len(points) == 2 else [(0, base_bytes), points[0]]
        slope = (p2 - p1) / (b2 - b1)
        if slope > 0:
            guesses.append(math.floor(b1 + (budget_bytes - p1) / slope))
    return max(guesses) if guesses else None


# --- traces per batch ---------------------------------------------------------------------------


@dataclass
class BatchTraces:
    """Traces of one model at several batches: Graphs are kept, joint FX graphs (hundreds of MB for GPT-2) and
    split variants only for the last few batches, and re-traced when needed again."""

    model: str
    seq: int | None = None
    precision: str = "bf16-mixed"
    device: str = "h100"
    optimizer: str = "adamw"
    keep_steps: int = 2
    gradients: str = "held"  # as remat.lower takes it
    on_trace: Callable[[int], None] | None = None  # called before each trace (progress)
    # kept among the keep_steps when others go: max_batch pins the largest batch that fits so far, which it plans
    # again at the end (GPT-2 small at batch 706: its step and a dozen split variants, 100 s to trace again)
    pinned: int | None = None
    graphs: dict[int, Graph] = field(default_factory=dict)
    _tracers: OrderedDict = field(default_factory=OrderedDict)
    _added: dict[int, TracedStep] = field(default_factory=dict)
    _compile: dict[tuple[int, float], Candidate] = field(default_factory=dict)
    _store_all: dict[int, Simulation] = field(default_factory=dict)

    def tracer(self, batch: int) -> SplitTracer:
        """The step at `batch`, with its split variants traced on demand."""
        if batch in self._tracers:
            self._tracers.move_to_end(batch)
            return self._tracers[batch]
        if self.on_trace:
            self.on_trace(batch)
        tracer = SplitTracer.zoo(self.model, batch=batch, seq=self.seq, precision=self.precision, device=self.device,
                                 optimizer=self.optimizer, gradients=self.gradients)
        self._tracers[batch] = tracer
        while len(self._tracers) > self.keep_steps:
            oldest = next((b for b in self._tracers if b not in (self.pinned, batch)), None)
            if oldest is None:
                break
            del self._tracers[oldest]
        self.graphs.setdefault(batch, tracer.unsplit.graph)
        return tracer

    def traced(self, batch: int) -> TracedStep:
        if batch in self._added and batch not in self._tracers:
            return self._added[batch]
        tracer = self.tracer(batch)
        return TracedStep(tracer.step, tracer.unsplit.graph)

    def graph(self, batch: int) -> Graph:
        return self.graphs[batch] if batch in self.graphs else self.tracer(batch).unsplit.graph

    def add(self, traced: TracedStep) -> None:
        """A trace made elsewhere (the batch the user asked for)."""
        batch = traced.graph.meta["batch"]
        self._added = {batch: traced}  # one at most: a joint graph is large
        self.graphs[batch] = traced.graph

    def split_variants(self, batch: int) -> Iterator[Variant]:
        """The step at `batch` with its head in 2, 4, 8, ... chunks while that lowers the floor (the rule of
        remat.split_plan), traced as they are asked for (a few seconds each for GPT-2 small)."""
        return self.tracer(batch).lowering()

    def lowest_floor(self, batch: int) -> int:
        """No schedule of any chunk count fits below this."""
        return min([self.graph(batch).min_budget_lower_bound(),
                    *(v.floor_bytes for v in self.split_variants(batch))])

    def compile_candidate(self, batch: int, activation_memory_budget: float) -> Candidate:
        key = (batch, activation_memory_budget)
        if key not in self._compile:
            traced = self.traced(batch)
            self._compile[key] = compile_budget_candidate(traced.step, self.graph(batch), activation_memory_budget)
        return self._compile[key]

    def store_all(self, batch: int) -> Simulation:
        if batch not in self._store_all:
            self._store_all[batch] = store_all_simulation(self.graph(batch))
        return self._store_all[batch]


# --- one method at one batch --------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A method's best schedule at one batch and budget."""

    fits: bool
    schedule_from: str
    simulation: Simulation | None  # of the cheapest fitting schedule, else of the lowest-memory one


def method_candidates(traces: BatchTraces, method: str, batch: int, budget_bytes: int) -> list[Candidate]:
    """The schedules a non-MILP method offers at this batch (several for `compile-budget`)."""
    if method == COMPILE_PREFIX:
        return [traces.compile_candidate(batch, b) for b in COMPILE_BUDGETS]
    budget = compile_budget_of(method)
    if budget is not None:
        return [traces.compile_candidate(batch, budget)]
    if method in BASELINES:
        return [baseline_candidate(traces.graph(batch), method, budget_bytes)]
    raise ValueError(f"unknown method {method!r}")


def best_outcome(candidates: list[Candidate], budget_bytes: int, max_compute_s: float = math.inf) -> Outcome:
    """The cheapest schedule that fits the budget (and takes at most `max_compute_s`), else the lowest-memory one."""
    valid = [c for c in candidates if c.simulation is not None and c.simulation.valid and c.schedule is not None]
    fitting = [c for c in valid if c.fits(budget_bytes) and c.simulation.compute_s <= max_compute_s]
    if fitting:
        best = min(fitting, key=lambda c: c.simulation.compute_s)
        return Outcome(True, best.method, best.simulation)
    if valid:
        lowest = min(valid, key=lambda c: c.simulation.peak_bytes)
        return Outcome(False, lowest.method, lowest.simulation)
    return Outcome(False, candidates[0].method if candidates else "", None)


def split_candidates(traces: BatchTraces, batch: int, budget_bytes: int,
                     stop_at: Callable[[Candidate], bool] | None = None) -> dict[VariantKey, list[Candidate]]:
    """The baselines' schedules, plain and with the head streamed, on each split variant whose floor fits, by
    variant (fewest chunks first; with `stop_at`, up to the first variant where one of them is good enough)."""
    candidates = {}
    for variant in traces.split_variants(batch):
        if variant.floor_bytes > budget_bytes:
            continue
        found = streamed_baselines(variant, budget_bytes, plain=True)
        candidates[variant.key] = [replace(c, method=with_chunks(c.method, variant.split)) for c in found]
        if stop_at is not None and any(stop_at(c) for c in found):
            break
    return candidates


def plan_candidates(traces: BatchTraces, method: str, batch: int, budget_bytes: int, time_limit_s: float
                    ) -> dict[VariantKey, list[Candidate]]:
    """remat's plan at this batch, as `remat solve` makes it (the head split where that helps), under the key of
    the variant it runs on; none where no chunk count's floor fits."""
    if traces.lowest_floor(batch) > budget_bytes:
        return {}
    # auto weighs torch.compile's own choice: the one this batch's probes made (cached) rather than a second one
    known = [traces.compile_candidate(batch, 1.0)] if method == "auto" else []
    tracer = traces.tracer(batch)
    chosen = solve_split(tracer, budget_bytes, solver=method, time_limit_s=time_limit_s, known=known)
    plan = chosen.plan
    if plan.schedule is None:
        return {}
    name = with_chunks(plan.method, chosen.split)
    return {tracer.variant_of(chosen.split).key: [Candidate(name, plan.status, plan.schedule, plan.simulation, 0.0)]}


def milp_outcome(traces: BatchTraces, method: str, batch: int, budget_bytes: int, time_limit_s: float,
                 others: list[Candidate], max_compute_s: float = math.inf) -> Outcome:
    """remat's plan at this batch weighed against `others`: every baseline and torch's choices, on the unsplit and
    split steps."""
    mine = flat(plan_candidates(traces, method, batch, budget_bytes, time_limit_s))
    if not mine and traces.lowest_floor(batch) > budget_bytes:
        return Outcome(False, method, None)
    return best_outcome(mine + others, budget_bytes, max_compute_s)


def flat(by_variant: dict[VariantKey, list[Candidate]]) -> list[Candidate]:
    return [c for found in by_variant.values() for c in found]


def _lowest_peaks(by_variant: dict[VariantKey, list[Candidate]]) -> dict[VariantKey, int]:
    """The lowest valid peak on each variant."""
    lowest = {key: _lowest_peak(found) for key, found in by_variant.items()}
    return {key: peak for key, peak in lowest.items() if peak is not None}


def _lowest_peak(candidates: list[Candidate]) -> int | None:
    peaks = [c.simulation.peak_bytes for c in candidates if c.simulation is not None and c.simulation.valid]
    return min(peaks) if peaks else None


def max_batch(traces: BatchTraces, method: str, budget_bytes: int, start: int = 16, time_limit_s: float = 20.0,
              cap: int = MAX_BATCH, max_overhead: float | None = None) -> MaxBatch:
    """The largest batch `method` fits under `budget_bytes`, and its figures there. With `max_overhead` (0.25:
    +25%), only schedules at most that much slower than store-all at the same batch count as fitting.

    For a MILP method a probe is cheap when another method's schedule fits (the plan weighs them all) or the
    single-op floor is above the budget; otherwise it is a solve with `time_limit_s`. The final batch is solved
    once more with the same limit for its step time.
    """
    started = time.perf_counter()
    outcomes: dict[int, Outcome] = {}
    traces.pinned = None
    if budget_bytes < traces.graph(start).fixed.state_bytes:  # parameters, gradients, optimizer state: every batch
        return MaxBatch(method, budget_bytes, 0, "", None, None, None, (Probe(start, False, None),),
                        time.perf_counter() - started, max_overhead=max_overhead)

    def max_compute_s(batch: int) -> float:
        return math.inf if max_overhead is None else (1 + max_overhead) * traces.store_all(batch).compute_s

    def baselines(batch: int) -> list[Candidate]:
        return [c for name in BASELINES for c in method_candidates(traces, name, batch, budget_bytes)]

    def torch_choices(batch: int) -> list[Candidate]:
        return method_candidates(traces, COMPILE_PREFIX, batch, budget_bytes)

    def others(batch: int) -> list[Candidate]:
        return torch_choices(batch) + baselines(batch)

    def probe(batch: int) -> Probe:
        slowest = max_compute_s(batch)
        if method in MILP_METHODS:
            # cheapest first, and the first schedule that fits settles the probe: the baselines, then the
            # baselines on the step with its head in 2, 4, ... chunks, then torch's choices, then the MILP
            by_variant = {UNSPLIT: baselines(batch)}
            outcome = best_outcome(flat(by_variant), budget_bytes, slowest)
            if not outcome.fits:
                def good(candidate: Candidate) -> bool:
                    return candidate.fits(budget_bytes) and candidate.simulation.compute_s <= slowest

                by_variant |= split_candidates(traces, batch, budget_bytes, stop_at=good)
                outcome = best_outcome(flat(by_variant), budget_bytes, slowest)
            if not outcome.fits:
                floor = traces.lowest_floor(batch)  # no chunk count fits: nothing more to try
                if floor > budget_bytes:
                    return Probe(batch, False, floor, _lowest_peaks(by_variant))
                by_variant[UNSPLIT] = by_variant[UNSPLIT] + torch_choices(batch)  # the baselines are there
                outcome = best_outcome(flat(by_variant), budget_bytes, slowest)
            if not outcome.fits:
                for key, found in plan_candidates(traces, method, batch, budget_bytes, time_limit_s).items():
                    by_variant[key] = by_variant.get(key, []) + found
                outcome = best_outcome(flat(by_variant), budget_bytes, slowest)
            outcomes[batch] = outcome
            if outcome.fits:  # the largest batch that fits so far (the search only probes above it): planned again
                traces.pinned = batch
            peaks = _lowest_peaks(by_variant)
            return Probe(batch, outcome.fits, min(peaks.values(), default=None), peaks)
        candidates = method_candidates(traces, method, batch, budget_bytes)
        outcome = best_outcome(candidates, budget_bytes, slowest)
        outcomes[batch] = outcome
        return Probe(batch, outcome.fits, _lowest_peak(candidates))

    batch, probes = largest_batch(probe, budget_bytes, start=start, cap=cap,
                                  base_bytes=traces.graph(start).fixed.state_bytes)
    if batch == 0:
        return MaxBatch(method, budget_bytes, 0, "", None, None, None, tuple(probes.values()),
                        time.perf_counter() - started, max_overhead=max_overhead)
    outcome = outcomes[batch]
    if method in MILP_METHODS:  # the probe may have stopped at the first schedule that fits: plan for step time
        known = others(batch) + flat(split_candidates(traces, batch, budget_bytes))
        outcome = milp_outcome(traces, method, batch, budget_bytes, time_limit_s, known, max_compute_s(batch))
        if not outcome.fits:  # the final solve found less than the probe did (a shorter search): keep the probe's
            outcome = outcomes[batch]
    simulation = outcome.simulation
    return MaxBatch(method, budget_bytes, batch, outcome.schedule_from,
                    simulation.peak_bytes if simulation else None, simulation.compute_s if simulation else None,
                    traces.store_all(batch).compute_s, tuple(sorted(probes.values(), key=lambda p: p.batch)),
                    time.perf_counter() - started, capped=batch >= cap, max_overhead=max_overhead)
