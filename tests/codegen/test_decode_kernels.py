"""Whole models through fusion and code generation: kernels per decode layer, and numerics.

The decode program is lowered as for a CUDA target (kernel choice included) without running it;
the forward program runs on the CPU with every fused region as a generated kernel (interpreter).
"""

import functools
from collections import Counter

import pytest
import torch
from torch import fx

from dsc import zoo
from dsc.codegen.lower import lower
from dsc.codegen.select import choose_kernels
from dsc.codegen.triton_codegen import region_sources
from dsc.compiler import _load_passes
from dsc.frontend import trace
from dsc.passes.context import PassContext
from dsc.passes.manager import PassManager
from dsc.pipelines import backend, cached, trunk
from dsc.runtime import generated
from dsc.runtime.executor import Executor
from tests.codegen.helpers import CUDA, generated_program

# Steps that launch no GPU work: views, size queries, tuple access.
VIEWS = {
    "aten::view.default",
    "aten::_unsafe_view.default",
    "aten::transpose.int",
    "aten::slice.Tensor",
    "aten::split.Tensor",
    "aten::unsqueeze.default",
    "aten::squeeze.dim",
    "aten::expand.default",
    "aten::permute.default",
    "aten::alias.default",
    "aten::t.default",
    "aten::sym_size.int",
}


@functools.cache
def _traced(name: str, layers: int):
    _load_passes()
    key = "n_layer" if name == "tiny-gpt2" else "num_hidden_layers"
    model = zoo.build(name, init_std=0.3, **{key: layers})
    return trace(model, dtype=torch.float32, max_batch=4, max_seq_len=64, position_ids=True)


