"""The three Ray Data stages, one callable class each (Ray Data builds one per actor; actors
never run a `with` block, so resources open in `__init__` and close in `close`).

Unit of work: a whole video or a segment of one (`camface.batch.segments`: chosen from the
archive and the actors). The first stage gets a unit's row; later rows are {"video": id,
"payload": bytes}: the payload is a pickled dict of ragged per-frame arrays (faces per frame
vary), which Arrow tensor columns cannot hold.

  Detect  (CPU)          decode every frame, BlazeFace detection, crop (`crop_for_graph`)
  Explain (GPU-capable)  the CAM graph on the video's crops, in calls of up to 32 crops across
                         frames (`run_graph_across_frames`)
  Render  (CPU)          decode again (frames are not shipped between nodes), `frame_result`
                         (+ `Smoother.update` with --smooth), `Renderer.annotate`, `VideoSink`,
                         the Parquet rows, the video's record (a segment: its parts and part
                         record; the driver joins them, `segments.finish`)

A failure inside a stage (a corrupt file) travels on as {"ok": False, "error": ...} and is
recorded by Render as a failed video: one bad file never stops the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import time
import traceback

import numpy as np

log = logging.getLogger(__name__)


def pack(video: str, payload: dict) -> dict:
    return {"video": video, "payload": pickle.dumps(payload, protocol=5)}


def unpack(row: dict) -> dict:
    return pickle.loads(row["payload"])


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _single_threaded_opencv() -> None:
    """As the live loop does (`opencv_single_threaded`): the actors already run side by side,
    one per core; OpenCV's own worker threads only add contention. An actor owns its process."""
    import cv2

    cv2.setNumThreads(1)


def _watch_owner(owner: dict | None) -> None:
    """This actor's process ends once its run no longer owns OUT_DIR (its driver was killed,
    or a --resume took over): orphans neither write nor hold CPUs (`camface.batch.owner`)."""
    from camface.batch.owner import Owner

    if owner is not None:
        Owner.of(owner).watch()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Detect:
    """{video, path} -> payload with fps, frames, faces per frame, dropped per frame, crops
    uint8 [total faces, H, W, C] (the graph's input), counts int [frames] (faces kept).

    With `detect_every` N > 1 the detector runs on frames 0, N, 2N, ... of the video and boxes
    are carried in between (camface.realtime.carry); a segment starting at frame s decodes from
    the key frame at or before s and keeps frames s.. only, so its boxes are the whole video's
    (and live's)."""

    def __init__(self, config, info=None, owner: dict | None = None):
        from camface.api import face_detector
        from camface.realtime.graph import CamGraph

        _watch_owner(owner)
        _single_threaded_opencv()
        self.info = info or CamGraph(config.model, "cpu").info  # input size and colour order of the crops
        self.margin, self.max_faces = config.margin, config.max_faces
        self._opened = contextlib.ExitStack()
        self.detector = self._opened.enter_context(face_detector(config))
        self.detect_every = config.detect_every

    def __call__(self, row: dict) -> dict:
        from camface.batch.inputs import stamp
        from camface.batch.segments import Unit
        from camface.realtime.carry import BoxCarrier, every_for, keyframe
        from camface.realtime.explainer import crop_for_graph
        from camface.realtime.sources import VideoFileSource

        start = time.perf_counter()
        unit = Unit.from_row(row)
        out = {"path": unit.path, "key": unit.key, "unit": unit, "start": unit.start, "stop": unit.stop, "ok": True,
               "detect_node": _node(), "started_at": time.time()}
        try:
            out["source"] = stamp(unit.path)  # before reading: a file changed later is redone by --resume
            faces, dropped, crops = [], [], []
            carrier = BoxCarrier(self.detector, every_for(self.detect_every))
            first = keyframe(unit.start, carrier.every)
            with VideoFileSource(unit.path, first, unit.stop) as source:
                out["fps"] = source.info.fps
                for index, frame in enumerate(source, first):
                    found = carrier.detect(frame, index)
                    if index < unit.start:  # decoded only to carry the boxes into the segment
                        continue
                    kept, frame_crops, lost = crop_for_graph(frame, found, self.margin, self.max_faces, self.info)
                    faces.append(kept)
                    dropped.append(lost)
                    crops.append(frame_crops)
            if source.truncated:  # said on the video's record, in the report and on the driver
                out["incomplete"] = {"frames_announced": source.info.frames,
                                     "reason": f"file truncated or damaged: {source.truncation}"}
            out.update(frames=len(faces), faces=faces, dropped=dropped,
                       counts=np.array([len(f) for f in faces], np.int64),
                       crops=np.concatenate(crops) if crops else
                       np.zeros((0, *self.info.input_size, self.info.channels), np.uint8))
        except Exception as exc:  # recorded as a failed video by Render
            out.update(ok=False, error=_reason(exc), stage="detect")
            log.debug("detect failed on %s:\n%s", unit.path, traceback.format_exc())
        out["detect_s"] = time.perf_counter() - start
        return pack(row["video"], out)

    def __del__(self):
        opened = getattr(self, "_opened", None)
        if opened is not None:
            opened.close()


