"""Kernels that have not run on a GPU yet compile for Hopper on any machine (Triton ships
ptxas), and their PTX has what they rely on. Compiled in a child process: under
TRITON_INTERPRET=1 the kernels are interpreter objects.

* the push all-reduce (fused with the norm): 64-bit stores of the flagged words, volatile
  64-bit loads of the receive buffer, the row's ticket and barrier, the trap for a peer that
  never writes, the PDL wait;
* the descriptor flash attention: tensor-memory-accelerator copies and warpgroup MMAs, and no
  pointer loads of Q/K/V;
* the small-batch GEMM with DSC_PDL_GEMV=late: its successor released after the weight stream;
  with DSC_GEMV_PRELOAD=1, its first weight step loaded before the PDL wait;
  with a deferred RMSNorm, in one row and in 16-row tiles (DSC_NORM_DEFER_ROWS=1);
* the small-batch GEMM's push epilogue: the call number read after the PDL wait, the tile sent
  as 64-bit words, no plain store of the output; the receiving all-reduce: no sends;
* the decode attention's split kernel, whose chunks come from the live length (or the part of
  it inside a sliding window; with ALiBi slopes too; with values of their own head size): its first K/V lines prefetched before
  the PDL wait, and, merging in the split, the group's arrival ticket;
  with a weight to prefetch, its share of the weight's lines requested before the wait too;
  with V beside K, the V rows requested before the tile's first tensor-core product;
* the QKV projection with its attention (`qkv_attention`): prefetch, wait, late release, the
  kv group's ticket;
* the MoE routing, the one-program grouping of a decode step's pairs by expert, and the
  experts' two grouped GEMMs (tensor-core products);
* the decode steps of linear attention and Mamba-2 (the gated delta rule, the causal
  convolution, the selective scan)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _compile(name: str) -> str:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if name in ("push_all_reduce", "receive_sum"):
        from dsc.kernels import push_all_reduce as module

        kernel, warps = module._push_all_reduce_kernel, 4
        signature = {
            "x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
            "n_ptr": "*bf16", "buf_ptrs": "*i64", "state_ptr": "*i32", "rank": "i32",
            "H": "i32", "W": "i32", "eps": "fp32", "stride_x": "i32", "stride_r": "i32",
            "stride_o": "i32", "stride_n": "i32", "max_spins": "i32",
        }
        constexprs = {"WORLD": 4, "PACK": 2, "FUSE_NORM": True, "ADD_RESIDUAL": False,
                      "HAS_WEIGHT": True,
                      "PRODUCT": tl.bfloat16, "CHUNK_W": 256, "MAX_ROWS_": module.MAX_ROWS,
                      "MAX_CHUNKS_": module.MAX_CHUNKS, "ROW_WORDS": module.MAX_ROW_WORDS,
                      "CAN_TRAP": True, "USE_PDL": True,
                      "RECEIVE_ONLY": name == "receive_sum"}
        if name == "receive_sum":
            constexprs.update(FUSE_NORM=False, HAS_WEIGHT=False)
    elif name in ("gemv_late", "gemv_push", "gemv_norm", "gemv_norm_rows", "gemv_preload",
                  "decode_split",
                  "decode_split_merge", "decode_split_prefetch", "decode_split_v_with_k",
                  "decode_split_window", "decode_split_alibi", "decode_split_sinks",
                  "decode_split_ring", "decode_split_mla", "decode_split_latent"):
        from dsc.kernels import decode_attention, small_batch_gemm

        if name in ("gemv_late", "gemv_push", "gemv_norm", "gemv_norm_rows", "gemv_preload"):
            kernel, warps = small_batch_gemm._small_batch_gemm_kernel, 4
            push = name == "gemv_push"
            norm = name in ("gemv_norm", "gemv_norm_rows")
            rows = name == "gemv_norm_rows"
            constexprs = dict(
                HAS_BIAS=False, HAS_RESIDUAL=not push, ACTIVATION="silu" if norm else "none",
                GATED=norm, IS_SPLIT=False, DOT_PRECISION="tf32", BLOCK_M=16 if rows else 1,
                BLOCK_N=64 if rows else 8, BLOCK_K=128 if rows else 512,
                NUM_STAGES=3 if rows else 4, USE_PDL=True, PREFETCH=True,
                PRELOAD=name == "gemv_preload", RELEASE_LATE=not push,
                NORM=1 if norm else 0, HAS_NW=norm, HAS_NB=False, STATS_K=0, DEFER_NORM=norm,
                PUSH=push, PUSH_WORLD=2, PACK=2, MAX_ROWS_=32, ROW_WORDS=8192)
            pointers = {"part_ptr": "*fp32", "push_ptrs": "*i64", "push_state": "*i32"}
        else:
            kernel, warps = decode_attention._decode_split_kernel, 4
            constexprs = dict(
                GROUP=4, CAUSAL=True, IS_SPLIT=True, WRITE_NEW=True, ROTARY=True, BLOCK_S=1,
                HEAD_D=128, BLOCK_R=16, BLOCK_N=64, BLOCK_D=128, V_D=128, BLOCK_DV=128,
                QK_CHUNK=0, DOT_PRECISION="tf32",
                MERGE_IN_SPLIT=name == "decode_split_merge",
                V_WITH_K=name == "decode_split_v_with_k", SPLITS_P2=4, PREFETCH_KEYS=128,
                LINE_ELEMS=64, PREFETCH_W=name == "decode_split_prefetch", PF_LINE_ELEMS=64,
                USE_PDL=True,
                WINDOW=4096 if name in ("decode_split_window", "decode_split_ring") else 0,
                ALIBI=name == "decode_split_alibi", SINKS=name == "decode_split_sinks",
                RING=name == "decode_split_ring")
            if name == "decode_split_mla":  # DeepSeek's heads: keys 192 wide, values 128
                constexprs.update(HEAD_D=192, BLOCK_D=256, ROTARY=False, MERGE_IN_SPLIT=True)
            if name == "decode_split_latent":  # its latent: keys 576 wide by chunks, values 512
                constexprs.update(GROUP=16, HEAD_D=576, BLOCK_D=1024, V_D=512, BLOCK_DV=512,
                                  QK_CHUNK=64, BLOCK_N=32, ROTARY=False)
            pointers = {"valid_ptr": "*u8", "start_ptr": "*i64", "part_acc_ptr": "*fp32",
                        "part_ml_ptr": "*fp32", "arrivals_ptr": "*i32", "slopes_ptr": "*fp32",
                        "sinks_ptr": "*bf16"}
        signature = {
            arg: pointers.get(arg, "*bf16") if arg.endswith("_ptr") or arg in pointers
            else "fp32" if arg in ("norm_eps", "scale_log2e") else "i32"
            for arg in kernel.arg_names if arg not in constexprs
        }
    elif name in ("qkv_attention", "qkv_attention_layer_norm"):
        from dsc.kernels import qkv_attention as module

        kernel, warps = module._qkv_attention_kernel, 4
        constexprs = dict(  # Llama-1.1B's layer: RMSNorm, GQA 32:4, rotary
            HQ=32, HKV=4, GROUP=8, PER_GROUP=40, HEAD_D=64, BLOCK_D=64, BLOCK_R=16,
            BLOCK_KEYS=64, NORM=1, HAS_NW=True, HAS_NB=False, STATS_K=1, HAS_BIAS=False,
            ROTARY=True, BLOCK_N=16, BLOCK_K=256, NUM_STAGES=4, DOT_PRECISION="tf32",
            USE_PDL=True)
        if name == "qkv_attention_layer_norm":  # GPT-2 XL's: LayerNorm, 25 heads, bias
            constexprs.update(HQ=25, HKV=25, GROUP=1, PER_GROUP=12, NORM=2, HAS_NB=True,
                              STATS_K=2048, HAS_BIAS=True, ROTARY=False)
        pointers = {"valid_ptr": "*u8", "start_ptr": "*i64", "arrivals_ptr": "*i32"}
        signature = {
            arg: pointers.get(arg, "*bf16") if arg.endswith("_ptr")
            else "fp32" if arg in ("norm_eps", "scale_log2e") else "i32"
            for arg in kernel.arg_names if arg not in constexprs
        }
    elif name in ("moe_route", "moe_align", "moe_gate_up", "moe_down"):
        from dsc.kernels import moe as module

        kernel, warps = {"moe_route": module._route_kernel, "moe_align": module._align_kernel,
                         "moe_gate_up": module._gate_up_kernel,
                         "moe_down": module._down_kernel}[name], 4
        tiles = {"DOT_PRECISION": "tf32", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
        constexprs = {
            "moe_route": {"TOP_K": 8, "NORMALIZE": True, "SIGMOID": True, "HAS_BIAS": True,
                          "GROUPS": 8, "GROUP_TOP_K": 4, "GROUP_MAX": False, "BLOCK_E": 256,
                          "BLOCK_K": 8},  # DeepSeek-V3's routing
            "moe_align": {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_E": 16, "FILL": 1024},
            "moe_gate_up": {"TOP_K": 2, "HAS_BIAS": True, "ACTIVATION": "silu", **tiles},
            "moe_down": {"HAS_BIAS": True, **tiles},
        }[name]
        pointers = {"logits_ptr": "*bf16", "weights_ptr": "*fp32", "experts_ptr": "*i32",
                    "pairs_ptr": "*i32", "block_expert_ptr": "*i32", "route_ptr": "*fp32",
                    "grouped_ptr": "*i32", "bias_ptr": "*fp32"}
        signature = {arg: pointers.get(arg, "*bf16") if arg.endswith("_ptr")
                     else "fp32" if arg == "scale" else "i32"
                     for arg in kernel.arg_names if arg not in constexprs}
    elif name in ("delta_rule_step", "causal_conv1d_step", "ssm_step"):
        from dsc.kernels import recurrent as module

        if name == "delta_rule_step":  # Qwen3.5's heads: 128 key and value lanes
            kernel, warps = module._delta_step_kernel, 4
            constexprs = {"L2NORM": True, "G_PER_LANE": False, "BLOCK_DK": 128, "BLOCK_DV": 32,
                          "USE_PDL": True}
        elif name == "ssm_step":  # Granite 4's Mamba heads: a 128-wide state, 64 lanes
            kernel, warps = module._ssm_step_kernel, 4
            constexprs = {"HAS_D": True, "HAS_BIAS": True, "SOFTPLUS": True, "BLOCK_N": 128,
                          "BLOCK_P": 32, "USE_PDL": True}
        else:
            kernel, warps = module._conv_step_kernel, 4
            constexprs = {"HAS_BIAS": False, "SILU": True, "BLOCK_C": 128, "BLOCK_K": 4,
                          "USE_PDL": True}
        pointers = {"state_ptr": "*bf16" if name == "causal_conv1d_step" else "*fp32",
                    "start_ptr": "*i64", "out_ptr": "*fp32" if name == "ssm_step" else "*bf16",
                    "a_ptr": "*fp32"}
        signature = {arg: pointers.get(arg, "*bf16") if arg.endswith("_ptr")
                     else "fp32" if arg in ("scale", "dt_min", "dt_max") else "i32"
                     for arg in kernel.arg_names if arg not in constexprs}
    else:
        from dsc.kernels import flash_attention_tma as module

        kernel, warps = module._flash_tma_kernel, 8
        tile = {"q_desc": 128, "k_desc": 64, "v_desc": 64, "o_desc": 128}
        signature = {
            **{arg: f"tensordesc<bf16[1,1,{rows},128]>" for arg, rows in tile.items()},
            "start_ptr": "*i64", "S": "i32", "T": "i32", "HQ": "i32", "scale_log2e": "fp32",
        }
        constexprs = {"GROUP": 4, "CAUSAL": True, "HEAD_D": 128, "BLOCK_M": 128, "BLOCK_N": 64,
                      "DOT_PRECISION": "tf32"}
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps,
                                   "num_stages": int(os.environ.get("DSC_PTX_STAGES", "3"))},
                          ).asm["ptx"]


def _ptx(name: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    if proc.returncode == 3:
        pytest.skip(f"this Triton cannot compile for CUDA here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)["ptx"]


def test_push_all_reduce_has_its_protocol():
    ptx = _ptx("push_all_reduce")
    assert re.search(r"st\.global(\.v2)?\.b64", ptx)  # whole 64-bit words: data and flag
    assert re.search(r"ld\.volatile\.global(\.v2)?\.b64", ptx)
    assert re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx)  # the row's ticket
    # The row's barrier for the norm: the count released by the last program, acquired by all.
    assert re.search(r"atom\.global\.gpu\.release\.exch", ptx)
    assert re.search(r"ld\.global\.gpu\.acquire", ptx) or re.search(
        r"atom\.global\.gpu\.acquire\.add", ptx)
    assert "trap;" in ptx and "griddepcontrol.wait" in ptx


def test_descriptor_flash_attention_uses_tma_and_wgmma():
    ptx = _ptx("flash_attention_tma")
    assert re.search(r"cp\.async\.bulk\.tensor", ptx)
    assert re.search(r"wgmma\.mma_async", ptx)
    assert len(re.findall(r"ld\.global", ptx)) <= 1  # the start position only


def test_gemv_late_release_follows_the_weight_stream():
    lines = _ptx("gemv_late").splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    release = next(i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line)
    loads = [i for i, line in enumerate(lines) if "ld.global" in line or "cp.async" in line]
    # Released after the loop's loads, not at the start as by default.
    assert wait < loads[0] and release > loads[len(loads) // 2]


def test_gemv_preloads_its_first_weight_step_before_the_wait():
    # DSC_GEMV_PRELOAD=1: the first K step's weight tile is loaded (into registers, evict-first)
    # before griddepcontrol.wait; the default only asks L2 for it there.
    def weight_loads_before_wait(name: str) -> int:
        lines = _ptx(name).splitlines()
        wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
        return sum(bool(re.search(r"ld\.global.*evict_first", line)) for line in lines[:wait])

    assert weight_loads_before_wait("gemv_late") == 0
    assert weight_loads_before_wait("gemv_preload") > 0


def test_gemv_with_a_deferred_norm_streams_from_the_start():
    # RMSNorm + gated product, the norm applied after the loop: no statistics loads stand
    # between the wait and the weight stream's first loads.
    lines = _ptx("gemv_norm").splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    first = next(line for line in lines[wait:] if re.search(r"(ld|cp\.async)\.global", line))
    assert "evict_first" in first  # a weight tile, not the row of x
    assert any("rsqrt" in line for line in lines)


def test_gemv_row_tiles_with_a_deferred_norm_compile():
    # DSC_NORM_DEFER_ROWS=1: a 16-row gated tile takes its RMSNorm from the loop's x tiles —
    # tensor-core products of x * gamma, rstd applied to the sums, no statistics pass.
    lines = _ptx("gemv_norm_rows").splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    first = next(line for line in lines[wait:] if re.search(r"(ld|cp\.async)\.global", line))
    assert "evict_first" in first  # a weight tile first, not a statistics load of x
    assert any("mma" in line for line in lines)
    assert any("rsqrt" in line for line in lines)


def test_gemv_push_epilogue_sends_words_after_the_wait():
    lines = _ptx("gemv_push").splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    count = next(i for i, line in enumerate(lines) if re.search(r"ld\.volatile\.global.*\.b32", line))
    assert wait < count  # the call number is the previous receive's, read after it ended
    assert any(re.search(r"st\.global(\.v\d)?\.b64", line) for line in lines)
    assert not any(re.search(r"st\.global(\.v\d)?\.b16", line) for line in lines)


def test_receive_sum_sends_nothing():
    ptx = _ptx("receive_sum")
    assert not re.search(r"st\.global(\.v\d)?\.b64", ptx)
    assert re.search(r"ld\.volatile\.global(\.v2)?\.b64", ptx) and "trap;" in ptx


def test_decode_split_kernel_compiles():
    lines = _ptx("decode_split").splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    prefetch = [i for i, line in enumerate(lines) if "prefetch.global.L2" in line]
    # The chunk's first K/V lines are requested before the wait; nothing merges in this variant.
    assert prefetch and max(prefetch) < wait
    assert any("mma" in line for line in lines)
    assert not any(re.search(r"atom\.global", line) for line in lines)


@pytest.mark.parametrize("name", ["decode_split_window", "decode_split_alibi", "decode_split_sinks",
                                  "decode_split_ring", "decode_split_mla"])
def test_decode_split_kernel_with_a_window_alibi_or_sinks_compiles(name):
    # WINDOW > 0: the chunks start at the window's first slot; ALIBI: a slope per row; SINKS: a
    # logit per row in the denominator; RING: rows at position % ring; MLA: keys 192 wide
    # (256 lanes), values 128, merged in the split. The PDL prefetch and wait stay as they are.
    lines = _ptx(name).splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    prefetch = [i for i, line in enumerate(lines) if "prefetch.global.L2" in line]
    assert prefetch and max(prefetch) < wait
    assert any("mma" in line for line in lines)


def test_decode_split_kernel_prefetches_the_next_weight_before_the_wait():
    plain = _ptx("decode_split")
    lines = _ptx("decode_split_prefetch").splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    prefetch = [i for i, line in enumerate(lines) if "prefetch.global.L2" in line]
    assert max(prefetch) < wait
    # The weight's lines come in a loop of their own, besides the K/V lines.
    assert len(prefetch) > plain.count("prefetch.global.L2")


def test_decode_split_kernel_can_prefetch_the_weight_in_bulk():
    ptx = _ptx("decode_split_prefetch")
    assert "cp.async.bulk.prefetch.L2.global" in ptx and "%tid.x" in ptx


def _loads_around_first_mma(name: str) -> tuple[int, int]:
    """(global loads after the PDL wait and before the first tensor-core product, after it),
    compiled with one pipeline stage (DSC_PTX_STAGES=1: no cp.async to blur the order)."""
    lines = _ptx(name).splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    body = lines[wait:]
    first_mma = next(i for i, line in enumerate(body) if "mma" in line)
    loads = [i for i, line in enumerate(body) if "ld.global" in line]
    return sum(i < first_mma for i in loads), sum(i > first_mma for i in loads)


def test_decode_split_kernel_with_v_beside_k_requests_both_before_the_product(monkeypatch):
    monkeypatch.setenv("DSC_PTX_STAGES", "1")
    before, after = _loads_around_first_mma("decode_split_v_with_k")
    plain_before, plain_after = _loads_around_first_mma("decode_split")
    # By default V's loads wait behind the softmax; beside K they come before the first mma.
    assert before > plain_before and after < plain_after


def test_decode_split_kernel_merging_its_partials_has_a_ticket():
    ptx = _ptx("decode_split_merge")
    assert re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx)  # the group's arrival ticket
    assert re.search(r"ld\.volatile\.global", ptx)  # the partials, past any stale L1 line


def test_qkv_attention_compiles_with_its_ticket_and_the_late_release():
    lines = _ptx("qkv_attention").splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    prefetch = [i for i, line in enumerate(lines) if "prefetch.global.L2" in line]
    release = next(i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line)
    ticket = next(i for i, line in enumerate(lines)
                  if re.search(r"atom\.global\.gpu\.acq_rel\.add", line))
    # First weight lines requested before the wait; the next kernel let in after the stream,
    # before the group's ticket; the scratch row read back past L1.
    assert prefetch and max(prefetch) < wait < release < ticket
    assert any(re.search(r"ld\.volatile\.global", line) for line in lines)
    assert any("mma" in line for line in lines)


def test_qkv_attention_compiles_with_a_layer_norm_and_a_bias():
    ptx = _ptx("qkv_attention_layer_norm")
    assert "griddepcontrol.wait" in ptx and re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx)


@pytest.mark.parametrize("name", ["moe_route", "moe_align", "moe_gate_up", "moe_down"])
def test_moe_kernels_compile_with_tensor_core_products(name):
    ptx = _ptx(name)
    if name in ("moe_gate_up", "moe_down"):  # the experts' tiles go through the tensor cores
        assert re.search(r"mma\.sync|wgmma", ptx)


@pytest.mark.parametrize("name", ["delta_rule_step", "causal_conv1d_step", "ssm_step"])
def test_linear_attention_step_kernels_compile(name):
    ptx = _ptx(name)
    assert "griddepcontrol.wait" in ptx and "ld.global" in ptx and "st.global" in ptx


if __name__ == "__main__":
    try:
        text = _compile(sys.argv[1])
    except (FileNotFoundError, ImportError) as exc:  # no ptxas / no CUDA backend in this build
        print(exc, file=sys.stderr)
        sys.exit(3)
    print(json.dumps({"ptx": text}))
