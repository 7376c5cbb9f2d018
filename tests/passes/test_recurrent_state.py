"""recurrent_state: Before/Expected on a linear-attention mixer's graph, numerics of the rewritten
graph across a prompt and a decode step, and the graph it leaves alone."""

import torch

import dsc.ops  # noqa: F401  (registers the dsc ops)
import dsc.passes.recurrent_state  # noqa: F401  (registers the pass)
from dsc.passes.manager import PassManager
from tests.passes.helpers import context, export_fn, ops

dsc_ops = torch.ops.dsc


def _mixer(x, q, k, v, g, beta, start, w):
    """A conv over x [B, C, L], a delta rule over q, k, v; `start` stands for cache_start."""
    return dsc_ops.causal_conv1d(x, w, None, "silu"), dsc_ops.gated_delta_rule(q, k, v, g, beta,
                                                                              True)


def _inputs(length):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, length, generator=gen)
    q, k = (torch.randn(2, length, 3, 4, generator=gen) for _ in range(2))
    v = torch.randn(2, length, 3, 5, generator=gen)
    g = -torch.rand(2, length, 3, generator=gen)
    beta = torch.rand(2, length, 3, generator=gen)
    return x, q, k, v, g, beta, torch.zeros(1, dtype=torch.int64)


def _graph(with_start: bool):
    weights = {"w": torch.randn(6, 4, generator=torch.Generator().manual_seed(1))}
    gm, weights = export_fn(_mixer, *_inputs(5), weights=weights)
    if with_start:
        start = [n for n in gm.graph.nodes if n.meta.get("dsc_input") == "x6"][0]
        start.meta["dsc_input"] = "cache_start"
    return gm, weights


def test_recurrent_state_before_expected():
    gm, weights = _graph(with_start=True)
    assert ops(gm)["causal_conv1d"] == 1 and ops(gm)["gated_delta_rule"] == 1
    ctx = context(weights, max_batch=3)
    gm = PassManager(ctx).run(gm, ["recurrent_state"], program="decode")
    after = ops(gm)
    assert after["cached_causal_conv1d"] == 1 and after["cached_gated_delta_rule"] == 1
    assert "causal_conv1d" not in after and "gated_delta_rule" not in after
    # One state per mixer, rows for max_batch: the conv's last K - 1 = 3 inputs of its 6
    # channels; the rule's [H, Dk, Dv] matrix in fp32.
    assert ctx.notes["cache"] == [
        {"name": "cache.conv_0", "shape": [3, 6, 3], "dtype": "torch.float32"},
        {"name": "cache.delta_0", "shape": [3, 3, 4, 5], "dtype": "torch.float32"},
    ]


def test_recurrent_state_graph_continues_a_prompt_with_a_step():
    gm, weights = _graph(with_start=True)
    gm = PassManager(context(weights, max_batch=3)).run(gm, ["recurrent_state"],
                                                         program="decode")
    gm.recompile()
    conv_state, delta_state = torch.zeros(3, 6, 3), torch.zeros(3, 3, 4, 5)
    x, q, k, v, g, beta, start = _inputs(6)
    w = weights["w"]
    whole = _mixer(x, q, k, v, g, beta, start, w)
    names = [n.meta.get("dsc_input") or n.meta.get("dsc_weight")
             for n in gm.graph.nodes if n.op == "placeholder"]

    def run(lo, hi):
        start.fill_(lo)
        feed = {"x0": x[..., lo:hi], "x1": q[:, lo:hi], "x2": k[:, lo:hi], "x3": v[:, lo:hi],
                "x4": g[:, lo:hi], "x5": beta[:, lo:hi], "cache_start": start, "w": w,
                "cache.conv_0": conv_state, "cache.delta_0": delta_state}
        return gm(*[feed[name] for name in names])

    prompt, step = run(0, 5), run(5, 6)
    for part, got in enumerate(zip(prompt, step)):
        torch.testing.assert_close(torch.cat(got, -1 if part == 0 else 1), whole[part])


def _scan(x, dt, B, C, start, A, D):
    return dsc_ops.ssm_scan(x, dt, A, B, C, D, None, True, 0.0, float("inf"))


def test_recurrent_state_gives_a_mamba_scan_its_state():
    gen = torch.Generator().manual_seed(3)
    x, dt = torch.randn(2, 5, 4, 3, generator=gen), torch.randn(2, 5, 4, generator=gen)
    B, C = (torch.randn(2, 5, 2, 6, generator=gen) for _ in range(2))
    start = torch.zeros(1, dtype=torch.int64)
    weights = {"A": -torch.rand(4, generator=gen), "D": torch.randn(4, generator=gen)}
    gm, weights = export_fn(_scan, x, dt, B, C, start, weights=weights)
    [node for node in gm.graph.nodes if node.meta.get("dsc_input") == "x4"][0].meta[
        "dsc_input"] = "cache_start"
    assert ops(gm)["ssm_scan"] == 1
    ctx = context(weights, max_batch=3)
    gm = PassManager(ctx).run(gm, ["recurrent_state"], program="decode")
    assert ops(gm)["cached_ssm_scan"] == 1 and "ssm_scan" not in ops(gm)
    # [max_batch, heads, N, P]: the scan's state per head, fp32.
    assert ctx.notes["cache"] == [
        {"name": "cache.ssm_0", "shape": [3, 4, 6, 3], "dtype": "torch.float32"}]


def test_recurrent_state_leaves_a_graph_without_a_cache_alone():
    # No cache_start: kv_cache found no causal attention, so nothing generates.
    gm, weights = _graph(with_start=False)
    before = ops(gm)
    ctx = context(weights)
    gm = PassManager(ctx).run(gm, ["recurrent_state"], program="decode")
    assert ops(gm) == before and "cache" not in ctx.notes
