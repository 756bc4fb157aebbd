"""The CAM graph on ONNX Runtime: probabilities and a heatmap for a batch of face crops, in
one call per frame. The graph's contract is `camface.graph_spec`.

Providers are tried in the order TensorRT, CUDA, CPU, and each is kept only when a session
created with it really runs on it (`get_providers()`); ONNX Runtime otherwise falls back
quietly, so the check is the session itself, not `get_available_providers()`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from camface import graph_spec as spec
from camface import model_kinds
from camface.errors import ModelError

log = logging.getLogger(__name__)

TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
DEVICE_CHAINS = {
    "auto": (TENSORRT, CUDA, CPU),
    "tensorrt": (TENSORRT, CUDA, CPU),
    "cuda": (CUDA, CPU),
    "cpu": (CPU,),
}
PROVIDER_DEVICES = {TENSORRT: "tensorrt", CUDA: "cuda", CPU: "cpu"}  # --device that asks for each
MAX_BATCH = 32  # the contract's dynamic batch range is 1..32


class _Quiet:
    """`with quiet(ort, provider):` sys.stdout swapped for a StringIO and, for a GPU provider,
    ONNX Runtime's default logger set to fatal only, while a session is made. Both belong to the
    process: the first thread in swaps them and the last one out puts them back. (Each thread
    putting back what it found left sys.stdout a StringIO for good when two overlapped: two
    pipelines loading, two methods' first calls; every later print was lost.) Threads still make
    their sessions side by side: a TensorRT engine build takes minutes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._stdout: Any = None

    @contextlib.contextmanager
    def __call__(self, ort: Any, provider: str) -> Iterator[None]:
        with self._lock:
            if not self._inside:
                self._stdout, sys.stdout = sys.stdout, io.StringIO()
            self._inside += 1
            if provider != CPU:
                ort.set_default_logger_severity(4)
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if not self._inside:
                    sys.stdout = self._stdout
                    ort.set_default_logger_severity(2)


_quiet = _Quiet()


def _provider_options(provider: str, image_shape: str) -> dict:
    if provider != TENSORRT:
        return {}
    # One engine for every batch size 1..32 (without profiles TensorRT rebuilds per new N),
    # cached on disk so the next start does not rebuild it.
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(Path(tempfile.gettempdir()) / "camface-trt-cache"),
        "trt_profile_min_shapes": f"{spec.INPUT_IMAGE}:1x{image_shape},{spec.INPUT_CLASS}:1",
        "trt_profile_opt_shapes": f"{spec.INPUT_IMAGE}:4x{image_shape},{spec.INPUT_CLASS}:4",
        "trt_profile_max_shapes": f"{spec.INPUT_IMAGE}:{MAX_BATCH}x{image_shape},{spec.INPUT_CLASS}:{MAX_BATCH}",
    }


def reads(node) -> list[str]:
    """The tensors `node` reads: its inputs, and what the graphs in its attributes (a Loop's
    body: the gradient-free methods' chunks) read from the outer scope."""
    names = [x for x in node.input if x]
    for attribute in node.attribute:
        for body in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            made = {o for n in body.node for o in n.output} | {i.name for i in body.input} | \
                {i.name for i in body.initializer}
            names += [x for inner in body.node for x in reads(inner) if x not in made]
    return names


def upstream(producer: dict, tensors) -> set[str]:
    """Every tensor that `tensors` (names) are computed from, themselves included; `producer`
    maps a tensor's name to the node that makes it."""
    found, stack = set(), list(tensors)
    while stack:
        tensor = stack.pop()
        if tensor not in found:
            found.add(tensor)
            if tensor in producer:
                stack.extend(reads(producer[tensor]))
    return found


