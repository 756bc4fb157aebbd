"""A .pt2 program saved at a fixed batch, made to read its batch from its input (torch_model
exports it again with a dynamic batch and checks that each crop gets what it got).

torch.export writes the traced batch into every shape it records: a flatten traced at a batch
of 2 is view(2, C), nn.MultiheadAttention's heads are [T, 2 * heads, dim]. `free` follows the
batch from the image through the graph (`_batch_axes`: which axis holds it, with the sizes
beside it on that axis) and writes the input's batch into those shapes instead. torch is
imported by the callers (the `camface[torch]` extra).
"""

from __future__ import annotations

import operator


# ops whose argument is a shape: traced at a fixed batch, its batch entry is that batch
_SHAPE_OPS = ("view", "reshape", "_unsafe_view", "unflatten", "expand", "zeros", "ones", "empty", "full",
              "new_zeros", "new_ones", "new_empty", "new_full")
_VIEW_OPS = ("view", "reshape", "_unsafe_view", "flatten", "unflatten")  # as many elements out as in
_REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "argmax", "argmin", "var", "std", "prod",
               "logsumexp", "norm", "linalg_vector_norm", "all", "any")
_DIMS_THIRD = ("norm", "linalg_vector_norm")  # (self, p, dim, ...): their reduced dims follow p
# higher-order ops that run subgraphs on operands: {name: (the subgraphs' args, the operands' first arg)};
# torch.export puts a block of forward under torch.no_grad() or torch.autocast in one (torch.cond's
# operands are one list)
_SUBGRAPH_OPS = {"cond": (slice(1, 3), 3), "wrap_with_set_grad_enabled": (slice(1, 2), 2),
                 "wrap_with_autocast": (slice(4, 5), 5)}


class Ties:
    """The axes taken where a view's batch is ambiguous: at a batch of 1, [2, 1, C] viewed as
    [2, C] holds it on either axis, and only running the freed program on another batch tells
    which. `picks[k]` is the candidate taken at the k-th such view (in graph order; 0, the
    tie-break's, past the end of `picks`); `counts[k]` is how many that view had and
    `places[k]` its node (in the program's own graph: the torch.cond holding it), filled in by
    `free`."""

    def __init__(self, picks=()):
        self.picks, self.counts, self.places = list(picks), [], []
        self.within = None  # the node of the program's graph whose subgraph is being freed

    def take(self, found: list, view):
        """The candidate of `found` (best first) view node `view` gets; counted when there are
        several."""
        if len(found) < 2:
            return found[0]
        k = len(self.counts)
        self.counts.append(len(found))
        self.places.append(self.within or view)
        return found[self.picks[k]] if k < len(self.picks) and self.picks[k] < len(found) else found[0]


def free(module, batch: int, ties: Ties | None = None):
    """`module` (a program's graph, traced at the fixed `batch`) with the shapes its views,
    expands and tensor constructors were traced with reading the input's batch instead of the
    number `batch` (a flatten traced at batch 2 is a view(2, C); nn.MultiheadAttention's heads
    [T, 2 * heads, dim] at a batch of 2; torch.arange(x.shape[0]) indexing the batch's axis, an
    arange(2): `_indexes_batch`), in place, the subgraphs of its torch.cond and of its
    torch.no_grad() and torch.autocast blocks too; returns `module`. Where a view's batch axis
    is ambiguous, `ties` says which to take and counts the candidates (the tie-break's when
    None)."""
    image = next(n for n in module.graph.nodes if n.op == "placeholder")
    _free_graph(module, batch, {image: (0, 1, 1)}, ties or Ties())
    return module


