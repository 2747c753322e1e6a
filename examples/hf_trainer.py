"""Hugging Face's Trainer with a planned model: `remat.apply` in place of the model, nothing else changed.

A small BERT classifier (random weights, random data) trains for one epoch under 85% of its store-all peak, is
evaluated and saved with `trainer.save_model` (reloaded with `from_pretrained`), and the same run is made with the
plain model: the losses are the same, as the plan computes what eager does. Needs `accelerate` (which the Trainer
needs): `pip install accelerate`, then `python examples/hf_trainer.py`.
"""

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import remat


class RandomTokens(Dataset):
    def __init__(self, size: int = 64, seq: int = 32, vocab: int = 500, labels: int = 3):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (size, seq), generator=generator)
        self.labels = torch.randint(0, labels, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def run(planned: bool) -> dict[str, float]:
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                        vocab_size=500, num_labels=3)
    model = BertForSequenceClassification(config)
    data = RandomTokens()
    if planned:
        example = {"input_ids": data.ids[:8], "labels": data.labels[:8]}
        model = remat.apply(model, budget="85%", example_inputs=example, time_limit=10)
        step = model.planned
        print(f"{type(model).__name__}: {step.plan.method}, planned peak {step.simulation.peak_bytes:,} bytes "
              f"of a {step.plan.budget_bytes:,}-byte budget")
    args = TrainingArguments(output_dir="/tmp/remat-hf-trainer", per_device_train_batch_size=8, num_train_epochs=1,
                             logging_steps=4, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trained = trainer.train()
    evaluated = trainer.evaluate()
    saved = f"/tmp/remat-hf-trainer/{'remat' if planned else 'eager'}"
    trainer.save_model(saved)  # the model's own save_pretrained: a checkpoint the plain model loads
    reloaded = BertForSequenceClassification.from_pretrained(saved)
    same = all(torch.equal(p, q) for p, q in zip(reloaded.parameters(), trainer.model.parameters(), strict=True))
    return {"train_loss": trained.training_loss, "eval_loss": evaluated["eval_loss"], "reloads": float(same)}


if __name__ == "__main__":
    eager, planned = run(planned=False), run(planned=True)
    for name in eager:
        print(f"{name}: eager {eager[name]:.6f}, remat {planned[name]:.6f}")
