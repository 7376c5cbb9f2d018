"""Replay a program as a CUDA graph: one capture per batch size, no Python per kernel after it.

The cache, its validity mask and the start slot already live at fixed addresses; only the step's
token ids, mask and positions change, so they are copied into static buffers before each replay.
"""

from __future__ import annotations

import torch

from dsc.runtime.executor import Executor

__all__ = ["HOST_WAITS", "GraphedProgram", "host_waits"]

_STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Cache inputs a step advances rather than writes (linear-attention and Mamba-2 states, named by
# the recurrent_state pass): running a step twice moves them twice, unlike a K/V slot.
_ADVANCED_STATES = ("cache.conv_", "cache.delta_", "cache.ssm_")

# Steps whose implementation makes the host wait for a value on the device, which a CUDA graph
# cannot hold: the reference implementations of the cached attentions read the start slot
# (they run where no kernel takes the op: head sizes the kernels do not cover), dsc.moe's
# counts each expert's tokens, and ops whose output size depends on the data.
HOST_WAITS = frozenset({
    "dsc::cached_attention.default", "dsc::rotary_cached_attention.default",
    "dsc::qkv_cached_attention.default", "dsc::moe.default",
    "aten::nonzero.default", "aten::_local_scalar_dense.default", "aten::item.default",
    "aten::masked_select.default", "aten::unique.default", "aten::_unique2.default",
})


def host_waits(program) -> list[str]:
    """The steps of `program` a CUDA graph cannot capture (HOST_WAITS), as 'out (op)'."""
    return [f"{s['out']} ({s['op']})" for s in program.steps if s["op"] in HOST_WAITS]


class GraphedProgram:
    def __init__(self, executor: Executor, feed: dict[str, torch.Tensor], warmup: int = 2):
        self.executor = executor
        self.static = {k: feed[k].clone() for k in _STEP_INPUTS if k in feed}
        self.feed = {**feed, **self.static}
        # The warm-up runs are the step itself: the states they advance are put back, so the
        # first replay is the step's only effect on them.
        saved = [(t, t.clone()) for name, t in feed.items() if name.startswith(_ADVANCED_STATES)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile kernels and create handles outside the capture
            for _ in range(warmup):
                executor(**self.feed)
        torch.cuda.current_stream().wait_stream(stream)
        for t, value in saved:
            t.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = executor(**self.feed)

    def __call__(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        for name, buf in self.static.items():
            buf.copy_(feed[name])
        self.graph.replay()
        return self.outputs
