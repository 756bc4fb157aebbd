"""A PyTorch program saved with `torch.export.save` (.pt2) -> forward-only ONNX model, through
`torch.onnx.export(..., dynamo=True)`; the ONNX engine (`onnx_export`) does the rest, so every
framework shares one gradient engine and one set of heatmap equations.

`.pt` / `.pth` files are refused: loading them unpickles, which runs code from the file. A .pt2
can run code too: it is loaded only as `pt2_archive` checks and guards it (`_load_program`), and
a program saved on a GPU is loaded on the CPU.
torch is imported inside functions (the `camface[torch]` extra; the live loop never needs it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import zipfile
from pathlib import Path

from camface.errors import CamfaceError, ModelError
from camface.export import pt2_archive, pt2_batch
from camface.outputs import check_model_file

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth")
DEFAULT_OPSET = 18  # ScatterElements(add) for MaxPool's gradient needs >= 16
MAX_CROPS = 32  # the most crops a camface graph takes at once (the re-export's dynamic batch)
_OTHER_TIES = 6  # the most other choices run where views' batch axes are ambiguous (_chosen_ties)


HOW_TO_EXPORT = ("ep = torch.export.export(model.eval(), (torch.randn(2, 3, H, W),), "
                 "dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=32)},)); "
                 "torch.export.save(ep, 'model.pt2')")


def _what_it_is(path: Path, exc: Exception) -> str:
    """What a file torch.export.load refused is, when its zip says so (a TorchScript archive or
    a torch.save pickle, renamed), else torch's message without the warnings it points to (they
    are silenced)."""

    try:
        names = zipfile.ZipFile(path).namelist()
    except (OSError, zipfile.BadZipFile):
        names = []
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "it is a TorchScript archive, saved with torch.jit.save"
    if any(n.endswith("/data.pkl") for n in names):
        return "it is a pickle saved with torch.save (a state dict or a whole model)"
    return str(exc).split(" Please check the warnings above")[0].strip()


def refuse_pickle(path: Path) -> None:
    """ModelError for .pt / .pth: unpickling runs code, like Keras' unsafe mode."""
    raise ModelError(
        f"{path}: camface does not load {path.suffix} files: torch.load unpickles them, which "
        "RUNS CODE FROM THE FILE (like Keras' unsafe mode). Save the model as an exported "
        f"program instead: {HOW_TO_EXPORT}; then camface export model.pt2 ...")


def to_onnx(path: str | Path, opset: int = DEFAULT_OPSET, input_size: tuple[int, int] | None = None,
            fuse: bool = True):
    """onnx.ModelProto of the exported program at `path`, its batch dynamic (a program exported
    at a fixed batch is exported again with a dynamic one; ModelError when it does not run so);
    input_size: (H, W) of a program whose height and width are dynamic (ModelError without).
    fuse: torch.onnx's optimiser runs as it does by default, which also fuses each convolution
    and the BatchNorm after it into one Conv (scoped as the BatchNorm: the convolution's own
    output is gone); False: no fusion, only onnxscript's constant folding (a convolution can be
    the target). What torch and onnxscript say on the way (warnings, optimiser passes) shows
    under --debug only."""
    with _exporter_quiet(), pt2_archive.no_guard_code(Path(path)):
        return _to_onnx(Path(path), opset, input_size, fuse)



