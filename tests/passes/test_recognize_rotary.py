import torch

from dsc.passes.manager import PassManager
from dsc.passes.recognize_rotary import recognize_rotary  # noqa: F401  (registers)
from tests.passes.helpers import context, export_fn, ops, run


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_rotary(q, cos, sin):
    return q * cos + rotate_half(q) * sin


def test_rotary_before_expected():
    q, cos, sin = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8)
    gm, weights = export_fn(hf_rotary, q, cos, sin)
    assert ops(gm)["cat"] == 1 and ops(gm)["neg"] == 1
    gm = PassManager(context(weights)).run(gm, ["recognize_rotary"])
    assert ops(gm) == {"rotary": 1}
    torch.testing.assert_close(run(gm, weights, q, cos, sin)[0], hf_rotary(q, cos, sin))


def test_operand_order_does_not_matter():
    def swapped(q, cos, sin):
        return sin * rotate_half(q) + cos * q

    q, cos, sin = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    gm, weights = export_fn(swapped, q, cos, sin)
    gm = PassManager(context(weights)).run(gm, ["recognize_rotary"])
    assert ops(gm) == {"rotary": 1}
    torch.testing.assert_close(run(gm, weights, q, cos, sin)[0], swapped(q, cos, sin))


def test_halves_in_the_other_order_do_not_match():
    def reversed_rotation(q, cos, sin):  # rotation by -theta: cat(x2, -x1)
        half = q.shape[-1] // 2
        return q * cos + torch.cat((q[..., half:], -q[..., :half]), dim=-1) * sin

    q, cos, sin = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    gm, weights = export_fn(reversed_rotation, q, cos, sin)
    gm = PassManager(context(weights)).run(gm, ["recognize_rotary"])
    assert "rotary" not in ops(gm)


def test_partial_rotary_does_not_match():
    def partial(q, cos, sin):  # rotates only the first 4 of 8 dims: slices are not halves of D
        return q[..., :4] * cos + rotate_half(q[..., :4]) * sin

    q, cos, sin = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    gm, weights = export_fn(partial, q, cos, sin)
    gm = PassManager(context(weights)).run(gm, ["recognize_rotary"])
    # The rotated half-width slice is itself a full rotate-half of a 4-wide tensor: that is a
    # correct match of the inner rotary, and the outer slicing stays.
    out = run(gm, weights, q, cos, sin)[0]
    torch.testing.assert_close(out, partial(q, cos, sin))


def half_table_rotary(q, k, cos, sin, backwards=False):
    # GPT-OSS: the tables are D/2 wide and each half is rotated on its own.
    def rotate(x):
        x1, x2 = torch.chunk(x, 2, dim=-1)
        second = x2 * cos - x1 * sin if backwards else x2 * cos + x1 * sin
        return torch.cat((x1 * cos - x2 * sin, second), dim=-1)

    return rotate(q), rotate(k)


def test_half_width_tables_before_expected():
    # Before: split(x, D/2) -> cat([x1 cos - x2 sin, x2 cos + x1 sin]) for q and for k.
    # Expected: the tables doubled once (cat([cos, cos]), cat([sin, sin])), two dsc.rotary.
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4)
    gm, weights = export_fn(half_table_rotary, q, k, cos, sin)
    gm = PassManager(context(weights)).run(gm, ["recognize_rotary"])
    assert ops(gm) == {"rotary": 2, "cat": 2}
    for got, want in zip(run(gm, weights, q, k, cos, sin), half_table_rotary(q, k, cos, sin)):
        torch.testing.assert_close(got, want)


def test_half_width_tables_with_a_wrong_sign_do_not_match():
    def wrong(q, k, cos, sin):
        return half_table_rotary(q, k, cos, sin, backwards=True)

    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    cos, sin = torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2)
    gm, weights = export_fn(wrong, q, k, cos, sin)
    gm = PassManager(context(weights)).run(gm, ["recognize_rotary"])
    assert "rotary" not in ops(gm)