def _free_graph(module, batch: int, inputs: dict, ties: Ties) -> dict:
    """`free` of the graph of `module` whose placeholders `inputs` hold the batch as
    {placeholder: (axis, outer, inner)} (that axis's size is outer * batch * inner); the same
    for the nodes of the graph (`_batch_axes`)."""
    import torch

    graph = module.graph
    # a view of a tensor that does not depend on the image (a constant, a parameter, an arange
    # made on the input's device) has as many elements at any batch: a leading 1 there is no
    # batch (scale.view(1, -1, 1, 1) must stay); an expand of one can be (a class token's)
    from_image = set(inputs)
    for node in graph.nodes:
        if any(arg in from_image for arg in node.all_input_nodes):
            from_image.add(node)
    source, (axis, outer, inner) = next(iter(inputs.items()))
    with graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1]):
        size = graph.call_function(torch.ops.aten.sym_size.int, (source, axis))
        if outer * inner > 1:
            size = graph.call_function(operator.floordiv, (size, outer * inner))
    axes = _batch_axes(module, inputs, batch, ties)
    _joined_axes(graph, axes, batch)
    for node in list(graph.nodes):
        op = _op_name(node)
        value = node.meta.get("val")
        if _batch_arange(node, batch) and node.users and all(_indexes_batch(user, node, axes) for user in node.users):
            # torch.arange(x.shape[0]) picking one row of each crop (t[arange(N), idx], CLIP's pooling)
            # was traced as arange(batch): its end is the input's batch (_check_freed refuses it if not)
            args = list(node.args)
            args[0 if len(args) == 1 else 1] = size
            node.args = tuple(args)
            continue
        if node.op != "call_function" or op not in _SHAPE_OPS or value is None or not value.shape:
            continue
        if op in _VIEW_OPS and node.args and node.args[0] not in from_image:
            continue
        # the shape argument's index; unflatten(x, dim, sizes): its sizes are the output's axes from dim
        index = 0 if op in ("zeros", "ones", "empty", "full") else 2 if op == "unflatten" else 1
        shape = node.args[index] if len(node.args) > index else None
        if not isinstance(shape, (list, tuple)) or not shape:
            continue
        offset = _unflattened_from(node) if op == "unflatten" else 0
        if offset is None:
            continue
        if isinstance(axes.get(node), tuple):
            at, outer, inner = axes[node]
            at -= offset
            if not 0 <= at < len(shape) or not isinstance(shape[at], int) or shape[at] != outer * batch * inner:
                continue
            with graph.inserting_before(node):
                entry = size if outer * inner == 1 else graph.call_function(operator.mul, (size, outer * inner))
        elif offset == 0 and value.shape[0] == batch and isinstance(shape[0], int) and shape[0] == batch:
            at, entry = 0, size
        else:
            continue
        args = list(node.args)
        args[index] = [*shape[:at], entry, *shape[at + 1:]]
        node.args = tuple(args)
    graph.lint()
    module.recompile()
    return axes


def _batch_arange(node, batch: int) -> bool:
    """Whether `node` is arange(batch) (or arange(0, batch[, 1])) of integers: the indices of the
    crops, as torch.arange(x.shape[0]) is traced at the fixed `batch`."""
    import torch

    value = node.meta.get("val")
    if _op_name(node) != "arange" or not isinstance(value, torch.Tensor) or value.is_floating_point() \
            or value.dtype == torch.bool:
        return False
    args = node.args  # arange(end), arange(start, end), arange(start, end, step)
    start, end, step = (0, args[0], 1) if len(args) == 1 else (*args[:2], 1) if len(args) == 2 else args[:3]
    return (start, step) == (0, 1) and isinstance(end, int) and not isinstance(end, bool) and end == batch


def _indexes_batch(user, node, axes: dict) -> bool:
    """Whether `user` is an index (t[..., node, ...]) that takes arange `node` as the index of
    t's batch axis, held there alone (outer and inner 1): crop i's row is picked from crop i."""
    if _op_name(user) != "index" or len(user.args) < 2 or not isinstance(user.args[1], (list, tuple)):
        return False
    at = axes.get(user.args[0])
    indices = list(user.args[1])
    return isinstance(at, tuple) and at[1:] == (1, 1) and at[0] < len(indices) and indices[at[0]] is node \
        and indices.count(node) == 1 and user.args[0] is not node


