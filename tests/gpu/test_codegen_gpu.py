"""Generated region kernels compiled for a real GPU, and whole models compiled with fusion.

Regions at real shapes in bf16 / fp16 against the same function in fp32 (relative error <= 1e-2);
tiny models compiled for CUDA with and without the fuse pass give the same greedy tokens (fp32).
Skipped without CUDA, and under TRITON_INTERPRET=1: run apart from tests/codegen and
tests/kernels, whose conftests turn the interpreter on.
"""

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and compiled (not interpreted) Triton",
)

import torch.nn.functional as F

import dsc
from dsc import compiler, pipelines, zoo
from dsc.runtime.executor import Executor
from tests.codegen.helpers import fused, generated_program, kernel_steps

ops = torch.ops.dsc
DTYPES = [torch.bfloat16, torch.float16]
TOL = 1e-2


def close(out: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    scale = ref.double().norm().item()
    err = (out.double() - ref.double()).norm().item() / (scale if scale > 0 else 1.0)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def check(fn, inputs, weights=None, kernels=1):
    """Run fn's regions as generated kernels on the GPU; compare with fn in fp32."""
    gm, weights = fused(fn, *inputs, weights=weights)
    program = generated_program(gm)
    assert len(kernel_steps(program)) == kernels
    outputs = Executor(program, weights, torch.device("cuda"))(**dict(zip(program.inputs, inputs)))
    with torch.no_grad():
        expected = fn(*[x.float() for x in inputs], *[w.float() for w in weights.values()])
    expected = expected if isinstance(expected, (tuple, list)) else [expected]
    for out, ref in zip(outputs, expected):
        assert out.dtype == inputs[0].dtype
        close(out, ref)


def randn(*shape, dtype, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).mul(scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_add_and_rms_norm(dtype):
    def fn(x, r, w):
        h = ops.residual_add(x, r)
        return h, ops.rms_norm(h, w, 1e-6, x.dtype)

    x, r = randn(2, 3, 4096, dtype=dtype), randn(2, 3, 4096, dtype=dtype)
    check(fn, [x, r], weights={"w": randn(4096, dtype=dtype) + 1})


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_with_bias(dtype):
    x = randn(5, 1600, dtype=dtype, scale=3.0)
    check(
        lambda x, w, b: ops.layer_norm(x, w, b, 1e-5),
        [x],
        weights={"w": randn(1600, dtype=dtype), "b": randn(1600, dtype=dtype)},
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_q_and_k_in_one_launch(dtype):
    def fn(q, k, c, s):
        return torch.cat([ops.rotary(q, c, s), ops.rotary(k, c, s)], 1)

    q = randn(1, 7, 32, 128, dtype=dtype).transpose(1, 2)
    k = randn(1, 7, 8, 128, dtype=dtype).transpose(1, 2)
    cos, sin = randn(1, 1, 7, 128, dtype=dtype), randn(1, 1, 7, 128, dtype=dtype)
    check(fn, [q, k, cos, sin])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_gated_activation(dtype, kind):
    def fn(merged):
        return ops.gated_activation(merged[..., :11008], merged[..., 11008:], kind)

    check(fn, [randn(5, 2 * 11008, dtype=dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_and_activation(dtype):
    check(lambda x: torch.softmax(x, -1), [randn(4, 32, 1000, dtype=dtype, scale=4.0)])
    check(lambda x: ops.activation(x, "gelu_tanh"), [randn(5, 6400, dtype=dtype, scale=3.0)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 300])  # small-batch GEMM, cuBLAS, tiled GEMM epilogue
def test_gemm_regions(dtype, rows):
    def gated(x, w):
        up = F.linear(x, w)
        return ops.gated_activation(up[..., :2816], up[..., 2816:], "silu")

    def biased(x, w, b):
        return ops.activation(F.linear(x, w, b), "gelu_tanh")

    x = randn(rows, 1024, dtype=dtype)
    check(gated, [x], weights={"w": randn(2 * 2816, 1024, dtype=dtype, scale=0.03)})
    check(
        biased,
        [x],
        weights={"w": randn(4096, 1024, dtype=dtype, scale=0.03), "b": randn(4096, dtype=dtype)},
    )


def _without_fuse(monkeypatch):
    monkeypatch.setattr(
        compiler, "backend", lambda target: [p for p in pipelines.backend(target) if p != "fuse"]
    )


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_fusion_keeps_greedy_tokens(name, monkeypatch, tmp_path):
    model = zoo.build(name, init_std=0.3, seed=1, device="cuda")
    target = dsc.Target(device="cuda", dtype="float32", max_seq_len=64)
    ids = torch.randint(
        3, 200, (2, 7), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    with_fusion = dsc.compile(model, target)
    assert kernel_steps(with_fusion.plan.programs["decode"])
    assert with_fusion.plan.kernel_sources
    tokens = with_fusion.generate(ids, max_new_tokens=24, eos_token_id=[])
    _without_fuse(monkeypatch)
    without = dsc.compile(model, target)
    assert not kernel_steps(without.plan.programs["decode"])
    assert torch.equal(tokens, without.generate(ids, max_new_tokens=24, eos_token_id=[]))
    # The plan carries its kernels: saved and loaded again, it gives the same tokens.
    loaded = dsc.load(with_fusion.save(tmp_path / "plan"))
    assert torch.equal(tokens, loaded.generate(ids, max_new_tokens=24, eos_token_id=[]))


def test_bf16_fused_logits_close_to_unfused(monkeypatch):
    model = zoo.build("tiny-llama", init_std=0.1, seed=1, device="cuda", dtype=torch.bfloat16)
    target = dsc.Target(device="cuda", dtype="bfloat16", max_seq_len=64)
    ids = torch.randint(3, 200, (2, 11), device="cuda")
    fused_logits = dsc.compile(model, target)(ids).logits.float()
    _without_fuse(monkeypatch)
    plain_logits = dsc.compile(model, target)(ids).logits.float()
    close(fused_logits, plain_logits)
