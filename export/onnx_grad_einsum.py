"""The gradient rule of Einsum (see `onnx_grad`): attention as torch writes it with
torch.einsum (`bhqd,bhkd->bhqk`, `bhqk,bhkd->bhqd`), linear layers (`bld,od->blo`), and any
equation of one or more operands, in explicit or implicit form, with or without an ellipsis.

The gradient of operand i is itself an Einsum: the output's gradient and the other operands,
contracted to operand i's labels (`out,others->in_i`); a label of operand i found nowhere else
(summed inside it by the forward) is restored by Unsqueeze and Expand to the operand's shape.
An axis of static size 1 is taken as broadcast (numpy's rule): it gets a label of its own, so
that the gradient is summed over the axis it was stretched along. A label whose sizes shape
inference leaves unknown (or symbolic and different) in the operands may be 1 in one of them
at run time: that operand's gradient is expanded to its shape and summed over the axes where
it holds 1 and the gradient does not, found at run time.
"""

from __future__ import annotations

import string

from camface.errors import ModelError
from camface.export.onnx_grad_context import attribute

_LETTERS = string.ascii_lowercase + string.ascii_uppercase


def _refuse(node, why: str) -> ModelError:
    return ModelError(f"node {node.name!r} (Einsum): equation "
                      f"{_text(attribute(node, 'equation'))!r} {why}; no gradient rule")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse(ctx, node) -> tuple[list[list[str]], list[str]]:
    """(labels of each operand, labels of the output), one letter per axis, the ellipsis
    written out as letters the equation does not use (right-aligned: an operand with fewer
    ellipsis axes takes the last ones, as numpy broadcasts)."""
    equation = _text(attribute(node, "equation")).replace(" ", "")
    left, arrow, right = equation.partition("->")
    terms = left.split(",")
    if len(terms) != len(node.input):
        raise _refuse(node, f"has {len(terms)} operand terms for {len(node.input)} inputs")
    unused = [c for c in _LETTERS if c not in equation]
    spans = []  # ellipsis axes per operand
    for term, x in zip(terms, node.input):
        if "..." not in term:
            spans.append(0)
            continue
        rank = ctx.rank(x)
        if rank is None:
            raise _refuse(node, f"has an ellipsis over {x!r}, whose rank shape inference left "
                                "unknown")
        spans.append(rank - len(term.replace("...", "")))
    widest = max(spans)
    ellipsis = unused[:widest]
    del unused[:widest]
    operands = []
    for term, span in zip(terms, spans):
        head, _, tail = term.partition("...")
        labels = list(head) + (ellipsis[widest - span:] if "..." in term else []) + list(tail)
        if any(not c.isalpha() for c in labels):
            raise _refuse(node, "has a character that is no letter")
        operands.append(labels)
    if arrow:
        head, dots, tail = right.partition("...")
        output = list(head) + (ellipsis if dots else []) + list(tail)
    else:  # implicit: the ellipsis, then the labels written once, in alphabetical order
        written = [c for term in terms for c in term.replace("...", "")]
        output = ellipsis + sorted(c for c in set(written) if written.count(c) == 1)
    for labels in operands + [output]:
        if len(set(labels)) != len(labels):
            raise _refuse(node, "repeats a label within one term (a diagonal)")
    for labels, x in zip(operands, node.input):
        rank = ctx.rank(x)
        if rank is not None and rank != len(labels):
            raise _refuse(node, f"labels {len(labels)} axes of {x!r}, which has {rank}")
    _broadcast_labels(ctx, node, operands, unused)
    return operands, output


def _broadcast_labels(ctx, node, operands: list[list[str]], unused: list[str]) -> None:
    """Give each axis of static size 1 a label of its own (in place), where another operand
    has the same label: summed over size 1 wherever it is read, its gradient is the sum of
    the output's along the axis it was broadcast to."""
    for labels, x in zip(operands, node.input):
        shape = ctx.shape(x) or [None] * len(labels)
        for axis, (label, size) in enumerate(zip(labels, shape)):
            shared = any(label in other for other in operands if other is not labels)
            if size == 1 and shared:
                if not unused:
                    raise _refuse(node, "uses every letter, none left for its broadcast axes")
                labels[axis] = unused.pop(0)


def _unsure(ctx, node, operands: list[list[str]]) -> set[str]:
    """The labels two operands share whose sizes shape inference does not show equal (one
    unknown, or two different symbols): an operand may hold 1 there, broadcast, at run time."""
    sizes: dict[str, set] = {}
    for labels, x in zip(operands, node.input):
        for label, size in zip(labels, ctx.shape(x) or [None] * len(labels)):
            sizes.setdefault(label, set()).add(size)
    shared = {c for c in sizes if sum(c in labels for labels in operands) > 1}
    return {c for c in shared if None in sizes[c] or len(sizes[c]) > 1}


def _fit(ctx, node, g: str, x: str) -> str:
    """g (x's rank) made x's shape at run time: expanded where g holds 1 and x does not, summed
    where x holds 1 (an axis broadcast in the forward) and g does not."""
    b = ctx.builder
    if b.opset < 13:
        raise _refuse(node, f"shares a label of unknown size with {x!r} (it may be broadcast); "
                            f"its gradient needs opset >= 13 (the model has {b.opset})")
    shape, one = b.op("Shape", [x]), b.ints([1])
    g = b.op("Expand", [g, shape])
    stretched = b.op("And", [b.op("Equal", [shape, one]),
                             b.op("Not", [b.op("Equal", [b.op("Shape", [g]), one])])])
    axes = b.op("Reshape", [b.op("NonZero", [stretched]), b.ints([-1])])
    return b.op("ReduceSum", [g, axes], keepdims=1, noop_with_empty_axes=1)


def einsum(ctx, node, grads):
    b = ctx.builder
    operands, output = _parse(ctx, node)
    unsure = _unsure(ctx, node, operands)
    grad_in = "".join(output)
    result = []
    for i, (labels, x) in enumerate(zip(operands, node.input)):
        others = [(lab, t) for j, (lab, t) in enumerate(zip(operands, node.input)) if j != i]
        seen = set(output).union(*[set(lab) for lab, _ in others])
        kept = [c for c in labels if c in seen]
        alone = [axis for axis, c in enumerate(labels) if c not in seen]
        equation = ",".join([grad_in] + ["".join(lab) for lab, _ in others]) + "->" + \
            "".join(kept)
        if not others and kept == output:
            g = grads[0]
        else:
            g = b.op("Einsum", [grads[0], *[t for _, t in others]], equation=equation)
        if alone:  # labels summed inside this operand alone: its gradient spread back along them
            g = b.unsqueeze(g, alone)
        if unsure.intersection(labels):
            g = _fit(ctx, node, g, x)
        elif alone:
            g = b.op("Expand", [g, b.op("Shape", [x])])
        result.append(g)
    return result