EXPORTER_LOGGERS = ("torch", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _exporter_quiet():
    """Inside the block, unless camface logs at DEBUG (--debug): the exporters' loggers (and
    those below them) at ERROR, Python warnings off, stdout (the optimiser's progress lines)
    dropped."""
    import logging
    import warnings

    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    # imported first: torch gives its loggers levels of their own when it is imported (its
    # top logger WARNING, which a level saved before would undo at the end; a logger made
    # inside the block would keep its own WARNING)
    for module in ("torch", "torch.onnx", "onnxscript"):
        with contextlib.suppress(ImportError):
            __import__(module)
    names = [n for n in logging.root.manager.loggerDict
             if any(n == top or n.startswith(top + ".") for top in EXPORTER_LOGGERS)]
    loggers = [logging.getLogger(n) for n in {*EXPORTER_LOGGERS, *names}]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _to_onnx(path: Path, opset: int, input_size: tuple[int, int] | None, fuse: bool = True):
    check_model_file(path)
    try:
        import torch
    except ImportError as exc:
        raise CamfaceError(f"{path}: .pt2 models need PyTorch: pip install 'camface[torch]'") from exc
    program = _load_program(path)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"
                    and n.name in program.graph_signature.user_inputs]
    if len(placeholders) != 1:
        raise ModelError(f"{path}: camface needs a program with one image input "
                         f"(it has {len(placeholders)})")
    example = placeholders[0].meta.get("val")
    if example is None or example.dim() != 4:
        raise ModelError(f"{path}: the program's input must be a 4-D image batch")
    shape = list(example.shape)
    hw = (2, 3) if isinstance(shape[1], int) and shape[1] in (1, 3) else (1, 2)
    fixed_batch = isinstance(shape[0], int)
    if not all(isinstance(shape[a], int) for a in hw):
        if input_size is None:
            raise ModelError(f"{path}: the program's input {[str(d) for d in shape]} has a dynamic "
                             "height and width; pass the size the model was trained on with "
                             "--input-size HxW")
        for axis, value in zip(hw, input_size):
            shape[axis] = int(value)
    elif not fixed_batch:
        input_size = None  # as exported: nothing to fix
    if fixed_batch or input_size is not None:
        # camface graphs take 1 to 32 crops at once: a program exported at a fixed batch is
        # exported again with a dynamic one; torch.onnx cannot convert every dynamic size (a
        # height of 2*h fails, "expected sympy.Symbol"): one with a dynamic height and width is
        # exported again at the fixed size
        program = _exported_again(path, program, [2, *(d if isinstance(d, int) else 2 for d in shape[1:])],
                                  input_size, fixed_batch and shape[0])
        shape[0] = 2
    shape = [d if isinstance(d, int) else 2 for d in shape]  # SymInt: the dynamic batch
    args = (torch.zeros(shape, dtype=torch.float32),)
    # torch.onnx.export traces the program again on the CPU: a view that read the layout an
    # operator had where it was saved (scaled_dot_product_attention's on a GPU, or another kernel's)
    # fails there
    _views_as_reshapes(program.graph_module)
    try:
        exported = torch.onnx.export(program, args, dynamo=True, output_names=output_names(program),
                                     opset_version=max(opset, 16), verbose=False, optimize=fuse)
        if not fuse:  # the optimiser's constant folding alone (its rewrite rules fuse Conv + BN)
            from onnxscript import optimizer

            optimizer.fold_constants(exported.model)
            optimizer.remove_unused_nodes(exported.model)
    except Exception as exc:
        raise ModelError(f"{path}: torch.onnx.export fails ({_export_failure(exc)})") from exc
    return exported.model_proto


def _export_failure(exc: BaseException) -> str:
    """Why torch.onnx.export failed, in one line: its own message is "Failed to convert ... Next
    steps:" with the cause chained below it, so the innermost exception's last line, after the
    aten op whose translation raised it (`at aten.scaled_dot_product_attention: only 4D query,
    key, and value are supported`); the message's first line when nothing is chained."""
    import re

    def plain(error: BaseException) -> list[str]:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # no terminal colours
        return [line.strip() for line in text.splitlines() if line.strip()]

    errors = list(pt2_archive.chain(exc))
    lines = next((plain(e) for e in reversed(errors[1:]) if plain(e)), None)
    if lines is not None:  # torch's own lines after the error: the node, its source, tlparse
        lines = lines[:next((i for i, line in enumerate(lines) if line.startswith("While executing")), None)]
    if not lines:
        return (plain(exc) or [type(exc).__name__])[0]
    op = next((m.group(1) for e in errors if (m := re.search(r"target=(?:torch\.ops\.)?(\w+\.\w+)", str(e)))), None)
    if op == "aten.view" and "view" in lines[-1]:  # kept where the program changes a tensor in place
        return (f"at aten.view: {lines[-1]} (a .view() that holds only for the layout where the program was "
                "traced: write .reshape() or .contiguous().view() there in the model and save it again)")
    return f"at {op}: {lines[-1]}" if op else lines[-1]


