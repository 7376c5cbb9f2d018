"""Rotary embeddings whose frequencies depend on the sequence length (dsc/dynamic_rope.py): the
compiled plan equals HF at lengths on both sides of the switch, forward and greedy generation."""

import pytest
import torch
import transformers

import dsc
from dsc.dynamic_rope import rope_switch_length

HEAD_DIM = 16


def _model(config_class, **rope):
    torch.manual_seed(0)
    config = config_class(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **rope)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for p in model.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.3)
    model.generation_config.eos_token_id = model.config.eos_token_id = None  # every new token
    return model


def _dynamic_ntk():
    # Frequencies recomputed from the length once it passes max_position_embeddings (16).
    return _model(transformers.LlamaConfig, max_position_embeddings=16,
                  rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def _longrope():
    # Phi-3's long/short factors: the long ones once the sequence passes 8 tokens.
    return _model(transformers.Phi3Config, max_position_embeddings=32,
                  original_max_position_embeddings=8,
                  rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * (HEAD_DIM // 2),
                                "long_factor": [3.0] * (HEAD_DIM // 2),
                                "original_max_position_embeddings": 8})


def _greedy_without_cache(model, ids, new_tokens):
    """HF's greedy decoding recomputing every position each step: the frequencies of each
    step's whole length everywhere."""
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("build", [_dynamic_ntk, _longrope])
def test_forward_equals_hf_on_both_sides_of_the_switch(build):
    model = build()
    compiled = dsc.compile(model, dsc.Target(device="cpu", max_seq_len=32))
    for length in (6, 24):
        ids = torch.randint(3, 200, (2, length))
        with torch.no_grad():
            ref = model(ids).logits
        torch.testing.assert_close(compiled(ids).logits, ref, atol=1e-4, rtol=1e-4)
    assert "forward" not in vars(model.model.rotary_emb)  # the tracing forward is gone again


def test_dynamic_ntk_generation_across_the_switch_equals_hf():
    model = _dynamic_ntk()
    compiled = dsc.compile(model, dsc.Target(device="cpu", max_seq_len=32))
    ids = torch.randint(3, 200, (1, 6))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=20, eos_token_id=[]), ref)


def test_longrope_generation_recomputes_the_cache_at_the_switch():
    model = _longrope()
    assert rope_switch_length(model) == 8
    compiled = dsc.compile(model, dsc.Target(device="cpu", max_seq_len=32))
    assert compiled.info["rope_switch_at"] == 8
    short = torch.randint(3, 200, (1, 6))  # grows past 8 tokens while decoding
    assert torch.equal(compiled.generate(short, max_new_tokens=6, eos_token_id=[]),
                       _greedy_without_cache(model, short, 6))
    long = torch.randint(3, 200, (1, 12))  # long factors from the prompt on: HF's cache agrees
    with torch.no_grad():
        ref = model.generate(long, max_new_tokens=6, do_sample=False)
    assert torch.equal(compiled.generate(long, max_new_tokens=6, eos_token_id=[]), ref)


def test_plain_rotary_has_no_switch():
    assert rope_switch_length(_model(transformers.LlamaConfig)) is None
