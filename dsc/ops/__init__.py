"""The dsc op set: semantic ops registered with torch.library in the `dsc` namespace.

Each op has a reference implementation (plain torch, runs anywhere, defines the semantics every
fast kernel is tested against) and a fake implementation (shape propagation for export and passes).
Importing this package registers them all; the runtime imports it, passes and codegen too.
"""

from dsc.ops import attention, collectives, mlp, moe, norms, residual, rotary  # noqa: F401

__all__ = ["attention", "collectives", "mlp", "moe", "norms", "residual", "rotary"]
