"""The online-softmax step every attention kernel here takes per key tile.

Scores arrive in base 2 (already multiplied by scale * log2(e)), some masked to -inf. The
running row maximum m, the running sum l and the accumulator are rescaled by alpha whenever the
maximum grows. A row that has seen only masked keys keeps m = -inf; its exponent offset falls
back to 0, so no inf - inf (NaN) appears.
"""

import triton
import triton.language as tl

__all__ = ["LOG2E", "online_softmax_step"]

LOG2E = 1.4426950408889634  # scores are taken in base 2: exp(x) = exp2(x * log2(e))


@triton.jit
def online_softmax_step(qk, m_i, l_i):
    """(p, alpha, m_new, l_new) for score tile qk [rows, keys]: the tile's probabilities against
    the new maximum, the factor for what was accumulated so far, and the updated running
    maximum and sum. The caller does acc = acc * alpha + p @ V."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)
