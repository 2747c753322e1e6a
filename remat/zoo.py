"""The zoo's model names and what is wrong with a `--model`, without importing torch.

The CLI checks a `--model` (and a `--device`) before its imports, as it checks a `--budget`: a typo took 6 s of
torch's imports to be told. remat.models builds each model; tests/test_models.py checks that the names agree.
"""

from __future__ import annotations

from pathlib import Path

ZOO_NAMES: tuple[str, ...] = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-tiny", "llama", "llama-tiny",
                              "mlp", "vgg16", "resnet50", "mobilenet_v2", "unet", "densenet121", "mlp-xc")


def model_problem(name_or_path: str) -> str:
    """What is wrong with a zoo name or `path/to/file.py:factory`, or "" (what the factory itself does is not
    checked here)."""
    if name_or_path in ZOO_NAMES:
        return ""
    path, _, factory = name_or_path.rpartition(":")
    if path.endswith(".py") and factory:
        if not Path(path).is_file():
            return f"model file {path} not found: give path/to/file.py:factory with an existing file"
        return ""
    if name_or_path.endswith(".py") or path.endswith(".py"):
        return f"name the factory function too: {name_or_path.rstrip(':')}:make_model"
    return f"unknown model {name_or_path!r}: choose one of {', '.join(ZOO_NAMES)}, or give path/to/file.py:factory"