def prune(model_bytes: bytes, outputs) -> bytes:
    """The CAM graph (serialised ONNX) pruned to `outputs` (names): the nodes and initializers
    they need, subgraphs' outer-scope reads included; inputs and metadata kept. Raises
    ImportError without the `onnx` package."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    needed = upstream({o: n for n in graph.node for o in n.output}, outputs)
    kept = [n for n in graph.node if any(o in needed for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept)
    kept_init = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)
    kept_out = [o for name in outputs for o in graph.output if o.name == name]
    del graph.output[:]
    graph.output.extend(kept_out)
    kept_info = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return model.SerializeToString()


def check_graph_path(path: Path) -> None:
    """ModelError naming `path` when it cannot be a CAM graph whatever it holds, said before a
    byte of it is read (`camface batch` asks before its inputs are probed): not a regular file
    (a folder is said to be one, not "not found"), or named as a video."""
    from camface.outputs import check_model_file

    check_model_file(path, "CAM graph")
    model_kinds.check_not_a_video(path)


class CamGraph:
    """A loaded CAM graph.

    path: the .onnx file. device: auto, cpu, cuda or tensorrt. threads: intra-op threads for
    the CPU provider (1 leaves the other core to the detector in the live loop; 0 = ORT's default).
    Attributes: info (GraphInfo from the metadata), provider (the provider that runs it).
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 1):
        path = Path(path)
        check_graph_path(path)
        try:
            model_bytes = path.read_bytes()
        except OSError as exc:  # no read permission: was a PermissionError traceback
            raise ModelError(f"cannot read CAM graph {path}: {exc.strerror or exc}") from exc
        if not model_bytes:
            raise ModelError(model_kinds.not_a_graph(path))
        self._load(model_bytes, path, device, threads)

    @classmethod
    def from_bytes(cls, model: bytes, name: str | Path = "<memory>", device: str = "auto",
                   threads: int = 1, contract: bool = True) -> "CamGraph":
        """A CamGraph from a serialised ONNX model (bytes, or an onnx.ModelProto); `name` is
        the `path` named in messages. contract=False skips the output check, for a graph
        pruned to fewer outputs on purpose (the bench's forward-only graph): only `session`
        is meant to be used then."""
        if not isinstance(model, (bytes, bytearray)):
            model = model.SerializeToString()
        graph = cls.__new__(cls)
        graph._load(bytes(model), Path(name), device, threads, contract)
        return graph

    def _load(self, model_bytes: bytes, path: Path, device: str, threads: int, contract: bool = True) -> None:
        if device not in DEVICE_CHAINS:
            raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICE_CHAINS)}")
        import onnxruntime as ort

        self.path, self._ort, self._model_bytes = path, ort, model_bytes
        self._by_method: dict[str, tuple] = {}  # method -> (session, its input names); see _session_for
        # method -> its lock: one session per method when threads call it first together, while
        # other methods' sessions are made side by side (guarded by `_locks`)
        self._making: dict[str, threading.Lock] = {}
        self._locks = threading.Lock()
        self._options = ort.SessionOptions()
        self._options.log_severity_level = 3
        if threads:
            self._options.intra_op_num_threads = threads
            self._options.inter_op_num_threads = 1
        self._session = self._create(CPU, "1x1x1")  # validates the file before any GPU work
        self.info = (self._read_info(self._session) if contract else
                     spec.GraphInfo.from_metadata(self._session.get_modelmeta().custom_metadata_map))
        self.provider = CPU
        self._select_provider(device)
        log.info("CAM graph %s on %s", self.path.name, self.provider)

    # -------------------------------------------------------------- loading and checks

    def _create(self, provider: str, image_shape: str, model_bytes: bytes | None = None):
        """A session on `provider` (of `model_bytes`, default the graph); image_shape "HxWxC"
        sizes TensorRT's optimisation profile."""
        options = _provider_options(provider, image_shape)
        providers = [(provider, options)] if provider == CPU else [(provider, options), CPU]
        if provider == TENSORRT and CUDA in self._ort.get_available_providers():
            providers.insert(1, CUDA)  # nodes TensorRT does not take run on CUDA, not the CPU
        try:
            # A provider that cannot load prints to stdout and logs errors before ORT falls
            # back; the check after creation is what decides, so keep the noise away.
            with _quiet(self._ort, provider):
                return self._ort.InferenceSession(model_bytes or self._model_bytes, self._options,
                                                  providers=providers)
        except Exception as exc:  # ORT raises several unrelated types for a bad file
            if provider != CPU:
                raise
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "INVALID_PROTOBUF" in first_line or "No graph was found" in first_line:
                # a text file, a Keras classifier (the bundled .hdf5 sits beside its graph), a BlazeFace .tflite
                raise ModelError(model_kinds.not_a_graph(self.path, model_kinds.onnx_runtime_reason(exc))) from exc
            raise ModelError(f"cannot load CAM graph {self.path}: {first_line}") from exc

    def _read_info(self, session) -> spec.GraphInfo:
        return spec.validate(self.path, {i.name: i.shape for i in session.get_inputs()},
                             {o.name: o.shape for o in session.get_outputs()},
                             session.get_modelmeta().custom_metadata_map,
                             types={i.name: i.type for i in session.get_inputs()})

    def _select_provider(self, device: str) -> None:
        available = set(self._ort.get_available_providers())
        for provider in DEVICE_CHAINS[device]:
            if provider == CPU:
                break
            if provider not in available:
                continue
            try:
                height, width = self.info.input_size
                session = self._create(provider, f"{height}x{width}x{self.info.channels}")
            except Exception as exc:  # a provider that fails to initialise: try the next one
                log.debug("%s failed to initialise: %s", provider, exc)
                continue
            if session.get_providers()[0] == provider:
                self._session, self.provider = session, provider
                return
        if device != "cpu" and device != "auto":
            log.warning("camface: device %r is not usable here; running the CAM graph on CPU", device)

    # -------------------------------------------------------------- running

    @property
    def model_bytes(self) -> bytes:
        """The serialised ONNX model this graph was loaded from."""
        return self._model_bytes

    @property
    def session(self):
        """The ONNX Runtime InferenceSession (for timing it alone)."""
        return self._session

    @property
    def methods(self) -> tuple[str, ...]:
        """Heatmap methods this graph offers, in menu order."""
        return spec.methods_of(self.info)

    def _session_for(self, method: str):
        """(session, input names) that `run` uses for `method`: the graph pruned to `probs` and
        that heatmap, made on first use. ONNX Runtime runs every node of a graph whatever
        outputs are asked for, so the whole graph would compute every heatmap of the registry
        on each call. Without the `onnx` package (it comes with camface's extras), or where
        pruning fails, the whole graph."""
        entry = self._by_method.get(method)  # made already: no lock on every frame's call
        if entry is not None:
            return entry
        with self._locks:
            making = self._making.setdefault(method, threading.Lock())
        with making:
            return self._by_method.get(method) or self._make_session(method)

    def _make_session(self, method: str):
        """`_session_for`'s entry for `method`, made and kept (under its lock in `_making`)."""
        session = self._session
        try:
            outputs = self._outputs(method)
            height, width = self.info.input_size
            pruned = self._create(self.provider, f"{height}x{width}x{self.info.channels}",
                                  prune(self._model_bytes, outputs))
            if pruned.get_providers()[0] == self.provider:
                session = pruned
        except ImportError:
            log.debug("no `onnx` package: every call computes every heatmap of %s", self.path.name)
        except Exception as exc:  # a graph onnx.utils cannot cut: run it whole
            log.debug("cannot prune %s to %s (%s): running it whole", self.path.name, method, exc)
        entry = self._by_method[method] = (session, tuple(i.name for i in session.get_inputs()))
        return entry

    def _outputs(self, method: str) -> tuple[str, ...]:
        """What `run_scores` asks for: probs, the heatmap unless "none", a gallery's similarity."""
        return ((spec.OUTPUT_PROBS,) + (() if method == "none" else (method,))
                + ((spec.OUTPUT_SIMILARITY,) if self.info.gallery else ()))

    def run(self, crops: np.ndarray, class_index: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
        """One call for all faces of a frame.

        crops: uint8 [N, H, W, C] in the graph's colour order, N in 1..32.
        class_index: int64 [N], class to explain per crop, -1 = the predicted class.
        method: a heatmap output name, or "none".
        Returns probs float32 [N, classes] and heatmaps float32 [N, h, w] (unnormalised, the
        graph's feature resolution; [N, 0, 0] for method "none").
        """
        probs, heatmaps, _ = self.run_scores(crops, class_index, method)
        return probs, heatmaps

    def run_scores(self, crops: np.ndarray, class_index: np.ndarray,
                   method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`run`, and a gallery graph's cosine similarities float32 [N, identities] as a third
        value (float32 [N, 0] for a classifier's graph), from the same call."""
        if method != "none" and method not in self.info.heatmaps:
            raise ModelError(f"{self.path.name} has no {method!r} heatmap (it has {', '.join(self.methods)})"
                             + (f": {self.info.cam_unavailable_reason}" if method == "cam" else ""))
        names = list(self._outputs(method))
        feeds = {spec.INPUT_IMAGE: crops, spec.INPUT_CLASS: np.asarray(class_index, np.int64)}
        session, inputs = self._session_for(method)
        result = dict(zip(names, session.run(names, {name: feeds[name] for name in inputs})))
        probs = result[spec.OUTPUT_PROBS]
        if probs.shape[1] != len(self.info.labels):
            raise ModelError(f"{self.path}: {len(self.info.labels)} labels in the metadata but the graph "
                             f"returns {probs.shape[1]} class probabilities")
        heatmaps = result[method] if method != "none" else np.zeros((len(crops), 0, 0), np.float32)
        similarity = result.get(spec.OUTPUT_SIMILARITY, np.zeros((len(crops), 0), np.float32))
        return probs, heatmaps, similarity
