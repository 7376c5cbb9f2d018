"""Token generation over a cached plan: prefill, then one decode step per new token.

Prompts are normalised to left padding, so every sequence's next token goes to the same cache slot;
positions come from the attention mask (cumsum − 1), so each sequence rotates by its own positions
and a padded batch gives every sequence exactly the tokens it gets alone.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from dsc.errors import InputError, LimitError

__all__ = ["GenerationRequest", "check_prompt", "left_pad", "select_next", "generate_tokens"]


def check_prompt(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    vocab_size: int | None,
    max_batch: int,
    max_seq_len: int,
    new_tokens: int = 0,
) -> torch.Tensor:
    """Validate a prompt batch before any work; return the attention mask (ones when None)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        raise InputError("input_ids must be 2-D [batch, seq]; use input_ids[None] for one prompt")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(
            f"input_ids must be a 2-D integer tensor [batch, seq], got {input_ids.dim()}-D "
            f"{input_ids.dtype}"
        )
    batch, seq = input_ids.shape
    if batch == 0 or seq == 0:
        raise InputError(f"empty prompt (input_ids shape {tuple(input_ids.shape)}); give at least one token")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
            f"{tuple(input_ids.shape)}"
        )
    if bool((attention_mask.sum(-1) == 0).any()):
        raise InputError("a prompt in the batch has no real token (its attention_mask is all 0)")
    real = input_ids[attention_mask.bool()]
    if vocab_size is not None and real.numel() and (
        int(real.min()) < 0 or int(real.max()) >= vocab_size
    ):
        bad = int(real.max()) if int(real.max()) >= vocab_size else int(real.min())
        raise InputError(f"token id {bad} is outside the model's vocabulary [0, {vocab_size})")
    if batch > max_batch:
        raise LimitError(
            f"batch of {batch} exceeds the plan's max_batch={max_batch}; compile with "
            f"dsc.Target(max_batch={batch}) or larger"
        )
    if seq + new_tokens > max_seq_len:
        raise LimitError(
            f"prompt of {seq} tokens + {new_tokens} new tokens = {seq + new_tokens} exceeds the "
            f"plan's max_seq_len={max_seq_len}; compile with dsc.Target(max_seq_len="
            f"{seq + new_tokens}) or larger, or ask for fewer tokens"
        )
    return attention_mask


def left_pad(input_ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end (left padding), keeping their order."""
    lengths = mask.sum(-1)
    if bool((mask[:, -1] == 1).all()):
        return input_ids, mask  # already left-padded (or unpadded)
    seq = input_ids.shape[1]
    ids = torch.full_like(input_ids, pad_id)
    out_mask = torch.zeros_like(mask)
    for row in range(input_ids.shape[0]):
        tokens = input_ids[row][mask[row].bool()]
        n = int(lengths[row])
        ids[row, seq - n :] = tokens
        out_mask[row, seq - n :] = 1
    return ids, out_mask


def select_next(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token of each row: argmax, or a sample after temperature, top-k and top-p."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


class GenerationRequest:
    """One generate() call's settings."""

    def __init__(self, max_new_tokens: int, do_sample: bool, temperature: float,
                 top_k: int | None, top_p: float | None, eos_token_id, seed: int | None):
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens}: ask for at least one token")
        if do_sample and temperature <= 0:
            raise InputError(f"temperature={temperature}: must be > 0 when sampling")
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        if eos_token_id is None:
            eos_token_id = []
        self.eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if do_sample and self.generator is None:
            self.generator = torch.Generator().manual_seed(torch.seed() % (2**63))


def generate_tokens(
    prefill: Callable[..., torch.Tensor],
    decode: Callable[..., torch.Tensor],
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    request: GenerationRequest,
    pad_id: int,
    agree: Callable[[torch.Tensor], None] | None = None,
    greedy_steps: Callable[..., Iterator[torch.Tensor]] | None = None,
    reprefill_at: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield [batch] tensors of new tokens, one per step; finished rows yield pad_id.

    prefill(ids, mask, positions) and decode(ids, positions, slot) return last-position logits
    [batch, vocab]; the caller owns the cache they write. `agree(token)`, if given, makes the
    chosen tokens the same on every rank (in place) before the next step reads them.
    `greedy_steps(first, next_pos, slot, finished)`, if given and decoding is greedy, yields the
    tokens after the first itself (a captured whole step, runtime/greedy_graph.py).
    `reprefill_at` (a longrope model's switch length, `dsc.dynamic_rope`): when a prompt of at
    most that many tokens grows past it, the step that crosses runs prefill over the whole
    sequence instead of decode, so every cached key is rotated with the long factors (what HF's
    Phi-3 generate means to do by dropping its cache there).
    """
    ids, mask = left_pad(input_ids, mask, pad_id)
    batch, seq = ids.shape
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = prefill(ids, mask, positions)
    finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    eos = torch.tensor(request.eos or [-1], device=ids.device)
    next_pos = positions[:, -1] + 1
    crosses = reprefill_at is not None and seq <= reprefill_at < seq + request.max_new_tokens - 1
    if greedy_steps is not None and not request.do_sample and not crosses:
        token = select_next(logits, False, 1.0, None, None, None)
        if request.eos:
            finished = torch.isin(token, eos)
        yield token
        if request.max_new_tokens > 1 and not (request.eos and bool(finished.all())):
            yield from greedy_steps(token, next_pos, seq, finished)
        return
    # The host never waits for the GPU inside this loop: the next decode step is queued before
    # this step's token is handed out (a caller that reads it waits only for the token, with the
    # step already queued behind it), and "all rows finished" is read one step late through a
    # pinned copy, so at most one extra step runs (its token is never yielded).
    on_gpu = ids.device.type == "cuda" and bool(request.eos)
    all_done = torch.zeros(1, dtype=torch.bool, pin_memory=on_gpu)
    done_event = torch.cuda.Event() if on_gpu else None
    for step in range(request.max_new_tokens):
        token = select_next(logits, request.do_sample, request.temperature, request.top_k,
                            request.top_p, request.generator)
        if agree is not None:
            agree(token)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        last = step + 1 == request.max_new_tokens
        if request.eos:
            finished = finished | torch.isin(token, eos)
            all_done.copy_(finished.all()[None], non_blocking=True)
            if done_event is not None:
                done_event.record()
        if crosses and ids.shape[1] <= reprefill_at:  # the sequence is kept up to the switch
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        if not last:
            if crosses and seq + step == reprefill_at:  # this token is the one past the switch
                logits = prefill(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
            else:
                logits = decode(token[:, None], next_pos[:, None], seq + step)
            next_pos = next_pos + 1
        yield token
        if last:
            return
        if request.eos:
            if done_event is not None:
                done_event.synchronize()  # the flag's copy, queued before the decode step
            if bool(all_done):
                return
