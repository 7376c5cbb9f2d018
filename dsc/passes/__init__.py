"""Graph passes: each is a function `(gm, ctx) -> gm` in its own file, registered by name.

`PASSES` maps names to functions; `pipeline_for(target, ...)` lists the names a Target runs;
`PassManager` runs them, verifying the invariants written in README.md after every pass.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

__all__ = ["PASSES", "register", "PassFn"]

PassFn = Callable[[fx.GraphModule, "PassContext"], fx.GraphModule]  # noqa: F821
PASSES: dict[str, PassFn] = {}


def register(name: str) -> Callable[[PassFn], PassFn]:
    """Register a pass under `name` (one name per pass, used in pipelines and history)."""

    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        PASSES[name] = fn
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn

    return wrap
