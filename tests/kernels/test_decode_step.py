"""advance_greedy: the token choice and bookkeeping between greedy decode steps, against torch."""

import pytest
import torch

from dsc.kernels import decode_step
from dsc.kernels.decode_step import advance_greedy

_ORDER = ("finished", "eos", "pad", "tokens", "col", "ids", "pos", "start", "valid")


def _state(batch: int, capacity: int, slots: int, start: int) -> dict:
    return dict(
        finished=torch.tensor([False, True, False][:batch]),
        eos=torch.tensor([7, 11, -1, -1]),
        pad=torch.tensor([0]),
        tokens=torch.full((batch, capacity), -5),
        col=torch.tensor([2]),
        ids=torch.full((batch, 1), -5),
        pos=torch.tensor([[10], [4], [9]][:batch]),
        start=torch.tensor([start]),
        valid=torch.zeros(batch, slots, dtype=torch.bool),
    )


def _args(state: dict) -> list:
    return [state[k] for k in _ORDER]


def _logits_choosing(choice: list[int], vocab: int) -> torch.Tensor:
    logits = torch.randn(len(choice), vocab)
    for row, c in enumerate(choice):
        logits[row, c] = 10.0
    return logits


@pytest.mark.parametrize("has_eos", [True, False])
def test_advance_records_blanks_and_moves_every_counter(has_eos):
    s = _state(3, capacity=5, slots=12, start=6)
    advance_greedy(_logits_choosing([7, 3, 5], 13), *_args(s), has_eos=has_eos)
    # Row 1 was finished: with eos handling it emits pad; row 0 just produced eos 7.
    want = torch.tensor([7, 0, 5]) if has_eos else torch.tensor([7, 3, 5])
    assert torch.equal(s["tokens"][:, 2], want)
    assert (s["tokens"][:, [0, 1, 3, 4]] == -5).all()  # only column col was written
    assert s["col"].item() == 3 and s["start"].item() == 7
    assert torch.equal(s["ids"][:, 0], want)
    assert torch.equal(s["pos"][:, 0], torch.tensor([11, 5, 10]))
    assert s["valid"][:, 7].all() and s["valid"].sum() == 3  # the next step's slot, every row
    if has_eos:
        assert torch.equal(s["finished"], torch.tensor([True, True, False]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_argmax_over_several_blocks_matches_torch_ties_and_nan_included(monkeypatch, dtype):
    monkeypatch.setattr(decode_step, "_ARGMAX_BLOCK", 16)  # 77 logits: 5 blocks, a ragged last
    logits = torch.randn(3, 77).to(dtype)
    logits[0, [20, 40, 70]] = 50.0  # a tie across blocks: the first position wins
    logits[1, 76] = 50.0  # the winner in the ragged block
    logits[2, 33] = float("nan")  # NaN wins, as in torch.argmax
    s = _state(3, capacity=4, slots=8, start=0)
    advance_greedy(logits[:, :], *_args(s), has_eos=False)
    assert torch.equal(s["tokens"][:, 2], logits.argmax(-1))


def test_advance_never_writes_past_the_token_buffer_or_the_cache():
    s = _state(2, capacity=2, slots=7, start=6)
    advance_greedy(_logits_choosing([1, 2], 5), *_args(s), has_eos=False)
    # col 2 is past a 2-column buffer and slot 7 past a 7-slot cache: nothing stored there.
    assert (s["tokens"] == -5).all() and not s["valid"].any()
    assert s["col"].item() == 3 and s["start"].item() == 7


def test_advance_refuses_a_strided_token_buffer():
    s = _state(2, capacity=4, slots=8, start=0)
    s["tokens"] = s["tokens"][:, ::2]
    with pytest.raises(ValueError, match="unit stride"):
        advance_greedy(_logits_choosing([1, 2], 5), *_args(s), has_eos=False)