def _load_program(path: Path):
    """torch.export.load of the entries of `path` that `pt2_archive.vetted` checked, with its
    unpicklers guarded (`pt2_archive.guards`); ModelError saying why when it is refused or is
    not an exported program."""
    import torch

    try:
        source, devices = pt2_archive.vetted(path)
        with pt2_archive.LOAD_LOCK, _quiet("torch.export"), contextlib.ExitStack() as stack:
            for patch in pt2_archive.guards():
                stack.enter_context(patch)
            # torch logs a traceback (as a warning) for a file it cannot read before it raises:
            # the error below says it in one line
            program = torch.export.load(source)
    except Exception as exc:  # a zip that is not an exported program raises many types
        unsafe = next((e for e in pt2_archive.chain(exc)
                       if isinstance(e, (pt2_archive.UnsafePickle, pt2_archive.Refused))), None)
        if isinstance(unsafe, pt2_archive.UnsafePickle):
            raise ModelError(f"{path}: refused: it holds a pickle that is not only tensors ({unsafe}); "
                             "loading it would RUN CODE FROM THE FILE, as a .pt would. Export the model "
                             f"again with torch.export.save from plain tensors: {HOW_TO_EXPORT}") from exc
        if unsafe is not None:
            raise ModelError(f"{path}: refused: {unsafe}; {unsafe.effect}. "
                             f"camface loads programs saved as {HOW_TO_EXPORT}") from exc
        raise ModelError(f"{path}: not a program saved with torch.export.save ({_what_it_is(path, exc)}); "
                         f"make one with {HOW_TO_EXPORT}") from exc
    if devices:
        log.info("%s: saved on %s; loaded on the CPU", path, ", ".join(sorted(devices)))
    return program



def output_names(program) -> list[str] | None:
    """The names of a program's outputs when it returns them by name (a dict such as
    {"logits": ..., "embedding": ...}, or a dataclass such as transformers' ModelOutput): the
    keys, joined by '.' when nested; None for a tensor or a tuple (torch names those)."""
    from torch.utils import _pytree as pytree

    spec = program.call_spec.out_spec
    if spec is None:
        return None
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    paths = [path for path, _ in pytree.tree_flatten_with_path(tree)[0]]
    if not any(hasattr(k, "key") or hasattr(k, "name") for path in paths for k in path):
        return None

    def part(key) -> str:
        for field in ("key", "name", "idx"):
            if hasattr(key, field):
                return str(getattr(key, field))
        return str(key)

    return [".".join(part(k) for k in path) for path in paths]


