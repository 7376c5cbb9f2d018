"""Generation: greedy tokens equal HF generate; padded batches; limits; sampling with a seed."""

import pytest
import torch

import dsc
from dsc import zoo

DECODERS = ["tiny-gpt2", "tiny-opt", "tiny-llama", "tiny-mistral", "tiny-mixtral"]


@pytest.fixture(scope="module", params=DECODERS)
def pair(request):
    model = zoo.build(request.param, init_std=0.3, seed=1)
    return model, dsc.compile(model, target=dsc.Target(max_batch=4, max_seq_len=64))


def test_greedy_equals_hf(pair):
    model, compiled = pair
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
    out = compiled.generate(ids, max_new_tokens=24, eos_token_id=[])
    assert len(set(out[0, 7:].tolist())) > 3, "tokens must vary for the comparison to mean anything"
    assert torch.equal(out, ref)


def test_left_padded_batch_equals_each_alone(pair):
    _, compiled = pair
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 200, (n,), generator=gen) for n in (3, 8, 5)]
    seq = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), seq, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, seq - len(p) :] = p
        mask[row, seq - len(p) :] = 1
    batch = compiled.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    for row, p in enumerate(prompts):
        alone = compiled.generate(p[None], max_new_tokens=10, eos_token_id=[])
        assert torch.equal(batch[row, seq:], alone[0, len(p) :])


def test_right_padding_is_handled(pair):
    _, compiled = pair
    p = torch.randint(3, 200, (4,), generator=torch.Generator().manual_seed(3))
    ids = torch.zeros(1, 6, dtype=torch.long)
    ids[0, :4] = p
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    right = compiled.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    alone = compiled.generate(p[None], max_new_tokens=6, eos_token_id=[])
    assert torch.equal(right[0, 6:], alone[0, 4:])


def test_sampling_is_reproducible_with_seed(pair):
    _, compiled = pair
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(
        max_new_tokens=8,
        do_sample=True,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        seed=7,
        eos_token_id=[],
    )
    a, b = compiled.generate(ids, **kw), compiled.generate(ids, **kw)
    assert torch.equal(a, b)
    c = compiled.generate(ids, **{**kw, "seed": 8})
    assert not torch.equal(a, c)


def test_stream_yields_the_generated_tokens(pair):
    _, compiled = pair
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(5))
    streamed = [t.item() for t in compiled.stream(ids, max_new_tokens=6, eos_token_id=[])]
    assert streamed == compiled.generate(ids, max_new_tokens=6, eos_token_id=[])[0, 5:].tolist()


