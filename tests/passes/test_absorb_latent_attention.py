"""absorb_latent_attention: Before/Expected and does-not-match."""

import pytest
import torch
import torch.nn.functional as F

from dsc.passes.absorb_latent_attention import absorb_latent_attention  # noqa: F401
from dsc.passes.manager import PassManager
from tests.passes.helpers import context, export_fn, ops, run

dsc = torch.ops.dsc

H, NOPE, ROT, VALUE, RANK, HIDDEN = 3, 4, 2, 5, 6, 8


def mla(x, w_q, w_kv_a, w_kv_b, w_o, *, keys="cat", bias=None, rot_per_head=False,
        values_from=None):
    """DeepSeek's latent attention as transformers traces it: per-head q, the latent and a
    shared rotary key from one product, the latent expanded into keys and values by w_kv_b."""
    b, s, _ = x.shape
    q = F.linear(x, w_q).view(b, s, H, NOPE + ROT).transpose(1, 2)
    q_nope, q_rot = q.split([NOPE, ROT], dim=-1)
    latent, k_rot = F.linear(x, w_kv_a).split([RANK, ROT], dim=-1)
    latent = F.rms_norm(latent, (RANK,))
    kv = F.linear(latent.view(b, 1, s, RANK), w_kv_b, bias).view(b, s, H, NOPE + VALUE)
    k_nope, v = kv.transpose(1, 2).split([NOPE, VALUE], dim=-1)
    if values_from is not None:  # values from a projection of their own
        v = F.linear(x, values_from).view(b, s, H, VALUE).transpose(1, 2)
    if rot_per_head:
        k_rot = k_rot.view(b, s, 1, ROT).expand(b, s, H, ROT).transpose(1, 2) * torch.arange(
            1.0, H + 1)[:, None, None]
    else:
        k_rot = k_rot.view(b, 1, s, ROT).expand(b, H, s, ROT)
    if keys == "cat":
        k = torch.cat([k_nope, k_rot], dim=-1)
    else:  # how transformers 5 fills DeepSeek's keys: into an empty tensor by slices
        k = k_nope.new_empty(b, H, s, NOPE + ROT)
        k[..., :NOPE] = k_nope
        k[..., NOPE:] = k_rot
    o = dsc.attention(torch.cat([q_nope, q_rot], dim=-1), k, v, None, True, 0.3)
    return F.linear(o.transpose(1, 2).reshape(b, s, H * VALUE), w_o)


def _weights(**extra):
    g = torch.Generator().manual_seed(0)
    shapes = {"w_q": (H * (NOPE + ROT), HIDDEN), "w_kv_a": (RANK + ROT, HIDDEN),
              "w_kv_b": (H * (NOPE + VALUE), RANK), "w_o": (HIDDEN, H * VALUE), **extra}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _absorb(fn, weights):
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    gm, weights = export_fn(fn, x, weights=weights)
    expected = run(gm, weights, x)
    ctx = context(weights)
    gm = PassManager(ctx).run(gm, ["absorb_latent_attention"])
    return gm, ctx, x, expected


def _attention(gm):
    (node,) = [n for n in gm.graph.nodes if n.target is dsc.attention.default]
    return node


@pytest.mark.parametrize("keys", ["cat", "slice_scatter"])
def test_before_expected_attends_over_the_latent(keys):
    # Before: attention(q [B,H,S,6], k [B,H,S,6], v [B,H,S,5]) over w_kv_b's expansion.
    # Expected: attention(cat(bmm(q_nope, W_uk), q_rot) [B,H,S,8], cat(latent, k_rot)
    # [B,1,S,8], latent [B,1,S,6]) and a bmm by W_uv after it; w_kv_b read by nothing.
    gm, ctx, x, expected = _absorb(lambda *a: mla(*a, keys=keys), _weights())
    node = _attention(gm)
    q, k, v = (a.meta["val"].shape for a in node.args[:3])
    assert (tuple(q), tuple(k), tuple(v)) == ((2, H, 5, RANK + ROT), (2, 1, 5, RANK + ROT),
                                              (2, 1, 5, RANK))
    assert ops(gm)["bmm"] == 2
    assert ctx.weights["w_kv_b.dsc_key_absorbed"].shape == (H, NOPE, RANK)
    assert ctx.weights["w_kv_b.dsc_value_absorbed"].shape == (H, RANK, VALUE)
    assert not any(n.meta.get("dsc_weight") == "w_kv_b" for n in gm.graph.nodes)
    torch.testing.assert_close(run(gm, ctx.weights, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["bias", "rotary key per head", "values of their own"])
def test_does_not_match(change):
    # A bias on w_kv_b adds a per-head key term no latent holds; a rotary key per head is no
    # longer shared; values from another projection are not the latent's to give.
    weights = _weights()
    if change == "bias":
        weights["b_kv"] = torch.randn(H * (NOPE + VALUE))

        def fn(x, w_q, w_kv_a, w_kv_b, w_o, b_kv):
            return mla(x, w_q, w_kv_a, w_kv_b, w_o, bias=b_kv)
    elif change == "rotary key per head":
        def fn(*a):
            return mla(*a, rot_per_head=True)
    else:
        weights["w_v"] = torch.randn(H * VALUE, HIDDEN)

        def fn(x, w_q, w_kv_a, w_kv_b, w_o, w_v):
            return mla(x, w_q, w_kv_a, w_kv_b, w_o, values_from=w_v)
    gm, ctx, x, expected = _absorb(fn, weights)
    assert _attention(gm).args[0].meta["val"].shape[-1] == NOPE + ROT
    assert "bmm" not in ops(gm)
    torch.testing.assert_close(run(gm, ctx.weights, x), expected)


@pytest.mark.parametrize("name,aliased", [("tiny-deepseek-v3", True), ("tiny-llama", False)])
def test_kv_cache_gives_the_latent_one_cache(name, aliased):
    # After the rewrite the values are the keys' first lanes: kv_cache makes the value cache a
    # view of the key cache (`view_of`). Keys and values of their own keep two caches.
    from tests.passes.helpers import decode_graph

    manager, _ = decode_graph(name, ["absorb_latent_attention", "kv_cache"])
    spec = manager.ctx.notes["cache"]
    values = [entry for entry in spec if entry["name"].endswith(".v")]
    if aliased:
        assert all(entry["view_of"] == entry["name"][:-1] + "k" for entry in values)
        assert spec[0]["shape"][1] == 1  # one kv head: the latent
    else:
        assert not any("view_of" in entry for entry in spec)


def test_the_latent_form_can_be_turned_off_for_an_ab(monkeypatch):
    from dsc.pipelines import cached, trunk
    from dsc.target import Target

    assert "absorb_latent_attention" in cached(Target())
    assert "absorb_latent_attention" in trunk(Target(tp=2))
    monkeypatch.setenv("DSC_ABSORB_LATENT", "0")
    assert "absorb_latent_attention" not in cached(Target()) + trunk(Target(tp=2))
