"""Target validation and the errors a user sees for models dsc cannot take."""

import json

import pytest
import torch

import dsc
from dsc import zoo
from dsc.target import as_target


def test_target_json_round_trip_and_shorthands():
    target = dsc.Target(device="cpu", dtype="bfloat16", tp=2, max_batch=3, max_seq_len=77)
    assert dsc.Target.from_json(target.to_json()) == target
    assert json.loads(target.to_json())["max_seq_len"] == 77
    assert as_target("cpu") == dsc.Target()
    assert as_target("cuda").dtype == "bfloat16"
    assert as_target({"max_batch": 5}).max_batch == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device": "tpu"}, "use 'cpu' or 'cuda'"),
        ({"dtype": "int8"}, "use one of"),
        ({"tp": 0}, "positive integer"),
        ({"offload": "disk"}, "None, 'cpu' or 'nvme'"),
        ({"offload": "nvme"}, "offload_path"),
    ],
)
def test_impossible_targets_are_refused(kwargs, message):
    with pytest.raises(dsc.TargetError, match=message):
        dsc.Target(**kwargs)


def test_unknown_target_field_is_named():
    with pytest.raises(dsc.TargetError, match="unknown Target fields"):
        dsc.Target.from_json({"tensor_parallel": 2})


def test_tp_must_divide_heads_when_target_meets_model():
    with pytest.raises(dsc.TargetError, match="tp=3 does not divide the model's 4 attention heads"):
        dsc.compile(zoo.build("tiny-llama"), dsc.Target(tp=3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def _windowed_mistral(window: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=window)
    model = transformers.MistralForCausalLM(config).eval()
    for p in model.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.3)
    return model


def test_sequences_longer_than_a_sliding_window_attend_within_it():
    # A window of 8 keys, longer than the six-token mask probe: found at the config's length,
    # and a 64-slot plan attends within it as HF does past the window (prompt 11, 12 new).
    model = _windowed_mistral(8)
    compiled = dsc.compile(model, dsc.Target(device="cpu", max_seq_len=64))
    ids = torch.randint(3, 200, (1, 11))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(compiled.generate(ids, max_new_tokens=12, eos_token_id=[]), ref)


def test_a_window_too_long_to_recognise_is_refused_with_the_fix():
    from dsc.target import MAX_PROBED_WINDOW

    model = _windowed_mistral(MAX_PROBED_WINDOW + 8)
    with pytest.raises(dsc.TargetError, match=rf"sliding window of {MAX_PROBED_WINDOW + 8} tokens"
                                              rf".*max_seq_len={MAX_PROBED_WINDOW + 8}\) or less"):
        dsc.compile(model, dsc.Target(device="cpu", max_seq_len=2 * MAX_PROBED_WINDOW))


def test_sliding_window_switched_off_in_the_config_is_no_window():
    import transformers

    from dsc.frontend import _sliding_window

    assert _sliding_window(transformers.Qwen2Config(sliding_window=16)) is None  # not in use
    assert _sliding_window(transformers.Qwen2Config(use_sliding_window=True,
                                                    sliding_window=16)) == 16
    assert _sliding_window(transformers.MistralConfig(sliding_window=None)) is None
    assert _sliding_window(transformers.Gemma2Config()) == 4096  # alternate layers slide


def test_cuda_without_gpu_is_refused():
    with pytest.raises(dsc.TargetError, match="no CUDA GPU"):
        dsc.compile(zoo.build("tiny-llama"), "cuda")


def test_fp16_on_cpu_is_refused():
    with pytest.raises(dsc.TargetError, match="float16"):
        dsc.compile(zoo.build("tiny-llama"), dsc.Target(dtype="float16"))


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask=None):
        if input_ids.sum() > 3:  # branches on token values: not traceable to one graph
            return self.embed(input_ids)
        return -self.embed(input_ids)


def test_untraceable_model_names_the_source_line():
    with pytest.raises(dsc.TraceError) as info:
        dsc.compile(_DataDependent(), "cpu")
    text = str(info.value)
    assert "_DataDependent" in text
    assert "test_target_and_errors.py" in text and "input_ids.sum() > 3" in text


@torch.library.custom_op("dsc_test::scramble", mutates_args=())
def _scramble(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


@_scramble.register_fake
def _(x):
    return torch.empty_like(x)


class _ForeignOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask=None):
        return torch.ops.dsc_test.scramble(self.embed(input_ids))


def test_unsupported_op_names_op_node_and_line():
    with pytest.raises(dsc.UnsupportedOpError) as info:
        dsc.compile(_ForeignOp(), "cpu")
    text = str(info.value)
    assert "dsc_test::scramble" in text
    assert "graph node scramble" in text
    assert "test_target_and_errors.py" in text


def test_not_a_module_is_refused():
    with pytest.raises(dsc.TraceError, match="needs a torch.nn.Module"):
        dsc.compile(lambda ids: ids, "cpu")