def _unflattened_from(node) -> int | None:
    """The axis that unflatten `node` (x, dim, sizes) splits, from 0; None where x's rank is unknown."""
    import torch

    source = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(source, torch.Tensor) or not isinstance(node.args[1], int) or not source.dim():
        return None
    return node.args[1] % source.dim()


def _joined_axes(graph, axes: dict, batch: int) -> None:
    """Tensors made at the traced batch and joined to the image's by torch.cat (a class token
    expanded to [1, batch, C] before tokens [T, batch, C], as nn.MultiheadAttention lays them
    out): their batch is where the others' is; added to `axes`, in place."""
    for node in graph.nodes:
        if _op_name(node) != "cat" or not isinstance(node.args[0], (list, tuple)):
            continue
        joined = node.args[0]
        held = [axes[t] for t in joined if isinstance(axes.get(t), tuple)]
        value = node.meta.get("val")
        if not held or value is None:
            continue
        dim = (node.args[1] if len(node.args) > 1 else 0) % value.dim()
        if held[0][0] == dim:
            continue
        for made in joined:
            made_value = getattr(made, "meta", {}).get("val")
            if made not in axes and _op_name(made) in _SHAPE_OPS and _op_name(made) not in _VIEW_OPS \
                    and made_value is not None and _holds(made_value, held[0], batch):
                axes[made] = held[0]


def _op_name(node) -> str:
    """aten.view.default -> "view"; operator.getitem -> "getitem"; torch.cond -> "cond"."""
    return getattr(node.target, "_opname", getattr(node.target, "__name__", ""))


def _batch_axes(module, inputs: dict, batch: int, ties: Ties) -> dict:
    """{node: (axis, outer, inner)} for the nodes of `module`'s graph that hold the batch on one
    axis, that axis's size outer * batch * inner (a Swin's windows [batch * windows, ...] lead
    with (0, 1, windows); nn.MultiheadAttention's tokens [T, batch, C] hold it at (1, 1, 1), its
    heads [T, batch * heads, dim] at (1, 1, heads), its rows [T * batch, C] at (0, T, 1));
    followed from `inputs` through permutes, transposes, selects, squeezes, views (by where
    their elements lie) and the rest (an axis kept where its size holds); a node whose value is
    a list (unbind, split, torch.cond, a torch.no_grad() block) maps to a list, one entry a
    tensor. What moved it off an axis, or split it, is left out."""
    import torch

    axes = dict(inputs)
    for node in module.graph.nodes:
        sources = [a for a in node.all_input_nodes if isinstance(axes.get(a), tuple)]
        value = node.meta.get("val")
        op = _op_name(node)
        if node.op != "call_function":
            continue
        if op == "getitem" and isinstance(axes.get(node.args[0]), list):
            entries = axes[node.args[0]]
            if node.args[1] < len(entries) and entries[node.args[1]] is not None:
                axes[node] = entries[node.args[1]]
            continue
        if op in _SUBGRAPH_OPS:
            within, ties.within = ties.within, ties.within or node
            axes[node] = _subgraph_axes(module, node, axes, batch, ties)
            ties.within = within
            continue
        if not sources:
            continue
        src = max(sources, key=lambda a: a.meta["val"].dim() if isinstance(a.meta.get("val"), torch.Tensor) else -1)
        before = src.meta.get("val")
        if not isinstance(before, torch.Tensor):
            continue
        axis, outer, inner = axes[src]
        moved = _moved(op, node, before, value, axis, outer, inner, batch, ties)
        if moved is None:
            continue
        if isinstance(value, (list, tuple)):  # unbind's and split's tensors, read by getitem
            axes[node] = [moved if isinstance(v, torch.Tensor) and _holds(v, moved, batch) else None
                          for v in value]
        elif isinstance(value, torch.Tensor) and _holds(value, moved, batch):
            axes[node] = moved
    return axes


