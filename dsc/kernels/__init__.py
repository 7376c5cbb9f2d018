"""Hand-written Triton kernels of dsc.

Each module holds one kernel family: a `@triton.jit` kernel, a launcher that checks its inputs and
computes the grid, and nothing else. Import the module you need; this package imports nothing.

- `small_batch_gemm.linear_small_batch(x, weight, bias)`: decode-time GEMM (1 to 32 rows) that
  streams the weight once at close to copy bandwidth (SBI-GeMM), split-K when N is small.
- `gemm.linear_fused(x, weight, bias, activation, residual)`: tiled GEMM for prefill with bias,
  activation and residual fused into the epilogue; `gemm.gated_linear(x, weight_gate_up, act)`:
  the fused act(gate) * up projection of gated MLPs.
- `norms.rms_norm(x, weight, eps, residual)`, `norms.layer_norm(x, weight, bias, eps, residual)`:
  row norms, optionally fused with the residual add, returning (normed, x + residual).
- `flash_attention.flash_attention(q, k_cache, v_cache, kv_valid, start, causal, scale)`: prefill
  attention over a KV cache; `flash_attention.attention(...)` picks it or the decode kernel.
- `decode_attention.decode_attention(...)`: flash-decoding for a few new tokens, GQA-aware,
  graph-replay safe (the cache position is read from device memory).
- `qkv_attention.qkv_attention(...)`: one sequence's QKV projection and its one-token attention
  over a short cache in one launch (the kv group's last projection program attends); used with
  DSC_QKV_ATTENTION=1.
- `decode_step.advance_greedy(...)`: the argmax and bookkeeping between two greedy decode steps
  (token record, eos, next id, position and cache slot), replayed inside the step's CUDA graph.
- `pdl`: the programmatic-dependent-launch protocol every decode-chain kernel follows on Hopper.
- `checks`: the argument checks and the SM count the launchers share.
- `reference`: plain-torch definitions of all of the above, which the tests compare against.
"""