def _run(t, passes: list[str], program: str):
    """Run passes over a copy of the traced graph (passes rewrite in place; traces are shared)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(t.gm.graph, {}))
    ctx = PassContext(target=CUDA, weights=dict(t.weights), info=t.info, inputs=t.inputs)
    gm = PassManager(ctx).run(fx.GraphModule(torch.nn.Module(), graph), passes, program=program)
    return gm, ctx


def _decode_launches(name: str, layers: int, fuse: bool) -> Counter:
    passes = [p for p in trunk(CUDA) + cached(CUDA) + backend(CUDA) if fuse or p != "fuse"]
    gm, _ = _run(_traced(name, layers), passes, "decode")
    program = lower(gm, "decode", choose_kernels(gm, "decode", CUDA))
    return Counter(
        s["op"] for s in program.steps if s["op"] not in VIEWS and not s["op"].startswith("py::")
    )


def _per_layer(name: str, fuse: bool) -> Counter:
    # One more layer adds exactly one layer's steps; the embedding, head and rotary tables cancel.
    return _decode_launches(name, 2, fuse) - _decode_launches(name, 1, fuse)


def test_llama_decode_layer_launches_8_kernels_after_fusion(monkeypatch):
    """A Llama decoder layer's decode step: 12 GPU steps unfused, 8 fused (the default).

    Unfused: rms_norm, QKV GEMM, rotary q, rotary k, attention, O GEMM, residual add, rms_norm,
    gate/up GEMM, gated activation, down GEMM, residual add.
    Fused: [residual add + rms_norm], QKV GEMM, [rotary q + rotary k] (one launch, two groups),
    attention, O GEMM, [residual add + rms_norm], [gate/up GEMM + gated SiLU], down GEMM.
    At decode sizes every step is one launch: the small-batch GEMM applies the gated SiLU to its
    own sums, and the attention kernel writes the step's keys and values into the cache itself
    (plus the split-key merge when the cache is split). The paper's Deep-Fusion design gives
    about 6-8.
    """
    monkeypatch.setenv("DSC_NORM_PROLOGUE", "0")
    monkeypatch.setenv("DSC_ROTARY_IN_ATTENTION", "0")
    before, after = _per_layer("tiny-llama", False), _per_layer("tiny-llama", True)
    assert sum(before.values()) == 12
    assert sum(after.values()) == 8
    regions = {op: n for op, n in after.items() if op.startswith("kernel::region_")}
    assert sorted(regions.values()) == [1, 1, 2]  # res+norm twice (one kernel), rotary, up+act
    assert after["cuda::cached_attention"] == 1 and after["cuda::linear_small_batch"] == 3


def test_llama_decode_layer_launches_6_kernels_with_norm_prologues(monkeypatch):
    """With DSC_NORM_PROLOGUE=1: the paper's four regions plus rotary and attention.

    [rms_norm + QKV GEMM] (the norm as the GEMM's prologue), [rotary q + rotary k], attention,
    [O GEMM + residual add], [rms_norm + gate/up GEMM + gated SiLU], [down GEMM + residual add].
    """
    monkeypatch.setenv("DSC_NORM_PROLOGUE", "1")
    monkeypatch.setenv("DSC_ROTARY_IN_ATTENTION", "0")
    after = _per_layer("tiny-llama", True)
    assert sum(after.values()) == 6
    regions = {op: n for op, n in after.items() if op.startswith("kernel::region_")}
    # norm+QKV, rotary, O+residual and down+residual (one kernel, twice), norm+gate/up+SiLU
    assert sorted(regions.values()) == [1, 1, 1, 2]
    assert after["cuda::cached_attention"] == 1 and "cuda::linear_small_batch" not in after
    assert "dsc::fused_region.default" not in after  # every region has generated code


def test_llama_decode_layer_launches_7_kernels_with_rotary_in_attention(monkeypatch):
    """By default the attention kernel rotates q and the new keys itself: the [rotary q +
    rotary k] region is gone."""
    monkeypatch.setenv("DSC_NORM_PROLOGUE", "0")
    monkeypatch.delenv("DSC_ROTARY_IN_ATTENTION", raising=False)
    after = _per_layer("tiny-llama", True)
    assert sum(after.values()) == 7
    regions = {op: n for op, n in after.items() if op.startswith("kernel::region_")}
    assert sorted(regions.values()) == [1, 2]  # res+norm twice (one kernel), up+act
    assert after["cuda::rotary_cached_attention"] == 1 and "cuda::cached_attention" not in after


def test_gpt2_decode_layer_launches_5_kernels_after_fusion():
    """GPT-2: 10 GPU steps per decode layer unfused (LayerNorm x2, Conv1D projections x4 —
    linears over transposed weights after addmm_to_linear, the dropout clones gone —, residual
    adds x2, GeLU, attention); 5 fused, the paper's four regions plus attention: [LayerNorm +
    QKV], attention, [out + residual add], [LayerNorm + up + GeLU], [down + residual add]."""
    before, after = _per_layer("tiny-gpt2", False), _per_layer("tiny-gpt2", True)
    assert sum(before.values()) == 10
    assert sum(after.values()) == 5
    regions = {op: n for op, n in after.items() if op.startswith("kernel::region_")}
    assert sorted(regions.values()) == [1, 1, 2]  # norm+QKV, norm+up+GeLU, out/down+residual
    assert after["cuda::cached_attention"] == 1 and "cuda::linear_small_batch" not in after


def test_gpt2_decode_layer_keeps_7_kernels_without_norm_prologues(monkeypatch):
    """DSC_NORM_PROLOGUE=0: each residual add joins the LayerNorm that reads its sum."""
    monkeypatch.setenv("DSC_NORM_PROLOGUE", "0")
    assert sum(_per_layer("tiny-gpt2", True).values()) == 7


def test_opt_decode_layer_launches_5_kernels_after_fusion():
    """OPT: its query scaling folds into the attention's scale and its flattened MLP keeps the
    LayerNorm next to fc1, so its layer is the same five kernels as GPT-2's (ReLU for GeLU)."""
    after = _per_layer("tiny-opt", True)
    assert sum(after.values()) == 5
    assert after["cuda::cached_attention"] == 1 and "cuda::linear_small_batch" not in after


