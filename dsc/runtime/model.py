"""`CompiledModel`: the callable a compile or a load returns — forward, generate, stream, save."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dsc.errors import PlanError
from dsc.plan import Plan, load_plan, save_plan
from dsc.runtime import allreduce as _allreduce  # noqa: F401  (registers collective:: steps)
from dsc.runtime import distributed
from dsc.runtime import generated
from dsc.runtime.cache import KVCache
from dsc.runtime.cuda_graphs import GraphedProgram, host_waits
from dsc.runtime.cuda_impls import unpadded_keys
from dsc.runtime.executor import Executor
from dsc.runtime.generate import GenerationRequest, check_prompt, generate_tokens
from dsc.runtime.greedy_graph import MAX_EOS_IDS, GreedyStepGraph

__all__ = ["CompiledModel", "ModelOutput", "load"]


@dataclass
class ModelOutput:
    """What `model(...)` returns with use_cache=False: `.logits` or `.last_hidden_state`."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)


class CompiledModel:
    """A Plan bound to a device: call it like the model, generate with it, save it."""

    def __init__(self, plan: Plan, history: list | None = None):
        self.plan = plan
        self.target = plan.target
        if plan.world_size > 1:
            # Join the other ranks first: on CUDA that picks this process's GPU, which "cuda"
            # then means.
            joined = distributed.init(plan.target.device, plan.world_size)
            if joined != plan.rank:
                raise PlanError(f"this process is rank {joined}; the plan part is rank {plan.rank}")
        self.device = torch.device(plan.target.device)
        self._history = history  # PassRecords when compiled in this process
        generated.register_sources(plan.kernel_sources)  # steps may call kernel::region_*
        self.weights = {k: v.to(self.device) for k, v in plan.weights.items()}
        self.executors = {
            name: Executor(program, self.weights, self.device)
            for name, program in plan.programs.items()
        }
        self.info = plan.model
        self.cache: KVCache | None = None
        # The decode step replays as a CUDA graph unless a step of it waits on the host.
        self.graph_blockers = (host_waits(plan.programs["decode"])
                               if "decode" in plan.programs else [])
        self._use_graphs = (self.device.type == "cuda" and plan.target.cuda_graphs
                            and not self.graph_blockers)
        self._graphs: dict[int, GraphedProgram] = {}  # decode step per batch size
        self._greedy_graphs: dict[tuple[int, bool], GreedyStepGraph] = {}  # (batch, eos)
        if "decode" in plan.programs:
            self.cache = KVCache(plan.model["cache"], self.device, plan.target.max_batch,
                                 plan.target.max_seq_len)

    # ---- introspection -------------------------------------------------------------------
    @property
    def history(self) -> list:
        from dsc.report import records

        return self._history if self._history is not None else records(self.plan.history)

    def decode_graph(self, batch: int) -> torch.cuda.CUDAGraph:
        """The model's decode step for `batch` rows as a CUDA graph that does not advance: each
        replay repeats the step at the cache's current slot, for timing the GPU work alone
        (sampling's step; greedy generation replays a graph that also chooses the token)."""
        if not self._use_graphs:
            blockers = ", ".join(self.graph_blockers[:3])
            raise RuntimeError(
                "decode_graph needs a CUDA target with cuda_graphs=True"
                + (f" and a decode step without host waits; this one has {blockers}"
                   if self.graph_blockers else ""))
        cache = self._require_decoder()
        if batch not in self._graphs:
            slot = min(int(cache.start.item()), self.target.max_seq_len - 1)
            token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            self._decode(token, torch.full_like(token, slot), slot)
        return self._graphs[batch].graph

    def report(self) -> str:
        from dsc.report import report

        return report(self.history, self.plan)

    def visualize(self, path: str | os.PathLike) -> Path:
        from dsc.report import visualize

        return visualize(self.history, self.plan, path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan; with several ranks every rank calls it and writes its own part."""
        if self.plan.world_size == 1:
            return save_plan(self.plan, path)
        root = save_plan(self.plan, path, gather=distributed.gather_to_first)
        distributed.barrier()  # every rank returns once plan.json holds all parts
        return root

    # ---- forward -------------------------------------------------------------------------
    def _check(self, input_ids, attention_mask, new_tokens: int = 0) -> torch.Tensor:
        return check_prompt(
            input_ids, attention_mask, vocab_size=self.info.get("vocab_size"),
            max_batch=self.target.max_batch, max_seq_len=self.target.max_seq_len,
            new_tokens=new_tokens,
        )

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> ModelOutput:
        mask = self._check(input_ids, attention_mask)
        ids = input_ids.to(self.device, torch.long)
        mask = mask.to(self.device, torch.long)
        batch, seq = ids.shape
        feed = {"input_ids": ids, "attention_mask": mask}
        rule = self.info.get("default_positions")
        if rule == "cumsum":  # the model counts real tokens, like HF OPT
            feed["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        else:
            feed["position_ids"] = torch.arange(seq, device=self.device).expand(batch, seq)
        executor = self.executors["forward"]
        (out,) = executor(**{k: feed[k] for k in executor.program.inputs})
        return ModelOutput(**{self.info["output"]: out})

    # ---- generation ----------------------------------------------------------------------
    def _require_decoder(self) -> KVCache:
        if self.cache is None:
            why = self.info.get("not_a_decoder_because") or "no KV cache was compiled"
            raise TypeError(
                f"{self.info.get('name', 'this model')} cannot generate: {why}. generate() needs "
                f"a causal LM whose attention dsc recognises; its forward (logits) works as "
                f"compiled"
            )
        return self.cache

    def _prefill(self, ids, mask, positions) -> torch.Tensor:
        cache = self._require_decoder()
        cache.reset(mask)
        program = self.executors["prefill"]
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                **cache.inputs(ids.shape[0], start=0)}
        # The cache was just reset to this mask from slot 0: without padding in it, prefill
        # attention may skip the padding checks (checked once here, not per layer and tile).
        with unpadded_keys(self.device.type == "cuda" and bool(mask.all())):
            (logits,) = program(**{k: feed[k] for k in program.program.inputs})
        return logits[:, -1]

    def _decode(self, token, positions, slot: int) -> torch.Tensor:
        cache = self._require_decoder()
        cache.mark(slot)
        program = self.executors["decode"]
        feed = {"input_ids": token, "attention_mask": torch.ones_like(token),
                "position_ids": positions, **cache.inputs(token.shape[0], start=slot)}
        feed = {k: feed[k] for k in program.program.inputs}
        if self._use_graphs:
            batch = token.shape[0]
            if batch not in self._graphs:
                self._graphs[batch] = GraphedProgram(program, feed)
            (logits,) = self._graphs[batch](feed)
        else:
            (logits,) = program(**feed)
        return logits[:, -1]

    def _greedy_graph(self, batch: int, has_eos: bool) -> GreedyStepGraph:
        key = (batch, has_eos)
        if key not in self._greedy_graphs:
            self._greedy_graphs[key] = GreedyStepGraph(
                self.executors["decode"], self.cache, batch, self.target.max_seq_len, has_eos)
        return self._greedy_graphs[key]

    def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        seed: int | None = None,
        callback: Callable[[torch.Tensor], Any] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens ([batch] tensor) as soon as it is chosen."""
        self._require_decoder()
        mask = self._check(input_ids, attention_mask, max_new_tokens)
        if eos_token_id is None:
            eos_token_id = self.info.get("eos_token_id") or []
        request = GenerationRequest(max_new_tokens, do_sample, temperature, top_k, top_p,
                                    eos_token_id, seed)
        pad = self.info.get("pad_token_id")
        if pad is None:
            pad = request.eos[0] if request.eos else 0
        ids = input_ids.to(self.device, torch.long)
        # Ranks hold bit-identical logits (the collectives sum in rank order), so argmax agrees;
        # a sampler seeded per process would not: rank 0's choice becomes everyone's.
        agree = None
        if self.plan.world_size > 1 and do_sample:
            agree = lambda token: distributed.broadcast_(token, src=0)  # noqa: E731
        greedy_steps = None
        # DSC_GREEDY_GRAPH=0: the host-driven loop for greedy decoding too (for comparisons).
        if (self._use_graphs and not do_sample
                and max_new_tokens > 1 and len(request.eos) <= MAX_EOS_IDS
                and os.environ.get("DSC_GREEDY_GRAPH", "1") != "0"):
            # Captured before the prefill, which rewrites the cache slots its warm-up wrote.
            with torch.no_grad():
                graph = self._greedy_graph(ids.shape[0], bool(request.eos))

            def greedy_steps(first, next_pos, slot, finished):
                return graph.run(first, next_pos, slot, finished, max_new_tokens, request.eos, pad)
        with torch.no_grad():
            for token in generate_tokens(self._prefill, self._decode, ids,
                                         mask.to(self.device, torch.long), request, pad, agree,
                                         greedy_steps, self.info.get("rope_switch_at")):
                if callback is not None:
                    callback(token)
                yield token

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Prompt + new tokens, like HF generate (rows padded after their eos)."""
        new = list(self.stream(input_ids, attention_mask, max_new_tokens, do_sample, temperature,
                               top_k, top_p, eos_token_id, seed))
        return torch.cat([input_ids.to(self.device, torch.long), torch.stack(new, dim=1)], dim=1)


def load(path: str | os.PathLike, rank: int | None = None) -> CompiledModel:
    """Load a saved plan (this process's rank under torchrun) and bind it to its device."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    return CompiledModel(load_plan(path, rank=rank))
