"""remat: rematerialization (activation checkpointing) planning for PyTorch training.

    import remat
    graph = remat.trace_model("gpt2", batch=16)          # fake tensors: no memory allocated
    plan = remat.solve(graph, remat.parse_size("16GB"))  # cheapest schedule that fits, simulated
    print(plan.method, plan.simulation.peak_bytes, plan.overhead)
"""

from remat.graph import FixedMemory, Graph, Node
from remat.schedule import Schedule
from remat.simulate import Simulation, simulate
from remat.units import format_bytes, parse_size

# Loaded on first use: remat.planner imports the solvers (which import remat's data modules), and
# remat.trace loads torch and transformers.
_LAZY = {"Plan": "remat.planner", "solve": "remat.planner", "sweep": "remat.planner", "trace_model": "remat.trace",
         "apply": "remat.training", "plan": "remat.training", "RematModule": "remat.training",
         "PlanError": "remat.training"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'remat' has no attribute {name!r}")


__all__ = ["FixedMemory", "Graph", "Node", "Plan", "PlanError", "RematModule", "Schedule", "Simulation", "apply",
           "format_bytes", "parse_size", "plan", "simulate", "solve", "sweep", "trace_model"]