def test_eos_stops_and_pads_like_hf():
    model = zoo.build("tiny-llama", init_std=0.3, seed=1)
    compiled = dsc.compile(model, "cpu")
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(0))
    free = compiled.generate(ids, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, 9])  # the 4th new token becomes the stop token
    with torch.no_grad():
        ref = model.generate(
            ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    out = compiled.generate(ids, max_new_tokens=10, eos_token_id=eos)
    assert out.shape[1] <= 16 and torch.equal(out[0, : ref.shape[1]], ref[0])


def test_limits_are_refused_before_work():
    compiled = dsc.compile(zoo.build("tiny-llama"), dsc.Target(max_batch=2, max_seq_len=16))
    with pytest.raises(dsc.LimitError, match="max_seq_len=16"):
        compiled.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(dsc.LimitError, match="max_batch=2"):
        compiled.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        compiled.generate(torch.ones(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        compiled.generate(torch.tensor([[5, 100000]]))


def test_encoder_cannot_generate():
    compiled = dsc.compile(zoo.build("tiny-bert"), "cpu")
    with pytest.raises(TypeError, match="cannot generate: its attention is not causal"):
        compiled.generate(torch.ones(1, 4, dtype=torch.long))


def test_unrecognised_attention_says_why_it_cannot_generate():
    # A T5-style learned relative-position bias (a table looked up by bucketed distance) is not
    # an attention dsc recognises: forward still equals the module; generate() names the reason
    # instead of calling the model no causal LM.
    torch.manual_seed(0)
    model = _RelativeBiasLM().eval()
    compiled = dsc.compile(model, "cpu")
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="no attention was recognised.*other position biases"):
        compiled.generate(ids, max_new_tokens=2)


class _PrefixMeanLM(torch.nn.Module):
    """Causal attention after a running mean over the tokens so far: state along the sequence
    that a KV cache does not hold, in ops that serve every length (cumsum)."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2, positions: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(positions, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.heads = heads

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        from transformers.modeling_outputs import CausalLMOutput

        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)[None].expand(b, s)
        x = self.embed(input_ids) + self.pos(position_ids)
        count = torch.arange(1, s + 1, device=x.device, dtype=x.dtype)[None, :, None]
        x = x + x.cumsum(1) / count
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return CausalLMOutput(logits=self.head(out.transpose(1, 2).reshape(b, s, -1) + x))


def test_state_outside_attention_is_caught_at_compile():
    # The running mean's state is not in the KV cache, so a decode step would answer wrongly.
    # compile() finds that its decode step does not continue the forward pass; forward still
    # equals the model, generate() refuses with the reason. (Linear-attention layers whose
    # state dsc holds generate: tests/e2e/test_model_families.py.)
    torch.manual_seed(0)
    model = _PrefixMeanLM().eval()
    compiled = dsc.compile(model, dsc.Target(device="cpu", max_seq_len=32))
    assert set(compiled.plan.programs) == {"forward"}
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="decode step does not continue its forward pass"):
        compiled.generate(ids, max_new_tokens=2)


class _RelativeBiasLM(torch.nn.Module):
    """One causal attention layer whose scores add a learned bias per clamped distance."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2, buckets: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.bias = torch.nn.Embedding(buckets, heads)
        self.head = torch.nn.Linear(dim, vocab)
        self.heads, self.buckets = heads, buckets

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        from transformers.modeling_outputs import CausalLMOutput

        b, s = input_ids.shape
        x = self.embed(input_ids)
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        pos = torch.arange(s, device=x.device)
        distance = (pos[:, None] - pos[None, :]).clamp(0, self.buckets - 1)
        bias = self.bias(distance).permute(2, 0, 1)[None]  # [1, H, S, S]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + bias
        scores = scores.masked_fill(~causal, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
        return CausalLMOutput(logits=self.head(out + x))


def _fixed_logits(tokens: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return logits


@pytest.mark.parametrize("eos,max_new,steps_called", [([], 4, True), ([], 1, False),
                                                      ([3, 5], 4, False), ([3], 4, True)])
def test_greedy_steps_take_over_after_the_first_token(eos, max_new, steps_called):
    """With `greedy_steps` (a captured whole step on CUDA), generate_tokens picks token 0 from
    the prefill and hands the rest over — unless one token was asked for or every row already
    ended."""
    from dsc.runtime.generate import GenerationRequest, generate_tokens

    calls = []

    def prefill(ids, mask, positions):
        return _fixed_logits([3, 5])

    def decode(*args):
        raise AssertionError("the step-by-step loop must not run")

    def greedy_steps(first, next_pos, slot, finished):
        calls.append((first.tolist(), next_pos.tolist(), slot, finished.tolist()))
        yield torch.tensor([7, 7])

    ids = torch.tensor([[1, 2, 4], [0, 2, 4]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    request = GenerationRequest(max_new, False, 1.0, None, None, eos, None)
    out = [t.tolist() for t in generate_tokens(prefill, decode, ids, mask, request, 0,
                                               greedy_steps=greedy_steps)]
    assert out[0] == [3, 5]
    if steps_called:
        # Positions count real tokens (row 1 is left-padded); token 0's slot is the prompt length.
        assert calls == [([3, 5], [3, 2], 3, [bool(eos), False])]
        assert out[1:] == [[7, 7]]
    else:
        assert calls == [] and len(out) == 1
