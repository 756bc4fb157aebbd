"""A .pt2 archive checked before torch loads it, and torch's loaders guarded while it does.

torch says never to load a .pt2 from an untrusted source: `torch.export.load` and the
`program.module()` that torch.onnx.export calls run code from the file in many ways (pickles,
sympy.sympify of its symbolic sizes, an AOTInductor library, names and guards written into
Python source). `vetted` reads an archive's entries once, refuses what would run code and writes
the checked entries again for torch (a program saved on a GPU rewritten to the CPU); `guards`
holds torch's unpicklers to tensors while it loads; `no_guard_code` keeps program.module() from
building guard source. These are the routes four reviews found with torch 2.13, not a sandbox.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import zipfile
from pathlib import Path

from camface.errors import ModelError


@contextlib.contextmanager
def no_guard_code(path: Path):
    """Inside the block, program.module() (torch.onnx.export calls it, and so does a re-export)
    builds no guard function: torch writes the program's guards, and the values of its constant
    inputs, into Python source that it runs (a string input holding a quote escapes it).
    camface checks shapes itself. ModelError when this torch builds guards elsewhere."""
    from unittest import mock

    try:
        import torch  # noqa: F401
    except ImportError:  # _to_onnx says which extra to install
        yield
        return
    try:
        from torch.export import _unlift
    except ImportError as exc:
        raise ModelError(f"{path}: refused: this torch builds a program's guards elsewhere than the "
                         f"torch 2.13 camface checks ({exc})") from exc
    if not hasattr(_unlift, "_ok_to_generate_guards_fn"):
        raise ModelError(f"{path}: refused: this torch builds a program's guards otherwise than the "
                         "torch 2.13 camface checks")
    with mock.patch.object(_unlift, "_ok_to_generate_guards_fn", lambda: False):
        yield



class UnsafePickle(Exception):
    """A pickle in a .pt2 that is more than tensors and plain containers."""


class Refused(Exception):
    """What in a .pt2 would run code or load native code when torch.export.load reads it."""

    effect = "loading it would RUN CODE FROM THE FILE"


class Unbounded(Refused):
    """A symbolic size whose evaluation (sympy's, as torch.export.load reads it) is not bounded."""

    effect = "loading it could hang or exhaust memory"


LOAD_LOCK = threading.Lock()  # torch's loader modules are guarded while one .pt2 loads


class _Guarded:
    """A module seen through a proxy: the attributes given replaced, the others the module's."""

    def __init__(self, module, **replaced):
        self.__dict__.update(replaced, _module=module)

    def __getattr__(self, name):
        return getattr(self._module, name)


def guards():
    """mock patches that hold torch.export.load's unpicklers to tensors and plain containers
    (`torch.load(weights_only=True)`, mapped to the CPU) and refuse its object pickles, in the
    two modules that call them (not torch.load itself: other threads keep theirs). Raises
    Refused when this torch's loader is not where they go (they would guard nothing)."""
    import importlib
    import pickle
    from unittest import mock

    import torch

    def safe_load(f, *args, **kwargs):  # torch's own arguments dropped: weights_only allows no pickle_module
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafePickle(_unsafe_global(exc)) from exc

    def refuse(*args, **kwargs):
        raise UnsafePickle("a pickled Python object (a TorchScript class or an opaque constant)")

    try:
        from torch._export.serde import serialize
        from torch.export.pt2_archive import _package
    except ImportError as exc:
        raise Refused(f"torch {torch.__version__} reads .pt2 files elsewhere than the torch 2.13 "
                       f"camface checks ({exc})") from exc
    from torch.utils import _pytree

    def refuse_import(name, *args, **kwargs):
        raise Refused(f"its tree specs import the module {name}")

    if not all(hasattr(m, "torch") for m in (_package, serialize)) or not hasattr(_package, "pickle") \
            or not hasattr(_pytree, "importlib"):
        raise Refused(f"torch {torch.__version__} reads .pt2 files otherwise than the torch 2.13 camface checks")
    return [mock.patch.object(_package, "torch", _Guarded(torch, load=safe_load,
                                                          _C=_Guarded(torch._C, _pickle_load_obj=refuse))),
            mock.patch.object(_package, "pickle", _Guarded(pickle, loads=refuse, load=refuse)),
            mock.patch.object(serialize, "torch", _Guarded(torch, load=safe_load)),
            # a tree spec's enum or defaultdict names a module that the spec's loader imports
            mock.patch.object(_pytree, "importlib", _Guarded(importlib, import_module=refuse_import))]


def chain(exc: BaseException):
    """`exc` and the exceptions it was raised from or during."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _unsafe_global(exc: Exception) -> str:
    """What torch's safe unpickler refused, from its message (e.g. "GLOBAL posix.system")."""
    import re

    found = re.search(r"Unsupported global: (GLOBAL \S+)", str(exc))
    return found.group(1) if found else str(exc).strip().splitlines()[-1][:200]


_NOT_MOVED = ("cpu", "meta")  # devices a program's tensors keep
# torch.export.load unpacks and dlopens an AOTInductor library it finds in the archive
_NATIVE = (".so", ".dll", ".dylib", ".pyd", ".o", ".cpp", ".cubin", ".ptx")
# what a graph node may call: torch's operators and Python's (a name anywhere else, e.g.
# torch.export.custom_ops', imports a module the file names)
_CALLS = ("torch.ops.aten.", "torch.ops.prims.", "torch.ops.higher_order.", "torch.ops.quantized_decomposed.",
          "_operator.", "operator.", "math.", "torch.sym_", "torch._sym_")
# sympy.sympify evaluates a symbolic size's expr_str as Python: only sympy arithmetic is let through
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "Eq", "Ne",
    "Lt", "Le", "Gt", "Ge", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Equality",
    "Unequality", "And", "Or", "Not", "Piecewise", "floor", "ceiling", "sqrt", "BooleanTrue", "BooleanFalse"})