def test_tiny_llama_forward_through_generated_kernels():
    # 10 rows: GEMMs then epilogue kernels (the tiled-GEMM path is in test_triton_codegen.py).
    seq = 5
    t = _traced("tiny-llama", 2)
    gm, ctx = _run(t, trunk(CUDA) + backend(CUDA), "forward")
    program = generated_program(gm)
    reference = lower(gm, "forward", {})  # the same regions, run op by op
    ids = torch.randint(0, t.info.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    feeds = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(seq).expand(2, seq),
    }
    feeds = {k: feeds[k] for k in program.inputs}
    (out,) = Executor(program, ctx.weights, torch.device("cpu"))(**feeds)
    (ref,) = Executor(reference, ctx.weights, torch.device("cpu"))(**feeds)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_qkv_attention_takes_the_norm_projection_and_attention_of_a_layer(monkeypatch):
    """DSC_QKV_ATTENTION=1: [norm + QKV + attention] is one step, so a Llama layer is four:
    that step, [O GEMM + residual add], [norm + gate/up GEMM + gated SiLU], [down GEMM +
    residual add]; GPT-2's the same four."""
    monkeypatch.setenv("DSC_QKV_ATTENTION", "1")
    for name in ("tiny-llama", "tiny-gpt2"):
        after = _per_layer(name, True)
        assert sum(after.values()) == 4, (name, after)
        assert after["cuda::qkv_cached_attention"] == 1


@pytest.mark.parametrize("batch,setting", [(1, "DSC_QKV_ATTENTION"), (2, "DSC_QKV_ATTENTION"),
                                           (4, "DSC_NORM_DEFER_ROWS"), (1, "DSC_ATTN_PREFETCH"),
                                           (1, "DSC_GEMV_PRELOAD"), (2, "DSC_DECODE_V_WITH_K")])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_opt_in_decode_step_through_the_chosen_kernels(name, batch, setting, monkeypatch):
    """One decode step with every kernel the GPU would run, on the interpreter, equals the
    same program run op by op — logits and the cache rows it writes. DSC_QKV_ATTENTION=1: the
    fused QKV + attention kernel for one sequence, its fallback for two. DSC_NORM_DEFER_ROWS=1:
    four rows, whose GEMM row tiles apply the input RMSNorm to their sums.
    DSC_ATTN_PREFETCH=1: each attention step names the next projection's weight.
    DSC_GEMV_PRELOAD=1: one-row GEMV tiles take their first weight step before the PDL wait.
    DSC_DECODE_V_WITH_K=1: decode attention loads V beside K."""
    monkeypatch.setenv(setting, "1")
    program = _decode_step_through_chosen_kernels(name, batch)
    fused = any(s["op"] == "cuda::qkv_cached_attention" for s in program.steps)
    assert fused == (setting == "DSC_QKV_ATTENTION")
    prefetching = [s for s in program.steps if s["kwargs"].get("prefetch")]
    assert len(prefetching) == (2 if setting == "DSC_ATTN_PREFETCH" else 0)


@pytest.mark.parametrize("batch", [1, 3])
def test_mixtral_decode_step_runs_its_experts_through_the_moe_kernels(batch):
    """Each MoE block of a decode step is one `cuda::moe` step (routing and grouped GEMMs on
    the device, nothing for a CUDA graph to refuse); the step equals the op-by-op program."""
    program = _decode_step_through_chosen_kernels("tiny-mixtral", batch)
    assert sum(s["op"] == "cuda::moe" for s in program.steps) == 2  # one per layer
    assert not any(s["op"] == "dsc::moe.default" for s in program.steps)


