"""Which passes a Target runs, as short named lists (the pipeline is data, not control flow)."""

from __future__ import annotations

import os

from dsc.target import Target

__all__ = ["trunk", "cached", "partition", "backend"]

# Recognition: aten subgraphs into dsc ops. Order matters only where a docstring says so.
RECOGNISE = [
    "canonicalize",
    "recognize_rms_norm",
    "recognize_layer_norm",
    "recognize_rotary",
    "recognize_attention",
    "fold_query_scale",
    "recognize_moe",  # before mlp: expert activations stay inside the MoE block
    "recognize_mlp",
    "recognize_residual",  # after moe: dsc.moe counts as a projection
]


def _absorb() -> bool:
    """DSC_ABSORB_LATENT=0 keeps latent attention per head in every program (the cache then
    holds every head's keys and values): the A/B of the latent cache."""
    return os.environ.get("DSC_ABSORB_LATENT", "1") != "0"


def trunk(target: Target) -> list[str]:
    """Passes every program shares. With tp > 1 latent attention attends over its latent in
    every program (the forward one too), so that all cut its weights the same way."""
    return [*RECOGNISE, *(["absorb_latent_attention"] if target.tp > 1 and _absorb() else [])]


def cached(target: Target) -> list[str]:
    """Passes that turn the shared graph into the prefill/decode graph: latent attention first
    attends over its latent (on one GPU the forward program keeps the per-head form, cheaper
    without a cache to shrink), so that kv_cache gives it a cache of latents; linear-attention
    layers then get their state beside the cache."""
    return [*(["absorb_latent_attention"] if target.tp == 1 and _absorb() else []), "kv_cache",
            "recurrent_state"]


def partition(target: Target) -> list[str]:
    """Passes that cut each program down to this rank's share: after kv_cache (the cache then
    holds the rank's own KV heads), before backend (which sees the per-rank shapes).
    `merge_all_reduces` adds a block's two partial sums before one all-reduce (routed and shared
    experts).
    `fuse_all_reduce_norm` with DSC_FUSED_ALLREDUCE=1, until measured on several GPUs;
    `fuse_all_reduce_residual` while norm prologues are on (the add then needs no launch: the
    norm after it runs in the next GEMM), on CPU too, so the multi-process CPU tests run the
    plans the GPUs run."""
    if target.tp == 1:
        return []
    fused = os.environ.get("DSC_FUSED_ALLREDUCE", "0") == "1"
    from dsc.passes.fuse import prologues_enabled

    add = ["fuse_all_reduce_residual"] if prologues_enabled() else []
    return ["tensor_parallel", "merge_all_reduces", *(["fuse_all_reduce_norm"] if fused else []),
            *add]


def backend(target: Target) -> list[str]:
    """Passes that shape each program for its kernels, after partitioning. `fuse` only on CUDA:
    its regions exist to become generated Triton kernels; on CPU they would run as the reference
    op by op, no faster than unfused. `fold_rotary_into_attention` only on CUDA (its op's
    only kernel is the Triton decode attention); DSC_ROTARY_IN_ATTENTION=0 turns it off.
    `fuse_linear_all_reduce` whenever tp > 1 (on CPU its op is the product then the sum, so the
    multi-process CPU tests run the plans the GPUs run). `fuse_qkv_attention` on CUDA with
    DSC_QKV_ATTENTION=1 (measured slower: bench/NOTES.md); `prefetch_next_weight` on CUDA with
    DSC_ATTN_PREFETCH=1 (measured slower too)."""
    cuda = target.device == "cuda"
    fold = (["fold_rotary_into_attention"]
            if cuda and os.environ.get("DSC_ROTARY_IN_ATTENTION", "1") != "0" else [])
    qkv = (["fuse_qkv_attention"]
           if cuda and os.environ.get("DSC_QKV_ATTENTION", "0") == "1" else [])
    fuse = ["fuse"] if cuda else []
    prefetch = (["prefetch_next_weight"]
                if cuda and os.environ.get("DSC_ATTN_PREFETCH", "0") == "1" else [])
    rows = ["fuse_linear_all_reduce"] if target.tp > 1 else []
    return ["addmm_to_linear", *rows, "merge_projections", *fold, *qkv, *fuse, *prefetch,
            "memory_plan"]