class Explain:
    """payload -> payload + probs float32 [total faces, classes], heatmaps float32 [total faces,
    h, w], class_index int64 [total faces], graph_calls, provider, graph_node."""

    def __init__(self, config, explained_class: int | None = None, owner: dict | None = None):
        from camface.api import load

        _watch_owner(owner)
        self._pipeline = load(config=config, cli=True)  # the graph on this node's device, the method checked
        self.graph, config = self._pipeline.graph, self._pipeline.config
        self.method, self.explained_class, self.smooth = config.method, explained_class, config.smooth

    def __call__(self, row: dict) -> dict:
        from camface.realtime.explainer import run_graph_scores, run_graph_smoothed

        out = unpack(row)
        out.update(provider=self.graph.provider, graph_node=_node(), threshold=self.graph.info.threshold,
                   saturated_below=self.graph.info.saturated_below)
        if not out["ok"]:
            return pack(row["video"], out)
        start = time.perf_counter()
        try:
            crops = out["crops"]
            if self.smooth and self.explained_class is None:  # the smoothed class, as live chooses it
                (out["probs"], out["heatmaps"], out["similarity"], out["class_index"],
                 out["graph_calls"]) = run_graph_smoothed(self.graph, crops, out["faces"], self.method, self.smooth)
            else:
                class_index = np.full(len(crops), -1 if self.explained_class is None else self.explained_class,
                                      np.int64)
                out["probs"], out["heatmaps"], out["similarity"], out["graph_calls"] = run_graph_scores(
                    self.graph, crops, class_index, self.method)
                out["class_index"] = class_index
        except Exception as exc:
            out.update(ok=False, error=_reason(exc), stage="graph")
        out["graph_s"] = time.perf_counter() - start
        return pack(row["video"], out)

    def __del__(self):
        pipeline = getattr(self, "_pipeline", None)
        if pipeline is not None:
            pipeline.close()


class Render:
    """payload -> the unit's outputs in out_dir (annotated video, Parquet rows, record; for a
    segment its parts and part record); returns a small row for the driver: {video, unit (the
    unit's row as JSON), record (JSON)}."""

    def __init__(self, out_dir: str, record: bool, config, explained_class: int | None, labels: tuple[str, ...],
                 settings: dict | None = None, owner: dict | None = None):
        from camface.batch.owner import Owner
        from camface.batch.state import Outputs
        from camface.realtime.render import Renderer

        _watch_owner(owner)
        _single_threaded_opencv()
        self.outputs = Outputs(out_dir, Owner.of(owner))  # files published only while the run owns OUT_DIR
        self.record = record
        self.renderer = Renderer.from_config(config)
        self.method, self.explained_class, self.labels = config.method, explained_class, tuple(labels)
        self.smooth, self.settings = config.smooth, settings or {}

    def __call__(self, row: dict) -> dict:
        from camface.batch.owner import Superseded
        from camface.batch.segments import part_paths
        from camface.batch.state import write_video_outputs

        out = unpack(row)
        unit = out.pop("unit")
        out["render_node"] = _node()
        start = time.perf_counter()
        paths = None if unit.whole else part_paths(self.outputs, unit)
        out["settings"] = self.settings  # a resume keeps the video or part only under the same options
        if paths is not None:
            paths["record"].parent.mkdir(parents=True, exist_ok=True)
        if out["ok"]:
            try:
                write_video_outputs(self.outputs, row["video"], out, self.renderer if self.record else None,
                                    self.method, self.explained_class, self.labels, self.smooth, paths)
            except Superseded:
                raise  # no record either
            except Exception as exc:
                out.update(ok=False, error=_reason(exc), stage="render")
        out["render_s"] = time.perf_counter() - start
        out["finished_at"] = time.time()
        record = self.outputs.write_record(row["video"], out, self.labels,
                                           None if paths is None else paths["record"])
        return {"video": row["video"], "unit": json.dumps(unit.row()), "record": json.dumps(record)}


class Whole:
    """All three stages in one actor, one unit at a time (when the graph has no GPU to go to,
    moving a video's crops between processes buys nothing)."""

    def __init__(self, detect: dict, explain: dict, render: dict):
        start = time.perf_counter()
        self.explain = Explain(**explain)
        self.detect, self.render = Detect(**detect, info=self.explain.graph.info), Render(**render)
        self.init_s = time.perf_counter() - start

    def __call__(self, row: dict) -> dict:
        return self.render(self.explain(self.detect(row)))