def _decode_step_through_chosen_kernels(name: str, batch: int, seq: int = 1, start: int = 9,
                                        entry: str = "decode"):
    """One step (decode, or a prompt of `seq` tokens at `start`) with every kernel the GPU
    would run, on the interpreter, against the same program run op by op: logits and the
    cache rows it writes (slot p % slots of position p: a windowed layer's ring). Returns the
    program."""
    import dataclasses

    target = dataclasses.replace(CUDA, max_batch=4, max_seq_len=32)  # a cache the kernel takes
    t = _traced(name, 2)
    graph = fx.Graph()
    graph.output(graph.graph_copy(t.gm.graph, {}))
    ctx = PassContext(target=target, weights=dict(t.weights), info=t.info, inputs=t.inputs)
    gm = PassManager(ctx).run(fx.GraphModule(torch.nn.Module(), graph),
                              trunk(target) + cached(target) + backend(target), program="decode")
    program = lower(gm, entry, choose_kernels(gm, entry, target))
    generated.register_sources(region_sources([program]))
    reference = lower(gm, entry, {})
    g = torch.Generator().manual_seed(batch)
    valid = torch.zeros(batch, 32, dtype=torch.bool)
    valid[:, : start + seq] = True
    feeds = {
        "input_ids": torch.randint(3, t.info.vocab_size, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, start + seq, dtype=torch.long),
        "position_ids": torch.arange(start, start + seq).expand(batch, seq),
        "kv_valid": valid,
        "cache_start": torch.tensor([start]),
        **{spec["name"]: torch.randn(spec["shape"], generator=g) for spec in ctx.notes["cache"]},
    }
    feeds = {k: feeds[k] for k in program.inputs}
    twin = {k: v.clone() for k, v in feeds.items()}
    (out, *_) = Executor(program, ctx.weights, torch.device("cpu"))(**feeds)
    (ref, *_) = Executor(reference, ctx.weights, torch.device("cpu"))(**twin)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for spec in ctx.notes["cache"]:
        slots = torch.arange(start, start + seq) % spec["shape"][2]
        key = spec["name"]
        torch.testing.assert_close(feeds[key][:batch, :, slots], twin[key][:batch, :, slots])
    return program


@pytest.mark.parametrize("entry,seq,start", [("decode", 1, 9), ("decode", 1, 2),
                                             ("prefill", 7, 0), ("prefill", 2, 0)])
def test_a_windowed_layers_ring_cache_through_the_chosen_kernels(entry, seq, start):
    """tiny-mistral-sliding (window 4): its caches are rings of 4 slots. A decode step (the
    decode kernel writing and reading the ring), a prompt longer than the ring (its own keys
    attended, the last 4 kept) and a short one equal the op-by-op program."""
    program = _decode_step_through_chosen_kernels("tiny-mistral-sliding", 2, seq, start, entry)
    assert any(s["op"].startswith("cuda::") and "attention" in s["op"] for s in program.steps)


@pytest.mark.parametrize("entry,seq,start", [("decode", 1, 9), ("prefill", 7, 0)])
def test_latent_attention_through_the_chosen_kernels(entry, seq, start):
    """tiny-deepseek-v3: keys 24 wide, values 16. The decode kernel writes and reads both
    caches, the prompt goes through the flash kernel; both equal the op-by-op program."""
    program = _decode_step_through_chosen_kernels("tiny-deepseek-v3", 2, seq, start, entry)
    attention = [s["op"] for s in program.steps if "attention" in s["op"]]
    assert attention and all(op.startswith("cuda::") for op in attention)


def _decode_program(model) -> object:
    _load_passes()
    t = trace(model, dtype=torch.float32, max_batch=4, max_seq_len=64, position_ids=True)
    gm, _ = _run(t, trunk(CUDA) + cached(CUDA) + backend(CUDA), "decode")
    return lower(gm, "decode", choose_kernels(gm, "decode", CUDA))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mixtral", "tiny-gpt-oss",
                                  "tiny-bloom", "tiny-mistral-sliding", "tiny-deepseek-v3"])
def test_decode_steps_the_kernels_cover_make_the_host_wait_nowhere(name):
    # What a CUDA graph needs: every attention and MoE step is a kernel's.
    from dsc.runtime.cuda_graphs import host_waits

    key = "n_layer" if name == "tiny-gpt2" else "num_hidden_layers"
    assert host_waits(_decode_program(zoo.build(name, **{key: 1}))) == []


def test_a_head_size_no_kernel_takes_is_named_as_a_host_wait():
    # 288-wide heads: past the attention kernels' 256, so the step runs the op's reference,
    # which reads the start slot on the host; the runtime replays no graph and says why.
    from dsc.runtime.cuda_graphs import host_waits

    model = zoo.build("tiny-llama", num_hidden_layers=1, head_dim=288)
    waits = host_waits(_decode_program(model))
    assert len(waits) == 1 and "cached_attention.default" in waits[0]
