"""Model name -> Graph: build the model on fake tensors, capture its training step, lower and cost it."""

from __future__ import annotations

from remat.capture import capture_fake
from remat.cost import load_profile
from remat.graph import Graph
from remat.lower import lower
from remat.models import build_model


def trace_model(model: str, batch: int = 16, seq: int | None = None, precision: str = "bf16-mixed",
                device: str = "h100", optimizer: str = "adamw") -> Graph:
    """The training-step graph of a zoo model or a `file.py:factory`, costed for `device`."""
    profile = load_profile(device)  # fail on a bad device before the slow trace
    spec, step = capture_fake(lambda: build_model(model, batch=batch, seq=seq), precision)
    meta = {"model": model, "batch": batch, "seq": spec.seq, "device": profile.name, "precision": precision,
            "description": spec.description}
    return lower(step, profile, optimizer=optimizer, meta=meta)
