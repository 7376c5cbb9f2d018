"""decode_attention (split-key flash-decoding) against the reference, on the Triton interpreter."""

import pytest
import torch

from dsc.kernels.decode_attention import DecodeConfig, decode_attention, pick_decode_config
from dsc.kernels.reference import attention_reference

CONFIGS = {
    "one-split": DecodeConfig(block_n=16, num_splits=1, num_warps=1, num_stages=1),
    "three-splits": DecodeConfig(block_n=16, num_splits=3, num_warps=1, num_stages=1),
    "three-splits-merged-in-split": DecodeConfig(block_n=16, num_splits=3, num_warps=1,
                                                 num_stages=1, merge_in_split=True),
    # V requested beside K: the NaN rows of make_inputs must still never reach the sums.
    "one-split-v-with-k": DecodeConfig(block_n=16, num_splits=1, num_warps=1, num_stages=1,
                                       v_with_k=True),
    "three-splits-v-with-k": DecodeConfig(block_n=16, num_splits=3, num_warps=1, num_stages=2,
                                          v_with_k=True),
}


def make_inputs(b=2, hq=4, hkv=2, s=1, t=13, d=16, start=0, seed=0):
    """Random q and cache with padding; slots nobody may attend hold NaN to prove they are unread."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, d, generator=g)
    valid = torch.rand(b, t, generator=g) > 0.3
    valid[:, start] = True
    valid[0, : start + 1] = False  # sequence 0: its first query row sees no key at all
    k[:, :, start + s :] = float("nan")
    v[:, :, start + s :] = float("nan")
    k.masked_fill_(~valid[:, None, :, None], float("nan"))
    v.masked_fill_(~valid[:, None, :, None], float("nan"))
    return q, k, v, valid, torch.tensor([start], dtype=torch.int64)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s,start", [(1, 0), (1, 9), (3, 0), (3, 6)])
def test_matches_reference(s, start, causal, config, assert_close, poisoned):
    q, k, v, valid, st = make_inputs(s=s, start=start, seed=s * 10 + start)
    out = decode_attention(q, k, v, valid, st, causal, 0.3, out=poisoned(q.shape), config=config)
    ref = attention_reference(q, k, v, valid, st, causal, 0.3)
    assert_close(out, ref)
    if causal or s == 1:
        # Sequence 0, query 0 attends nothing: zeros, not NaN.
        assert torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))


def test_multi_query_attention_and_odd_head_dim(assert_close):
    # 8 query heads on one kv head (MQA), D = 20 (not a power of two).
    q, k, v, valid, st = make_inputs(b=1, hq=8, hkv=1, s=2, t=21, d=20, start=4, seed=3)
    out = decode_attention(q, k, v, valid, st, True, 0.25, config=CONFIGS["three-splits"])
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.25))


def test_strided_views_and_larger_cache_batch(assert_close, poisoned):
    # q as a transposed view of [B, S, H, D]; caches sized for more sequences than q has.
    q, k, v, valid, st = make_inputs(b=3, s=2, start=5, seed=4)
    q = q[:2].transpose(1, 2).contiguous().transpose(1, 2)
    valid = valid[:2]
    out = poisoned((2, 2, 4, 16)).transpose(1, 2)
    res = decode_attention(q, k, v, valid, st, True, 0.3, out=out, config=CONFIGS["one-split"])
    assert res.data_ptr() == out.data_ptr()
    assert_close(res, attention_reference(q, k, v, valid, st, True, 0.3))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("s,start", [(1, 0), (1, 12), (3, 4), (2, 15)])
def test_writes_the_new_rows_into_the_cache(s, start, config, assert_close):
    # new_k / new_v land at slots start..start+S-1 (any chunk, the last slot included) and the
    # attention sees them: same result and same cache as a separate cache write first.
    q, k, v, valid, st = make_inputs(s=s, t=17, start=start, seed=7 + start)
    g = torch.Generator().manual_seed(start)
    qkv = torch.randn(2, s, 3, 2, 16, generator=g)  # new k, v as strided views of one tensor
    new_k, new_v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    valid[:, start : start + s] = True
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[:, :, start : start + s] = new_k
    v_ref[:, :, start : start + s] = new_v
    out = decode_attention(q, k, v, valid, st, True, 0.3, config=config, new_k=new_k, new_v=new_v)
    assert_close(out, attention_reference(q, k_ref, v_ref, valid, st, True, 0.3))
    assert torch.equal(k.nan_to_num(0.0), k_ref.nan_to_num(0.0))
    assert torch.equal(v.nan_to_num(0.0), v_ref.nan_to_num(0.0))


def test_new_rows_need_both_and_the_right_shape():
    q, k, v, valid, st = make_inputs()
    with pytest.raises(ValueError, match="both new_k and new_v"):
        decode_attention(q, k, v, valid, st, True, 0.3, new_k=torch.zeros(2, 2, 1, 16))
    with pytest.raises(ValueError, match=r"new_k must be \[B, Hkv, S, D\]"):
        decode_attention(q, k, v, valid, st, True, 0.3, new_k=torch.zeros(2, 4, 1, 16),
                         new_v=torch.zeros(2, 4, 1, 16))


def test_same_launch_serves_every_start(assert_close):
    # The grid depends on T only; the position is read on the device, so one launch shape
    # (as a CUDA graph would replay it) is right for any start.
    q, k, v, valid, _ = make_inputs(t=29, seed=5)
    valid[:] = True
    k.nan_to_num_(0.0)
    v.nan_to_num_(0.0)
    config = DecodeConfig(block_n=16, num_splits=2, num_warps=1, num_stages=1)
    for start in (0, 15, 28):
        st = torch.tensor([start])
        out = decode_attention(q, k, v, valid, st, True, 0.3, config=config)
        assert_close(out, attention_reference(q, k, v, valid, st, True, 0.3))


def test_default_config():
    cfg = pick_decode_config(batch=1, hkv=32, t=8192, sm_count=132)
    assert cfg.num_splits > 1
    assert pick_decode_config(batch=64, hkv=32, t=2048, sm_count=132).num_splits == 1
    # A short cache with few (batch, kv head) pairs: 64-key tiles, so 4 splits instead of 2.
    short = pick_decode_config(batch=1, hkv=4, t=200, sm_count=132)
    assert (short.block_n, short.num_splits) == (64, 4)
    assert pick_decode_config(batch=1, hkv=32, t=8192, sm_count=132).block_n == 128
    # GPT-2 XL's 25 heads over 200 slots: 50 programs at 128 keys, under the floor of 128.
    assert pick_decode_config(batch=1, hkv=25, t=200, sm_count=132).block_n == 64
    assert pick_decode_config(batch=1, hkv=32, t=1024, sm_count=132).block_n == 128


def test_program_floor_for_short_tiles_is_a_setting(monkeypatch):
    # 16 kv heads (a 7B at tp=2) over 200 slots: 32 programs at 128 keys.
    cfg = pick_decode_config(batch=1, hkv=16, t=200, sm_count=132)
    assert (cfg.block_n, cfg.num_splits) == (64, 4)
    monkeypatch.setenv("DSC_DECODE_MIN_PROGRAMS", "32")  # the floor before run 34
    assert pick_decode_config(batch=1, hkv=16, t=200, sm_count=132).block_n == 128
    monkeypatch.setenv("DSC_DECODE_MIN_PROGRAMS", "many")
    with pytest.raises(ValueError, match="DSC_DECODE_MIN_PROGRAMS"):
        pick_decode_config(batch=1, hkv=16, t=200, sm_count=132)


def _bad(**changes):
    q, k, v, valid, st = make_inputs()
    args = {
        "q": q,
        "k_cache": k,
        "v_cache": v,
        "kv_valid": valid,
        "start": st,
        "causal": True,
        "scale": 0.3,
    }
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"q": torch.randn(4, 1, 16)}, "q must be 4-D"),
        ({"q": torch.randn(2, 3, 1, 16)}, "not a multiple of Hkv"),
        ({"q": torch.randn(2, 4, 1, 8)}, "head dim mismatch"),
        ({"v_cache": torch.randn(2, 2, 12, 16)}, "must be k_cache's"),
        ({"v_cache": torch.randn(2, 2, 13, 520)}, "Dv=520: above the supported 1024 \\(keys\\) "
                                                  "and 512"),
        ({"kv_valid": torch.ones(2, 13, dtype=torch.int64)}, "bool"),
        ({"kv_valid": torch.ones(2, 12, dtype=torch.bool)}, "kv_valid must be"),
        ({"start": 3}, "start must be an int64 tensor"),
        ({"start": torch.tensor([1.0])}, "start must be an int64 tensor"),
        ({"q": torch.randn(3, 4, 1, 16)}, "batch mismatch"),
    ],
)
def test_bad_inputs_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        decode_attention(**_bad(**changes))


def test_too_many_rows_for_decode():
    q, k, v, valid, st = make_inputs(hq=4, hkv=1, t=64, s=40)
    with pytest.raises(ValueError, match="use flash_attention"):
        decode_attention(q, k, v, valid, st, True, 0.3)


def test_cpu_tensors_need_cuda(no_interpreter):
    with pytest.raises(ValueError, match="needs CUDA"):
        decode_attention(**_bad())


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("s,start,d", [(1, 0, 16), (1, 12, 24), (2, 15, 16)])
def test_rotates_queries_and_new_keys_as_it_loads_them(s, start, d, config, assert_close):
    # rotary=(cos, sin): the same result and cache as rotating q and the new keys first (d=24:
    # a head dimension short of its power-of-two block, whose halves pair lanes d and d +- 12).
    from dsc.ops.rotary import rotary

    q, k, v, valid, st = make_inputs(s=s, t=17, d=d, start=start, seed=11 + start)
    g = torch.Generator().manual_seed(start)
    qkv = torch.randn(2, s, 3, 2, d, generator=g)
    new_k, new_v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    cos, sin = torch.randn(2, 1, s, d, generator=g), torch.randn(1, 1, s, d, generator=g)
    valid[:, start : start + s] = True
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[:, :, start : start + s] = rotary(new_k, cos, sin)
    v_ref[:, :, start : start + s] = new_v
    out = decode_attention(q, k, v, valid, st, True, 0.3, config=config, new_k=new_k,
                           new_v=new_v, rotary=(cos, sin))
    assert_close(out, attention_reference(rotary(q, cos, sin), k_ref, v_ref, valid, st, True, 0.3))
    assert torch.allclose(k.nan_to_num(0.0), k_ref.nan_to_num(0.0), atol=1e-6)
    assert torch.equal(v.nan_to_num(0.0), v_ref.nan_to_num(0.0))


def test_rotary_needs_the_new_rows_and_matching_tables():
    q, k, v, valid, st = make_inputs()
    table = torch.zeros(1, 1, 1, 16)
    with pytest.raises(ValueError, match="rotary needs new_k"):
        decode_attention(q, k, v, valid, st, True, 0.3, rotary=(table, table))
    new = torch.zeros(2, 2, 1, 16)
    with pytest.raises(ValueError, match="do not broadcast"):
        decode_attention(q, k, v, valid, st, True, 0.3, new_k=new, new_v=new,
                         rotary=(torch.zeros(1, 1, 1, 8), table))


def test_short_caches_in_one_pass_when_asked(monkeypatch):
    assert pick_decode_config(batch=1, hkv=25, t=200, sm_count=132).num_splits > 1
    monkeypatch.setenv("DSC_DECODE_SINGLE_PASS_KEYS", "256")
    one = pick_decode_config(batch=1, hkv=25, t=200, sm_count=132)
    assert (one.num_splits, one.block_n) == (1, 64)
    assert pick_decode_config(batch=1, hkv=25, t=2048, sm_count=132).num_splits > 1


def test_merge_mode_comes_from_the_environment(monkeypatch):
    assert not pick_decode_config(batch=1, hkv=8, t=8192, sm_count=132).merge_in_split
    monkeypatch.setenv("DSC_DECODE_MERGE", "split")
    assert pick_decode_config(batch=1, hkv=8, t=8192, sm_count=132).merge_in_split
    monkeypatch.setenv("DSC_DECODE_MERGE", "inline")
    with pytest.raises(ValueError, match="DSC_DECODE_MERGE='inline'.*split or kernel"):
        pick_decode_config(batch=1, hkv=8, t=8192, sm_count=132)


@pytest.mark.parametrize("merge_in_split", [False, True])
@pytest.mark.parametrize("s,start", [(1, 5), (2, 20), (1, 70)])
def test_splits_share_the_live_length_not_the_capacity(s, start, merge_in_split, assert_close,
                                                       poisoned):
    """A cache of 96 slots split 6 ways holding start + s tokens: the chunks divide the live
    tokens (16-key tiles over all six programs), and the step's own keys are written by
    whichever program's chunk holds their slot."""
    q, k, v, valid, st = make_inputs(b=2, hq=4, hkv=2, s=s, t=96, start=start, seed=start)
    new_k, new_v = torch.randn(2, 2, s, 16), torch.randn(2, 2, s, 16)
    config = DecodeConfig(block_n=16, num_splits=6, num_warps=1, num_stages=1,
                          merge_in_split=merge_in_split)
    out = decode_attention(q, k, v, valid, st, True, 0.3, out=poisoned(q.shape), config=config,
                           new_k=new_k, new_v=new_v)
    torch.testing.assert_close(k[:, :, start:start + s], new_k)
    torch.testing.assert_close(v[:, :, start:start + s], new_v)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.3))