_SYMPY_NAMES = frozenset({"oo", "zoo", "nan", "true", "false", "True", "False", "S"})
_SYMPY_KEYWORDS = frozenset({"integer", "positive", "negative", "nonnegative", "nonpositive", "real", "finite",
                             "even", "odd", "commutative", "evaluate"})


def _torch_sympy_functions() -> frozenset[str]:
    """The names of torch's own sympy functions (FloorDiv, CleanDiv, ModularIndexing...)."""
    from torch.utils._sympy import functions

    return frozenset(n for n, v in vars(functions).items() if isinstance(v, type)
                     and getattr(v, "__module__", "").startswith(("torch.utils._sympy", "sympy")))


# sympy evaluates what it can as it parses: a size's text that is arithmetic may still be a number
# that takes hours or all memory to compute (9**9**99), or nest past the parser's recursion. torch
# writes a few hundred characters, small literals, powers by 2 or 3 (s0**2) for a CNN's sizes.
_EXPRESSION_CHARS = 10_000
_EXPRESSION_DEPTH = 100  # levels of Python syntax (a call and its argument are 1 level, a keyword 2)
_LITERAL_MAX = 2**63
_EXPONENT_MAX = 64  # of a power (Pow, PowByNatural, FloatPow, **) and of a shift (LShift, <<)
_BITS_MAX = 2**16  # of any number in the expression, each size taken as 64 bits
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow"})


class _Unbounded(Exception):
    """What in a symbolic size's text could make sympy's evaluation unbounded."""


def _expression_refused(text: str, calls: frozenset[str]) -> str:
    """Why sympy may not evaluate the symbolic-size expression `text` ("" when it may): what
    is more than sympy arithmetic, or arithmetic that is not bounded in time and memory."""
    import ast
    import re

    if len(text) > _EXPRESSION_CHARS:
        return (f"could take sympy unbounded time or memory (it is {len(text)} characters long, "
                f"over {_EXPRESSION_CHARS})")
    if not text.isascii():
        return "is not arithmetic (it is not ASCII)"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "is not arithmetic (it does not parse)"
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > _EXPRESSION_DEPTH:
            return f"could take sympy unbounded time or memory (it nests over {_EXPRESSION_DEPTH} levels deep)"
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    allowed = (ast.Expression, ast.Call, ast.Name, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp,
               ast.Compare, ast.BoolOp, ast.Tuple, ast.Load, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            return f"is not arithmetic (it has {type(node).__name__})"
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in calls):
            return f"is not arithmetic (it calls {ast.unparse(node.func)})"
        if isinstance(node, ast.Name) and node.id not in calls and node.id not in _SYMPY_NAMES \
                and not re.fullmatch(r"[a-z]+\d+", node.id, re.ASCII):
            return f"is not arithmetic (it names {node.id})"
        if isinstance(node, ast.keyword) and node.arg not in _SYMPY_KEYWORDS:
            return f"is not arithmetic (it passes {node.arg}=)"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and not re.fullmatch(r"[a-z]+\d+", node.value, re.ASCII):
            return f"is not arithmetic (it holds the string {node.value!r})"
    try:
        bits = _bits(tree.body)
    except _Unbounded as exc:
        return f"could take sympy unbounded time or memory ({exc})"
    if bits > _BITS_MAX:
        return f"could take sympy unbounded time or memory (its numbers could reach {bits} bits, over {_BITS_MAX})"
    return ""


