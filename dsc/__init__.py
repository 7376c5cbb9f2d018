"""dsc: a compiler for transformer inference.

    compiled = dsc.compile(model, target="cpu")
    compiled(input_ids).logits
    compiled.generate(input_ids, max_new_tokens=32)
    compiled.save("plan_dir"); dsc.load("plan_dir")
"""

from dsc.errors import DscError, InputError, LimitError, PlanError, TargetError, TraceError, UnsupportedOpError
from dsc.target import Target

__all__ = [
    "compile",
    "load",
    "Target",
    "DscError",
    "InputError",
    "LimitError",
    "PlanError",
    "TargetError",
    "TraceError",
    "UnsupportedOpError",
]


def compile(model, target="cpu"):
    """Compile `model` for `target` ('cpu', 'cuda' or a dsc.Target); see dsc.compiler.compile."""
    from dsc.compiler import compile as _compile

    return _compile(model, target)


def load(path, rank=None):
    """Load a saved plan; needs neither transformers nor the model's code."""
    from dsc.runtime.model import load as _load

    return _load(path, rank)