def _exported_again(path: Path, program, shape: list[int], input_size, fixed_batch):
    """`program` exported again from its module on an example of `shape`, the batch dynamic
    (1..32); ModelError saying why when it does not run so (its batch or size fixed inside)."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=MAX_CROPS)
    saved: dict = {}  # the program's outputs on the crops `_check_freed` gives every module it checks

    def again(ties=None):
        # inside: a graph pt2_batch.free cannot read is refused in one line as well
        module = (pt2_batch.free(program.module(check_guards=False), fixed_batch, ties) if fixed_batch
                  else program.module())
        _views_as_reshapes(module)
        # torch logs the failing op's traceback as an error before it raises: the error below
        # says it in one line (--debug shows both)
        with _quiet("torch.export"), _quiet("torch._subclasses.fake_tensor", logging.CRITICAL
                                            if not log.isEnabledFor(logging.DEBUG) else logging.NOTSET):
            exported = torch.export.export(module, (torch.zeros(shape),), dynamic_shapes=({0: batch},))
            if fixed_batch:
                _check_freed(program, exported.module(), [fixed_batch, *shape[1:]], saved)
            return exported

    try:
        # a view whose batch axis is ambiguous (at a batch of 1) may hold it on another: the
        # choice is made by running the freed graph (no trace, milliseconds), so a program
        # refused for any reason is traced once, with the tie-break's choices, as before
        ties = _chosen_ties(path, program, [fixed_batch, *shape[1:]], saved) if fixed_batch else None
        try:
            return again(ties)
        except Exception:
            if ties is None or not any(ties.picks):
                raise
            log.debug("%s: freed with the batch of views on their candidates %s: refused", path, ties.picks,
                      exc_info=True)
            return again()
    except Exception as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = f"export it with a dynamic batch: {HOW_TO_EXPORT}"
        if fixed_batch and why.startswith("Constraints violated"):  # torch's next words: run with TORCH_LOGS
            why, hint = _violated(str(exc), fixed_batch, hint)
        if fixed_batch:
            raise ModelError(f"{path}: the program was exported with a fixed batch of {fixed_batch} "
                             "and does not run with a dynamic one (camface graphs take 1 to 32 crops "
                             f"at once: {why}); {hint}") from exc
        raise ModelError(f"{path}: the program does not run at --input-size "
                         f"{input_size[0]}x{input_size[1]} ({why})") from exc


def _violated(message: str, fixed_batch: int, hint: str) -> tuple[str, str]:
    """Why torch's "Constraints violated (batch)!" `message` refused the freed program, in one
    line, and what to do. torch lists its reasons below, one a "  - " line: "your code
    specialized it to be a constant (2)" means a size is the batch as a number camface did not
    trace back to the input's (`hint`: export with a dynamic batch); any other (torch could
    not prove a guard it made holds at every batch: "Not all values of batch ... satisfy the
    generated guard ...") is said as torch says it: the model as written exports with no
    dynamic batch at all."""
    reasons = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    if any("specialized it to be a constant" in reason for reason in reasons):
        return (f"a size in it is the batch {fixed_batch} as a number camface could not trace back to the "
                f"input's batch, so torch fixed the batch at {fixed_batch}: Constraints violated (batch)"), hint
    why = f"Constraints violated (batch): {reasons[0].rstrip('.')}" if reasons else message.strip().splitlines()[0]
    return why, ("torch.export cannot give the model as written a dynamic batch either (TORCH_LOGS=\"+dynamic\" "
                 f"shows where its guard comes from): change that code, then {HOW_TO_EXPORT}")


def _chosen_ties(path: Path, program, shape: list[int], saved: dict):
    """The pt2_batch.Ties with which `program` (saved at the fixed batch shape[0]), freed and
    run as it is, untraced, gives batch + 1 crops what it gives them (`_check_freed`): the
    tie-break's where no view's batch axis is ambiguous or where it does; else one found
    greedily in up to _OTHER_TIES runs, each with another candidate at one view, the nearest
    before where the run fails (`_picked`: the views after it at the tie-break's, then as they
    were), kept when the run then fails further on (that view was wrong; one after it is too);
    the tie-break's when none does (the re-export then says why).
    `saved`: `_check_freed`'s."""
    import torch

    order = {n.name: i for i, n in enumerate(program.module(check_guards=False).graph.nodes)}

    def freed(picks: tuple) -> tuple:
        """The program's module freed with `picks`, and its Ties (their counts and places)."""
        ties = pt2_batch.Ties(picks)
        module = pt2_batch.free(program.module(check_guards=False), shape[0], ties)
        _views_as_reshapes(module)
        return module, ties

    def failure(module, picks: tuple) -> int | None:
        """Where `module` (freed with `picks`) fails the check, run node by node: its failing
        node's place in `order`; past the end where it gives other outputs; None where it
        passes."""
        interpreter, ran = torch.fx.Interpreter(module), []

        def run_node(node):
            ran.append(node)
            return torch.fx.Interpreter.run_node(interpreter, node)

        interpreter.run_node = run_node
        try:
            with torch.no_grad():
                _check_freed(program, interpreter.run, shape, saved)
        except Exception as exc:  # any: the freed graph fails on the crops, or gives them other outputs
            at = len(order) if isinstance(exc, _NotFreed) or not ran else order.get(ran[-1].name, len(order))
            log.debug("%s: freed with the batch of views on their candidates %s: refused at node %d",
                      path, picks, at, exc_info=True)
            return at
        return None

    try:
        module, ties = freed(())
    except Exception:  # pt2_batch.free's own: the re-export raises it again, in one line
        return pt2_batch.Ties()
    point = failure(module, ()) if ties.counts else None
    picks, seen = (), set()
    for _ in range(_OTHER_TIES if point is not None else 0):
        nearest = [k for k in reversed(range(len(ties.counts)))
                   if order.get(ties.places[k].name, len(order)) <= point and _pick(picks, k) == 0]
        other = next((p for k in nearest for j in range(1, ties.counts[k])
                      for p in _picked(picks, k, j) if p not in seen), None)
        if other is None:
            break
        seen.add(other)
        try:
            module, tried = freed(other)
        except Exception:
            continue
        moved = failure(module, other)
        if moved is None:
            return pt2_batch.Ties(other)
        if moved > point:
            picks, point, ties = other, moved, tried
    return pt2_batch.Ties()


