import math

import pytest
import torch
import torch.nn.functional as F

from dsc import zoo
from dsc.frontend import trace
from dsc.passes.context import PassContext
from dsc.passes.manager import PassManager
from dsc.passes.canonicalize import canonicalize  # noqa: F401  (registers)
from dsc.passes.recognize_attention import recognize_attention  # noqa: F401  (registers)
from dsc.target import Target
from tests.passes.helpers import context, export_fn, ops, run


def test_sdpa_causal_before_expected():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    gm, weights = export_fn(attn, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["recognize_attention"])
    assert ops(gm) == {"attention": 1}
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.args[4] is True and math.isclose(node.args[5], 1 / math.sqrt(8))
    torch.testing.assert_close(run(gm, weights, q, k, v)[0], attn(q, k, v))


def test_gqa_repeat_is_folded_into_the_op():
    def gqa(q, k, v):
        k = k[:, :, None].expand(2, 2, 2, 5, 8).reshape(2, 4, 5, 8)
        v = v[:, :, None].expand(2, 2, 2, 5, 8).reshape(2, 4, 5, 8)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    gm, weights = export_fn(gqa, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["recognize_attention"])
    assert ops(gm) == {"attention": 1}  # no expand/reshape left: K/V stay at 2 heads
    torch.testing.assert_close(run(gm, weights, q, k, v)[0], gqa(q, k, v))


def test_gqa_repeat_spelled_with_whole_slices_is_folded():
    """A CUDA trace spells repeat_kv's `x[:, :, None, :, :]` with a slice per `:`; canonicalize
    drops them, so the cache still holds the 2 KV heads rather than 4 repeated ones."""
    whole = 9223372036854775807

    def repeat(x):
        x = torch.ops.aten.slice.Tensor(torch.ops.aten.slice.Tensor(x, 0, 0, whole), 1, 0, whole)
        x = torch.ops.aten.slice.Tensor(x.unsqueeze(2), 3, 0, whole)
        return x.expand(2, 2, 2, 5, 8).reshape(2, 4, 5, 8)

    def gqa(q, k, v):
        return F.scaled_dot_product_attention(q, repeat(k), repeat(v), is_causal=True)

    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    gm, weights = export_fn(gqa, q, k, v)
    assert ops(gm)["slice"] == 6
    gm = PassManager(context(weights)).run(gm, ["canonicalize", "recognize_attention"])
    assert ops(gm) == {"attention": 1}
    torch.testing.assert_close(run(gm, weights, q, k, v)[0], gqa(q, k, v))


def test_softmax_form_before_expected():
    def eager(q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) * 0.3
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    gm, weights = export_fn(eager, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["recognize_attention"])
    assert ops(gm) == {"attention": 1}
    torch.testing.assert_close(run(gm, weights, q, k, v)[0], eager(q, k, v))


def test_scores_shifted_by_their_row_max_before_expected():
    # MiMo-V2-Flash: softmax(s - max(s, -1, keepdim)) with values narrower than the keys.
    # Expected: dsc.attention(q, k, v, None, False, 0.3) — the shift changes nothing.
    def eager(q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) * 0.3
        scores = scores - scores.max(dim=-1, keepdim=True).values
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 3)
    gm, weights = export_fn(eager, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["recognize_attention"])
    assert ops(gm) == {"attention": 1}
    torch.testing.assert_close(run(gm, weights, q, k, v)[0], eager(q, k, v))


def test_dropout_does_not_match():
    def dropped(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True)

    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    gm, weights = export_fn(dropped, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["recognize_attention"])
    assert "attention" not in ops(gm)


def _recognised(model):
    traced = trace(model)
    ctx = PassContext(Target(), traced.weights, traced.info, traced.inputs)
    gm = PassManager(ctx).run(traced.gm, ["canonicalize", "recognize_attention"])
    return [n for n in gm.graph.nodes if n.target is torch.ops.dsc.attention.default]


def test_hf_masks_are_classified_by_probe():
    llama = _recognised(zoo.build("tiny-llama"))
    assert len(llama) == 2 and all(n.args[4] is True and n.args[3] is not None for n in llama)
    bert = _recognised(zoo.build("tiny-bert"))
    assert len(bert) == 2 and all(n.args[4] is False and n.args[3] is not None for n in bert)