def _bits(node) -> int:
    """An upper bound on the bits of what the (checked, depth-bounded) expression `node`
    evaluates to, each symbol taken as 64 bits. Raises _Unbounded for a literal over
    _LITERAL_MAX, a power or shift by other than a literal up to _EXPONENT_MAX, and `^` (a
    power to sympy)."""
    import ast

    if isinstance(node, ast.Constant):
        if isinstance(node.value, int) and not isinstance(node.value, bool):
            if abs(node.value) > _LITERAL_MAX:
                raise _Unbounded(f"the literal {str(node.value)[:40]} is over 2**63")
            return max(1, node.value.bit_length())
        return 64  # a float, a symbol's name, a flag
    if isinstance(node, ast.UnaryOp):
        return _bits(node.operand)
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.BitXor):
            raise _Unbounded("it has ^, a power to sympy")
        if isinstance(node.op, ast.Pow):
            return _bits(node.left) * _exponent(node.right)
        if isinstance(node.op, ast.LShift):
            return _bits(node.left) + _exponent(node.right)
        return _bits(node.left) + _bits(node.right) + 1
    if isinstance(node, ast.Call):
        name = node.func.id
        if name == "Symbol":
            return 64
        if name in _POWERS and len(node.args) == 2:
            return _bits(node.args[0]) * _exponent(node.args[1])
        if name == "LShift" and len(node.args) == 2:
            return _bits(node.args[0]) + _exponent(node.args[1])
        if name in _POWERS or name == "LShift":
            raise _Unbounded(f"{name} has {len(node.args)} arguments")
        return sum(_bits(a) + 1 for a in node.args)
    if isinstance(node, (ast.Compare, ast.BoolOp, ast.Tuple)):
        return sum(_bits(c) + 1 for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr))
    return 64  # a name


def _exponent(node) -> int:
    """|p| when `node` is a literal exponent p or p/q (an integer, Integer(p), Rational(p, q),
    p/q) with |p| and |q| up to _EXPONENT_MAX (at least 1); raises _Unbounded otherwise."""
    import ast

    def literal(item):
        while isinstance(item, ast.UnaryOp) and isinstance(item.op, (ast.USub, ast.UAdd)):
            item = item.operand
        if isinstance(item, ast.Call) and item.func.id == "Integer" and len(item.args) == 1 and not item.keywords:
            item = item.args[0]
        if isinstance(item, ast.Constant) and isinstance(item.value, int) and not isinstance(item.value, bool):
            return abs(item.value)
        return None

    parts = [literal(node)]
    if parts[0] is None and isinstance(node, ast.Call) and node.func.id == "Rational" and len(node.args) == 2:
        parts = [literal(a) for a in node.args]
    elif parts[0] is None and isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        parts = [literal(node.left), literal(node.right)]
    if any(p is None or p > _EXPONENT_MAX for p in parts) or 0 in parts[1:]:
        raise _Unbounded(f"the exponent {ast.unparse(node)[:40]} is no literal up to {_EXPONENT_MAX}")
    return max(1, parts[0])


# strings of a program's JSON that may hold quotes or line breaks (the others are names, ops
# and numbers: torch.fx writes some into source, where a quote or a carriage return escapes)
_FREE_TEXT = frozenset({"stack_trace", "in_spec", "out_spec", "metadata", "custom", "nn_module_stack",
                        "source_fn_stack", "torch_fn"})
_VALUE_TABLES = ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values")


