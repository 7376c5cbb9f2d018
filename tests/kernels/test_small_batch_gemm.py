"""linear_small_batch against the reference, on the Triton interpreter (tiny irregular shapes)."""

import dataclasses

import pytest
import torch

from dsc.kernels.reference import linear_reference
from dsc.kernels.small_batch_gemm import (
    SmallBatchConfig,
    linear_small_batch,
    pick_config,
    small_batch_wins,
)

# Small blocks keep the interpreter fast; each config exercises one path of the kernel.
CONFIGS = {
    "fma": SmallBatchConfig(block_m=1, block_n=16, block_k=16),
    "dot": SmallBatchConfig(block_m=16, block_n=16, block_k=16),
    "dot-split3": SmallBatchConfig(block_m=16, block_n=16, block_k=16, split_k=3),
    "fma-split2": SmallBatchConfig(block_m=1, block_n=16, block_k=32, split_k=2),
    "fma-narrow-split3": SmallBatchConfig(block_m=1, block_n=4, block_k=16, split_k=3),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("m,k,n", [(1, 37, 19), (3, 37, 19), (17, 64, 33)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(m, k, n, config, with_bias, assert_close, poisoned):
    torch.manual_seed(m * 100 + k + n)
    x, w = torch.randn(m, k), torch.randn(n, k)
    bias = torch.randn(n) if with_bias else None
    out = linear_small_batch(x, w, bias, out=poisoned((m, n)), config=config)
    assert_close(out, linear_reference(x, w, bias))


def _act(y, kind):
    return {None: y, "silu": torch.nn.functional.silu(y), "gelu": torch.nn.functional.gelu(y),
            "gelu_tanh": torch.nn.functional.gelu(y, approximate="tanh"),
            "relu": torch.relu(y)}[kind]


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("m,k,n", [(1, 37, 19), (3, 40, 21)])
@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_epilogue_bias_activation_residual(m, k, n, activation, config, assert_close, poisoned):
    torch.manual_seed(m + k + n)
    x, w, bias, res = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
    out = linear_small_batch(x, w, bias, activation=activation, residual=res,
                             out=poisoned((m, n)), config=config)
    assert_close(out, _act(linear_reference(x, w, bias), activation) + res)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("m,k,n", [(1, 37, 19), (3, 40, 21)])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gated_epilogue(m, k, n, activation, config, assert_close, poisoned):
    # weight = [gate; up]: the result is act(x @ gate^T) * (x @ up^T), N columns.
    torch.manual_seed(m * 7 + n)
    x, w = torch.randn(m, k), torch.randn(2 * n, k)
    out = linear_small_batch(x, w, activation=activation, gated=True, out=poisoned((m, n)),
                             config=config)
    ref = _act(linear_reference(x, w[:n]), activation) * linear_reference(x, w[n:])
    assert_close(out, ref)


@pytest.mark.parametrize("mode", ["default", "exact-one-load", "exact-k-steps"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("m,k,n", [(1, 37, 19), (3, 40, 21)])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_prologue(m, k, n, kind, config, mode, assert_close, poisoned, monkeypatch):
    # norm(x) @ W^T, the norm as dsc.ops.norms computes it (rows of irregular length K). One-row
    # tiles apply an RMSNorm after the weight stream by default; a LayerNorm, and any norm with
    # DSC_NORM_PROLOGUE_EXACT=1, takes the row statistics first, from one load of the row or
    # (rows above 8192) from a loop over K.
    from dsc.kernels import small_batch_gemm
    from dsc.ops.norms import layer_norm, rms_norm

    if mode != "default":
        monkeypatch.setenv("DSC_NORM_PROLOGUE_EXACT", "1")
    if mode == "exact-k-steps":
        monkeypatch.setattr(small_batch_gemm, "_stats_block", lambda k: 0)

    torch.manual_seed(m + 3 * k + n)
    x = torch.randn(m, k) * 3 + 1
    w, nw, nb = torch.randn(n, k), torch.randn(k), torch.randn(k)
    if kind == "rms":
        normed, norm = rms_norm(x, nw, 1e-5, x.dtype), ("rms", nw, None, 1e-5)
    else:
        normed, norm = layer_norm(x, nw, nb, 1e-5), ("layer", nw, nb, 1e-5)
    out = linear_small_batch(x, w, norm=norm, out=poisoned((m, n)), config=config)
    assert_close(out, linear_reference(normed, w))


ONE_ROW = {name: cfg for name, cfg in CONFIGS.items() if cfg.block_m == 1}


@pytest.mark.parametrize("config", ONE_ROW.values(), ids=ONE_ROW.keys())
@pytest.mark.parametrize("k", [9, 32, 37, 70])  # under one step, whole steps, ragged ends
@pytest.mark.parametrize("variant", ["bias+residual", "gated", "rms", "layer"])
def test_one_row_tiles_with_the_first_step_preloaded(k, variant, config, assert_close,
                                                     poisoned, monkeypatch):
    # DSC_GEMV_PRELOAD=1: the first K step's weight is loaded before the PDL wait and consumed
    # in a step of its own; every path of the stream must still add each K position once.
    from dsc.ops.norms import layer_norm, rms_norm

    monkeypatch.setenv("DSC_GEMV_PRELOAD", "1")
    torch.manual_seed(k)
    n = 19
    x = torch.randn(1, k) * 2 + 0.5
    nw, nb = torch.randn(k), torch.randn(k)
    if variant == "bias+residual":
        w, bias, res = torch.randn(n, k), torch.randn(n), torch.randn(1, n)
        out = linear_small_batch(x, w, bias, residual=res, out=poisoned((1, n)), config=config)
        want = linear_reference(x, w, bias) + res
    elif variant == "gated":
        w = torch.randn(2 * n, k)
        out = linear_small_batch(x, w, activation="silu", gated=True, norm=("rms", nw, None, 1e-5),
                                 out=poisoned((1, n)), config=config)
        h = rms_norm(x, nw, 1e-5, x.dtype)
        want = _act(linear_reference(h, w[:n]), "silu") * linear_reference(h, w[n:])
    else:
        w = torch.randn(n, k)
        norm = ("rms", nw, None, 1e-5) if variant == "rms" else ("layer", nw, nb, 1e-5)
        h = rms_norm(x, nw, 1e-5, x.dtype) if variant == "rms" else layer_norm(x, nw, nb, 1e-5)
        out = linear_small_batch(x, w, norm=norm, out=poisoned((1, n)), config=config)
        want = linear_reference(h, w)
    assert_close(out, want)


def test_preload_setting_is_checked(monkeypatch):
    monkeypatch.setenv("DSC_GEMV_PRELOAD", "on")
    with pytest.raises(ValueError, match="DSC_GEMV_PRELOAD='on'"):
        linear_small_batch(torch.randn(1, 8), torch.randn(4, 8), config=CONFIGS["fma"])


def test_an_unsplit_one_row_rms_norm_is_applied_after_the_stream(monkeypatch):
    from dsc.kernels.small_batch_gemm import _defer_norm

    one_row, rows = CONFIGS["fma"], dataclasses.replace(CONFIGS["fma"], block_m=16)
    assert _defer_norm("rms", one_row, 1, gated=True)
    assert not _defer_norm("layer", one_row, 1, gated=False)  # statistics first
    assert not _defer_norm("rms", one_row, 2, gated=False)  # K split: no program sees the row
    assert not _defer_norm("rms", rows, 1, gated=False)  # row tiles: the norm kernel first
    monkeypatch.setenv("DSC_NORM_DEFER_ROWS", "1")
    assert _defer_norm("rms", rows, 1, gated=True)
    assert not _defer_norm("layer", rows, 1, gated=False)
    assert not _defer_norm("rms", rows, 2, gated=False)
    monkeypatch.setenv("DSC_NORM_PROLOGUE_EXACT", "1")
    assert not _defer_norm("rms", one_row, 1, gated=False)
    assert not _defer_norm("rms", rows, 1, gated=False)


@pytest.mark.parametrize("gated", [False, True])
def test_row_tiles_apply_an_rms_norm_after_the_stream_when_asked(gated, assert_close,
                                                                  monkeypatch):
    # 17 rows over 16-row tiles (two row blocks, the second ragged), K = 40 (a ragged step):
    # with DSC_NORM_DEFER_ROWS=1 the GEMM takes the norm itself, the norm kernel never runs.
    from dsc.kernels import norms
    from dsc.ops.norms import rms_norm

    def no_norm_kernel(*args, **kwargs):
        raise AssertionError("the norm kernel ran")

    monkeypatch.setenv("DSC_NORM_DEFER_ROWS", "1")
    monkeypatch.setattr(norms, "rms_norm", no_norm_kernel)
    torch.manual_seed(11)
    x, nw = torch.randn(17, 40) * 3 + 1, torch.randn(40)
    w = torch.randn(42 if gated else 21, 40)
    out = linear_small_batch(x, w, activation="silu" if gated else None, gated=gated,
                             norm=("rms", nw, None, 1e-6), config=CONFIGS["dot"])
    normed = rms_norm(x, nw, 1e-6, x.dtype)
    ref = (_act(linear_reference(normed, w[:21]), "silu") * linear_reference(normed, w[21:])
           if gated else linear_reference(normed, w))
    assert_close(out, ref)


@pytest.mark.parametrize("config", ["fma", "fma-split2"])
def test_norm_prologue_with_gated_epilogue(config, assert_close):
    # Without a K split the norm is applied after the stream (both halves share the row's
    # statistics); split, it is applied first.
    from dsc.ops.norms import rms_norm

    torch.manual_seed(5)
    x, w, nw = torch.randn(1, 40), torch.randn(42, 40), torch.randn(40)
    out = linear_small_batch(x, w, activation="silu", gated=True, norm=("rms", nw, None, 1e-6),
                             config=CONFIGS[config])
    normed = rms_norm(x, nw, 1e-6, x.dtype)
    ref = _act(linear_reference(normed, w[:21]), "silu") * linear_reference(normed, w[21:])
    assert_close(out, ref)


def test_epilogue_bad_arguments():
    x, w = torch.randn(2, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        linear_small_batch(x, w, activation="tanh")
    with pytest.raises(ValueError, match=r"gated needs a \[2N, K\] weight"):
        linear_small_batch(x, torch.randn(5, 8), gated=True)
    with pytest.raises(ValueError, match="and no bias"):
        linear_small_batch(x, w, torch.randn(6), gated=True)
    with pytest.raises(ValueError, match="norm must be"):
        linear_small_batch(x, w, norm=("rms", None, torch.randn(8), 1e-5))
    with pytest.raises(ValueError, match=r"norm weight must be \[K=8\]"):
        linear_small_batch(x, w, norm=("layer", torch.randn(7), None, 1e-5))
    with pytest.raises(ValueError, match=r"residual must be \(2, 3\)"):
        linear_small_batch(x, w, gated=True, residual=torch.randn(2, 6))


def test_default_config_and_any_m(assert_close):
    # M past one row block (block_m <= 64) takes several M programs.
    torch.manual_seed(0)
    x, w, bias = torch.randn(70, 24), torch.randn(21, 24), torch.randn(21)
    assert_close(linear_small_batch(x, w, bias), linear_reference(x, w, bias))


def test_strided_operands(assert_close, poisoned):
    torch.manual_seed(1)
    x = torch.randn(40, 3)[:, :].t()[:2]  # [2, 40] with stride (1, 3)
    w = torch.randn(40, 19).t()  # [19, 40], column-major
    out = poisoned((19, 2)).t()  # [2, 19] with strides (1, 2)
    res = linear_small_batch(x, w, out=out, config=CONFIGS["dot"])
    assert res.data_ptr() == out.data_ptr()
    assert_close(res, linear_reference(x, w))


def test_pick_config_fills_the_gpu():
    # A wide projection needs no split; a narrow one splits K to reach every SM.
    for m in (1, 3, 16, 32):
        wide = pick_config(m, 11008, 4096, sm_count=132)
        assert wide.split_k == 1 and 11008 / wide.block_n >= 132
        assert wide.block_m >= m
    assert pick_config(1, 256, 2048, sm_count=132).split_k > 1
    assert pick_config(16, 256, 2048, sm_count=132).split_k > 1


def test_pick_config_fits_the_stages_in_shared_memory():
    qkv = pick_config(16, 12288, 4096, sm_count=132)
    assert (qkv.block_n, qkv.block_k, qkv.num_stages) == (64, 128, 3)  # 60 KB of tiles
    o_proj = pick_config(16, 4096, 4096, sm_count=132)
    assert (o_proj.block_n, o_proj.split_k, o_proj.num_stages) == (64, 2, 5)  # 64 blocks x 2
    gated = pick_config(16, 22016, 4096, sm_count=132, gated=True)
    assert (2 * gated.block_n + gated.block_m) * gated.block_k * 2 * gated.num_stages <= 232448
    assert gated.num_stages == 4
    smaller = pick_config(16, 22016, 4096, sm_count=108, gated=True, shared_memory=101376)
    assert smaller.num_stages == 2  # 36 KB a stage in 99 KB


@pytest.mark.parametrize(
    "x_shape,w_shape,bias_shape,match",
    [
        ((2, 3, 8), (4, 8), None, "x must be 2-D"),
        ((2, 8), (4, 8, 1), None, "weight must be 2-D"),
        ((2, 8), (4, 9), None, "K mismatch"),
        ((2, 8), (4, 8), (5,), "bias must be"),
    ],
)
def test_bad_shapes_raise(x_shape, w_shape, bias_shape, match):
    bias = None if bias_shape is None else torch.randn(bias_shape)
    with pytest.raises(ValueError, match=match):
        linear_small_batch(torch.randn(x_shape), torch.randn(w_shape), bias)


def test_bad_dtype_and_out_raise():
    with pytest.raises(ValueError, match="floating-point"):
        linear_small_batch(torch.ones(2, 8, dtype=torch.int32), torch.randn(4, 8))
    with pytest.raises(ValueError, match="block_m must be"):
        linear_small_batch(torch.randn(2, 8), torch.randn(4, 8), config=SmallBatchConfig(3, 4, 8))
    with pytest.raises(ValueError, match="out must be"):
        linear_small_batch(torch.randn(2, 8), torch.randn(4, 8), out=torch.empty(4, 2))


def test_cpu_tensors_need_cuda(no_interpreter):
    with pytest.raises(ValueError, match="needs CUDA"):
        linear_small_batch(torch.randn(2, 8), torch.randn(4, 8))


def test_pick_config_takes_measured_one_row_shapes():
    gpt2_qkv = pick_config(1, 4800, 1600, sm_count=132)
    assert (gpt2_qkv.block_n, gpt2_qkv.block_k, gpt2_qkv.split_k) == (8, 256, 1)
    gpt2_out = pick_config(1, 1600, 1600, sm_count=132)
    assert (gpt2_out.block_n, gpt2_out.block_k) == (4, 256)
    assert pick_config(1, 4800, 1600, sm_count=132, gated=True).block_k == 512  # not measured
    o_proj = pick_config(1, 4096, 4096, sm_count=132)
    assert (o_proj.block_n, o_proj.block_k) == (4, 256)
    down = pick_config(1, 4096, 11008, sm_count=132)
    assert (down.block_n, down.block_k) == (8, 512)  # faster alone, slower in the model


def test_one_row_tiles_can_be_overridden_per_shape(monkeypatch):
    monkeypatch.setenv("DSC_GEMV_ONE_ROW", "4096x4096=8x512+ 5504x4096g=16x128")
    o_proj = pick_config(1, 4096, 4096, sm_count=132)
    assert (o_proj.block_n, o_proj.block_k) == (8, 512)
    gate_up = pick_config(1, 5504, 4096, sm_count=132, gated=True)
    assert (gate_up.block_n, gate_up.block_k) == (16, 128)
    assert pick_config(1, 5504, 4096, sm_count=132).block_k == 512  # the plain shape is not named
    gpt2_qkv = pick_config(1, 4800, 1600, sm_count=132)
    assert (gpt2_qkv.block_n, gpt2_qkv.block_k) == (8, 256)  # the table still applies


@pytest.mark.parametrize("spec,complaint", [
    ("4096x4096:4x256", "cannot read"),
    ("4096=4x256", "cannot read"),
    ("4096x4096=3x256", "powers of two"),
    ("4096x4096=4x8", "at least 16"),
])
def test_unreadable_one_row_overrides_say_how_to_write_them(monkeypatch, spec, complaint):
    monkeypatch.setenv("DSC_GEMV_ONE_ROW", spec)
    with pytest.raises(ValueError, match=complaint):
        pick_config(1, 4096, 4096, sm_count=132)


def test_row_tiles_can_be_overridden_per_shape(monkeypatch):
    monkeypatch.setenv("DSC_GEMV_ROWS", "12288x4096=64x128/1/3+4096x4096=64x128/2/5")
    qkv = pick_config(16, 12288, 4096, sm_count=132)
    assert (qkv.block_m, qkv.block_n, qkv.block_k, qkv.split_k, qkv.num_stages) == (
        16, 64, 128, 1, 3)
    o_proj = pick_config(4, 4096, 4096, sm_count=132)
    assert (o_proj.block_n, o_proj.block_k, o_proj.split_k, o_proj.num_stages) == (64, 128, 2, 5)
    assert pick_config(1, 4096, 4096, sm_count=132).block_m == 1  # one row: not these tiles
    assert pick_config(32, 4096, 4096, sm_count=132).block_m == 32  # past 16 rows: neither
    monkeypatch.setenv("DSC_GEMV_ROWS", "4096x4096=64x128/2")
    with pytest.raises(ValueError, match="cannot read"):
        pick_config(16, 4096, 4096, sm_count=132)
    monkeypatch.setenv("DSC_GEMV_ROWS", "4096x4096=8x128/2/5")
    with pytest.raises(ValueError, match="of at least 16"):
        pick_config(16, 4096, 4096, sm_count=132)


def test_small_batch_wins_takes_few_rows_everywhere_and_wide_weights_up_to_64_rows():
    assert small_batch_wins(1, 4096) and small_batch_wins(16, 4096)
    assert not small_batch_wins(17, 4096) and not small_batch_wins(32, 4096)
    assert small_batch_wins(32, 12288) and small_batch_wins(64, 8192)
    assert not small_batch_wins(65, 8192)


def test_small_batch_rows_override_and_its_error(monkeypatch):
    monkeypatch.setenv("DSC_SMALL_BATCH_ROWS", "2")
    assert small_batch_wins(2, 4096) and not small_batch_wins(3, 4096)
    monkeypatch.setenv("DSC_SMALL_BATCH_ROWS", "sixteen")
    with pytest.raises(ValueError, match="DSC_SMALL_BATCH_ROWS='sixteen'"):
        small_batch_wins(4, 4096)