def _windows(model, max_seq_len=64):
    """(causal, window) of each recognised attention, or None for one left as aten."""
    traced = trace(model)
    ctx = PassContext(Target(max_seq_len=max_seq_len), traced.weights, traced.info, traced.inputs)
    gm = PassManager(ctx).run(traced.gm, ["canonicalize", "recognize_attention"])
    found = []
    for node in gm.graph.nodes:
        if node.target is torch.ops.dsc.attention.default:
            found.append((node.args[4], node.kwargs.get("window", 0)))
        elif node.target is torch.ops.aten.scaled_dot_product_attention.default:
            found.append(None)
    return found


def test_sliding_window_mask_before_expected():
    # Before: sdpa(q, k, v, mask) with the mask of a 2-token window. Expected: dsc.attention(q,
    # k, v, valid, True, s, window=2) in both layers (the six-token probe shows the window).
    assert _windows(zoo.build("tiny-mistral", sliding_window=2)) == [(True, 2), (True, 2)]


def test_window_longer_than_the_short_probe_is_found_at_the_configs_length():
    # Eight keys look causal on six tokens; the probe at the config's window shows them.
    assert _windows(zoo.build("tiny-mistral", sliding_window=8)) == [(True, 8), (True, 8)]
    # Sequences that never outgrow the window: it never applies, plain causal attention.
    assert _windows(zoo.build("tiny-mistral", sliding_window=8), max_seq_len=8) == [
        (True, 0), (True, 0)]


def test_alternating_window_and_full_layers_keep_their_own_masks():
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    model = transformers.Gemma2ForCausalLM(config).eval()
    assert _windows(model) == [(True, 6), (True, 0)]