def _not_a_name(text) -> str:
    """Why `text` is no name torch.fx may write into source ("" when it is one): Python reads a
    non-ASCII identifier as its NFKC form (`self.ｆｃ` is `self.fc`), another name than the
    file's, which torch's name checks do not see."""
    import keyword
    import unicodedata

    if not (isinstance(text, str) and text.isidentifier() and not keyword.iskeyword(text)):
        return "is no Python identifier"
    if not text.isascii():
        return f"is not ASCII (Python reads it as {unicodedata.normalize('NFKC', text)!r})"
    return ""


def _identifier(text) -> bool:
    return not _not_a_name(text)


def _dotted(text) -> bool:
    """A module path such as `features.4.num_batches_tracked` (or none), in ASCII."""
    return not text or (isinstance(text, str) and text.isascii()
                        and all(_identifier(p) or p.isdigit() for p in text.split(".")))


NON_FINITE = ("Infinity", "-Infinity", "NaN")  # how torch.export.save writes a float that is no JSON number
# (masked_fill(mask, float("-inf")) in an attention mask); it reads them back with float()


def _name_refused(key: str, value) -> str:
    """Why `value` under `key` in a program's JSON is no name torch.fx may write into the
    Python source it generates and runs when the program loads ("" when it is one)."""
    if key in ("name", "as_name", "forward_arg_names") and isinstance(value, (str, list)):
        # (a higher-order op's positional inputs are named "": only keyword inputs reach the source)
        bad = [v for v in (value if isinstance(value, list) else [value]) if v != "" and not _identifier(v)]
        return f"the name {bad[0]!r} {_not_a_name(bad[0])}" if bad else ""
    if (key == "fqn" or key.endswith("_name")) and isinstance(value, str) and not _dotted(value):
        return f"the module path {value!r} ({key}) is not one" + ("" if value.isascii() else " in ASCII")
    if key in ("target", "as_operator") and isinstance(value, str) and "__" in value:
        return f"{key} {value[:120]!r} reaches through a dunder attribute"
    if key in ("target", "as_operator") and isinstance(value, str) and not value.isascii():
        return f"{key} {value[:120]!r} is not ASCII"
    if key in ("as_int", "as_float", "as_bool") and not isinstance(value, (bool, int, float, list, dict)) \
            and not (key == "as_float" and value in NON_FINITE):
        return f"{key} holds {str(value)[:80]!r}, no number"
    if key == "as_string" and isinstance(value, str) and any(c in value for c in "'\\"):
        return f"the string {value[:80]!r} holds a quote or a backslash (torch writes it into source)"
    if key not in _FREE_TEXT and isinstance(value, str) and any(c in value for c in '\r\n"'):
        return f"{key} {value[:80]!r} holds a quote or a line break"
    if key in _VALUE_TABLES and isinstance(value, dict):
        bad = [k for k in value if not _identifier(k)]
        return f"the name {bad[0]!r} {_not_a_name(bad[0])}" if bad else ""
    if key in ("in_spec", "out_spec") and isinstance(value, str):
        return _spec_refused(value, key)
    return ""


def _spec_refused(text: str, key: str) -> str:
    """Why a tree spec (a JSON string in the program's JSON) would import a module or inject a
    name when torch reads it ("" when it would not)."""
    try:
        spec = json.loads(text)
    except ValueError:
        return f"its {key} does not parse"
    stack = [spec]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if "__enum__" in value:
                return f"its {key} names an enum of the module {str(value.get('fqn'))[:80]!r}"
            if value.get("type") == "collections.defaultdict":
                return f"its {key} names a defaultdict, whose factory's module torch imports"
            if key == "in_spec" and value.get("type") == "builtins.dict" and isinstance(value.get("context"), str):
                with contextlib.suppress(ValueError):
                    keys = json.loads(value["context"])
                    if isinstance(keys, list) and not all(_identifier(k) for k in keys):
                        return f"its in_spec's argument names {keys!r} are not identifiers"
            if isinstance(value.get("context"), str):
                with contextlib.suppress(ValueError):
                    stack.append(json.loads(value["context"]))
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return ""