def test_one_configuration_for_every_call_from_the_environment(monkeypatch, assert_close):
    monkeypatch.setenv("DSC_DECODE_CONFIG", "16/3/1/1")
    q, k, v, valid, st = make_inputs(start=9, seed=7)
    out = decode_attention(q, k, v, valid, st, True, 0.3)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.3))
    for bad in ("16/3/1", "24/1/4/2", "16/0/4/2", "sixteen/1/4/2"):
        monkeypatch.setenv("DSC_DECODE_CONFIG", bad)
        with pytest.raises(ValueError, match="DSC_DECODE_CONFIG="):
            decode_attention(q, k, v, valid, st, True, 0.3)


def test_short_chunks_take_one_pipeline_stage():
    # Llama-7B batch 16 at 200 slots: 512 programs of four 64-key tiles, one stage.
    short = pick_decode_config(batch=16, hkv=32, t=200, sm_count=132)
    assert (short.block_n, short.num_splits, short.num_stages) == (64, 1, 1)
    # The same batch at 2048 slots walks 32 tiles a program: two stages keep it streaming.
    assert pick_decode_config(batch=16, hkv=32, t=2048, sm_count=132).num_stages == 2
    assert pick_decode_config(batch=1, hkv=32, t=8192, sm_count=132).num_stages == 2
    # Split programs of one to four tiles (batch 1 at 200 slots) keep two stages.
    split = pick_decode_config(batch=1, hkv=32, t=200, sm_count=132)
    assert (split.block_n, split.num_splits, split.num_stages) == (64, 4, 2)