def _holds(value, at: tuple, batch: int) -> bool:
    """Whether the tensor `value` has the size `at` says on its axis."""
    axis, outer, inner = at
    return 0 <= axis < value.dim() and isinstance(value.shape[axis], int) and value.shape[axis] == outer * batch * inner


def _moved(op: str, node, before, value, axis: int, outer: int, inner: int, batch: int, ties: Ties):
    """(axis, outer, inner) of the batch in `node`'s value, from where it is in its input
    `before`; None where the op takes it off an axis of its own."""
    import torch

    rank = before.dim()
    # max.dim and the like return (values, indices), each of the reduced rank
    out = value[0] if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor) else value
    if op == "permute":
        return [d % rank for d in node.args[1]].index(axis), outer, inner
    if op == "transpose" or op == "t":  # t: a transpose(0, 1) of a matrix, nothing below 2 axes
        ends = [d % rank for d in node.args[1:3]] if op == "transpose" else [0, 1][:rank]
        return (ends[1 - ends.index(axis)] if axis in ends and len(ends) == 2 else axis), outer, inner
    if op == "stack":  # a new axis at dim, in front of the batch's when dim <= its axis
        dim = (node.args[1] if len(node.args) > 1 else 0) % (rank + 1)
        return axis + (dim <= axis), outer, inner
    if op in ("select", "unbind"):
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        return None if dim == axis else (axis - (axis > dim), outer, inner)
    if op == "unsqueeze":
        dim = node.args[1] % (rank + 1)
        return axis + (dim <= axis), outer, inner
    if op == "squeeze" and isinstance(value, torch.Tensor):
        dims = node.args[1] if len(node.args) > 1 else [d for d in range(rank) if before.shape[d] == 1]
        dims = [d % rank for d in ([dims] if isinstance(dims, int) else dims) if before.shape[d % rank] == 1]
        return None if axis in dims else (axis - sum(d < axis for d in dims), outer, inner)
    indexed = _indexed_axis(node, before, out, axis, outer, inner, batch) if op == "index" else None
    if indexed is not None:
        return indexed
    if op in _VIEW_OPS and isinstance(value, torch.Tensor):
        return _view_axis(list(before.shape), list(value.shape), axis, outer, batch, ties, node)
    if op in _REDUCTIONS and isinstance(out, torch.Tensor) and out.dim() < rank:
        at = 2 if op in _DIMS_THIRD else 1
        dims = node.args[at] if len(node.args) > at else None
        if not isinstance(dims, (list, tuple, int)):
            return None
        dims = [d % rank for d in ([dims] if isinstance(dims, int) else dims)] or list(range(rank))
        return None if axis in dims else (axis - sum(d < axis for d in dims), outer, inner)
    out_rank = out.dim() if isinstance(out, torch.Tensor) else rank
    if out_rank < rank:
        return None
    if op == "expand":  # its new axes lead ([N, C] to [2, N, C]), as broadcasting's do
        return axis + out_rank - rank, outer, inner
    # broadcasting aligns the last axes: more axes out than in come from an operand with as many
    # (x + pos[T, 1, C]); an op that adds its own (unfold's last) puts them elsewhere
    if out_rank > rank and not any(isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dim() == out_rank
                                   for a in node.all_input_nodes):
        return None
    return axis + out_rank - rank, outer, inner


