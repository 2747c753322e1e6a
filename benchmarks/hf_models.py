"""Hugging Face architectures beyond the zoo: each built from a small config (random weights), called by name as
Hugging Face models are (model(**batch) -> output.loss), traced, and planned below store-all as `remat solve` plans.

    python benchmarks/hf_models.py [--models swin,whisper] [--budget 70%] [--time-limit 10]
                                   [--out benchmarks/results/hf_models.json]

It checks coverage (every architecture traces, plans and fits the budget) and reports the plan's overhead and
proven gap beside the best baseline of the same run. The configs are small so that the whole table takes a few
minutes on 2 cores: the figures say how close to optimal the plans are, not what a full-size model costs.
Each function below is also a factory for the command line:

    remat solve --model benchmarks/hf_models.py:swin --budget 70%
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
import transformers as hf

BATCH = 4
# two layers of width 128 (4 heads, MLP 256) over a 1,000-token vocabulary
SMALL_DECODER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=1000)


def _language_model(config, model_class, batch: int, seq: int):
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return model_class(config), {"input_ids": ids, "labels": ids}


def _images(model, batch: int, size: int, labels: int = 10):
    return model, {"pixel_values": torch.randn(batch, 3, size, size), "labels": torch.randint(0, labels, (batch,))}


def bert(batch: int = BATCH, seq: int = 128):
    return _language_model(hf.BertConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                    intermediate_size=1024), hf.BertForMaskedLM, batch, seq)


def roberta(batch: int = BATCH, seq: int = 128):
    return _language_model(hf.RobertaConfig(**SMALL_DECODER), hf.RobertaForMaskedLM, batch, seq)


def distilbert(batch: int = BATCH, seq: int = 128):
    return _language_model(hf.DistilBertConfig(dim=128, hidden_dim=256, n_layers=2, n_heads=4, vocab_size=1000),
                      hf.DistilBertForMaskedLM, batch, seq)


def llama(batch: int = BATCH, seq: int = 256):
    return _language_model(hf.LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=688, vocab_size=32000),
                      hf.LlamaForCausalLM, batch, seq)


def mistral(batch: int = BATCH, seq: int = 128):
    return _language_model(hf.MistralConfig(**SMALL_DECODER, num_key_value_heads=2, sliding_window=64),
                      hf.MistralForCausalLM, batch, seq)


def qwen2(batch: int = BATCH, seq: int = 128):
    return _language_model(hf.Qwen2Config(**SMALL_DECODER, num_key_value_heads=2), hf.Qwen2ForCausalLM, batch, seq)


def gemma(batch: int = BATCH, seq: int = 128):
    return _language_model(hf.GemmaConfig(**SMALL_DECODER, num_key_value_heads=1, head_dim=32), hf.GemmaForCausalLM,
                      batch, seq)


def phi(batch: int = BATCH, seq: int = 128):
    return _language_model(hf.PhiConfig(**SMALL_DECODER), hf.PhiForCausalLM, batch, seq)


def gpt_neo(batch: int = BATCH, seq: int = 128):
    return _language_model(hf.GPTNeoConfig(hidden_size=128, num_layers=2, num_heads=4,
                                      attention_types=[[["global", "local"], 1]], vocab_size=1000,
                                      max_position_embeddings=256, bos_token_id=0, eos_token_id=0),
                           hf.GPTNeoForCausalLM, batch, seq)


def opt(batch: int = BATCH, seq: int = 128):
    return _language_model(hf.OPTConfig(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=1000, word_embed_proj_dim=128), hf.OPTForCausalLM, batch, seq)


def t5(batch: int = BATCH, seq: int = 128):
    return _language_model(hf.T5Config(num_layers=2, num_decoder_layers=2, d_model=256, d_ff=1024, num_heads=4, d_kv=64,
                                  decoder_start_token_id=0, pad_token_id=0), hf.T5ForConditionalGeneration,
                      batch, seq)


def bart(batch: int = BATCH, seq: int = 64):
    return _language_model(hf.BartConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                    decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                    vocab_size=1000), hf.BartForConditionalGeneration, batch, seq)


def whisper(batch: int = BATCH):
    config = hf.WhisperConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=1000,
                              num_mel_bins=16, max_source_positions=50, max_target_positions=64,
                              decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    batch_inputs = {"input_features": torch.randn(batch, 16, 100), "labels": torch.randint(2, 1000, (batch, 16))}
    return hf.WhisperForConditionalGeneration(config), batch_inputs


def vit(batch: int = BATCH):
    return _images(hf.ViTForImageClassification(hf.ViTConfig(num_hidden_layers=4, hidden_size=256,
                                                             num_attention_heads=4, intermediate_size=1024,
                                                             image_size=224, num_labels=10)), batch, 224)


def deit(batch: int = BATCH):
    return _images(hf.DeiTForImageClassification(hf.DeiTConfig(image_size=64, patch_size=8, hidden_size=128,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               intermediate_size=256, num_labels=10)), batch, 64)


def swin(batch: int = BATCH):
    return _images(hf.SwinForImageClassification(hf.SwinConfig(image_size=64, patch_size=4, embed_dim=32,
                                                               depths=[1, 1], num_heads=[2, 4], window_size=4,
                                                               num_labels=10)), batch, 64)


def convnext(batch: int = BATCH):
    return _images(hf.ConvNextForImageClassification(hf.ConvNextConfig(depths=[1, 1, 2, 1],
                                                                       hidden_sizes=[32, 64, 128, 256],
                                                                       num_labels=10)), batch, 224)


def resnet(batch: int = BATCH):
    return _images(hf.ResNetForImageClassification(hf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32],
                                                                   depths=[1, 1], num_labels=10)), batch, 64)


MODELS = ("bert", "roberta", "distilbert", "llama", "mistral", "qwen2", "gemma", "phi", "gpt_neo", "opt", "t5",
          "bart", "whisper", "vit", "deit", "swin", "convnext", "resnet")
BASELINES_SHOWN = ("chen-sqrtn", "chen-greedy", "per-block", "griewank", "checkpoint-all")


def plan_one(name: str, budget: str, time_limit_s: float) -> dict:
    """Trace and plan one architecture as `remat solve` does; its figures, or the error a user would see."""
    from remat.split_plan import SplitTracer, solve_split
    from solvers.base import overhead_of

    started = time.perf_counter()
    try:
        tracer = SplitTracer.zoo(f"{__file__}:{name}", batch=BATCH, device="h100")
    except Exception as error:  # a model that does not trace is the finding: report it, go on with the rest
        return {"model": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    trace_s = time.perf_counter() - started
    graph = tracer.unsplit.graph
    budget_bytes = tracer.budget_bytes(budget)
    started = time.perf_counter()
    plan = solve_split(tracer, budget_bytes, time_limit_s=time_limit_s).plan
    wall_s = time.perf_counter() - started
    row = {"model": name, "nodes": len(graph), "trace_s": trace_s, "wall_s": wall_s, "budget_bytes": budget_bytes,
           "status": plan.status, "method": plan.method,
           "fits": plan.schedule is not None, "overhead": None, "gap": plan.gap, "best_baseline": None}
    if plan.schedule is None:
        return row
    store_all_s = graph.compute_s  # the unsplit step's: a split's own cost counts as overhead
    row.update(overhead=overhead_of(plan.compute_s, store_all_s), peak_bytes=plan.simulation.peak_bytes)
    fitting = [c for c in plan.candidates if c.method.split("+")[0] in BASELINES_SHOWN and c.simulation is not None
               and c.simulation.valid and c.simulation.peak_bytes <= budget_bytes]
    if fitting:
        best = min(fitting, key=lambda c: c.simulation.compute_s)
        row["best_baseline"] = {"method": best.method, "overhead": overhead_of(best.simulation.compute_s, store_all_s)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budget", default="70%", help="of each step's store-all peak (or a size)")
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_models.json"))
    args = parser.parse_args()

    rows = []
    print(f"{'model':<11} {'nodes':>5} {'plan':<28} {'overhead':>9} {'gap':>7} {'wall s':>6}  best baseline")
    for name in args.models.split(","):
        row = plan_one(name, args.budget, args.time_limit)
        rows.append(row)
        if "error" in row:
            print(f"{name:<11} does not trace: {row['error']}")
            continue
        plan = f"{row['method']} ({row['status']})"
        if not row["fits"]:
            print(f"{name:<11} {row['nodes']:>5} {plan:<28} no schedule fits {args.budget}")
            continue
        baseline = row["best_baseline"]
        shown = f"{baseline['method']} {baseline['overhead']:+.1%}" if baseline else "none fits"
        print(f"{name:<11} {row['nodes']:>5} {plan:<28} {row['overhead']:>+9.2%} {row['gap']:>7.2%} "
              f"{row['wall_s']:>6.1f}  {shown}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"commit": commit, "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
              "budget": args.budget, "time_limit_s": args.time_limit, "batch": BATCH,
              "transformers": hf.__version__, "torch": torch.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
