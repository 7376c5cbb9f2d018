"""tensor_parallel: split one rank's share of the model out of the graph (Megatron-style).

Column/row pairs are found from the graph, not from per-model tables. A *column* linear is a
linear / addmm / mm on a weight whose output reaches, only through ops that keep one dimension
"per head or per feature" (views, transposes, rotary, attention, activations, elementwise ops),
*row* linears that contract over that dimension. A norm, a softmax over features, the graph
output or any op without a rule ends the search: that linear stays whole on every rank.

Matches (Llama attention; the MLP is the same with gate/up -> act -> down):

    q = linear(h, Wq)                                    # Wq [Hq*D, H]      column
    k = linear(h, Wk); v = linear(h, Wv)                 # [Hkv*D, H]        column
    a = attention(rotary(transpose(view(q, [B, S, -1, D]))), ..., valid, causal, scale)
    o = linear(view(transpose(a), [B, S, -1]), Wo)       # Wo [H, Hq*D]      row
    e = embedding(E, input_ids)                          # E [V, H]          vocab
    y = linear(x, W_head)                                # [V, H], the logits
    m = moe(x, router, gate_up, down, k, norm, kind)     # [E, 2F, H], [E, H, F]

Rewrite to (rank r of tp; explicit head counts and sizes in view/expand/split args divided):

    q = linear(h, Wq[r-th Hq/tp heads])
    k = linear(h, Wk[r-th Hkv/tp heads, or the one KV head rank r's query heads read])
    a = attention(...)  /  cached_attention(..., k_cache [Bmax, Hkv_local, Smax, D], ...)
    o = all_reduce(linear(view(transpose(a), [B, S, -1]), Wo[:, r-th Hq*D/tp], bo or 0))
    out = ids < lo | ids >= hi                               # lo, hi: rank r's vocab rows
    e = all_reduce(masked_fill(embedding(E[lo:hi], masked_fill(ids - lo, out, 0)), out[..., None], 0))
    y = slice(all_gather(linear(x, W_head[lo:hi]), -1), -1, 0, V)
    m = all_reduce(moe(x, router, gate_up[:, r-th F/tp of gate and of up], down[..., r-th F/tp]))
                   (gate_up's bias cut as gate_up; down's bias on rank 0, zeros elsewhere)

The vocabulary is padded with zero rows to a multiple of tp (rank r holds ceil(V/tp) rows); a
weight both the embedding and the head read (tied) is cut once, the same way for both. A fused
projection whose output is split on its last dim (GPT-2's c_attn -> q, k, v) is cut segment by
segment. GPT-2's Conv1D is addmm(b, x, W) with W [in, out]: cut on dim 1 as a column, dim 0 as a
row. A row's stored bias is added once: rank 0's product carries it, the other ranks hold zeros
in its place (`Cut.zero`); a bias computed in the graph is added after the all_reduce. When
there are fewer KV heads than ranks each rank keeps the KV head its query heads read
(replication); the KV cache holds the local heads, so cache placeholders shrink and
`ctx.notes["cache"]` is rewritten. An attention's ALiBi slopes (one per query head) keep the
rank's heads' slopes. Absorbed latent attention (`absorb_latent_attention`): its queries are
cut by heads through bmm(q_nope by head, W_uk) — W_uk and W_uv [H, n, m] are cut on their head
dim — while its one kv head (the latent) is read by every query head and stays whole, cache
and projection, on every rank. A norm within each head (Qwen3's q and k norms) keeps the cut of
the heads dim.

Does not match: a projection that feeds a norm over the sharded dim, a reduction over the sharded dim or the output
(it stays replicated); an op outside the rule tables inside a candidate region, an operand that
is neither in the region nor broadcast over the sharded dim, a weight another node also reads
(replicated), such as a linear-attention layer's projections (its convolution and delta rule
are not in the tables). The propagation rules are the table `_RULES`; attention may be dsc.attention,
dsc.cached_attention or an unrecognised scaled_dot_product_attention.
Raises TargetError when a dimension cannot be split: heads, KV heads, MLP features or experts'
features not divisible by tp (KV heads may instead divide tp).
`ctx.weights` ends up holding rank `ctx.rank`'s shards (as `<name>.tp<rank>of<tp>`; the whole
weights leave it) and the replicated weights; a later program of the same compile reuses them.
Ordering: after recognition (attention, rotary, MoE, MLP, residual) and after kv_cache; before
merge_projections, kernel selection and fusion, which see the per-rank shapes
(`pipelines.partition`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import sympy
import torch
from torch import fx

import dsc.ops  # noqa: F401  (registers the dsc ops the rules name)
from dsc.errors import TargetError
from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, fake_mode_of, is_op, set_meta, tensor_meta, weight_name
from dsc.passes.kv_cache import cache_spec

__all__ = ["Cut", "collective_kernels", "tensor_parallel"]

aten = torch.ops.aten
dsc_ops = torch.ops.dsc

_ATTENTION = (dsc_ops.attention, dsc_ops.cached_attention, aten.scaled_dot_product_attention)
_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view)
_SPLITS = (aten.split, aten.split_with_sizes)
_ID_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten._to_copy, aten.clone)

# Ops that act on each element (scalars and broadcast operands allowed): the sharded dim keeps
# its place, counted from the right.
_ELEMENTWISE = (
    aten.add,
    aten.sub,
    aten.mul,
    aten.div,
    aten.neg,
    aten.pow,
    aten.tanh,
    aten.sigmoid,
    aten.silu,
    aten.gelu,
    aten.relu,
    aten.erf,
    aten.exp,
    aten._to_copy,
    aten.type_as,
    aten.clone,
    aten.alias,
    dsc_ops.activation,
    dsc_ops.gated_activation,
    dsc_ops.rotary,
)


# ---- symbolic sizes ----------------------------------------------------------------------------
def _expr(size) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _prod(sizes) -> sympy.Expr:
    out = sympy.Integer(1)
    for s in sizes:
        out = out * _expr(s)
    return out


def _equal(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.expand(a - b) == 0


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _is_one(size) -> bool:
    """size == 1 without asking a symbolic size (which would add a guard)."""
    return isinstance(size, int) and size == 1


# ---- how the sharded dim moves through one op: (node, region input, its dim) -> out dim ---------
def _reshape(node: fx.Node, x: fx.Node, d: int) -> int | None:
    """The output dim holding the same contiguous block: prod(out[e:]) == prod(in[d:])."""
    src, out = tensor_meta(x).shape, tensor_meta(node).shape
    block = _prod(src[d:])
    for e in range(len(out)):
        if not _is_one(out[e]) and _equal(_prod(out[e:]), block):
            return e
    return None


def _transpose(node, x, d):
    rank = tensor_meta(x).dim()
    a, b = _dim(node.args[1], rank), _dim(node.args[2], rank)
    return b if d == a else a if d == b else d


def _permute(node, x, d):
    rank = tensor_meta(x).dim()
    return [_dim(p, rank) for p in node.args[1]].index(d)


def _unsqueeze(node, x, d):
    k = _dim(node.args[1], tensor_meta(node).dim())
    return d + 1 if k <= d else d


def _squeeze(node, x, d):
    rank = tensor_meta(x).dim()
    dims = node.args[1] if len(node.args) > 1 else list(range(rank))
    dims = [_dim(k, rank) for k in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if d in dims:
        return None
    return d - sum(1 for k in dims if k < d and _is_one(tensor_meta(x).shape[k]))


def _expand(node, x, d):
    return d + len(node.args[1]) - tensor_meta(x).dim()


def _off_dim(position: int) -> Callable:
    """An op on another dim (slice, select, split): fine unless it is the sharded one."""

    def rule(node, x, d):
        k = _dim(node.args[position] if len(node.args) > position else 0, tensor_meta(x).dim())
        if k == d:
            return None
        if is_op(node, aten.select):
            return d - 1 if k < d else d
        return d

    return rule


def _cat(node, x, d):
    """Joining along another dim (a partial rotary's rotated and passed halves) keeps it;
    `_operands_ok` checks that every part is cut the same way."""
    k = _dim(node.args[1] if len(node.args) > 1 else 0, tensor_meta(x).dim())
    return None if k == d else d


def _tuple_item(node, x, d):
    return d


def _elementwise(node, x, d):
    return d + tensor_meta(node).dim() - tensor_meta(x).dim()


def _position(node: fx.Node, x: fx.Node) -> int | None:
    return next((i for i, a in enumerate(node.args) if a is x), None)


def _heads(node, x, d):
    """q, k, v [B, H, S, D]: the heads dim (1) passes to the output [B, H, S, D]."""
    return 1 if _position(node, x) in (0, 1, 2) and d == 1 else None


def _norm_within_heads(node, x, d):
    """A norm over the last dim (Qwen3's per-head q and k norms) keeps a cut of another dim."""
    last = tensor_meta(x).dim() - 1
    return d if _position(node, x) == 0 and d != last else None


def _per_head_product(node, x, d):
    """bmm(x [H, M, n], W [H, n, m]) with W a stored weight (absorbed latent attention's W_uk,
    W_uv): heads in dim 0, cut in W as in x."""
    w = tensor_meta(node.args[1])
    if _position(node, x) != 0 or d != 0 or weight_name(node.args[1]) is None or w is None:
        return None
    return 0 if w.dim() == 3 and w.shape[0] == tensor_meta(x).shape[0] else None


_RULES: list[tuple[tuple, Callable]] = [
    (_RESHAPES, _reshape),  # view / reshape: the dim holding the same block
    ((aten.transpose,), _transpose),  # the two dims swap
    ((aten.permute,), _permute),  # the dim moves where permute puts it
    ((aten.unsqueeze,), _unsqueeze),  # a new dim before it shifts it right
    ((aten.squeeze,), _squeeze),  # a removed size-1 dim before it shifts it left
    ((aten.expand,), _expand),  # new leading dims shift it right
    ((aten.slice,), _off_dim(1)),  # slicing another dim keeps it
    ((aten.select,), _off_dim(1)),  # selecting on another dim keeps it (shifted)
    (_SPLITS, _off_dim(2)),  # splitting another dim keeps it, in each part
    ((aten.cat,), _cat),  # joining on another dim keeps it
    ((operator.getitem,), _tuple_item),  # a part of a split
    (_ATTENTION, _heads),  # heads in, heads out
    ((aten.bmm,), _per_head_product),  # heads as the batch of a product by a per-head weight
    ((dsc_ops.rms_norm, dsc_ops.layer_norm), _norm_within_heads),  # a norm within each head
    (_ELEMENTWISE, _elementwise),  # same place from the right
]


def _rule(node: fx.Node) -> Callable | None:
    for ops, rule in _RULES:
        if is_op(node, *ops):
            return rule
    return None


# ---- finding column/row regions ----------------------------------------------------------------
def _weight_arg(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(weight placeholder, its output-feature dim, its input-feature dim) of a projection."""
    if is_op(node, aten.linear):
        w, out_dim, in_dim = node.args[1], 0, 1
    elif is_op(node, aten.addmm):
        w, out_dim, in_dim = node.args[2], 1, 0
    elif is_op(node, aten.mm):
        w, out_dim, in_dim = node.args[1], 1, 0
    else:
        return None
    if weight_name(w) is None or tensor_meta(w) is None or tensor_meta(w).dim() != 2:
        return None
    return w, out_dim, in_dim


def _activation_arg(node: fx.Node) -> fx.Node:
    return node.args[1] if is_op(node, aten.addmm) else node.args[0]


def _bias_arg(node: fx.Node) -> fx.Node | None:
    if is_op(node, aten.addmm):
        return node.args[0]
    if is_op(node, aten.linear) and len(node.args) > 2:
        return node.args[2]
    return None


def _owns_weights(node: fx.Node) -> bool:
    """The projection is the only reader of its weight and bias (a shared one stays whole)."""
    params = [_weight_arg(node)[0], _bias_arg(node)]
    return all(p is None or set(p.users) == {node} for p in params)


def _is_row(user: fx.Node, x: fx.Node, d: int) -> bool:
    """user is a projection of x that contracts over x's sharded dim d."""
    if _weight_arg(user) is None or _activation_arg(user) is not x:
        return False
    if is_op(user, aten.addmm) and weight_name(user.args[0]) is None:
        return False
    return d == tensor_meta(x).dim() - 1


@dataclass
class _Piece:
    """A run of a column projection's output features that is cut as one: the whole output, or
    one part of a split of it (q, k, v of a fused QKV)."""

    source: fx.Node
    size: int
    start: fx.Node  # the node the region starts from
    dims: dict[fx.Node, int] = field(default_factory=dict)  # region node -> its sharded dim
    rows: set[fx.Node] = field(default_factory=set)
    kv: bool = False  # reaches attention as k or v (may be replicated instead of cut)
    units: int = 0  # the smallest size the sharded dim takes: heads, or features
    parts: int = 0  # how many parts it is cut in (tp, or the KV heads when replicating)


def _explore(piece: _Piece) -> bool:
    """Fill piece.dims/rows by following every use of its start; False if one leads elsewhere."""
    d0 = tensor_meta(piece.start).dim() - 1
    piece.dims[piece.start] = d0
    stack = [piece.start]
    while stack:
        value = stack.pop()
        d = piece.dims[value]
        for user in value.users:
            if _is_row(user, value, d):
                piece.rows.add(user)
                continue
            if is_op(user, aten.sym_size) and _dim(user.args[1], tensor_meta(value).dim()) != d:
                continue  # the size of another dim: the cut does not change it
            rule = _rule(user)
            out = rule(user, value, d) if rule is not None else None
            if out is None or piece.dims.get(user, out) != out:
                return False
            if is_op(user, *_ATTENTION) and _position(user, value) in (1, 2):
                piece.kv = True
            if user not in piece.dims:
                piece.dims[user] = out
                stack.append(user)
    sizes = [tensor_meta(n).shape[d] for n, d in piece.dims.items() if tensor_meta(n) is not None]
    if not all(isinstance(s, int) for s in sizes):
        return False
    piece.units = min(sizes)
    return True


def _chain(source: fx.Node) -> tuple[list[fx.Node], fx.Node | None]:
    """(views from source keeping its last dim whole, the split of that dim after them)."""
    features = tensor_meta(source).shape[-1]
    chain, node = [], source
    while len(node.users) == 1:
        user = next(iter(node.users))
        val = tensor_meta(user)
        if is_op(user, *_RESHAPES) and val is not None and val.shape[-1] == features:
            chain.append(user)
            node = user
            continue
        if is_op(user, *_SPLITS) and len(user.args) > 2:
            rank = tensor_meta(node).dim()
            if _dim(user.args[2], rank) == rank - 1 and all(
                is_op(u, operator.getitem) for u in user.users
            ):
                return chain, user
        break
    return chain, None


def _pieces(source: fx.Node) -> tuple[list[_Piece], list[fx.Node], fx.Node | None]:
    chain, split = _chain(source)
    if split is None:
        return [_Piece(source, tensor_meta(source).shape[-1], source)], [], None
    sizes = split.args[1]
    total = tensor_meta(source).shape[-1]
    if isinstance(sizes, int):
        sizes = [sizes] * (total // sizes) + ([total % sizes] if total % sizes else [])
    items = {u.args[1]: u for u in split.users}
    pieces = [
        _Piece(source, size, items[i]) if i in items else _Piece(source, size, split)
        for i, size in enumerate(sizes)
    ]
    return pieces, chain, split


@dataclass
class _Region:
    """Column pieces and the rows they feed: one attention, or one MLP."""

    pieces: list[_Piece]
    dims: dict[fx.Node, int]
    rows: set[fx.Node]
    chains: dict[fx.Node, tuple[list[fx.Node], fx.Node | None]]  # source -> its chain and split

    @property
    def sources(self) -> list[fx.Node]:
        return list(dict.fromkeys(p.source for p in self.pieces))


def _operands_ok(node: fx.Node, dims: dict[fx.Node, int]) -> bool:
    """Every tensor operand of a region node is in the region or broadcast over the sharded dim."""
    out = tensor_meta(node)
    if is_op(node, *_ATTENTION):
        # Keys and values in the region, or one kv head every query head reads (absorbed latent
        # attention's latent: replicated on every rank).
        if node.args[0] not in dims or not all(
                node.args[i] in dims or _is_one(tensor_meta(node.args[i]).shape[1])
                for i in (1, 2)):
            return False
        if is_op(node, aten.scaled_dot_product_attention) and len(node.args) > 3:
            mask = tensor_meta(node.args[3])
            return mask is None or mask.dim() < 3 or _is_one(mask.shape[-3])
        return True
    if is_op(node, aten.cat):  # every part in the region, cut in the same place
        return all(part in dims and dims[part] == dims[node] for part in node.args[0])
    if out is None or not is_op(node, *_ELEMENTWISE):
        return True  # single-input layout ops: their input is the region value
    for arg in node.args:
        val = tensor_meta(arg)
        if val is None:
            continue
        place = dims[node] - (out.dim() - val.dim())
        if arg in dims:
            if dims[arg] != place:
                return False
        elif place >= 0 and not _is_one(val.shape[place]):
            return False
    return True


def _find_regions(gm: fx.GraphModule) -> list[_Region]:
    candidates = [n for n in gm.graph.nodes if _weight_arg(n) is not None]
    explored: list[_Piece] = []
    chains = {}
    for source in candidates:
        pieces, chain, split = _pieces(source)
        if any(p.start is split for p in pieces):
            continue  # a part of the split nobody reads: leave the projection whole
        if all(_explore(p) for p in pieces) and any(p.rows for p in pieces):
            explored.extend(pieces)
            chains[source] = (chain, split)
    # Pieces that share a node (q, k, v meet at attention; gate, up at the product) or a source
    # form one region.
    parent = list(range(len(explored)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[fx.Node, int] = {}
    for i, piece in enumerate(explored):
        for node in [*piece.dims, *piece.rows, piece.source]:
            if node in owner:
                parent[find(i)] = find(owner[node])
            else:
                owner[node] = i
    groups: dict[int, list[_Piece]] = {}
    for i, piece in enumerate(explored):
        groups.setdefault(find(i), []).append(piece)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    regions, rows_taken, sources_taken = [], set(), set()
    for pieces in sorted(groups.values(), key=lambda ps: order[ps[0].source]):
        dims: dict[fx.Node, int] = {}
        rows: set[fx.Node] = set()
        consistent = True
        for p in pieces:
            for n, d in p.dims.items():
                consistent &= dims.setdefault(n, d) == d
            rows |= p.rows
        region = _Region(pieces, dims, rows, {p.source: chains[p.source] for p in pieces})
        if not consistent or not all(_operands_ok(n, dims) for n in dims):
            continue
        if not all(_owns_weights(n) for n in [*region.sources, *rows]):
            continue
        # A projection is a column of one region or a row of another, never both (chained MLPs:
        # the first pair wins, in graph order).
        if set(region.sources) & rows_taken or rows & sources_taken or rows & set(region.sources):
            continue
        regions.append(region)
        rows_taken |= rows
        sources_taken |= set(region.sources)
    return regions


# ---- cutting weights ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Cut:
    """How a weight is cut: along `dim`, each (size, parts, index) segment in order keeps part
    `index` of `parts`; `pad_to` first pads `dim` with zeros (the vocabulary); `zero` makes the
    shard zeros of the cut's shape (a row-parallel bias on every rank but the first)."""

    dim: int
    segments: tuple[tuple[int, int, int], ...]
    pad_to: int | None = None
    zero: bool = False

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.pad_to is not None and self.pad_to > tensor.shape[self.dim]:
            shape = list(tensor.shape)
            shape[self.dim] = self.pad_to - shape[self.dim]
            tensor = torch.cat([tensor, tensor.new_zeros(shape)], self.dim)
        parts, start = [], 0
        for size, n, index in self.segments:
            step = size // n
            parts.append(tensor.narrow(self.dim, start + index * step, step))
            start += size
        shard = torch.cat(parts, self.dim)  # a new tensor: the whole one can be freed
        return torch.zeros_like(shard) if self.zero else shard


class _Weights:
    """Cuts weights for this rank and points placeholders at the shards.

    A shard is stored as `<name>.tp<rank>of<tp>` and the whole weight leaves ctx.weights, so the
    plan holds this rank's shards only. Passes that run before this one in a later program of
    the same compile (the decode program after the forward one) see whole weights again: the
    compiler adds back what its trace holds and ctx.weights lacks, and recognisers that probe
    with weight values (recognize_moe) need them whole. The shard made once is reused.
    """

    def __init__(self, gm: fx.GraphModule, ctx: PassContext):
        self.ctx = ctx
        self.mode = fake_mode_of(gm)
        notes = ctx.notes.setdefault("tensor_parallel", {})
        self.cuts: dict[str, Cut] = notes.setdefault("cuts", {})  # whole name -> its cut
        self.shards: dict[str, str] = notes.setdefault("shards", {})  # shard name -> whole name

    def cut(self, node: fx.Node, cut: Cut) -> None:
        name = weight_name(node)
        whole = self.shards.get(name, name)  # a tied weight's placeholder may be cut already
        done = self.cuts.get(whole)
        if done is not None and done != cut:
            raise TargetError(
                f"weight {whole!r} is used in two ways that need different tensor-parallel cuts "
                f"({done} and {cut}); compile with tp=1."
            )
        shard = f"{whole}.tp{self.ctx.rank}of{self.ctx.target.tp}"
        if shard not in self.ctx.weights:
            self.ctx.weights[shard] = cut.apply(self.ctx.weights[whole])
            self.cuts[whole] = cut
            self.shards[shard] = whole
        self.ctx.weights.pop(whole, None)
        node.meta["dsc_weight"] = shard
        node.meta["val"] = self.mode.from_tensor(self.ctx.weights[shard], static_shapes=True)


def _parts(piece: _Piece, tp: int) -> int:
    if piece.units % tp == 0:
        return tp
    if piece.kv and tp % piece.units == 0:
        return piece.units  # fewer KV heads than ranks: each rank keeps one, replicated
    what = "key/value heads" if piece.kv else "heads or features"
    raise TargetError(
        f"tensor parallelism tp={tp} cannot split the {piece.units} {what} of "
        f"{piece.source.name} ({weight_name(_weight_arg(piece.source)[0])}); choose tp among the "
        f"divisors of {piece.units}."
    )


def _divide(size, parts: int, what: str):
    if isinstance(size, int) and size != -1:
        if size % parts:
            raise TargetError(f"{what}: size {size} is not divisible by {parts}")
        return size // parts
    return size


def _rewrite_region(region: _Region, tp: int, rank: int, weights: _Weights) -> list[fx.Node]:
    """Cut one region's weights, fix its size arguments; returns the nodes whose values changed."""
    factor: dict[fx.Node, int] = {}
    for piece in region.pieces:
        piece.parts = _parts(piece, tp)
        factor[piece.start] = piece.parts
    changed: list[fx.Node] = []
    for source in region.sources:
        pieces = [p for p in region.pieces if p.source is source]
        w, out_dim, _ = _weight_arg(source)
        segments = tuple((p.size, p.parts, rank * p.parts // tp) for p in pieces)
        weights.cut(w, Cut(out_dim, segments))
        bias = _bias_arg(source)
        if weight_name(bias) is not None:
            weights.cut(bias, Cut(0, segments))
        chain, split = region.chains[source]
        local = [p.size // p.parts for p in pieces]
        for view in chain:
            shape = list(view.args[1])
            if shape[-1] != -1:
                shape[-1] = sum(local)
            view.args = (view.args[0], shape, *view.args[2:])
        if split is not None:
            split.target = aten.split_with_sizes.default
            split.args = (split.args[0], local, split.args[2])
        changed += [source, *chain] + ([split] if split is not None else [])
    order = {n: i for i, n in enumerate(next(iter(region.dims)).graph.nodes)}
    for node in sorted(region.dims, key=order.__getitem__):
        if node not in factor:
            inputs = [a for a in node.all_input_nodes if a in region.dims]
            if is_op(node, *_ATTENTION):
                inputs = [node.args[0]]
            factor[node] = factor[inputs[0]]
            if any(factor[a] != factor[node] for a in inputs):
                raise TargetError(f"{node.name}: operands cut in different ways; compile with tp=1")
        f = factor[node]
        if is_op(node, *_ATTENTION) and node.kwargs.get("alibi"):
            # ALiBi slopes are per query head: this rank keeps its heads' slopes.
            slopes = node.kwargs["alibi"]
            local, part = len(slopes) // f, rank * f // tp
            node.update_kwarg("alibi", slopes[part * local : (part + 1) * local])
        if is_op(node, *_ATTENTION) and node.kwargs.get("sinks") is not None:
            # So are attention sinks (a stored [heads] weight): this rank keeps its heads' rows.
            sinks = node.kwargs["sinks"]
            weights.cut(sinks, Cut(0, ((tensor_meta(sinks).shape[0], f, rank * f // tp),)))
        val = tensor_meta(node)
        if val is not None and val.shape[region.dims[node]] % f:
            raise TargetError(
                f"{node.name}: dim {region.dims[node]} of size {val.shape[region.dims[node]]} "
                f"cannot be split in {f}; choose another tp."
            )
        if is_op(node, aten.bmm):  # this rank's heads of a per-head weight
            w = node.args[1]
            weights.cut(w, Cut(0, ((tensor_meta(w).shape[0], f, rank * f // tp),)))
        if is_op(node, *_RESHAPES, aten.expand):
            x = node.args[0]
            shape = list(node.args[1])
            e = region.dims[node]
            shape[e] = _divide(shape[e], f, node.name)
            node.args = (x, shape, *node.args[2:])
        if is_op(node, dsc_ops.cached_attention):
            for kv, cache in zip(node.args[1:3], node.args[3:5]):
                if kv not in factor:
                    continue  # one kv head outside the region: the whole cache on every rank
                old = cache.meta["val"]
                shape = list(old.shape)
                shape[1] //= factor[kv]
                with weights.mode:
                    cache.meta["val"] = torch.empty(shape, dtype=old.dtype, device=old.device)
        changed.append(node)
    for row in region.rows:
        if factor[_activation_arg(row)] != tp:
            raise TargetError(f"{row.name}: its input is replicated, not split; compile with tp=1")
    return changed


def _reduce_rows(
    gm: fx.GraphModule, rows: list[fx.Node], tp: int, rank: int, weights: _Weights
) -> None:
    """row(x, W, b) -> all_reduce(row(x, W[:, rank's inputs], b on rank 0, zeros elsewhere)).

    A stored bias only this row reads rides in the first rank's product, so the sum adds it
    once and the all_reduce stays next to the residual add (`fuse_all_reduce_residual`; GPT-2's
    and OPT's blocks) with the bias in the GEMM's epilogue; any other bias is added after the
    all_reduce.
    """
    graph = gm.graph
    for row in rows:
        w, _, in_dim = _weight_arg(row)
        features = tensor_meta(w).shape[in_dim]
        weights.cut(w, Cut(in_dim, ((features, tp, rank),)))
        x = _activation_arg(row)
        bias = _bias_arg(row)
        inside = (bias is not None and weight_name(bias) is not None
                  and set(bias.users) == {row})
        if inside:
            outputs = tensor_meta(bias).shape[0]
            weights.cut(bias, Cut(0, ((outputs, 1, 0),), zero=rank != 0))
        with graph.inserting_after(row):
            if is_op(row, aten.linear):
                args = (x, w, bias) if inside else (x, w)
                product = call(graph, aten.linear.default, args, like=row)
            elif inside:
                product = call(graph, aten.addmm.default, (bias, x, w), like=row)
            else:
                product = call(graph, aten.mm.default, (x, w), like=row)
        with graph.inserting_after(product):
            out = call(graph, dsc_ops.all_reduce.default, (product,), like=row)
        if bias is not None and not inside:
            with graph.inserting_after(out):
                out = call(graph, aten.add.Tensor, (out, bias), like=row)
        row.replace_all_uses_with(out)
        graph.erase_node(row)
        if inside:
            _reduce_after_view(graph, out)


def _reduce_after_view(graph: fx.Graph, reduced: fx.Node) -> None:
    """all_reduce(p) read by one view only -> all_reduce(view(p)): the same sum, and the
    all_reduce then meets the residual add that reads it (GPT-2's Conv1D product is unflattened
    from [B*S, N] to [B, S, N] before its residual add)."""
    users = list(reduced.users)
    if len(users) != 1 or not is_op(users[0], aten.view, aten._unsafe_view, aten.reshape):
        return
    view = users[0]
    view.replace_input_with(reduced, reduced.args[0])
    with graph.inserting_after(view):
        moved = call(graph, dsc_ops.all_reduce.default, (view,), like=view)
    view.replace_all_uses_with(moved, delete_user_cb=lambda user: user is not moved)
    graph.erase_node(reduced)


# ---- vocabulary, experts -----------------------------------------------------------------------
def _from_input_ids(node) -> bool:
    while is_op(node, *_ID_VIEWS):
        node = node.args[0]
    return isinstance(node, fx.Node) and node.meta.get("dsc_input") == "input_ids"


def _vocab_cut(vocab: int, tp: int, rank: int) -> tuple[Cut, int, int]:
    rows = math.ceil(vocab / tp)
    return Cut(0, ((rows * tp, tp, rank),), pad_to=rows * tp), rank * rows, (rank + 1) * rows


def _vocab_parallel(
    gm: fx.GraphModule, ctx: PassContext, taken: set[fx.Node], weights: _Weights
) -> None:
    """Embedding lookups of input_ids and the logits projection, cut by vocabulary rows."""
    graph, tp, rank = gm.graph, ctx.target.tp, ctx.rank
    vocab = ctx.info.vocab_size
    embeddings = [
        n
        for n in graph.nodes
        if is_op(n, aten.embedding)
        and weight_name(n.args[0]) is not None
        and _from_input_ids(n.args[1])
    ]
    heads = [
        n
        for n in graph.nodes
        if is_op(n, aten.linear)
        and n not in taken
        and _weight_arg(n) is not None
        and vocab is not None
        and tensor_meta(n.args[1]).shape[0] == vocab
    ]
    handled = set(embeddings) | set(heads)
    for node in embeddings + heads:
        table = node.args[0] if node in embeddings else node.args[1]
        if not set(table.users) <= handled:
            return  # the table has another use (a transposed tied head ...): keep it whole
    for emb in embeddings:
        table, ids = emb.args[0], emb.args[1]
        cut, lo, hi = _vocab_cut(tensor_meta(table).shape[0], tp, rank)
        weights.cut(table, cut)
        with graph.inserting_before(emb):
            below = call(graph, aten.lt.Scalar, (ids, lo))
            above = call(graph, aten.ge.Scalar, (ids, hi))
            outside = call(graph, aten.logical_or.default, (below, above))
            local = call(graph, aten.sub.Scalar, (ids, lo))
            local = call(graph, aten.masked_fill.Scalar, (local, outside, 0))
            rows = call(graph, aten.embedding.default, (table, local), like=emb)
            mask = call(graph, aten.unsqueeze.default, (outside, -1))
            rows = call(graph, aten.masked_fill.Scalar, (rows, mask, 0), like=emb)
            out = call(graph, dsc_ops.all_reduce.default, (rows,), like=emb)
        emb.replace_all_uses_with(out)
        graph.erase_node(emb)
    for head in heads:
        w = head.args[1]
        cut, _, _ = _vocab_cut(vocab, tp, rank)
        weights.cut(w, cut)
        if len(head.args) > 2 and weight_name(head.args[2]) is not None:
            weights.cut(head.args[2], cut)
        last = tensor_meta(head).dim() - 1
        with graph.inserting_after(head):
            gathered = graph.call_function(dsc_ops.all_gather.default, (head, last))
        set_meta(head)
        # Set by hand: the op's fake reads the process group's size, absent when one process
        # compiles for several ranks.
        local = tensor_meta(head)
        with weights.mode:
            gathered.meta["val"] = local.new_empty((*local.shape[:-1], local.shape[-1] * tp))
        out = gathered
        if cut.pad_to != vocab:
            with graph.inserting_after(gathered):
                out = call(graph, aten.slice.Tensor, (gathered, last, 0, vocab), like=head)
        head.replace_all_uses_with(out, delete_user_cb=lambda user, g=gathered: user is not g)


def _experts(gm: fx.GraphModule, ctx: PassContext, weights: _Weights) -> None:
    """moe(x, router, gate_up, down) -> all_reduce(moe(..., rank's F/tp of every expert))."""
    graph, tp, rank = gm.graph, ctx.target.tp, ctx.rank
    for node in [n for n in graph.nodes if is_op(n, dsc_ops.moe)]:
        gate_up, down = node.args[2], node.args[3]
        if weight_name(gate_up) is None or weight_name(down) is None:
            raise TargetError(f"{node.name}: expert weights are computed, not stored; use tp=1")
        ffn = tensor_meta(down).shape[-1]
        if ffn % tp:
            raise TargetError(
                f"tensor parallelism tp={tp} cannot split the experts' {ffn} features "
                f"({weight_name(down)}); choose tp among the divisors of {ffn}."
            )
        weights.cut(gate_up, Cut(1, ((ffn, tp, rank), (ffn, tp, rank))))
        weights.cut(down, Cut(2, ((ffn, tp, rank),)))
        gate_up_bias, down_bias = node.kwargs.get("gate_up_bias"), node.kwargs.get("down_bias")
        if gate_up_bias is not None:
            weights.cut(gate_up_bias, Cut(1, ((ffn, tp, rank), (ffn, tp, rank))))
        if down_bias is not None:  # added once, by rank 0: the all-reduce sums the ranks
            hidden = tensor_meta(down_bias).shape[1]
            weights.cut(down_bias, Cut(1, ((hidden, 1, 0),), zero=rank != 0))
        set_meta(node)
        with graph.inserting_after(node):
            out = call(graph, dsc_ops.all_reduce.default, (node,), like=node)
        node.replace_all_uses_with(out, delete_user_cb=lambda user, o=out: user is not o)


def _refresh(gm: fx.GraphModule, nodes: set[fx.Node], mode) -> None:
    """Recompute fake values of the changed nodes, in graph order."""
    for node in gm.graph.nodes:
        if node in nodes and node.op == "call_function":
            set_meta(node, mode)


@register("tensor_parallel")
def tensor_parallel(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    tp, rank = ctx.target.tp, ctx.rank
    if tp == 1:
        return gm
    if not 0 <= rank < tp:
        raise TargetError(f"rank {rank} is outside tp={tp}")
    weights = _Weights(gm, ctx)
    regions = _find_regions(gm)
    changed: set[fx.Node] = set()
    for region in regions:
        changed.update(_rewrite_region(region, tp, rank, weights))
    _refresh(gm, changed, weights.mode)
    rows = [row for region in regions for row in region.rows]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    _reduce_rows(gm, sorted(rows, key=order.__getitem__), tp, rank, weights)
    taken = {n for region in regions for n in region.sources}
    _vocab_parallel(gm, ctx, taken, weights)
    _experts(gm, ctx, weights)
    if any(
        n.meta.get("dsc_input", "").startswith("cache.")
        for n in gm.graph.nodes
        if n.op == "placeholder"
    ):
        ctx.notes["cache"] = cache_spec(gm)
    gm.graph.eliminate_dead_code()
    return gm


# Collectives run through the runtime's implementation (it picks the transport per message size
# and turns a dead peer into a clear error); see dsc/runtime/allreduce.py.
_COLLECTIVE_IMPLS = {
    dsc_ops.all_reduce.default: "collective::all_reduce",
    dsc_ops.all_gather.default: "collective::all_gather",
    dsc_ops.all_reduce_residual.default: "collective::all_reduce_residual",
    dsc_ops.all_reduce_residual_norm.default: "collective::all_reduce_residual_norm",
    dsc_ops.linear_all_reduce.default: "collective::linear_all_reduce",
}


def collective_kernels(gm: fx.GraphModule) -> dict[str, str]:
    """node name -> runtime implementation, for every collective in the graph."""
    return {
        n.name: _COLLECTIVE_IMPLS[n.target]
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in _COLLECTIVE_IMPLS
    }
