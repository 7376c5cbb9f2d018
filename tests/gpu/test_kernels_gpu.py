"""The Triton kernels compiled for a real GPU: real shapes, bf16 and fp16, against fp32 references.

Skipped without CUDA, and under TRITON_INTERPRET=1 (the interpreter's bf16 `tl.dot` is wrong).
Run apart from tests/kernels, whose conftest turns the interpreter on.
"""

import math
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and compiled (not interpreted) Triton",
)

from dsc.kernels.decode_attention import DecodeConfig, decode_attention
from dsc.kernels.flash_attention import attention, flash_attention
from dsc.kernels.flash_attention_tma import TmaFlashConfig, flash_attention_tma
from dsc.kernels.gemm import gated_linear, linear_fused
from dsc.kernels.norms import layer_norm, rms_norm
from dsc.kernels.reference import (
    attention_reference,
    gated_linear_reference,
    layer_norm_reference,
    linear_reference,
    rms_norm_reference,
)
from dsc.kernels.small_batch_gemm import SmallBatchConfig, linear_small_batch

DTYPES = [torch.bfloat16, torch.float16]
TOL = 1e-2


def close(out: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    scale = ref.double().norm().item()
    err = (out.double() - ref.double()).norm().item() / (scale if scale > 0 else 1.0)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def nan_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16, 32])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (1000, 999)])
def test_linear_small_batch(m, n, k, dtype):
    torch.manual_seed(m + n + k)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
    bias = torch.randn(n, device="cuda", dtype=dtype) if n == 1000 else None
    out = linear_small_batch(x, w, bias, out=nan_like((m, n), dtype))
    close(out, linear_reference(x, w, bias))


@pytest.mark.parametrize("n,k", [(4096, 4096), (2560, 2048), (1000, 999), (64, 100)])
def test_linear_small_batch_one_row_with_the_first_step_preloaded(n, k, monkeypatch):
    """DSC_GEMV_PRELOAD=1: one-row tiles load their first weight step before the PDL wait."""
    monkeypatch.setenv("DSC_GEMV_PRELOAD", "1")
    torch.manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") / math.sqrt(k)).to(torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    out = linear_small_batch(x, w, bias, residual=res, out=nan_like((1, n), torch.bfloat16))
    close(out, linear_reference(x, w, bias) + res)


@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("case", [("layer", 4800, 1600, torch.float16),
                                  ("rms", 12288, 4096, torch.bfloat16),
                                  ("rms", 1000, 12000, torch.bfloat16)],
                         ids=["layer-4800x1600-fp16", "rms-12288x4096-bf16", "rms-1000x12000-bf16"])
@pytest.mark.parametrize("defer_rows", ["0", "1"])
def test_linear_small_batch_norm_prologue(case, m, defer_rows, monkeypatch):
    """norm(x) @ W^T with the norm applied as x is loaded (one row; row statistics from one
    load of the row, or from K steps for rows above 8192 elements) or by the norm kernel first
    (row tiles; with DSC_NORM_DEFER_ROWS=1 an RMSNorm applied to their sums)."""
    from dsc.ops.norms import layer_norm, rms_norm

    monkeypatch.setenv("DSC_NORM_DEFER_ROWS", defer_rows)
    kind, n, k, dtype = case
    torch.manual_seed(n + k)
    x = (torch.randn(m, k, device="cuda") * 3 + 1).to(dtype)
    w = (torch.randn(n, k, device="cuda") / math.sqrt(k)).to(dtype)
    nw = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    nb = torch.randn(k, device="cuda").to(dtype)
    if kind == "rms":
        normed, norm = rms_norm(x, nw, 1e-5, dtype), ("rms", nw, None, 1e-5)
    else:
        normed, norm = layer_norm(x, nw, nb, 1e-5), ("layer", nw, nb, 1e-5)
    out = linear_small_batch(x, w, norm=norm, out=nan_like((m, n), dtype))
    close(out, linear_reference(normed, w))