def test_v_with_k_comes_from_the_environment(monkeypatch, assert_close):
    assert not pick_decode_config(batch=16, hkv=32, t=200, sm_count=132).v_with_k
    monkeypatch.setenv("DSC_DECODE_V_WITH_K", "1")
    assert pick_decode_config(batch=16, hkv=32, t=200, sm_count=132).v_with_k
    monkeypatch.setenv("DSC_DECODE_CONFIG", "16/3/1/1")
    q, k, v, valid, st = make_inputs(start=9, seed=8)
    new_k, new_v = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    out = decode_attention(q, k, v, valid, st, True, 0.3, new_k=new_k, new_v=new_v)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.3))
    monkeypatch.setenv("DSC_DECODE_V_WITH_K", "yes")
    with pytest.raises(ValueError, match="DSC_DECODE_V_WITH_K='yes'"):
        pick_decode_config(batch=16, hkv=32, t=200, sm_count=132)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("s,start,window", [(1, 12, 4), (3, 9, 5), (2, 15, 40), (1, 20, 1)],
                         ids=["4@12", "s3-5@9", "wider-than-live", "itself-only"])
def test_sliding_window_reads_only_the_window(s, start, window, config, assert_close):
    # Query i sees slots start + i - window + 1 .. start + i. The slots behind every query's
    # window hold NaN: the programs share out only the window's slots, so none is read.
    q, k, v, valid, st = make_inputs(s=s, t=23, start=start, seed=5 + start)
    g = torch.Generator().manual_seed(start)
    new_k, new_v = torch.randn(2, 2, s, 16, generator=g), torch.randn(2, 2, s, 16, generator=g)
    valid[:, start : start + s] = True
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[:, :, start : start + s], v_ref[:, :, start : start + s] = new_k, new_v
    behind = max(start - window + 1, 0)
    k[:, :, :behind] = float("nan")
    v[:, :, :behind] = float("nan")
    out = decode_attention(q, k, v, valid, st, True, 0.3, config=config, new_k=new_k,
                           new_v=new_v, window=window)
    assert_close(out, attention_reference(q, k_ref, v_ref, valid, st, True, 0.3, window=window))


