"""Train a small GPT-2 twice from the same initialisation, once as usual and once under a memory
budget that forces rematerialization, and show that the loss curves coincide.

    python examples/train_gpt2.py              # 20 steps each, about a minute on a laptop CPU
    python examples/train_gpt2.py --budget 60% --steps 50

The data is random tokens (no downloads); the model is transformers' GPT2LMHeadModel with random
weights, tied embedding and head, dropout 0.1 (so recomputed dropout must replay the same masks).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import remat
from remat.split import Split
from remat.units import format_bytes


class GPT2Loss(torch.nn.Module):
    """input_ids (B, T) -> next-token cross-entropy."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.lm = GPT2LMHeadModel(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, labels=input_ids).loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--budget", default="75%", help="whole step memory: 2GB, 512MiB, or a %% of store-all")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_head=4, n_embd=128, vocab_size=2048, n_positions=args.seq,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    eager_model = GPT2Loss(config)
    remat_model = copy.deepcopy(eager_model)  # same initial weights
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq)) for _ in range(args.steps)]

    started = time.perf_counter()
    planned = remat.apply(remat_model, budget=args.budget, example_inputs=(batches[0],), device="cpu",
                          time_limit=20, progress=lambda message: print(f"  remat: {message}"))
    step = planned.planned
    sim = step.simulation
    print(f"plan: {step.plan.method}, {len(step.graph)} nodes, {len(step.plan.schedule.recomputed_nodes())} "
          f"recomputed, planned peak {format_bytes(sim.peak_bytes)} (store-all "
          f"{format_bytes(step.solved.store_all.peak_bytes)}), made in {time.perf_counter() - started:.1f} s")
    split = step.graph.meta.get("split")
    if split:  # the chunk losses are summed in another order: equal to float32 rounding, not bit for bit
        print(f"  split: {Split.from_meta(split).describe()}: {split['reason']}")

    curves = {}
    for name, model in (("eager", eager_model), ("remat", planned)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        torch.manual_seed(1)  # the same dropout masks in both runs
        losses = []
        started = time.perf_counter()
        for index, input_ids in enumerate(batches):
            if name == "remat" and index == 0:
                loss, memory = planned.measure(input_ids)  # one step with live bytes counted
                print(f"  step 0 measured activation peak {format_bytes(memory.peak_live_bytes)}, "
                      f"planned {format_bytes(sim.activation_peak_bytes)}")
            else:
                loss = model(input_ids)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if index % 5 == 0 or index == len(batches) - 1:
                print(f"  {name} step {index:3d}  loss {loss.item():.4f}")
        print(f"{name}: {len(batches)} steps in {time.perf_counter() - started:.1f} s")
        curves[name] = losses

    worst = max(abs(a - b) for a, b in zip(curves["eager"], curves["remat"], strict=True))
    print(f"largest loss difference over {args.steps} steps: {worst:.3g}"
          + (" (identical)" if worst == 0 else ""))


if __name__ == "__main__":
    main()
