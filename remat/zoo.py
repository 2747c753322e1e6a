"""The zoo's model names and what is wrong with a `--model`, without importing torch.

The CLI checks a `--model` (and a `--device`) before its imports, as it checks a `--budget`: a typo took 6 s of
torch's imports to be told. remat.models builds each model; tests/test_models.py checks that the names agree.
"""

from __future__ import annotations

import ast
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
        file = name_or_path.rstrip(":")
        if not Path(file).is_file():
            return f"model file {file} not found: give path/to/file.py:factory with an existing file"
        defined = _functions_in(Path(file))  # (it suggested a make_model whether or not the file had one)
        return (f"name the factory function too: {file}:FACTORY"
                + (f" (functions defined there: {', '.join(defined)})" if defined else ""))
    return f"unknown model {name_or_path!r}: choose one of {', '.join(ZOO_NAMES)}, or give path/to/file.py:factory"


def _functions_in(path: Path) -> list[str]:
    """The functions a Python file defines at its top level, read without running it; [] if it does not parse."""
    try:
        tree = ast.parse(path.read_text())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]