def test_a_window_sizes_the_launch_for_the_slots_it_can_see():
    # 4096 slots, a 64-slot window: the default configuration is the one of a 64-slot cache,
    # not of a 4096-slot one (whose split programs would mostly find nothing to read).
    q, k, v, valid, st = make_inputs(t=4096, start=100)
    calls = []
    from dsc.kernels import decode_attention as module

    original = module.pick_decode_config
    try:
        module.pick_decode_config = lambda *a: calls.append(a) or original(*a)
        decode_attention(q, k, v, valid, st, True, 0.3, window=64)
    finally:
        module.pick_decode_config = original
    assert calls and calls[0][2] == 64


def test_a_window_needs_causal_attention():
    q, k, v, valid, st = make_inputs()
    with pytest.raises(ValueError, match="sliding window needs causal attention"):
        decode_attention(q, k, v, valid, st, False, 0.3, window=4)
    with pytest.raises(ValueError, match="window must be 0"):
        decode_attention(q, k, v, valid, st, True, 0.3, window=-1)


SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])  # one per query head of make_inputs


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("s,start,window", [(1, 12, 0), (3, 9, 0), (2, 15, 6)])
def test_alibi_slopes_bias_the_scores(s, start, window, config, assert_close):
    # Query head h adds SLOPES[h] * (key slot - query slot): within a sliding window too.
    q, k, v, valid, st = make_inputs(s=s, t=17, start=start, seed=21 + start)
    out = decode_attention(q, k, v, valid, st, True, 0.3, config=config, window=window,
                           alibi=SLOPES)
    ref = attention_reference(q, k, v, valid, st, True, 0.3, window=window, alibi=SLOPES)
    assert_close(out, ref)
    plain = attention_reference(q, k, v, valid, st, True, 0.3, window=window)
    assert float((ref - plain).norm() / ref.norm()) > 1e-2  # the bias matters


