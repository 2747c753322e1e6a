"""Measure the time of every op of a training step on a device, and store it as a device profile.

Each distinct op (overload + argument shapes and dtypes, `remat.lower.cost_key`) of the captured joint
graph is run alone on random inputs of its recorded shapes, strides and dtypes: a few warm-up runs, then
repeats timed with CUDA events (wall clock on CPU), the median kept. The profile file is the base device
profile (peak FLOP/s, bandwidth: the roofline for ops it has no time for) plus `measured_s`, so
`remat solve --device profiles/NAME.json` costs measured ops with their times and the rest with the roofline.
Ops that cannot run alone on the device (a CPU-only attention kernel on CUDA, say) are listed and left
to the roofline.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from remat.capture import CapturedStep, aliasing_input
from remat.cost import DeviceProfile
from remat.lower import cost_key

GPU_PROFILES = ("h100", "a100", "v100")  # base profiles recognised in torch.cuda.get_device_name()


@dataclass(frozen=True)
class Measurement:
    measured_s: dict[str, float]  # cost key -> median seconds
    failed: dict[str, str] = field(default_factory=dict)  # cost key -> why it could not run
    ops: int = 0  # compute ops in the graph (repeats of one key included)
    wall_s: float = 0.0


def base_profile_for(device_name: str) -> str:
    """"h100" for "NVIDIA H100 80GB HBM3"; h100 when the name is none of ours."""
    lowered = device_name.lower()
    return next((name for name in GPU_PROFILES if name in lowered), "h100")


def compute_nodes(step: CapturedStep) -> list[torch.fx.Node]:
    """The ops lowering costs: call_functions that allocate storage (views and getitem are free)."""
    found = []
    for node in step.joint.graph.nodes:
        if node.op != "call_function" or aliasing_input(node) is not None:
            continue
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list))
                                              and any(isinstance(v, torch.Tensor) for v in value)):
            found.append(node)
    return found


def random_like(value: Any, device: str) -> Any:
    """A real tensor with `value`'s shape, strides and dtype: normal floats, zero integers (valid indices)."""
    if not isinstance(value, torch.Tensor):
        return value
    size, stride = tuple(value.shape), tuple(value.stride())
    elements = 1 + sum((s - 1) * st for s, st in zip(size, stride, strict=True)) if all(size) else 0
    storage = torch.empty(elements, dtype=value.dtype, device=device)
    if value.dtype.is_floating_point or value.dtype.is_complex:
        storage.normal_()
    else:
        storage.zero_()
    return storage.as_strided(size, stride)


def _timer(device: str) -> Callable[[Callable[[], Any], int], list[float]]:
    if device.startswith("cuda"):
        def cuda_times(run: Callable[[], Any], repeats: int) -> list[float]:
            pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                     for _ in range(repeats)]
            for start, end in pairs:
                start.record()
                run()
                end.record()
            torch.cuda.synchronize()
            return [start.elapsed_time(end) / 1e3 for start, end in pairs]  # ms -> s
        return cuda_times

    def wall_times(run: Callable[[], Any], repeats: int) -> list[float]:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return times
    return wall_times


def measure_ops(step: CapturedStep, device: str = "cuda", warmup: int = 3, repeats: int = 10,
                progress: Callable[[int, int], None] | None = None) -> Measurement:
    """Median seconds of every distinct op of `step` on `device` (see the module docstring)."""
    started = time.perf_counter()
    nodes = compute_nodes(step)
    by_key: dict[str, torch.fx.Node] = {}
    for node in nodes:
        by_key.setdefault(cost_key(node), node)
    timer = _timer(device)
    measured, failed = {}, {}
    for done, (key, node) in enumerate(by_key.items()):
        try:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs),
                                                 lambda x: random_like(x.meta.get("val"), device))
            kwargs = {**kwargs, "device": torch.device(device)} if "device" in kwargs else kwargs

            def run(args=args, kwargs=kwargs, target=node.target):
                return target(*args, **kwargs)

            for _ in range(warmup):
                run()
            measured[key] = statistics.median(timer(run, repeats))
        except Exception as error:  # an op that cannot run alone here: the roofline costs it
            failed[key] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        if progress:
            progress(done + 1, len(by_key))
    return Measurement(measured, failed, len(nodes), time.perf_counter() - started)


def profile_json(base: DeviceProfile, measurement: Measurement, name: str, meta: dict) -> dict:
    """The profile file: the base profile's fields (the roofline fallback) plus the measured times."""
    fields = asdict(base)
    fields.update(name=name, description=f"{base.description}; measured op times: {meta.get('model')}",
                  measured_s=dict(sorted(measurement.measured_s.items())))
    return {**fields, "measured": {**meta, "ops": measurement.ops, "distinct_ops": len(measurement.measured_s)
                                   + len(measurement.failed), "unmeasured": measurement.failed,
                                   "wall_s": measurement.wall_s}}


def write_profile(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path