def _pick(picks: tuple, k: int) -> int:
    """The candidate `picks` takes at the k-th ambiguous view (0: the tie-break's)."""
    return picks[k] if k < len(picks) else 0


def _picked(picks: tuple, k: int, j: int) -> list[tuple]:
    """`picks` taking candidate j at the k-th ambiguous view, to be tried in turn: first with
    the views after it back at the tie-break's (a later view's candidates follow from where the
    views before it put the batch, so its pick, an index among them, chosen with the k-th view
    elsewhere, may be wrong now), then with their picks kept (views on branches of their own)."""
    head = tuple(_pick(picks, i) for i in range(k))
    kept = tuple(j if i == k else _pick(picks, i) for i in range(max(len(picks), k + 1)))
    return [(*head, j)] if not any(kept[k + 1:]) else [(*head, j), kept]


def _views_as_reshapes(module) -> None:
    """Each aten.view in `module` (a program's graph) made a reshape, in place, unless a
    tensor it aliases (its base, itself, or a view of either) is changed in place (an
    nn.ReLU(inplace=True): the view must then alias its base). torch.export drops a
    .contiguous() that does nothing at the traced size (tokens [T, 1, C] of a batch of 1), so
    its .view() reads the traced layout, which another batch or size does not have (torch
    #186381); a reshape is that view where the layout allows it and a copy where it does not,
    as .contiguous().view() is. The subgraphs of its higher-order ops (torch.cond's branches,
    a torch.no_grad() block of forward) too, each read alone: they neither change their
    operands in place nor return an alias of them."""
    import torch

    for graph in [m for m in module.modules() if isinstance(m, torch.fx.GraphModule)]:
        _graph_views_as_reshapes(graph)