def vetted(path: Path):
    """(source for torch.export.load, the devices the program was saved on besides the CPU):
    the archive's entries, read once, checked, and written again for torch as checked (a
    second entry of the same name, which Python's zipfile and torch's reader do not pick
    alike, is refused; so is any program entry but models/model.json, names that are not
    identifiers, which torch.fx writes into the source it runs, and tree specs that name a
    module to import).
    Raises Refused naming an entry that would load native code (an AOTInductor library), a
    symbolic size that is more than arithmetic (sympy evaluates it as Python) or Unbounded (a
    number, power or nesting sympy could spend hours or all memory on), or a graph node
    calling anything but torch's and Python's operators. A program saved on a GPU has each
    device in its JSON (the weights' and constants' tensor metadata, the graph's values and
    device arguments) set to the CPU, as torch.export.passes' move_to_device_pass does to a
    loaded program: torch.export.load makes each weight on its saved device (it fails where
    there is none), and camface exports on the CPU."""
    data = path.read_bytes()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return io.BytesIO(data), set()  # torch.export.load says what it is
    devices: set[str] = set()
    calls = _SYMPY_CALLS | _torch_sympy_functions()
    changes = [0]

    def checked(value, where: str):
        if isinstance(value, dict):
            if value.keys() == {"type", "index"} and isinstance(value["type"], str) \
                    and value["type"] not in _NOT_MOVED:
                changes[0] += 1
                devices.add(value["type"] + ("" if value["index"] is None else f":{value['index']}"))
                return {"type": "cpu", "index": None}
            for key, item in value.items():
                if key == "metadata":
                    continue  # read as text (stack traces, module stacks), never as source
                if why := _name_refused(key, item):
                    raise Refused(f"{where}: {why}")
                if key == "expr_str" and isinstance(item, str) and (why := _expression_refused(item, calls)):
                    kind = Refused if why.startswith("is not arithmetic") else Unbounded
                    raise kind(f"{where} holds the symbolic size {item[:120]!r} (expr_str), which {why}")
                if key == "target" and isinstance(item, str) and "inputs" in value and not item.startswith(_CALLS):
                    raise Refused(f"{where}: a node calls {item[:120]}, which is not one of torch's or Python's "
                                   "operators")
            return {k: (v if k == "metadata" else checked(v, where)) for k, v in value.items()}
        if isinstance(value, list):
            return [checked(v, where) for v in value]
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**64:
            # a size's hint, a bound: sympy computes with them as with a size's literals
            raise Unbounded(f"{where} holds the number {str(value)[:40]}..., past 64 bits (sympy "
                            "computes with a size's hints and bounds)")
        return value

    with archive:
        names = [info.filename for info in archive.infolist()]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise Refused(f"it holds two entries named {twice}")
        programs = [n for n in names if "/models/" in f"/{n}"]
        if len(programs) > 1 or any(not n.endswith("models/model.json") for n in programs):
            raise Refused(f"it holds {', '.join(programs)[:200]} where torch.export.save writes one "
                           "models/model.json (torch.export.load reads every entry there, whatever its suffix)")
        for name in names:
            if "\0" in name or "\\" in name or ".." in name.split("/") or len(name) > 255:
                raise Refused(f"it holds an entry named {name[:80]!r}, which no saved program has")
            if "/data/aotinductor/" in f"/{name}" or name.lower().endswith(_NATIVE):
                raise Refused(f"it holds {name}, an AOTInductor build: native code that torch.export.load "
                              "would load")
        rewritten = {}
        for info in archive.infolist():
            if not info.filename.endswith(".json"):
                continue
            try:
                document = json.loads(archive.read(info))
            except (ValueError, UnicodeDecodeError):
                continue  # not the program's: torch.export.load reads it or not
            before = changes[0]
            if isinstance(document, dict) and document.get("guards_code"):
                # Python source that program.module() runs (its shape checks): camface checks
                # shapes itself and exports at sizes it chose, so they are dropped, not run
                document["guards_code"] = []
                changes[0] += 1
            if info.filename.endswith("_config.json") and isinstance(document.get("config"), dict):
                bad = next((k for k in document["config"] if not _dotted(k)), None)
                if bad is not None:
                    raise Refused(f"{info.filename}: the module path {bad[:80]!r} is not one"
                                  + ("" if bad.isascii() else " in ASCII"))
            document = checked(document, info.filename)
            if changes[0] > before:
                rewritten[info.filename] = json.dumps(document).encode()
        # written again from the entries read here, also when nothing changed: torch's zip
        # reader can find other entries than Python's in the same bytes (a second directory)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as copy:
            for info in archive.infolist():
                copy.writestr(zipfile.ZipInfo(info.filename, info.date_time),
                              rewritten[info.filename] if info.filename in rewritten else archive.read(info))
    buffer.seek(0)
    return buffer, devices
