"""Generated region kernels against torch, on the Triton interpreter: tiny irregular shapes, fp32.

Each case is a small function; the fuse pass turns it into fused regions, code generation into
kernels, and the plan executor runs them. The outputs must match the function run by torch, and
the program must launch the number of generated kernels the case names.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from dsc.codegen import triton_codegen
from dsc.errors import PlanError
from dsc.runtime import generated
from tests.codegen.helpers import fused, generated_program, kernel_steps, run_generated

dsc = torch.ops.dsc


def check(assert_close, fn, *inputs, weights=None, kernels=1, tol=1e-5):
    outputs, expected, program = run_generated(fn, *inputs, weights=weights)
    assert len(kernel_steps(program)) == kernels, [s["op"] for s in program.steps]
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        assert_close(out, ref, tol)
    return program


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(with_weight, assert_close):
    torch.manual_seed(0)
    weights = {"w": torch.randn(37)} if with_weight else {}

    def fn(x, *w):
        return dsc.rms_norm(x, w[0] if w else None, 1e-6, torch.float32)

    check(assert_close, fn, torch.randn(3, 37), weights=weights)


def test_layer_norm_with_bias(assert_close):
    torch.manual_seed(1)
    weights = {"w": torch.randn(37), "b": torch.randn(37)}
    check(
        assert_close,
        lambda x, w, b: dsc.layer_norm(x, w, b, 1e-5),
        torch.randn(2, 3, 37) * 3 + 1,
        weights=weights,
    )


def test_rotary_on_strided_heads(assert_close):
    torch.manual_seed(2)
    x = torch.randn(2, 5, 3, 18).transpose(1, 2)  # [B, H, S, D] view of a [B, S, H, D] projection
    cos, sin = torch.randn(2, 1, 5, 18), torch.randn(2, 1, 5, 18)
    check(assert_close, lambda x, c, s: dsc.rotary(x, c, s), x, cos, sin)


@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh", "relu"])
def test_gated_activation_on_halves_of_one_projection(kind, assert_close):
    torch.manual_seed(3)

    def fn(merged):
        return dsc.gated_activation(merged[..., :37], merged[..., 37:], kind)

    check(assert_close, fn, torch.randn(3, 74))


@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu", "silu"])
def test_activation(kind, assert_close):
    torch.manual_seed(4)
    check(assert_close, lambda x: dsc.activation(x, kind), torch.randn(3, 37) * 3)


def test_residual_add_and_norm_fused(assert_close):
    torch.manual_seed(5)

    def fn(x, r, w):
        h = dsc.residual_add(x, r)
        return h, dsc.rms_norm(h, w, 1e-5, torch.float32)

    # One kernel writes both the new residual stream and the normalised rows.
    check(assert_close, fn, torch.randn(3, 37), torch.randn(3, 37), weights={"w": torch.randn(37)})


@pytest.mark.parametrize("log", [False, True])
def test_softmax(log, assert_close):
    torch.manual_seed(6)
    fn = (lambda x: torch.log_softmax(x, -1)) if log else (lambda x: torch.softmax(x * 0.5, -1))
    check(assert_close, fn, torch.randn(3, 5, 37) * 4)


def test_casts_round_where_torch_rounds(assert_close):
    torch.manual_seed(14)

    def fn(x, w):  # fp16 in and out, an fp32 detour, and an fp16 norm in between
        y = (x.float().exp() * 0.5).to(torch.float16) + x
        return dsc.rms_norm(y, w, 1e-5, torch.float16) * 2.0

    x = torch.randn(3, 37, dtype=torch.float16)
    check(assert_close, fn, x, weights={"w": torch.randn(37, dtype=torch.float16)}, tol=1e-3)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # 0/0 in masked-off lanes
def test_written_out_chain_with_broadcasts_and_reductions(assert_close):
    torch.manual_seed(7)

    def fn(x, s, w):
        centred = x - x.mean(-1, keepdim=True)
        return torch.sigmoid(centred * w / s) + x.amax(-1, keepdim=True) + centred.pow(2)

    check(
        assert_close,
        fn,
        torch.randn(2, 3, 37),
        torch.rand(2, 3, 1) + 0.5,
        weights={"w": torch.randn(37)},
    )


def test_long_rows_are_tiled(assert_close):
    torch.manual_seed(8)
    program = check(
        assert_close,
        lambda x, y: torch.tanh(x) * 2.0 + y.exp(),
        torch.randn(2, 1500),
        torch.randn(2, 1500),
    )
    name = kernel_steps(program)[0].removeprefix("kernel::")
    assert "tl.program_id(1)" in generated._SOURCES[name]  # no reduction: the row is tiled


def test_independent_chains_launch_together(assert_close):
    torch.manual_seed(9)

    def fn(q, k, c, s):
        return torch.cat([dsc.rotary(q, c, s), dsc.rotary(k, c, s)], 1)

    program = check(
        assert_close,
        fn,
        torch.randn(2, 4, 3, 10),
        torch.randn(2, 2, 3, 10),
        torch.randn(2, 1, 3, 10),
        torch.randn(2, 1, 3, 10),
    )
    source = generated._SOURCES[kernel_steps(program)[0].removeprefix("kernel::")]
    assert "if pid < g1_start:" in source  # one launch, two groups of programs


# ---- GEMM epilogues: the product runs alone up to 64 rows (small-batch kernel for 1-2 rows),
# the tiled GEMM with the epilogue on its accumulator beyond.
ROWS = [1, 5, 70]


@pytest.mark.parametrize("rows", ROWS)
def test_gemm_gated_epilogue(rows, assert_close):
    torch.manual_seed(10)

    def fn(x, w):
        up = F.linear(x, w)
        return dsc.gated_activation(up[..., :24], up[..., 24:], "silu")

    check(
        assert_close, fn, torch.randn(rows, 40), weights={"w": torch.randn(48, 40) * 0.2}, tol=1e-4
    )


@pytest.mark.parametrize("rows", ROWS)
def test_gemm_bias_activation_epilogue(rows, assert_close):
    torch.manual_seed(11)

    def fn(x, w, b):
        return dsc.activation(F.linear(x, w, b), "gelu_tanh")

    check(
        assert_close,
        fn,
        torch.randn(1, rows, 40),
        weights={"w": torch.randn(37, 40) * 0.2, "b": torch.randn(37)},
        tol=1e-4,
    )


@pytest.mark.parametrize("rows", ROWS)
def test_gemm_residual_epilogue(rows, assert_close):
    torch.manual_seed(12)

    def fn(x, s, w):
        return dsc.residual_add(s, F.linear(x, w)) * 2.0  # the sum feeds no norm

    check(
        assert_close,
        fn,
        torch.randn(rows, 40),
        torch.randn(rows, 37),
        weights={"w": torch.randn(37, 40) * 0.2},
        kernels=2,
        tol=1e-4,
    )


@pytest.mark.parametrize("rows", ROWS)
def test_gemm_rms_norm_prologue(rows, assert_close, monkeypatch):
    # The input norm of a QKV projection: one region, the norm as the GEMM's prologue.
    monkeypatch.setenv("DSC_NORM_PROLOGUE", "1")
    torch.manual_seed(14)

    def fn(x, nw, w):
        return F.linear(dsc.rms_norm(x, nw, 1e-6, x.dtype), w)

    check(
        assert_close,
        fn,
        torch.randn(1, rows, 40) * 2,
        weights={"nw": torch.randn(40), "w": torch.randn(37, 40) * 0.2},
        tol=1e-4,
    )


@pytest.mark.parametrize("rows", ROWS)
def test_gemm_layer_norm_prologue_and_gated_epilogue(rows, assert_close, monkeypatch):
    monkeypatch.setenv("DSC_NORM_PROLOGUE", "1")
    torch.manual_seed(15)

    def fn(x, nw, nb, w):
        up = F.linear(dsc.layer_norm(x, nw, nb, 1e-5), w)
        return dsc.gated_activation(up[..., :24], up[..., 24:], "silu")

    check(
        assert_close,
        fn,
        torch.randn(rows, 40) + 1,
        weights={"nw": torch.randn(40), "nb": torch.randn(40), "w": torch.randn(48, 40) * 0.2},
        tol=1e-4,
    )


def test_addmm_with_views_before_the_activation(assert_close):
    torch.manual_seed(13)

    def fn(x, b, w):  # GPT-2's Conv1D: addmm over flattened rows, viewed back, then GeLU
        y = torch.addmm(b, x.view(-1, 40), w).view(2, 3, 37)
        return dsc.activation(y, "gelu_tanh")

    check(
        assert_close,
        fn,
        torch.randn(2, 3, 40),
        weights={"b": torch.randn(37), "w": torch.randn(40, 37) * 0.2},
        tol=1e-4,
    )


# ---- naming and loading ------------------------------------------------------------------
def _norm_region(shape, eps=1e-6) -> str:
    def fn(x, w):
        return dsc.rms_norm(x, w, eps, torch.float32)

    gm, _ = fused(fn, torch.randn(*shape), weights={"w": torch.randn(shape[-1])})
    (node,) = [n for n in gm.graph.nodes if n.target is dsc.fused_region.default]
    return node.args[1]


def test_same_structure_same_kernel_whatever_the_sizes():
    small, large = _norm_region((3, 37)), _norm_region((5, 64))
    assert small != large  # the regions record their shapes ...
    name = triton_codegen.kernel_name(small)
    assert name == triton_codegen.kernel_name(large)  # ... the kernel takes them as arguments
    assert triton_codegen.generate(small) == triton_codegen.generate(large)
    assert triton_codegen.kernel_name(_norm_region((3, 37), eps=1e-5)) != name


def test_source_reads_sizes_and_strides_as_arguments():
    source = triton_codegen.generate(_norm_region((3, 37)))
    assert "def region_" in source and "@triton.jit" in source
    assert "g0_n," in source and "g0_i0_s0," in source  # sizes and strides are kernel arguments
    assert "tl.sum(" in source and "tl.rsqrt(" in source
    compile(source, "<generated>", "exec")


def test_unregistered_kernel_is_a_plan_error():
    with pytest.raises(PlanError, match="was not registered"):
        generated.resolve("region_0000000000000000")


def test_plan_sources_load_by_name():
    text = _norm_region((3, 37))
    name = triton_codegen.kernel_name(text)
    generated.register_sources({name: triton_codegen.generate(text)})
    launcher = generated.resolve(name)
    x, w = torch.randn(3, 37), torch.randn(37)
    (out,) = launcher([x, w], text)
    torch.testing.assert_close(out, dsc.rms_norm(x, w, 1e-6, torch.float32))


def test_supports_refuses_what_it_cannot_compile():
    doc = json.loads(_norm_region((3, 37)))
    doc["ops"][0]["op"] = "aten::cumsum.default"
    assert not triton_codegen.supports(json.dumps(doc))
    doc = json.loads(_norm_region((3, 37)))
    doc["kind"] = "gemm"  # a GEMM region must start with its GEMM
    assert not triton_codegen.supports(json.dumps(doc))


def test_program_steps_call_generated_kernels():
    gm, _ = fused(lambda x, r: dsc.residual_add(x, r).exp(), torch.randn(3, 37), torch.randn(3, 37))
    program = generated_program(gm)
    (op,) = kernel_steps(program)
    assert op == "kernel::" + triton_codegen.kernel_name(
        next(s for s in program.steps if s["op"] == op)["args"][1]
    )


def test_reference_runs_only_region_ops():
    doc = json.loads(_norm_region((3, 37)))
    doc["ops"][0]["op"] = "aten::copy_.default"  # not in REGION_OPS: never resolved, never run
    with pytest.raises(ValueError, match="not a region op"):
        dsc.fused_region([torch.randn(3, 37), torch.randn(37)], json.dumps(doc))