@pytest.mark.parametrize("defer_rows", ["0", "1"])
@pytest.mark.parametrize("m", [1, 16])
def test_linear_small_batch_gated_rms_norm(m, defer_rows, monkeypatch):
    """silu(norm(x) @ gate^T) * (norm(x) @ up^T) at the Llama-7B's shape: one row applies the
    RMSNorm to the finished sums; a 16-row tile runs the norm kernel first, or with
    DSC_NORM_DEFER_ROWS=1 applies it to its sums too."""
    from dsc.ops.norms import rms_norm

    monkeypatch.setenv("DSC_NORM_DEFER_ROWS", defer_rows)
    torch.manual_seed(m)
    k, n, dtype = 4096, 11008, torch.bfloat16
    x = (torch.randn(m, k, device="cuda") * 3 + 1).to(dtype)
    w = (torch.randn(2 * n, k, device="cuda") / math.sqrt(k)).to(dtype)
    nw = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    out = linear_small_batch(x, w, activation="silu", gated=True, norm=("rms", nw, None, 1e-5),
                             out=nan_like((m, n), dtype))
    normed = rms_norm(x, nw, 1e-5, dtype)
    gate, up = linear_reference(normed, w[:n]), linear_reference(normed, w[n:])
    close(out, torch.nn.functional.silu(gate.float()).to(dtype) * up)


@pytest.mark.parametrize(
    "config", [SmallBatchConfig(1, 16, 256, 4), SmallBatchConfig(16, 32, 128, 3)]
)
def test_linear_small_batch_split_k(config):
    torch.manual_seed(0)
    m = 1 if config.block_m == 1 else 5
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16) / 45
    bias = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    close(linear_small_batch(x, w, bias, config=config), linear_reference(x, w, bias))


# Every activation in bf16, one in fp16: each (dtype, activation) is a separate compile.
DTYPE_ACTIVATIONS = [(torch.bfloat16, a) for a in (None, "silu", "gelu", "gelu_tanh", "relu")]
DTYPE_ACTIVATIONS.append((torch.float16, "silu"))


@pytest.mark.parametrize("dtype,activation", DTYPE_ACTIVATIONS)
@pytest.mark.parametrize("m,n,k", [(512, 4096, 4096), (300, 777, 1000), (40, 512, 256)])
def test_linear_fused(m, n, k, activation, dtype):
    torch.manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    res = torch.randn(m, n, device="cuda", dtype=dtype)
    out = linear_fused(x, w, bias, activation, res, out=nan_like((m, n), dtype))
    close(out, linear_reference(x, w, bias, activation, res))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("m,n,k", [(256, 11008, 4096), (33, 100, 96)])
def test_gated_linear(m, n, k, activation, dtype):
    torch.manual_seed(n)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(2 * n, k, device="cuda", dtype=dtype) / math.sqrt(k)
    out = gated_linear(x, w, activation, out=nan_like((m, n), dtype))
    close(out, gated_linear_reference(x, w, activation))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 4096), (2048, 4096), (2, 7, 1000), (3, 16384)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norms(shape, with_residual, dtype):
    torch.manual_seed(shape[-1])
    x = torch.randn(shape, device="cuda", dtype=dtype)
    res = torch.randn(shape, device="cuda", dtype=dtype) if with_residual else None
    w = torch.randn(shape[-1], device="cuda", dtype=dtype)
    b = torch.randn(shape[-1], device="cuda", dtype=dtype)
    got = rms_norm(x, w, 1e-6, res, out=nan_like(shape, dtype))
    want = rms_norm_reference(x, w, 1e-6, res)
    for g, r in zip(*((got, want) if with_residual else ((got,), (want,)))):
        close(g, r)
    got = layer_norm(x, w, b, 1e-5, res)
    want = layer_norm_reference(x, w, b, 1e-5, res)
    for g, r in zip(*((got, want) if with_residual else ((got,), (want,)))):
        close(g, r)


def make_cache(b, hq, hkv, s, t, d, start, dtype, pad=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, s, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype, generator=g)
    valid = torch.ones(b, t, device="cuda", dtype=torch.bool)
    if pad:
        # Left padding of different lengths, and slots past the live length filled with NaN.
        for i in range(b):
            valid[i, : (7 * i) % max(1, start + 1)] = False
        k[:, :, start + s :] = float("nan")
        v[:, :, start + s :] = float("nan")
        k.masked_fill_(~valid[:, None, :, None], float("nan"))
        v.masked_fill_(~valid[:, None, :, None], float("nan"))
    return q, k, v, valid, torch.tensor([start], device="cuda", dtype=torch.int64)


