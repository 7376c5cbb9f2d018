"""The dsc op set: semantic ops registered with torch.library in the `dsc` namespace.

Each op has a reference implementation (plain torch, runs anywhere, defines the semantics every
fast kernel is tested against) and a fake implementation (shape propagation for export and passes).
Importing this package registers them all; the runtime imports it, passes and codegen too.
"""

from dsc.ops import (  # noqa: F401
    attention, collectives, fused, mlp, moe, norms, qkv_attention, recurrent, residual, rotary,
)

__all__ = [
    "attention",
    "collectives",
    "fused",
    "mlp",
    "moe",
    "norms",
    "qkv_attention",
    "recurrent",
    "residual",
    "rotary",
    "direct",
]


def direct(name: str):
    """The Python function behind `dsc::<name>`, callable without the dispatcher.

    The reference runtime calls thousands of small ops per token on the CPU; the dispatcher's
    custom-op wrapping (autograd, fake-mode checks) costs more than many of them compute. Same
    function, same semantics. Falls back to the registered op when the function is not exposed.
    """
    import torch

    op = getattr(getattr(torch.ops, "dsc"), name)
    for module in (attention, collectives, fused, mlp, moe, norms, qkv_attention, recurrent,
                   residual, rotary):
        opdef = getattr(module, name, None)
        fn = getattr(opdef, "_init_fn", None)
        if callable(fn):
            return fn
    return op.default