def _graph_views_as_reshapes(module) -> None:
    """`_views_as_reshapes` of `module`'s own graph."""
    import torch

    nodes = [n for n in module.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
    base: dict = {}  # node -> a node it aliases (union-find over the ops that return an alias)

    def root(node):
        while node in base:
            node = base[node]
        return node

    written = set()
    for node in nodes:
        schema = node.target._schema
        aliased = {name for r in schema.returns if r.alias_info for name in r.alias_info.before_set}
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is None or not isinstance(value, torch.fx.Node):
                continue
            if aliased & set(arg.alias_info.before_set) and root(node) is not root(value):
                base[root(node)] = root(value)
            if arg.alias_info.is_write:
                written.add(value)
    written = {root(node) for node in written}
    for node in nodes:
        if node.target is torch.ops.aten.view.default and root(node) not in written:
            node.target = torch.ops.aten.reshape.default
    module.recompile()


class _NotFreed(Exception):
    """The program exported again with a dynamic batch gives crops other outputs than it did."""


def _check_freed(program, again, shape: list[int], saved: dict | None = None) -> None:
    """Raises _NotFreed unless `again` (the module of the program at the fixed batch shape[0]
    freed: exported again with a dynamic batch, or not yet traced) gives a batch of shape[0] + 1
    random crops what `program` gives them shape[0] at a time: a size pt2_batch.free read wrong
    gives other rows, or mixes crops. A program saved at MAX_CROPS or more (which `again` does
    not take + 1 of) is checked on MAX_CROPS - 1 crops against the first rows of `program`'s
    batch. `saved`: a dict kept by a caller that checks several modules of one program and
    shape; it holds the program's outputs on these crops after the first check."""
    import numpy as np
    import torch
    from torch.utils import _pytree as pytree

    from camface.export import verify

    def outputs(module, images):
        # each run from the saved state: a buffer changed in place in forward (a counter, a running
        # statistic) is the program's own tensor, shared by every module of it and by the re-export
        with _state_kept(program, module):
            return [t.double().numpy() for t in pytree.tree_leaves(module(images)) if isinstance(t, torch.Tensor)]

    fixed = shape[0]
    count = fixed + 1 if fixed < MAX_CROPS else MAX_CROPS - 1  # never `fixed`, within the Dim
    crops = torch.from_numpy(np.random.default_rng(0).standard_normal([max(fixed, count), *shape[1:]])
                             .astype(np.float32))
    saved = {} if saved is None else saved
    with torch.no_grad():
        if not saved:
            original = program.module(check_guards=False)
            saved["first"] = outputs(original, crops[:fixed])
            saved["last"] = outputs(original, crops[count - fixed:count]) if count > fixed else saved["first"]
        first, last = saved["first"], saved["last"]
        got = outputs(again, crops[:count])
    atol, rtol = verify.TOLERANCE["fp32"]
    for a, b, c in zip(first, last, got):
        # an output's batch is the axis whose size went from `fixed` * rows to `count` * rows
        # (logits [C, N] as well as [N, C]; tokens as rows [N * T, C], T rows a crop); one with
        # none must not change with the batch
        axis, rows = next(((i, m // fixed) for i, (m, n) in enumerate(zip(a.shape, c.shape))
                           if m > 0 and m % fixed == 0 and n * fixed == m * count), (None, 1))
        if axis is None:
            expected = a
        else:
            a, b, c = (np.moveaxis(t, axis, 0) for t in (a, b, c))
            expected = np.concatenate([a, b[(fixed - count) * rows:]]) if count > fixed else a[:count * rows]
        # each element against its own scale (_scales), not the output's largest; equal values
        # are 0 apart (a masked logit's -inf in both: inf - inf is nan)
        same = c.shape == expected.shape
        with np.errstate(invalid="ignore"):
            apart = np.where((c == expected) | (np.isnan(c) & np.isnan(expected)), 0.0,
                             np.abs(c - expected)) if same else np.array(np.inf)
        if not same or not np.all(apart <= atol + rtol * _scales(expected, 1 if axis is None else count)):
            raise _NotFreed(f"a batch of {count} crops does not give each crop what the batch of "
                            f"{fixed} gives it (up to {float(apart.max(initial=0)):.3g} apart)")


@contextlib.contextmanager
def _state_kept(program, module):
    """The buffers and constants of `program` (an ExportedProgram) and of `module` (an
    nn.Module; anything else has none of its own) as they were on entry, put back in place on
    exit: a run that changes one in place (self.n += 1 in forward) changes the program's own
    tensor, which program.module() and a program exported again from it share."""
    import torch

    held = [*dict(program.named_buffers()).values(), *program.constants.values()] \
        if isinstance(program, torch.export.ExportedProgram) else []
    if isinstance(module, torch.nn.Module):
        held += list(module.buffers())
    kept = {id(t): (t, t.clone()) for t in held if isinstance(t, torch.Tensor)}
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, before in kept.values():
                tensor.copy_(before)


def _scales(values, crops: int):
    """The scale `_check_freed` judges each element of `values` (an output, its first axis
    `crops` crops' rows in turn; 1 where it has no batch) against: the largest |value| at that
    position over the crops, at least the median of those over the positions not 0 in every
    crop (an element near 0 in each crop is no finer than the output's others; a sparse output's
    exact zeros, a ReLU's dead units, would make that median 0). Not the output's largest: a logit
    biased by 1e4 would let crops mix by 10 in every other element. A value that is not
    finite (a masked logit's -inf) counts as 0: it must be met exactly."""
    import numpy as np

    if values.size == 0:
        return np.abs(values)
    per_position = np.where(np.isfinite(values), np.abs(values), 0.0).reshape(crops, -1).max(0)
    live = per_position[per_position > 0]
    floor = float(np.median(live)) if live.size else 0.0
    return np.broadcast_to(np.maximum(per_position, floor), (crops, per_position.size)).reshape(values.shape)


@contextlib.contextmanager
def _quiet(logger: str, level_inside: int = logging.ERROR):
    """Logger `logger` at `level_inside` (ERROR: its warnings dropped) inside the block."""
    log_ = logging.getLogger(logger)
    level = log_.level
    log_.setLevel(level_inside)
    try:
        yield
    finally:
        log_.setLevel(level)