def test_alibi_slopes_are_checked():
    q, k, v, valid, st = make_inputs()
    with pytest.raises(ValueError, match="one slope per query head: 4, got 3"):
        decode_attention(q, k, v, valid, st, True, 0.3, alibi=SLOPES[:3])
    with pytest.raises(ValueError, match="alibi slopes need causal attention"):
        decode_attention(q, k, v, valid, st, False, 0.3, alibi=SLOPES)
    with pytest.raises(ValueError, match="must be float32"):
        decode_attention(q, k, v, valid, st, True, 0.3, alibi=SLOPES.double())


def test_sliding_window_with_rotary_and_new_rows(assert_close):
    # Mistral's decode step on the GPU: rotate q and the new key as they load, write the new
    # rows, attend within the window (split in three).
    from dsc.ops.rotary import rotary

    s, start, window = 2, 14, 5
    q, k, v, valid, st = make_inputs(s=s, t=17, start=start, seed=31)
    g = torch.Generator().manual_seed(3)
    new_k, new_v = torch.randn(2, 2, s, 16, generator=g), torch.randn(2, 2, s, 16, generator=g)
    cos, sin = torch.randn(2, 1, s, 16, generator=g), torch.randn(2, 1, s, 16, generator=g)
    valid[:, start : start + s] = True
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[:, :, start : start + s] = rotary(new_k, cos, sin)
    v_ref[:, :, start : start + s] = new_v
    out = decode_attention(q, k, v, valid, st, True, 0.3, config=CONFIGS["three-splits"],
                           new_k=new_k, new_v=new_v, rotary=(cos, sin), window=window)
    want = attention_reference(rotary(q, cos, sin), k_ref, v_ref, valid, st, True, 0.3,
                               window=window)
    assert_close(out, want)