def _indexed_axis(node, before, out, axis: int, outer: int, inner: int, batch: int):
    """Where index `node` (t[indices], advanced indexing, t `before` holding the batch on `axis`)
    puts it in `out`: an index `before` (of integers) that holds it puts it on the broadcast axes
    (table[idx], an embedding looked up for each crop); an axis of t not indexed keeps it, moved
    past the indexed ones (their broadcast axes stand where the first is when they are adjacent,
    in front when not); an indexed one keeps it only where its index is the crops' own (an
    arange of the batch: `_batch_arange`), on the last of the indices' broadcast axes
    (t[arange(N), idx], idx [K, N]: [K, N, ...]); None elsewhere (a boolean mask, another index
    of the batch: `_moved`'s other rules, as before)."""
    import torch

    if not isinstance(out, torch.Tensor):
        return None
    indices = list(node.args[1]) if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) else []
    held = [i for i, t in enumerate(indices) if t is not None]
    values = [indices[i].meta.get("val") if isinstance(indices[i], torch.fx.Node) else None for i in held]
    if not held or not all(isinstance(v, torch.Tensor) and v.dtype not in (torch.bool, torch.uint8) for v in values):
        return None
    indexed = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(indexed, torch.Tensor):
        return None
    broadcast = out.dim() - (indexed.dim() - len(held))  # the indices' broadcast axes
    adjacent = held == list(range(held[0], held[-1] + 1))
    first = held[0] if adjacent else 0
    if before is not indexed:
        # the batch comes from an index (table[idx], idx [N] from the image: `before` is idx):
        # it lies on the broadcast axes, which align the indices' last axes
        return (first + axis + broadcast - before.dim(), outer, inner) if before.dim() <= broadcast else None
    if axis in held:
        if broadcast < 1 or outer * inner != 1 or not _batch_arange(indices[axis], batch):
            return None
        return first + broadcast - 1, outer, inner  # the arange [N] aligns with the last broadcast axis
    if adjacent and axis < held[0]:
        return axis, outer, inner
    return axis - sum(i < axis for i in held) + broadcast, outer, inner


def _view_axis(before: list, after: list, axis: int, outer: int, batch: int, ties: Ties, node=None):
    """Where a view (a reshape) of `before` that holds the batch on `axis` (of size outer *
    batch * inner) puts it: the axis of `after` that holds the elements batch covers, whole;
    (axis, outer, inner) there, or None (a batch split over axes, a symbolic or empty size). At a batch
    of 1 several axes can (nn.MultiheadAttention's [T, 1, heads, dim] as [T, C] holds it in
    either): an axis other than the last (the features a linear layer reads at a fixed size)
    first, then an axis of the batch alone, then one it leads; `ties` may take another (at the
    view `node`)."""
    if not all(isinstance(d, int) and d > 0 for d in (*before, *after)):
        return None  # an empty tensor (no registers: tokens[:, 1:1]) has no elements to follow
    groups = outer  # index groups outside the batch: the axes before it, its outer part
    for size in before[:axis]:
        groups *= size
    found, ahead = [], 1
    for at, size in enumerate(after):
        if groups % ahead == 0 and size % (groups // ahead) == 0 and (size // (groups // ahead)) % batch == 0:
            found.append((at, groups // ahead, size // (groups // ahead) // batch))
        ahead *= size
        if ahead > groups * batch and found:
            break
    if not found:
        return None
    return ties.take(sorted(found, key=lambda f: (f[0] == len(after) - 1 > 0, f[1] * f[2] != 1, f[1] != 1)), node)


def _subgraph_axes(module, node, axes: dict, batch: int, ties: Ties) -> list | None:
    """Where the outputs of `node`, a torch.cond or a block of `forward` under torch.no_grad()
    or torch.autocast (their subgraphs of `module`: a torch.cond's two branches), hold the
    batch, the subgraphs freed on the way (`_free_graph` with their operands' axes); None where
    a branch's outputs disagree or no operand holds it."""
    at, first = _SUBGRAPH_OPS[_op_name(node)]
    operands = node.args[first] if _op_name(node) == "cond" else node.args[first:]
    found = None
    for subgraph in node.args[at]:
        sub = getattr(module, subgraph.target)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        inputs = {p: axes[o] for p, o in zip(placeholders, operands) if isinstance(axes.get(o), tuple)}
        if not inputs:
            return None
        inner_axes = _free_graph(sub, batch, inputs, ties)
        output = next(n for n in sub.graph.nodes if n.op == "output")
        outs = [inner_axes.get(o) if isinstance(inner_axes.get(o), tuple) else None for o in output.args[0]]
        if found is not None and outs != found:
            return None
        found = outs
    return found
