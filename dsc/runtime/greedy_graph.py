"""A whole greedy decode step as one CUDA graph: the model, the token choice and the advance.

Replaying only the model's decode graph leaves the glue between steps to the host: the argmax,
blanking finished rows, copying token, position and slot into the graph's inputs, marking the
cache slot — about ten small launches per token, 5 % of the Llama-1.1B's step (bench/NOTES.md,
run 12). For greedy decoding all of it is a function of device state, so it is captured too:

    replay k:  valid[:, start] is already marked
               logits = decode program(ids, pos, cache, start)
               advance_greedy: choice = argmax(logits[:, -1]);
                               tokens[:, k] = choice (pad once finished); ids = choice;
                               pos += 1; start += 1; valid[:, start] = True

so one replay runs step k and leaves step k+1's inputs in place; the host only replays. One graph
per (batch size, with eos or not) is captured on first use and reused by later generations, whose
state is written into the same buffers before the first replay.
"""

from __future__ import annotations

from typing import Iterator

import torch

from dsc.kernels.decode_step import advance_greedy
from dsc.runtime.cache import KVCache
from dsc.runtime.executor import Executor

__all__ = ["GreedyStepGraph", "MAX_EOS_IDS"]

MAX_EOS_IDS = 8  # eos ids the graph's buffer holds; more go through the step-by-step loop


class GreedyStepGraph:
    """One captured greedy step for `batch` rows: `run` replays it once per new token."""

    def __init__(self, executor: Executor, cache: KVCache, batch: int, capacity: int,
                 has_eos: bool, warmup: int = 2):
        device = cache.start.device
        self.cache, self.batch, self.has_eos = cache, batch, has_eos
        long = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros(batch, 1, **long)
        self.pos = torch.zeros(batch, 1, **long)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.full((MAX_EOS_IDS,), -1, **long)
        self.pad = torch.zeros(1, **long)
        self.tokens = torch.zeros(batch, capacity, **long)
        self.col = torch.zeros(1, **long)
        self.valid = cache.valid[:batch]
        feed = {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids),
                "position_ids": self.pos, "kv_valid": self.valid, "cache_start": cache.start,
                **cache.tensors}
        self._run = lambda: self._step(executor, {k: feed[k] for k in executor.program.inputs})

        # Kernels compile and allocations settle outside the capture. The warm-up steps write
        # K/V at the cache's current slots — build this before a prefill, which rewrites them —
        # and advance the counters, which are put back.
        saved = [(t, t.clone()) for t in (cache.start, cache.valid, self.col)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run()
        for t, value in saved:
            t.copy_(value)

    def _step(self, executor: Executor, feed: dict) -> None:
        (logits,) = executor(**feed)
        advance_greedy(logits[:, -1], self.finished, self.eos, self.pad, self.tokens, self.col,
                       self.ids, self.pos, self.cache.start, self.valid, self.has_eos)

    def run(self, first: torch.Tensor, next_pos: torch.Tensor, slot: int,
            finished: torch.Tensor, max_new_tokens: int, eos: list[int], pad_id: int
            ) -> Iterator[torch.Tensor]:
        """Yield tokens 1.. of a generation whose token 0 (`first`, already yielded by the
        caller) was chosen from the prefill; `slot` is the cache slot of token 0."""
        if max_new_tokens > self.tokens.shape[1]:
            raise ValueError(f"{max_new_tokens} new tokens exceed the graph's capacity "
                             f"{self.tokens.shape[1]}")
        self.ids.copy_(first[:, None])
        self.pos.copy_(next_pos[:, None])
        self.finished.copy_(finished)
        self.eos.fill_(-1)
        if eos:
            self.eos[: len(eos)] = torch.tensor(eos)
        self.pad.fill_(pad_id)
        self.col.fill_(1)
        self.cache.start.fill_(slot)
        self.cache.mark(slot)
        # "All rows finished" is read one step late, as in generate_tokens: step k is queued
        # before step k-1's flag is waited for. Two pinned flags, so step k's copy cannot land
        # in the one being read.
        flags = [torch.zeros(1, dtype=torch.bool, pin_memory=True) for _ in range(2)]
        events = [torch.cuda.Event(), torch.cuda.Event()]
        for k in range(1, max_new_tokens):
            self.graph.replay()
            if self.has_eos:
                flags[k % 2].copy_(self.finished.all()[None], non_blocking=True)
                events[k % 2].record()
                if k > 1:
                    events[(k - 1) % 2].synchronize()
                    if bool(flags[(k - 1) % 2]):
                        return
            # A copy: the buffer is rewritten by the next generation on this graph.
            yield self.tokens[:, k].clone()
