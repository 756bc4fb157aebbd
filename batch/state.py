"""OUT_DIR's layout, atomic writes, and one record per finished video.

  OUT_DIR/videos/<id>.mp4        annotated video (--record)
  OUT_DIR/rows/<id>.parquet      its rows (one per face per frame; `camface.batch.rows`)
  OUT_DIR/state/<id>.json        the video's record: done or failed (with the reason), counts; its
                                 key and path as its rows say them (`camface.batch.rows`); its
                                 video_file and rows_file from OUT_DIR (`Outputs.file` reads them)
  OUT_DIR/state/<id>.npz         per explained class: sum and count of normalised heatmaps and of crops
  OUT_DIR/parts/<id>/            a segmented video's parts while it is in work (`camface.batch.segments`)
  OUT_DIR/summary.json, report.md, report/*.png   (camface.batch.report)
  OUT_DIR/.camface-run.lock, .camface-run.json    the run that owns OUT_DIR (camface.batch.owner)

Every file is written under a temporary name starting with "." (which Parquet readers skip)
and renamed into place (`camface.outputs.replace_whole`: an error names the file, never its
temporary one, and leaves the earlier file whole), the record last: a video counts as finished
only when its record exists, so a task that Ray retries, or a run killed half-way, never leaves
a duplicate or a half-written file behind, and `--resume` redoes exactly the videos without a
"done" record.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from camface.errors import OutputError
from camface.outputs import left_beside, replace_whole

DONE, FAILED = "done", "failed"
_ID = re.compile(r".+-[0-9a-f]{8}")  # a video's id (`camface.batch.inputs.video_id`)


class Outputs:
    """Paths under OUT_DIR (see the module doc). owner: the run that owns OUT_DIR
    (`camface.batch.owner.Owner`); given, every file is published only while it still does."""

    def __init__(self, out_dir: str | Path, owner=None):
        self.root = Path(out_dir)
        self.owner = owner
        self.videos, self.rows, self.state = self.root / "videos", self.root / "rows", self.root / "state"
        self.parts = self.root / "parts"
        self.used = True  # OUT_DIR held a state folder before this run (`drop_unrecorded`)

    def check(self) -> None:
        """Raise Superseded unless this run still owns OUT_DIR (asked before each file is
        renamed into place: a worker of a killed driver publishes nothing)."""
        if self.owner is not None:
            self.owner.check()

    def write(self, final: Path, write) -> None:
        """`write(tmp)` a temporary file beside `final`, then rename it into place if this run
        still owns OUT_DIR (`camface.outputs.replace_whole`: OutputError naming `final` when it
        cannot be written, the earlier file kept; no temporary file left behind either way)."""
        replace_whole(final, write, self.check)

    def make(self) -> None:
        for folder in (self.videos, self.rows, self.state):
            folder.mkdir(parents=True, exist_ok=True)

    def video(self, video_id: str) -> Path:
        return self.videos / f"{video_id}.mp4"

    def parquet(self, video_id: str) -> Path:
        return self.rows / f"{video_id}.parquet"

    def record_path(self, video_id: str) -> Path:
        return self.state / f"{video_id}.json"

    def sums_path(self, video_id: str) -> Path:
        return self.state / f"{video_id}.npz"

    def read_record(self, video_id: str) -> dict | None:
        try:
            return read_json(self.record_path(video_id))
        except (OSError, ValueError):
            return None

    def records(self) -> dict[str, dict]:
        found = {}
        if self.state.is_dir():
            for path in sorted(self.state.glob("[!.]*.json")):
                try:
                    found[path.stem] = read_json(path)
                except ValueError:
                    continue
        return found

    def relative(self, path: str | Path) -> str:
        """A file of OUT_DIR as a record names it: its path from OUT_DIR ("rows/<id>.parquet"),
        which a move of OUT_DIR keeps."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:  # not under OUT_DIR: as it is
            return str(path)

    def file(self, named: str) -> Path:
        """The file a record's `video_file` / `rows_file` names, under OUT_DIR as it is now: a path
        from OUT_DIR (`relative`), or an absolute one an earlier camface wrote, into OUT_DIR where
        it was then (OUT_DIR's own folders are found in it: videos/, rows/, parts/<id>/)."""
        path = Path(named)
        if not path.is_absolute():
            return self.root / path
        for depth in (2, 3):  # videos/<id>.mp4, rows/<id>.parquet; parts/<id>/<segment>.<suffix>
            if len(path.parts) > depth and path.parts[-depth] in ("videos", "rows", "parts"):
                return self.root.joinpath(*path.parts[-depth:])
        return path

    def clean_partials(self) -> int:
        """Remove temporary files a killed run left behind; returns how many."""
        removed = 0
        parts = [p for p in self.parts.iterdir() if p.is_dir()] if self.parts.is_dir() else []
        for folder in (self.root, self.root / "report", self.videos, self.rows, self.state, *parts):
            # camface.outputs.beside's names, and (".*.tmp*") those of runs of camface before it
            for path in [*folder.glob(".*.tmp*"), *left_beside(folder)] if folder.is_dir() else ():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def drop_unrecorded(self, inputs=()) -> int:
        """Remove the outputs (annotated video, rows, class sums) of each video without a record:
        a run killed after renaming them into place, before writing its record (written last), left
        them. The video is not finished, and its rows would lie in OUT_DIR/rows beside finished
        ones for good when it is not among a later run's inputs. A record that cannot be read keeps
        them, and so does a name that is not a video's id, and a file among `inputs` (this run's
        videos: one in OUT_DIR/videos named like an id, e.g. clip-20240101.mp4, is the user's).
        Nothing goes from a folder no camface batch run has used (`used`: no state folder before
        this run; `-o` pointed at a folder of the user's own with a videos/ sub-folder). Returns
        how many files went."""
        if not self.used:
            return 0
        recorded = {path.stem for path in self.state.glob("[!.]*.json")} if self.state.is_dir() else set()
        named = {Path(path).resolve() for path in inputs}
        removed = 0
        for folder, suffix in ((self.videos, "mp4"), (self.rows, "parquet"), (self.state, "npz")):
            for path in folder.glob(f"[!.]*.{suffix}") if folder.is_dir() else ():
                if _ID.fullmatch(path.stem) and path.stem not in recorded and path.resolve() not in named:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def write_record(self, video_id: str, out: dict, labels: tuple[str, ...], path: Path | None = None) -> dict:
        """The video's record (done or failed) from a Render payload, written last; or, with
        `path`, a segment's part record. Returns it; when it cannot be written (OSError: a full
        disk) returns a failed record saying so, written nowhere."""
        record = {"video": video_id, "key": out.get("key", ""), "path": out["path"],
                  "status": DONE if out["ok"] else FAILED}
        if self.owner is not None:
            self.owner.check()  # before anything is removed, too
            record["run"] = self.owner.token  # which run wrote it
        if not out["ok"] and path is None:
            record.update(reason=out.get("error", "unknown"), stage=out.get("stage", ""))
            for stale in (self.video(video_id), self.parquet(video_id), self.sums_path(video_id)):
                stale.unlink(missing_ok=True)  # a failed redo leaves no older outputs behind
        elif path is None and "video_file" not in out:  # done without drawing (--no-record): an
            self.video(video_id).unlink(missing_ok=True)  # earlier run's video, of other options, goes
        for key in ("frames", "faces_total", "dropped_total", "fps", "graph_calls", "provider", "class_counts",
                    "unknown_faces", "detect_node", "graph_node", "render_node", "detect_s", "graph_s", "render_s",
                    "started_at", "finished_at", "start", "stop", "segments", "settings", "source",
                    "video_file", "rows_file"):
            if key in out:
                record[key] = out[key]
        for name in ("video_file", "rows_file"):  # OUT_DIR moved elsewhere still finds them (`file`)
            if name in record:
                record[name] = self.relative(record[name])
        if not out["ok"] and path is not None:
            record.update(reason=out.get("error", "unknown"), stage=out.get("stage", ""))
        if out["ok"] and out.get("incomplete"):
            record["incomplete"] = incomplete(out["incomplete"], out.get("frames", 0))
        try:
            write_json(path or self.record_path(video_id), record, self.check)
        except (OSError, OutputError) as exc:  # a full disk: no record, so the unit is not finished;
            from camface.batch.owner import Superseded  # the driver says why

            if isinstance(exc, Superseded):  # an OutputError too: this run lost OUT_DIR, no record at all
                raise
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            return {"video": video_id, "key": out.get("key", ""), "path": out["path"], "status": FAILED,
                    "stage": "record",
                    "reason": f"cannot write its record {path or self.record_path(video_id)}: "
                              f"{getattr(cause, 'strerror', None) or cause}"}
        return record