SINKS = torch.tensor([2.0, -1.0, 0.5, 9.0])  # one per query head; 9: a sink that dominates


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("s,start,window", [(1, 12, 0), (3, 9, 0), (2, 15, 6)])
def test_attention_sinks_join_the_denominator(s, start, window, config, assert_close):
    # Each head's sink logit takes a share of the softmax and adds nothing: in one split, in
    # the combine kernel and in the in-split merge alike.
    q, k, v, valid, st = make_inputs(s=s, t=17, start=start, seed=31 + start)
    out = decode_attention(q, k, v, valid, st, True, 0.3, config=config, window=window,
                           sinks=SINKS)
    ref = attention_reference(q, k, v, valid, st, True, 0.3, window=window, sinks=SINKS)
    assert_close(out, ref)
    plain = attention_reference(q, k, v, valid, st, True, 0.3, window=window)
    assert float((ref - plain).norm() / ref.norm()) > 1e-2  # the sinks matter


def test_attention_sinks_are_checked():
    q, k, v, valid, st = make_inputs()
    with pytest.raises(ValueError, match="one floating-point logit per query head"):
        decode_attention(q, k, v, valid, st, True, 0.3, sinks=SINKS[:3])


def _ring_of(full: torch.Tensor, ring: int, upto: int) -> torch.Tensor:
    """The ring cache holding positions upto - ring .. upto - 1 of `full` (p in slot p % ring);
    slots for positions before 0 hold NaN (never written, never read)."""
    out = torch.full((*full.shape[:2], ring, full.shape[3]), float("nan"))
    for p in range(max(0, upto - ring), upto):
        out[:, :, p % ring] = full[:, :, p]
    return out


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("s,start,window,ring", [(1, 12, 4, 4), (1, 2, 5, 5), (2, 9, 5, 6),
                                                 (1, 20, 6, 9)],
                         ids=["wrapped", "not-yet-full", "two-rows", "ring-past-window"])
def test_a_ring_cache_serves_the_window(s, start, window, ring, config, assert_close):
    # A windowed layer's cache of `ring` slots: position p in slot p % ring. The step writes its
    # rows there and attends as over the whole cache; the slot it overwrote is behind the window.
    q, k, v, valid, st = make_inputs(s=s, t=23, start=start, seed=7 + start)
    g = torch.Generator().manual_seed(start + 1)
    new_k, new_v = torch.randn(2, 2, s, 16, generator=g), torch.randn(2, 2, s, 16, generator=g)
    valid[:, start : start + s] = True
    k_full, v_full = k.clone(), v.clone()
    k_full[:, :, start : start + s], v_full[:, :, start : start + s] = new_k, new_v
    k_ring, v_ring = _ring_of(k, ring, start), _ring_of(v, ring, start)
    out = decode_attention(q, k_ring, v_ring, valid, st, True, 0.3, config=config, new_k=new_k,
                           new_v=new_v, window=window)
    assert_close(out, attention_reference(q, k_full, v_full, valid, st, True, 0.3,
                                          window=window))
    for i in range(s):  # the step's rows landed in their ring slots
        assert torch.equal(k_ring[:, :, (start + i) % ring], new_k[:, :, i])


def test_a_ring_too_short_for_the_step_is_refused():
    q, k, v, valid, st = make_inputs(s=3, t=23, start=9)
    ring_k, ring_v = k[:, :, :5].clone(), v[:, :, :5].clone()
    with pytest.raises(ValueError, match="at most 1 tokens"):
        decode_attention(q, ring_k, ring_v, valid, st, True, 0.3, window=5,
                         new_k=torch.zeros(2, 2, 3, 16), new_v=torch.zeros(2, 2, 3, 16))
    with pytest.raises(ValueError, match="sliding window of at most 5 slots"):
        decode_attention(q[:, :, :1], ring_k, ring_v, valid, st, True, 0.3, window=0)


def _values_like(valid: torch.Tensor, hkv: int, d_v: int, live: int, seed: int) -> torch.Tensor:
    """A value cache of head size d_v with make_inputs' poison: NaN where no query may look."""
    v = torch.randn(valid.shape[0], hkv, valid.shape[1], d_v,
                    generator=torch.Generator().manual_seed(seed))
    v[:, :, live:] = float("nan")
    return v.masked_fill_(~valid[:, None, :, None], float("nan"))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("d,d_v", [(24, 16), (16, 40)], ids=["values-narrower", "values-wider"])