def test_window_that_is_not_causal_does_not_match():
    # ModernBERT's local layers see two tokens on either side: no dsc.attention expresses that,
    # so they stay sdpa; its global layer is recognised.
    import transformers

    config = transformers.ModernBertConfig(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, local_attention=4, global_attn_every_n_layers=3,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    model = transformers.ModernBertModel(config).eval()
    assert _windows(model) == [(False, 0), None, None]

def _bloom(heads: int = 6):
    import transformers

    config = transformers.BloomConfig(vocab_size=211, hidden_size=16 * heads, n_layer=2,
                                      n_head=heads)
    return transformers.BloomForCausalLM(config).eval()


def test_bloom_alibi_form_before_expected():
    # Before: baddbmm(alibi, q, kᵀ, alpha=1/√D) -> view -> + mask -> softmax -> bmm(p, v) -> view.
    # Expected: dsc.attention(q, k, v, valid, True, 1/√D, alibi=slopes), the slopes HF builds
    # (six heads: the interleaved slopes of a count that is not a power of two).
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    model = _bloom(6)
    traced = trace(model)
    ctx = PassContext(Target(), traced.weights, traced.info, traced.inputs)
    gm = PassManager(ctx).run(traced.gm, ["canonicalize", "recognize_attention"])
    found = [n for n in gm.graph.nodes if n.target is torch.ops.dsc.attention.default]
    hf_slopes = build_alibi_tensor(torch.ones(1, 2), 6, torch.float32)[:, 0, 1].tolist()
    assert len(found) == 2
    for node in found:
        assert node.args[4] is True and node.args[3] is not None
        assert math.isclose(node.args[5], 1 / math.sqrt(16))
        assert node.kwargs["alibi"] == pytest.approx(hf_slopes, rel=1e-6)
    assert not {"baddbmm", "bmm", "softmax", "cumsum"} & set(ops(gm))


def test_bias_that_is_not_linear_in_the_key_position_does_not_match(monkeypatch):
    # The same graph with a bias quadratic in the key's position: not ALiBi, left as it is.
    import transformers.models.bloom.modeling_bloom as bloom

    real = bloom.build_alibi_tensor
    monkeypatch.setattr(bloom, "build_alibi_tensor",
                        lambda mask, heads, dtype: real(mask, heads, dtype) ** 2)
    traced = trace(_bloom(4))
    ctx = PassContext(Target(), traced.weights, traced.info, traced.inputs)
    gm = PassManager(ctx).run(traced.gm, ["canonicalize", "recognize_attention"])
    assert ops(gm)["baddbmm"] == 2 and "attention" not in ops(gm)


def test_mpt_alibi_in_eager_scores_before_expected():
    # Before: softmax(masked_fill(matmul(q, kᵀ) * s + alibi[:, :, -S:], masked, -big)) @ v.
    # Expected: dsc.attention(q, k, v, valid, True, s, alibi=slopes), MPT's slopes.
    import transformers
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    config = transformers.MptConfig(vocab_size=211, d_model=64, n_layers=2, n_heads=4,
                                    max_seq_len=128)
    traced = trace(transformers.MptForCausalLM(config).eval())
    ctx = PassContext(Target(), traced.weights, traced.info, traced.inputs)
    gm = PassManager(ctx).run(traced.gm, ["canonicalize", "recognize_attention"])
    found = [n for n in gm.graph.nodes if n.target is torch.ops.dsc.attention.default]
    bias = build_mpt_alibi_tensor(4, 128)  # [H, 1, L]: slope * (key - (L - 1))
    slopes = (bias[:, 0, 1] - bias[:, 0, 0]).tolist()
    assert len(found) == 2 and all(n.args[4] is True for n in found)
    assert all(n.kwargs["alibi"] == pytest.approx(slopes, rel=1e-6) for n in found)
    assert not {"masked_fill", "softmax"} & set(ops(gm))


def test_falcon_alibi_inside_the_sdpa_mask_before_expected():
    # Before: sdpa(q, k, v, masked_fill(alibi / √D, masked, -big)). Expected: dsc.attention(q, k,
    # v, valid, True, s, alibi=slopes / √D) (sdpa adds its mask unscaled).
    import transformers
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    config = transformers.FalconConfig(vocab_size=211, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, alibi=True,
                                       new_decoder_architecture=False, multi_query=False)
    traced = trace(transformers.FalconForCausalLM(config).eval())
    ctx = PassContext(Target(), traced.weights, traced.info, traced.inputs)
    gm = PassManager(ctx).run(traced.gm, ["canonicalize", "recognize_attention"])
    found = [n for n in gm.graph.nodes if n.target is torch.ops.dsc.attention.default]
    slopes = (build_alibi_tensor(torch.ones(1, 2), 4, torch.float32)[:, 0, 1] / 4).tolist()
    assert len(found) == 2 and all(n.args[4] is True for n in found)
    assert all(n.kwargs["alibi"] == pytest.approx(slopes, rel=1e-2) for n in found)
    assert "scaled_dot_product_attention" not in ops(gm)


def test_batched_heads_form_without_a_bias():
    # bmm(q, kᵀ) * s instead of baddbmm, heads merged into the batch: recognised, no slopes.
    def merged(q, k, v):
        b, h, s, d = q.shape
        scores = torch.bmm(q.reshape(b * h, s, d), k.reshape(b * h, s, d).transpose(1, 2))
        probs = torch.softmax(scores.view(b, h, s, s), dim=-1)
        return torch.bmm(probs.view(b * h, s, s), v.reshape(b * h, s, d)).view(b, h, s, d)

    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    gm, weights = export_fn(merged, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["recognize_attention"])
    assert ops(gm) == {"attention": 1}
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.args[4] is False and "alibi" not in node.kwargs
    torch.testing.assert_close(run(gm, weights, q, k, v)[0], merged(q, k, v))


EAGER_SCORES = {
    # name: (config, scale, windows) — GPT-Neo: where(causal buffer, qkᵀ, min) + mask, unscaled,
    # local layers in a window; CodeGen: (qkᵀ + mask) / √D; XGLM: max(view(bmm) + mask, min).
    "gpt_neo": (lambda T: T.GPTNeoConfig(vocab_size=211, hidden_size=64, num_layers=2,
                                         num_heads=4, attention_types=[[["global", "local"], 1]],
                                         window_size=4, max_position_embeddings=128),
                1.0, [0, 4]),
    "codegen": (lambda T: T.CodeGenConfig(vocab_size=211, n_embd=64, n_layer=2, n_head=4,
                                          rotary_dim=8, n_positions=128), 0.25, [0, 0]),
    "xglm": (lambda T: T.XGLMConfig(vocab_size=211, d_model=64, num_layers=2, attention_heads=4,
                                    ffn_dim=96, max_position_embeddings=128), 1.0, [0, 0]),
}


@pytest.mark.parametrize("name", EAGER_SCORES)
def test_scores_wrapped_in_masks_and_scales_before_expected(name):
    import transformers

    make, scale, windows = EAGER_SCORES[name]
    model = transformers.AutoModelForCausalLM.from_config(make(transformers)).eval()
    traced = trace(model)
    ctx = PassContext(Target(max_seq_len=64), traced.weights, traced.info, traced.inputs)
    gm = PassManager(ctx).run(traced.gm, ["canonicalize", "recognize_attention"])
    found = [n for n in gm.graph.nodes if n.target is torch.ops.dsc.attention.default]
    assert [n.kwargs.get("window", 0) for n in found] == windows
    assert all(n.args[4] is True and n.args[3] is not None for n in found)
    assert all(math.isclose(n.args[5], scale) for n in found)
    assert "softmax" not in ops(gm)


def test_where_that_fills_with_zero_is_not_a_mask():
    def zeroed(q, k, v):
        scores = q @ k.transpose(-2, -1)
        return torch.softmax(torch.where(scores > 0, scores, 0.0), dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    gm, weights = export_fn(zeroed, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["recognize_attention"])
    assert "attention" not in ops(gm) and "softmax" in ops(gm)


def test_a_window_the_config_does_not_name_is_found_at_max_seq_len(monkeypatch):
    # Without a window in the config, a causal mask is probed at max_seq_len: an eight-key
    # window still shows (and would be missed by the six-token probe alone).
    import dsc.frontend

    monkeypatch.setattr(dsc.frontend, "_sliding_window", lambda config: None)
    assert _windows(zoo.build("tiny-mistral", sliding_window=8)) == [(True, 8), (True, 8)]


def test_probing_masks_leaves_the_callers_random_stream_alone():
    traced = trace(zoo.build("tiny-mistral", sliding_window=8))
    ctx = PassContext(Target(max_seq_len=64), traced.weights, traced.info, traced.inputs)
    before = torch.random.get_rng_state()
    PassManager(ctx).run(traced.gm, ["canonicalize", "recognize_attention"])
    assert torch.equal(torch.random.get_rng_state(), before)


def _with_sinks(q, k, v, sinks, drop_last=True, shift=True):
    # GPT-OSS's eager attention: a logit per head beside the keys, dropped after the softmax.
    scores = torch.matmul(q, k.transpose(2, 3)) * 0.35
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    combined = torch.cat([scores, column], dim=-1)
    if shift:
        combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1)
    return torch.matmul(probs[..., :-1] if drop_last else probs[..., 1:], v)


@pytest.mark.parametrize("shift", [True, False])
def test_attention_sinks_before_expected(shift):
    # Before: matmul(slice(softmax(cat([q kᵀ s, expand(view(sinks))]) - max), -1, 0, -1), v).
    # Expected: dsc.attention(q, k, v, None, False, s, sinks=<the sinks weight>).
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    sinks = torch.randn(3)

    def eager(q, k, v, sinks):
        return _with_sinks(q, k, v, sinks, shift=shift)

    gm, weights = export_fn(eager, q, k, v, weights={"sinks": sinks})
    gm = PassManager(context(weights)).run(gm, ["canonicalize", "recognize_attention"])
    assert ops(gm) == {"attention": 1}
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.dsc.attention.default)
    assert node.kwargs["sinks"].meta["dsc_weight"] == "sinks"
    assert node.args[4] is False and math.isclose(node.args[5], 0.35)
    torch.testing.assert_close(run(gm, weights, q, k, v)[0], eager(q, k, v, sinks))


def test_a_column_dropped_from_the_other_end_is_not_a_sink():
    q, k, v = (torch.randn(1, 2, 4, 4) for _ in range(3))

    def eager(q, k, v, sinks):
        return _with_sinks(q, k, v, sinks, drop_last=False)

    gm, weights = export_fn(eager, q, k, v, weights={"sinks": torch.randn(2)})
    gm = PassManager(context(weights)).run(gm, ["canonicalize", "recognize_attention"])
    assert "attention" not in ops(gm)


def test_gpt_oss_attention_takes_its_sinks_and_windows():
    found = _recognised(zoo.build("tiny-gpt-oss"))
    assert len(found) == 2
    assert [n.kwargs.get("window", 0) for n in found] == [4, 0]  # sliding, then full
    assert all(n.kwargs["sinks"].meta["dsc_weight"].endswith("self_attn.sinks") for n in found)