DECODE_CASES = [
    # b, hq, hkv, s, t, d, start
    (16, 32, 32, 1, 2048, 128, 2047),
    (1, 32, 32, 1, 8192, 128, 5000),
    (2, 32, 8, 1, 4096, 128, 3000),
    (3, 25, 25, 1, 1024, 64, 700),
    (2, 32, 8, 4, 1024, 128, 500),
]


@pytest.mark.parametrize("merge,v_with_k", [("kernel", "0"), ("split", "0"), ("kernel", "1")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_decode_attention(case, dtype, merge, v_with_k, monkeypatch):
    """Both ways of merging the key splits' partials: a second launch, or the last split
    program of each (sequence, kv head) (DSC_DECODE_MERGE=split); and V loaded beside K
    (DSC_DECODE_V_WITH_K=1), over caches whose padded slots hold NaN."""
    if dtype == torch.float16 and case is not DECODE_CASES[0]:
        pytest.skip("fp16 is checked on the first shape only (compile time)")
    monkeypatch.setenv("DSC_DECODE_MERGE", merge)
    monkeypatch.setenv("DSC_DECODE_V_WITH_K", v_with_k)
    b, hq, hkv, s, t, d, start = case
    q, k, v, valid, st = make_cache(b, hq, hkv, s, t, d, start, dtype)
    scale = 1 / math.sqrt(d)
    for _ in range(2):  # the second call finds the arrival counters reset by the first
        out = decode_attention(q, k, v, valid, st, True, scale, out=nan_like(q.shape, dtype))
        close(out, attention_reference(q, k, v, valid, st, True, scale))


FLASH_CASES = [
    # b, hq, hkv, s, t, d, start, causal
    (1, 32, 32, 2048, 2048, 128, 0, True),
    (2, 32, 8, 500, 1024, 128, 100, True),
    (2, 32, 8, 500, 1024, 128, 100, False),
    (1, 20, 4, 333, 700, 80, 17, True),
    (2, 12, 12, 257, 257, 64, 0, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_attention(case, dtype):
    if dtype == torch.float16 and case is not FLASH_CASES[0]:
        pytest.skip("fp16 is checked on the first shape only (compile time)")
    b, hq, hkv, s, t, d, start, causal = case
    q, k, v, valid, st = make_cache(b, hq, hkv, s, t, d, start, dtype, seed=s)
    scale = 1 / math.sqrt(d)
    out = flash_attention(q, k, v, valid, st, causal, scale, out=nan_like(q.shape, dtype))
    close(out, attention_reference(q, k, v, valid, st, causal, scale))
    close(attention(q, k, v, valid, st, causal, scale), out, tol=1e-3)


@pytest.mark.parametrize("case", [FLASH_CASES[0], FLASH_CASES[1], FLASH_CASES[3]])
def test_flash_attention_unpadded_fast_path(case):
    b, hq, hkv, s, t, d, start, causal = case
    q, k, v, valid, st = make_cache(b, hq, hkv, s, t, d, start, torch.bfloat16, seed=s, pad=False)
    scale = 1 / math.sqrt(d)
    out = flash_attention(q, k, v, valid, st, causal, scale, out=nan_like(q.shape, torch.bfloat16),
                          padded=False)
    close(out, attention_reference(q, k, v, valid, st, causal, scale))


@pytest.mark.parametrize("tiles", ["128x64 w8 s3", "64x64 w4 s3", "128x128 w8 s2"])
@pytest.mark.parametrize("case", [FLASH_CASES[0], FLASH_CASES[1], FLASH_CASES[4]])
def test_flash_attention_through_descriptors(case, tiles):
    """The TMA kernel (DSC_FLASH_TMA=1) on real shapes; D = 80 is not a descriptor case."""
    b, hq, hkv, s, t, d, start, causal = case
    q, k, v, valid, st = make_cache(b, hq, hkv, s, t, d, start, torch.bfloat16, seed=s, pad=False)
    scale = 1 / math.sqrt(d)
    shape, warps, stages = tiles.split()
    block_m, block_n = map(int, shape.split("x"))
    cfg = TmaFlashConfig(block_m, block_n, int(warps[1:]), int(stages[1:]))
    out = flash_attention_tma(q, k, v, st, causal, scale, nan_like(q.shape, torch.bfloat16), cfg)
    close(out, attention_reference(q, k, v, valid, st, causal, scale))


@pytest.mark.parametrize("window", [1, 512, 4096])
@pytest.mark.parametrize("case", [DECODE_CASES[1], DECODE_CASES[2], DECODE_CASES[4]],
                         ids=lambda c: "-".join(map(str, c)))
def test_decode_attention_in_a_sliding_window(case, window):
    # Slots behind every query's window hold NaN: the programs share out only the window.
    b, hq, hkv, s, t, d, start = case
    q, k, v, valid, st = make_cache(b, hq, hkv, s, t, d, start, torch.bfloat16)
    scale = 1 / math.sqrt(d)
    want = attention_reference(q, k, v, valid, st, True, scale, window=window)
    behind = max(start - window + 1, 0)
    k[:, :, :behind], v[:, :, :behind] = float("nan"), float("nan")
    out = decode_attention(q, k, v, valid, st, True, scale, out=nan_like(q.shape, q.dtype),
                           window=window)
    close(out, want)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("window", [1, 100, 4096])
@pytest.mark.parametrize("case", [FLASH_CASES[0], FLASH_CASES[1], FLASH_CASES[3]],
                         ids=lambda c: "-".join(map(str, c)))
def test_flash_attention_in_a_sliding_window(case, window, padded):
    b, hq, hkv, s, t, d, start, causal = case
    q, k, v, valid, st = make_cache(b, hq, hkv, s, t, d, start, torch.bfloat16, seed=s, pad=padded)
    scale = 1 / math.sqrt(d)
    out = flash_attention(q, k, v, valid, st, True, scale, out=nan_like(q.shape, q.dtype),
                          padded=None if padded else False, window=window)
    close(out, attention_reference(q, k, v, valid, st, True, scale, window=window))


def _bloom_slopes(heads: int) -> torch.Tensor:
    """BLOOM's ALiBi slopes: 2^(-8 i / n) for the nearest power of two n, then interleaved."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    return build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1].cuda()


@pytest.mark.parametrize("case", [DECODE_CASES[0], DECODE_CASES[2], DECODE_CASES[4]],
                         ids=lambda c: "-".join(map(str, c)))
def test_decode_attention_with_alibi(case):
    b, hq, hkv, s, t, d, start = case
    q, k, v, valid, st = make_cache(b, hq, hkv, s, t, d, start, torch.bfloat16)
    scale, slopes = 1 / math.sqrt(d), _bloom_slopes(hq)
    out = decode_attention(q, k, v, valid, st, True, scale, out=nan_like(q.shape, q.dtype),
                           alibi=slopes)
    close(out, attention_reference(q, k, v, valid, st, True, scale, alibi=slopes))


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("case", [FLASH_CASES[0], FLASH_CASES[1], FLASH_CASES[3]],
                         ids=lambda c: "-".join(map(str, c)))
def test_flash_attention_with_alibi(case, padded):
    b, hq, hkv, s, t, d, start, causal = case
    q, k, v, valid, st = make_cache(b, hq, hkv, s, t, d, start, torch.bfloat16, seed=s, pad=padded)
    scale, slopes = 1 / math.sqrt(d), _bloom_slopes(hq)
    out = flash_attention(q, k, v, valid, st, True, scale, out=nan_like(q.shape, q.dtype),
                          padded=None if padded else False, alibi=slopes)
    close(out, attention_reference(q, k, v, valid, st, True, scale, alibi=slopes))


@pytest.mark.parametrize("merge_in_split", [False, True])
def test_decode_attention_replays_in_a_cuda_graph(merge_in_split):
    # The position lives in device memory: one captured graph serves every decode step. Three
    # calls per replay: the in-split merge's counters must be back at zero after each.
    b, hq, hkv, t, d = 4, 32, 8, 4096, 128
    q, k, v, valid, st = make_cache(b, hq, hkv, 1, t, d, 0, torch.bfloat16, pad=False)
    scale = 1 / math.sqrt(d)
    cfg = DecodeConfig(block_n=64, num_splits=8, merge_in_split=merge_in_split)
    decode_attention(q, k, v, valid, st, True, scale, config=cfg)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [decode_attention(q, k, v, valid, st, True, scale, config=cfg) for _ in range(3)]
    for start in (0, 63, 64, 1000, 4095):
        st.fill_(start)
        graph.replay()
        want = attention_reference(q, k, v, valid, st, True, scale)
        for out in outs:
            close(out, want)


@pytest.mark.parametrize("bulk", ["0", "1"])
@pytest.mark.parametrize("weight_shape,budget_mb", [((2048, 2048), "16"), ((4096, 11008), "4"),
                                                     ((97, 1600), "16")])
def test_decode_attention_prefetching_a_weight_is_unchanged(weight_shape, budget_mb, bulk,
                                                            monkeypatch):
    # The next projection's weight requested into L2 (whole, or each row's first lines under a
    # budget; a ragged one; line by line or in bulk): the attention and the caches it writes
    # stay bit for bit the same.
    monkeypatch.setenv("DSC_PREFETCH_MB", budget_mb)
    monkeypatch.setenv("DSC_PREFETCH_BULK", bulk)
    b, hq, hkv, t, d = 1, 32, 4, 200, 64
    q, k, v, valid, st = make_cache(b, hq, hkv, 1, t, d, 159, torch.bfloat16, pad=False)
    new_k, new_v = (torch.randn(b, hkv, 1, d, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
    weight = torch.randn(*weight_shape, device="cuda", dtype=torch.bfloat16)
    outs = []
    for prefetch in (None, weight):
        kc, vc = k.clone(), v.clone()
        outs.append((decode_attention(q, kc, vc, valid, st, True, 0.125, new_k=new_k,
                                      new_v=new_v, prefetch=prefetch), kc, vc))
    for a, b_ in zip(*outs):
        assert torch.equal(a, b_)


def test_small_batch_gemm_replays_in_a_cuda_graph():
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    linear_small_batch(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_small_batch(x, w)
    for _ in range(2):
        x.normal_()
        graph.replay()
        close(out, linear_reference(x, w))


@pytest.mark.parametrize("merge", ["kernel", "split"])
def test_dependent_chain_in_a_cuda_graph_sees_each_predecessor(merge, monkeypatch):
    # Each kernel is placed while its predecessor runs (dsc.kernels.pdl, on by default on
    # Hopper) and must still read that predecessor's finished output: 24 norm -> GEMV -> decode
    # attention links, each reading what the last wrote, replayed with fresh inputs, against
    # the same chain in torch.
    from dsc.kernels import pdl

    monkeypatch.setenv("DSC_DECODE_MERGE", merge)
    torch.manual_seed(0)
    hidden, links, t, d = 1024, 24, 256, 64
    weights = [torch.randn(hidden, hidden, device="cuda") / math.sqrt(hidden) for _ in range(links)]
    norm_w = torch.rand(hidden, device="cuda") + 0.5
    x = torch.randn(1, hidden, device="cuda")
    k = torch.randn(1, hidden // d, t, d, device="cuda")
    v = torch.randn(1, hidden // d, t, d, device="cuda")
    valid = torch.ones(1, t, dtype=torch.bool, device="cuda")
    st = torch.tensor([t - 1], device="cuda")

    def chain(kernels: bool) -> torch.Tensor:
        h = x
        for w in weights:
            if kernels:
                h = linear_small_batch(rms_norm(h, norm_w, 1e-6), w)
                q = h.view(1, hidden // d, 1, d)
                h = decode_attention(q, k, v, valid, st, True, 0.125).reshape(1, hidden) + h
            else:
                h = rms_norm_reference(h, norm_w, 1e-6) @ w.T
                q = h.view(1, hidden // d, 1, d)
                h = attention_reference(q, k, v, valid, st, True, 0.125).reshape(1, hidden) + h
        return h

    chain(True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(True)
    for _ in range(3):
        x.normal_()
        graph.replay()
        close(out, chain(False), tol=1e-4)
    assert pdl.enabled(x.device) == (torch.cuda.get_device_capability()[0] >= 9
                                     and os.environ.get("DSC_PDL", "1") != "0")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 16, 300])  # decode, batch 16, a prefill's 64-row blocks
def test_moe_matches_the_fp32_reference(dtype, tokens):
    from dsc.ops.moe import moe_reference
    from dsc.runtime.cuda_impls import moe

    g = torch.Generator("cuda").manual_seed(0)
    experts, hidden, ffn = 8, 512, 704  # F not a multiple of the 64-column tile

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    x = randn(tokens, hidden)
    router = randn(experts, hidden, scale=0.05)
    gate_up, down = randn(experts, 2 * ffn, hidden, scale=hidden**-0.5), randn(
        experts, hidden, ffn, scale=ffn**-0.5)
    out = moe(x, router, gate_up, down, 2, True, "silu")
    ref = moe_reference(x.float(), router.float(), gate_up.float(), down.float(), 2, True, "silu")
    close(out.float(), ref)


def test_moe_replays_in_a_cuda_graph():
    # Routing and alignment stay on the device: the captured block follows new inputs.
    from dsc.ops.moe import moe_reference
    from dsc.runtime.cuda_impls import moe

    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(4, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    router = torch.randn(8, 256, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1
    gate_up = torch.randn(8, 384, 256, device="cuda", generator=g, dtype=torch.bfloat16) / 16
    down = torch.randn(8, 256, 192, device="cuda", generator=g, dtype=torch.bfloat16) / 14
    moe(x, router, gate_up, down, 2, False, "silu")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe(x, router, gate_up, down, 2, False, "silu")
    for seed in range(3):
        x.copy_(torch.randn(4, 256, device="cuda", generator=g.manual_seed(seed)))
        graph.replay()
        ref = moe_reference(x.float(), router.float(), gate_up.float(), down.float(), 2, False,
                            "silu")
        close(out.float(), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_on_a_ring_cache(dtype):
    # A windowed layer's cache of W slots, position p in slot p % W, wrapped many times.
    g = torch.Generator("cuda").manual_seed(2)
    window, start, t = 256, 3000, 4096
    q = torch.randn(4, 32, 1, 128, device="cuda", generator=g).to(dtype)
    full_k = torch.randn(4, 8, t, 128, device="cuda", generator=g).to(dtype)
    full_v = torch.randn(4, 8, t, 128, device="cuda", generator=g).to(dtype)
    valid = torch.zeros(4, t, dtype=torch.bool, device="cuda")
    valid[:, : start + 1] = True
    positions = torch.arange(start - window + 1, start + 1, device="cuda")
    ring_k = torch.empty(4, 8, window, 128, device="cuda", dtype=dtype)
    ring_v = torch.empty_like(ring_k)
    ring_k[:, :, positions % window] = full_k[:, :, positions]
    ring_v[:, :, positions % window] = full_v[:, :, positions]
    st = torch.tensor([start], device="cuda")
    out = decode_attention(q, ring_k, ring_v, valid, st, True, 0.088, window=window,
                           new_k=full_k[:, :, start : start + 1].clone(),
                           new_v=full_v[:, :, start : start + 1].clone())
    ref = attention_reference(q, full_k, full_v, valid, st, True, 0.088, window=window)
    close(out, ref)


@pytest.mark.parametrize("heads", [16, 32])  # 32: two launches of 16 heads
@pytest.mark.parametrize("b,s,t,start", [(1, 1, 4096, 3000), (16, 1, 600, 500), (2, 4, 300, 90)])
def test_decode_attention_over_an_absorbed_latent(b, s, t, start, heads):
    """DeepSeek's absorbed latent attention: one kv head, keys [latent 512 | rotary 64] scored
    by 64-lane chunks, values the latent — the key cache's first 512 lanes, as the runtime
    lays them out."""
    q, k, _, valid, st = make_cache(b, heads, 1, s, t, 576, start, torch.bfloat16)
    v = k[..., :512]
    scale = 1 / math.sqrt(192)
    out = decode_attention(q, k, v, valid, st, True, scale,
                           out=nan_like((b, heads, s, 512), torch.bfloat16))
    close(out, attention_reference(q, k, v, valid, st, True, scale))


@pytest.mark.parametrize("b,s,t,start", [(1, 512, 512, 0), (2, 100, 300, 57)])
def test_flash_attention_over_an_absorbed_latent(b, s, t, start):
    q, k, _, valid, st = make_cache(b, 16, 1, s, t, 576, start, torch.bfloat16)
    v = k[..., :512]
    scale = 1 / math.sqrt(192)
    out = flash_attention(q, k, v, valid, st, True, scale,
                          out=nan_like((b, 16, s, 512), torch.bfloat16))
    close(out, attention_reference(q, k, v, valid, st, True, scale))


# Linear attention's decode steps at Qwen3.5's sizes (32 value heads of 128 lanes; a 4-tap
# convolution over 8192 channels), bf16 inputs, against the ops' torch form on the GPU.
@pytest.mark.parametrize("begun", [True, False])
def test_delta_rule_step_at_qwen35_sizes(begun):
    import dsc.ops  # noqa: F401
    from dsc.kernels.recurrent import delta_rule_step

    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(4, 1, 32, 128, device="cuda", generator=gen).bfloat16()
               for _ in range(3))
    g = -torch.nn.functional.softplus(torch.randn(4, 1, 32, device="cuda", generator=gen))
    beta = torch.rand(4, 1, 32, device="cuda", generator=gen).bfloat16()
    state = torch.randn(8, 32, 128, 128, device="cuda", generator=gen)
    start = torch.tensor([9 if begun else 0], device="cuda")
    ref_state = state.clone()
    ref = torch.ops.dsc.cached_gated_delta_rule(q, k, v, g, beta, ref_state, start, True)
    out = delta_rule_step(q, k, v, g, beta, state, start, True)
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    assert float((state - ref_state).norm() / ref_state.norm()) < 1e-5


def test_causal_conv1d_step_at_qwen35_sizes():
    import dsc.ops  # noqa: F401
    from dsc.kernels.recurrent import causal_conv1d_step

    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(4, 8192, 1, device="cuda", generator=gen).bfloat16()
    weight = torch.randn(8192, 4, device="cuda", generator=gen).bfloat16()
    state = torch.randn(8, 8192, 3, device="cuda", generator=gen).bfloat16()
    start = torch.tensor([5], device="cuda")
    ref_state = state.clone()
    ref = torch.ops.dsc.cached_causal_conv1d(x, weight, None, ref_state, start, "silu")
    out = causal_conv1d_step(x, weight, None, state, start, "silu")
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    assert torch.equal(state, ref_state)


def test_ssm_step_at_granite4_sizes():
    # Granite 4's Mamba-2 heads: 128 heads of 64 lanes, a 128-wide state in one group.
    import dsc.ops  # noqa: F401
    from dsc.kernels.recurrent import ssm_step

    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(4, 1, 128, 64, device="cuda", generator=gen).bfloat16()
    dt = torch.randn(4, 1, 128, device="cuda", generator=gen).bfloat16()
    A = -torch.rand(128, device="cuda", generator=gen) * 8
    B, C = (torch.randn(4, 1, 1, 128, device="cuda", generator=gen).bfloat16() for _ in range(2))
    D, bias = (torch.randn(128, device="cuda", generator=gen) for _ in range(2))
    state = torch.randn(8, 128, 128, 64, device="cuda", generator=gen)
    start = torch.tensor([5], device="cuda")
    ref_state = state.clone()
    ref = torch.ops.dsc.cached_ssm_scan(x, dt, A, B, C, D, bias, True, 0.0, float("inf"),
                                        ref_state, start)
    out = ssm_step(x, dt, A, B, C, D, bias, True, 0.0, float("inf"), state, start)
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    assert float((state - ref_state).norm() / ref_state.norm()) < 1e-5