def test_values_of_their_own_head_size(d, d_v, config, assert_close, poisoned):
    # Latent attention (DeepSeek: keys 192 wide, values 128), in small: keys 24 wide (masked
    # lanes), values 16, or values wider than the keys. The step's rows are written by the
    # kernel from separate tensors; the output and the split partials take the values' size.
    s, start = 2, 6
    q, k, _, valid, st = make_inputs(s=s, t=17, d=d, start=start, seed=11)
    valid[:, start : start + s] = True
    v = _values_like(valid, 2, d_v, start + s, seed=12)
    g = torch.Generator().manual_seed(13)
    new_k, new_v = torch.randn(2, 2, s, d, generator=g), torch.randn(2, 2, s, d_v, generator=g)
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[:, :, start : start + s], v_ref[:, :, start : start + s] = new_k, new_v
    out = decode_attention(q, k, v, valid, st, True, 0.3, out=poisoned((2, 4, s, d_v)),
                           config=config, new_k=new_k, new_v=new_v)
    assert out.shape == (2, 4, s, d_v)
    assert_close(out, attention_reference(q, k_ref, v_ref, valid, st, True, 0.3))
    assert torch.equal(v[:, :, start : start + s], new_v)


def test_new_values_need_the_value_head_size():
    q, k, _, valid, st = make_inputs(d=24)
    v = torch.randn(2, 2, 13, 16)
    with pytest.raises(ValueError, match=r"new_v must be \[B, Hkv, S, Dv\] = \[2, 2, 1, 16\]"):
        decode_attention(q, k, v, valid, st, True, 0.3, new_k=torch.zeros(2, 2, 1, 24),
                         new_v=torch.zeros(2, 2, 1, 24))


@pytest.mark.parametrize("config", [CONFIGS["one-split"], CONFIGS["three-splits-merged-in-split"],
                                    CONFIGS["three-splits-v-with-k"]],
                         ids=["one-split", "merged-in-split", "v-with-k"])
@pytest.mark.parametrize("s", [1, 3])
def test_keys_past_256_lanes_are_scored_by_chunks(s, config, assert_close, poisoned):
    # Absorbed latent attention: queries and keys 576 wide (the latent and its rotary part),
    # values 512, one kv head. Here 320 and 288: five 64-lane chunks, the last one masked.
    start = 5
    q, k, _, valid, st = make_inputs(hq=4, hkv=1, s=s, t=15, d=320, start=start, seed=31)
    valid[:, start : start + s] = True
    v = _values_like(valid, 1, 288, start + s, seed=32)
    g = torch.Generator().manual_seed(33)
    new_k, new_v = torch.randn(2, 1, s, 320, generator=g), torch.randn(2, 1, s, 288, generator=g)
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[:, :, start : start + s], v_ref[:, :, start : start + s] = new_k, new_v
    out = decode_attention(q, k, v, valid, st, True, 0.05, out=poisoned((2, 4, s, 288)),
                           config=config, new_k=new_k, new_v=new_v)
    assert_close(out, attention_reference(q, k_ref, v_ref, valid, st, True, 0.05))


def test_many_heads_over_wide_values_go_a_few_heads_a_launch(assert_close):
    # 32 query heads on one kv head with 512-wide values: a program would hold a [32, 512]
    # accumulator; the heads go 16 at a time, each launch with its heads' sinks.
    q, k, _, valid, st = make_inputs(b=1, hq=32, hkv=1, s=1, t=9, d=576, start=6, seed=41)
    v = _values_like(valid, 1, 512, 7, seed=42)
    sinks = torch.randn(32, generator=torch.Generator().manual_seed(43))
    out = decode_attention(q, k, v, valid, st, True, 0.04, config=CONFIGS["one-split"],
                           sinks=sinks)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.04, sinks=sinks))


def test_wide_keys_refuse_rotary_and_wide_values_need_one_kv_head():
    q, k, v, valid, st = make_inputs(hkv=1, d=320)
    new = torch.zeros(2, 1, 1, 320)
    with pytest.raises(ValueError, match="rotary needs a head dimension of at most 256"):
        decode_attention(q, k, v, valid, st, True, 0.3, new_k=new, new_v=new,
                         rotary=(torch.ones(1, 1, 1, 320), torch.zeros(1, 1, 1, 320)))
    q, k, _, valid, st = make_inputs(hq=64, hkv=2, d=16)
    with pytest.raises(ValueError, match="need one kv head"):
        decode_attention(q, k, torch.randn(2, 2, 13, 512), valid, st, True, 0.3)