def incomplete(found: dict, frames_read: int) -> dict:
    """A record's "incomplete" entry: frames the file announces (None: it does not say), frames
    read, and why it ended early."""
    return {"frames_announced": found.get("frames_announced"), "frames_read": int(frames_read),
            "reason": found.get("reason", "file truncated or damaged")}


def describe_incomplete(record: dict) -> str:
    """'read 17 of 60 announced frames (file truncated or damaged: ...)' for the driver and the report."""
    entry = record["incomplete"]
    of = f" of {entry['frames_announced']} announced" if entry.get("frames_announced") else ""
    return f"read {entry['frames_read']}{of} frames ({entry['reason']})"


def read_json(path: Path):
    """A record, part record or saved split of OUT_DIR (OSError, ValueError as reading and
    json.loads raise them), its settings as this camface writes them (`upgraded`)."""
    value = json.loads(Path(path).read_text())
    if isinstance(value, dict) and isinstance(value.get("settings"), dict):
        value["settings"] = upgraded(value["settings"])
    return value


def upgraded(settings: dict) -> dict:
    """Settings an earlier camface wrote, naming the model by its path, size and modification
    time, with the model named as now (`BatchJob.model_digest`): by the sha256 of that file if
    it is still there with that size and time (the model that camface would have kept), else by
    its path (another model: what they made is done again, as that camface did)."""
    from camface.batch.inputs import stamp

    if "model_size" not in settings and "model_mtime_ns" not in settings:
        return settings
    settings = dict(settings)
    size, mtime_ns = settings.pop("model_size", None), settings.pop("model_mtime_ns", None)
    path = str(settings.get("model"))
    if stamp(path) == {"size": size, "mtime_ns": mtime_ns}:
        settings["model"] = _digest(path, size, mtime_ns) or path
    return settings


@lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str | None:
    """"sha256:<hex>" of the file at `path`, which has that size and modification time (the
    cache's key: every record of a run names one model); None when it cannot be read."""
    from camface.hashing import sha256_file

    try:
        return f"sha256:{sha256_file(path)}"
    except OSError:
        return None


def write_json(path: Path, value, before_rename=None) -> None:
    """`value` as JSON at `path`, whole or not at all (`camface.outputs.replace_whole`, which
    runs `before_rename`: `Outputs.check`)."""
    replace_whole(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2)), before_rename)


def write_video_outputs(outputs: Outputs, video_id: str, out: dict, renderer, method: str,
                        explained_class: int | None, labels: tuple[str, ...], smooth: float = 0.0,
                        paths: dict | None = None) -> None:
    """Render stage body: the annotated video (when `renderer`), the rows, the class sums, of
    a whole video or (with `paths`: `segments.part_paths`) of one segment, frames numbered from
    out["start"]. smooth: the live loop's smoothing, run over the frames in order (a whole video).
    Adds frames / faces_total / dropped_total / class_counts / files to `out`, and on a gallery
    graph unknown_faces (faces whose best similarity is below its threshold)."""
    from camface.batch.rows import build_rows, write_parquet
    from camface.methods import normalize
    from camface.realtime.explainer import frame_result
    from camface.realtime.smooth import Smoother

    counts = out["counts"]
    ends = np.cumsum(counts)
    starts = ends - counts
    first = out.get("start", 0)
    similarity = out.get("similarity")  # a gallery graph's, with its threshold
    results = [frame_result(first + i, out["faces"][i], out["probs"][starts[i]:ends[i]],
                            out["heatmaps"][starts[i]:ends[i]], out["class_index"][starts[i]:ends[i]],
                            out["dropped"][i], method, explained_class, labels, out["provider"],
                            similarity=None if similarity is None else similarity[starts[i]:ends[i]],
                            threshold=out.get("threshold"), saturated_below=out.get("saturated_below"))
               for i in range(out["frames"])]
    if smooth:
        smoother = Smoother(smooth)
        results = [smoother.update(result) for result in results]
    if renderer is not None and results:  # a segment past the file's real end has none
        video = outputs.video(video_id) if paths is None else paths["video"]
        outputs.write(video, lambda tmp: _write_video(tmp, out, results, renderer))
        out["video_file"] = str(video)
    table = build_rows(video_id, out["path"], out["fps"], results, out.get("key", ""))
    final = outputs.parquet(video_id) if paths is None else paths["rows"]
    outputs.write(final, lambda tmp: write_parquet(table, tmp))
    out["rows_file"] = str(final)
    # Per explained class: normalised heatmaps (display normalisation, [0, 1]) and crops, summed.
    classes = len(labels)
    explained = np.array([p.explained for r in results for p in r.predictions], np.int64)
    crops = out["crops"]  # uint8, summed in float64 below without a float64 copy of them all (8x their size)
    heat = (np.stack([normalize(p.heatmap, method) for r in results for p in r.predictions]).astype(np.float64)
            if len(explained) and method != "none" else None)
    sums = {"count": np.bincount(explained, minlength=classes)}
    sums["crop_sum"] = np.stack([crops[explained == k].sum(axis=0, dtype=np.float64) for k in range(classes)])
    if heat is not None:
        sums["heatmap_sum"] = np.stack([heat[explained == k].sum(axis=0) for k in range(classes)])
    final = outputs.sums_path(video_id) if paths is None else paths["sums"]
    outputs.write(final, lambda tmp: np.savez(tmp, **sums))
    out["frames"] = int(out["frames"])
    out["faces_total"] = int(counts.sum())
    out["dropped_total"] = int(np.sum(out["dropped"]))
    out["class_counts"] = {labels[k]: int(n) for k, n in enumerate(sums["count"]) if n}
    if out.get("threshold") is not None:  # a gallery graph: faces below its threshold, named unknown
        out["unknown_faces"] = sum(p.is_unknown(r.threshold) for r in results for p in r.predictions)


def _write_video(path: Path, out: dict, results, renderer) -> None:
    """Decode the video again, draw each frame's result, encode at `path` with the live loop's sink."""
    from camface.errors import SourceError
    from camface.realtime.sinks import VideoSink
    from camface.realtime.sources import VideoFileSource

    written = 0
    with VideoFileSource(out["path"], out.get("start", 0), out.get("stop")) as source, \
            VideoSink(path, out["fps"], overwrite=True) as sink:
        for frame, result in zip(source, results):
            renderer.annotate(frame, result, hud=False)  # no HUD: rolling fps means nothing here
            sink.write(frame)
            written += 1
    if written != len(results):
        raise SourceError(f"{out['path']}: {written} frames decoded for drawing, {len(results)} detected")
