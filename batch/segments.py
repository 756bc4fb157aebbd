"""The unit of work: a whole video, or a segment of one (frames start..stop-1), and putting a
segmented video's parts back together.

Why segments, and when (benchmarks/RESULTS.md, "unit of work"): one video runs on one actor
at a time, so an archive with fewer videos than detection actors (one long interview on a
16-core node) leaves actors idle; cut into segments it keeps every actor busy. Where videos
already outnumber the actors, whole videos are faster: a segment pays a seek, an encoder start
and a concatenation. The automatic rule (`split`): aim at two units per detection actor (so
the last ones finish close together): segments of at most total frames / (2 x actors), never
below MIN_SEGMENT_FRAMES, so only videos longer than a fair share are cut; with `--smooth`
whole videos always, because smoothing carries each face's state from one frame to the next
through the whole video.

Frames of a segment are found by seeking (`VideoFileSource(path, start, stop)`, checked), and
detection is per frame (BlazeFace in VIDEO mode keeps no state between frames: checked), so
segments give exactly the rows of the whole video. Each segment's Render writes its parts under
OUT_DIR/parts/<video id>/ (atomically, with a part record written last); when all of a video's
parts are there, the driver concatenates them (`finish`): the rows table, the class sums, and
the video by copying its H.264 packets (no re-encoding) into one fragmented MP4.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from camface.batch.state import read_json

log = logging.getLogger(__name__)

MIN_SEGMENT_FRAMES = 300  # 10 s at 30 fps: seek + encoder start + concat stay under ~1% of it
UNITS_PER_ACTOR = 2


@dataclass(frozen=True)
class Unit:
    """One row of the pipeline. stop None: to the end of the file. segments 1: a whole video.
    key: the video's (`camface.batch.inputs.Video.key`)."""

    video: str
    path: str
    segment: int = 0
    segments: int = 1
    start: int = 0
    stop: int | None = None
    key: str = ""

    @property
    def whole(self) -> bool:
        return self.segments == 1

    @property
    def name(self) -> str:
        """The part files' stem: segment and range, so a resume with other segments finds none."""
        return f"{self.segment:05d}-{self.start}-{'end' if self.stop is None else self.stop}"

    def row(self) -> dict:
        row = asdict(self)
        row["stop"] = -1 if self.stop is None else self.stop  # Arrow: one integer type per column
        return row

    @classmethod
    def from_row(cls, row: dict) -> "Unit":
        stop = int(row["stop"])
        return cls(row["video"], row["path"], int(row["segment"]), int(row["segments"]), int(row["start"]),
                   None if stop < 0 else stop, row.get("key", ""))


def segment_frames_for(frames: list[int], actors: int) -> int:
    """The automatic segment length: two units per actor over the archive's frames, at least
    MIN_SEGMENT_FRAMES."""
    total = sum(frames)
    return max(MIN_SEGMENT_FRAMES, math.ceil(total / max(1, actors * UNITS_PER_ACTOR)))


def split(videos, frames: list[int], actors: int, segment_frames: int | None, smooth: bool) -> tuple[list[Unit], str]:
    """The units for `videos` (with the frame counts their files announce, 0 when unknown)
    and why. segment_frames: None = automatic, 0 = whole videos, N = segments of at most N
    frames (a file that announces no frame count stays whole)."""
    if smooth:
        return ([Unit(v.id, v.path, key=v.key) for v in videos],
                "whole videos: --smooth carries state from frame to frame")
    if segment_frames == 0:
        return [Unit(v.id, v.path, key=v.key) for v in videos], "whole videos (--segment-frames 0)"
    length = segment_frames or segment_frames_for(frames, actors)
    units = []
    for video, count in zip(videos, frames):
        # segments of at most `length` frames; automatic: never below MIN_SEGMENT_FRAMES
        pieces = math.ceil(count / length) if segment_frames else min(math.ceil(count / length),
                                                                       count // MIN_SEGMENT_FRAMES)
        pieces = max(1, pieces)
        if pieces == 1:
            units.append(Unit(video.id, video.path, key=video.key))
            continue
        bounds = [round(k * count / pieces) for k in range(pieces + 1)]  # near-equal pieces
        for k in range(pieces):
            stop = None if k == pieces - 1 else bounds[k + 1]  # the last runs to the real end
            units.append(Unit(video.id, video.path, k, pieces, bounds[k], stop, video.key))
    cut = len({u.video for u in units if not u.whole})
    how = "--segment-frames" if segment_frames else f"automatic: {UNITS_PER_ACTOR} units per actor, " \
                                                    f">= {MIN_SEGMENT_FRAMES} frames"
    shortest = length if segment_frames else max(length, 2 * MIN_SEGMENT_FRAMES - 1)  # longest left whole
    reason = (f"{len(units)} units: {cut} of {len(videos)} videos cut into segments of ~{length} frames ({how})"
              if cut else f"whole videos (none longer than {shortest} frames; {how})")
    return units, reason


# ---------------------------------------------------------------- parts and putting them together


def part_paths(outputs, unit: Unit) -> dict[str, Path]:
    folder = outputs.parts / unit.video
    return {kind: folder / f"{unit.name}.{suffix}"
            for kind, suffix in (("video", "mp4"), ("rows", "parquet"), ("sums", "npz"), ("record", "json"))}


def part_record(outputs, unit: Unit) -> dict | None:
    try:
        return read_json(part_paths(outputs, unit)["record"])
    except (OSError, ValueError):
        return None


def part_records(outputs) -> list[tuple[str, dict]]:
    """(video id, part record) of every part in OUT_DIR/parts/ (those that can be read)."""
    found = []
    for path in sorted(outputs.parts.glob("*/[0-9]*.json")) if outputs.parts.is_dir() else ():
        try:
            found.append((path.parent.name, read_json(path)))
        except (OSError, ValueError):
            continue
    return found


def done_before(outputs, unit: Unit, settings: dict) -> bool:
    """A segment whose parts an earlier run finished with the same `settings` (its part
    record says done and names them)."""
    from camface.batch.state import DONE

    from camface.batch.inputs import stamp

    record = {} if unit.whole else part_record(outputs, unit) or {}
    return (record.get("status") == DONE and record.get("settings") == settings
            and record.get("source") == stamp(unit.path))  # and the file is the one it read


def keep_splits(outputs, units: list[Unit], settings: dict) -> list[Unit]:
    """The units with each segmented video cut as an earlier run cut it, if that run saved
    its split (parts/<id>/split.json) with the same settings: the automatic split depends on
    the videos left and the actors, so a resume would otherwise cut elsewhere and redo every
    segment. Saves the split of each video cut now."""
    from camface.batch.state import write_json

    by_video: dict[str, list[Unit]] = {}
    for unit in units:
        by_video.setdefault(unit.video, []).append(unit)
    kept = []
    for video, parts in by_video.items():
        saved = outputs.parts / video / "split.json"
        try:
            earlier = read_json(saved)
        except (OSError, ValueError):
            earlier = None
        if earlier and earlier.get("settings") == settings and earlier.get("bounds"):
            bounds = earlier["bounds"]
            parts = [Unit(video, parts[0].path, k, len(bounds), start, stop, parts[0].key)
                     for k, (start, stop) in enumerate(bounds)]
        elif not parts[0].whole:
            saved.parent.mkdir(parents=True, exist_ok=True)
            write_json(saved, {"settings": settings, "bounds": [[u.start, u.stop] for u in parts]})
        kept.extend(parts)
    return kept


SUMMED = ("frames", "faces_total", "dropped_total", "graph_calls", "detect_s", "graph_s", "render_s")


def finish(outputs, units: list[Unit], labels: tuple[str, ...], record_video: bool) -> dict:
    """Put a segmented video's parts together into its final files and write its record
    (done, or failed with the first failed segment's reason); removes the parts. units: all
    segments of one video, in order, each with a part record."""
    from camface.batch.state import DONE

    parts = [part_record(outputs, u) for u in units]
    video, path = units[0].video, units[0].path
    out = {"path": path, "key": units[0].key, "ok": True}
    failed = next((p for p in parts if p is None or p["status"] != DONE), None)
    if failed is not None:
        out.update(ok=False, error=(failed or {}).get("reason", "a segment's outputs are missing"),
                   stage=(failed or {}).get("stage", "render"))
    elif any(p.get("source") != parts[0].get("source") for p in parts):
        out.update(ok=False, error=f"{path} changed while its segments were explained", stage="join")
    else:
        try:
            _join(outputs, units, parts, labels, record_video, out)
        except Exception as exc:  # noqa: BLE001 (recorded: one bad video never stops the rest)
            out.update(ok=False, error=f"joining {len(units)} segments: {type(exc).__name__}: {exc}", stage="join")
    record = outputs.write_record(video, out, labels)
    drop_parts(outputs, video)
    return record


def drop_parts(outputs, video: str) -> None:
    """Remove a video's parts (joined, or of a killed run when the video was done whole)."""
    shutil.rmtree(outputs.parts / video, ignore_errors=True)
    try:
        outputs.parts.rmdir()  # the last video joined: no empty folder left behind
    except OSError:
        pass  # other videos' parts are still there


def drop_unused_parts(outputs) -> int:
    """Remove the parts no run would use again: those of each video whose record says done under
    the options its parts were cut with (`finish` wrote it, then the driver died before removing
    them, or the removal failed), and those holding no result, no part record (a run killed
    before any segment of the video finished left its saved split, or parts whose record, written
    last, never was). Parts cut under other options are kept (a resume under those options goes on
    from them), and so are the finished segments of videos without a done record. Returns how
    many videos' parts went."""
    from camface.batch.state import DONE

    folders = sorted(p for p in outputs.parts.iterdir() if p.is_dir()) if outputs.parts.is_dir() else []
    dropped = 0
    for folder in folders:
        record = outputs.read_record(folder.name)
        finished = any(folder.glob("[0-9]*.json"))
        if finished and (not record or record.get("status") != DONE
                         or record.get("settings") != _parts_settings(folder)):
            continue
        drop_parts(outputs, folder.name)
        dropped += 1
    return dropped


def _parts_settings(folder: Path) -> dict | None:
    """The options a video's parts were cut under: its saved split's, else a part record's."""
    for path in (folder / "split.json", *sorted(folder.glob("[!.]*.json"))):
        try:
            settings = read_json(path).get("settings")
        except (OSError, ValueError, AttributeError):
            continue
        if settings is not None:
            return settings
    return None


def _join(outputs, units, parts, labels, record_video, out) -> None:
    """The parts' rows, class sums and video written as the video's own files (`Outputs.write`:
    atomic, and only while this run owns OUT_DIR)."""
    import pyarrow as pa

    from camface.batch.rows import schema, write_parquet

    files = [part_paths(outputs, u) for u in units]
    table = pa.concat_tables([_located(_read_rows(f["rows"]), units[0]) for f in files]).cast(schema())
    outputs.write(outputs.parquet(units[0].video), lambda tmp: write_parquet(table, tmp))
    sums: dict[str, np.ndarray] = {}
    for f in files:
        with np.load(f["sums"]) as part:
            for key in part.files:
                sums[key] = sums[key] + part[key] if key in sums else part[key]
    outputs.write(outputs.sums_path(units[0].video), lambda tmp: np.savez(tmp, **sums))
    if record_video:
        outputs.write(outputs.video(units[0].video),
                      lambda tmp: join_videos([f["video"] for f, p in zip(files, parts) if p.get("frames")], tmp,
                                              parts[0].get("fps") or 30.0))
        out["video_file"] = str(outputs.video(units[0].video))
    out["rows_file"] = str(outputs.parquet(units[0].video))
    for key in SUMMED:
        out[key] = sum(p.get(key, 0) for p in parts)
    out["fps"] = parts[0].get("fps")
    out["provider"] = parts[0].get("provider")
    counts: dict[str, int] = {}
    for p in parts:
        for label, n in p.get("class_counts", {}).items():
            counts[label] = counts.get(label, 0) + n
    out["class_counts"] = {label: counts[label] for label in labels if label in counts}
    if any("unknown_faces" in p for p in parts):  # a gallery graph's
        out["unknown_faces"] = sum(p.get("unknown_faces", 0) for p in parts)
    for key in ("detect_node", "graph_node", "render_node"):
        out[key] = parts[0].get(key)
    out["started_at"] = min(p.get("started_at", float("inf")) for p in parts)
    out["finished_at"] = max(p.get("finished_at", 0.0) for p in parts)
    out["segments"] = len(units)
    out["settings"] = parts[0].get("settings")  # each part's: a part is kept only under the run's settings
    out["source"] = parts[0].get("source")  # each part's too (`finish` checks)
    cut = next((p["incomplete"] for p in parts if p.get("incomplete")), None)
    if cut is not None:  # the segment that met the file's early end; frames read: of all segments
        out["incomplete"] = {"frames_announced": cut.get("frames_announced"), "reason": cut.get("reason")}


def _located(table, unit: Unit):
    """A part's rows with the video's key and path as they are now: the video is explained when its
    parts are joined, and parts written before the archive moved name where it was then (those of
    an earlier camface have no key column)."""
    import pyarrow as pa

    from camface.batch.rows import conformed

    table = table.drop_columns([name for name in ("key", "path") if name in table.column_names])
    for name, value in (("key", unit.key), ("path", unit.path)):
        table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()))
    return conformed(table)  # columns an earlier camface did not write (similarity): null


def _read_rows(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def join_videos(parts: list[Path], out: Path, fps: float) -> None:
    """`concatenate` the parts; when they were encoded unalike (one node's NVENC and another's
    libx264, an encoder that fell back), decode them and encode them again, in order."""
    try:
        concatenate(parts, out)
        return
    except ValueError as exc:
        log.warning("camface batch: %s; encoding %s again from its %d parts", exc, out.name, len(parts))
    from camface.realtime.sinks import VideoSink
    from camface.realtime.sources import VideoFileSource

    with VideoSink(out, fps, overwrite=True) as sink:
        for part in parts:
            with VideoFileSource(part) as source:
                for frame in source:
                    sink.write(frame)


def concatenate(parts: list[Path], out: Path) -> None:
    """Copy the video packets of `parts` (MP4s from one encoder setup: same codec, size and
    parameter sets) one after another into `out`, a fragmented MP4 like the live recordings,
    shifting each part's timestamps to follow the previous part. No re-encoding."""
    import av

    from camface.realtime.fmp4 import MOVFLAGS

    with av.open(str(parts[0])) as first:
        template = first.streams.video[0]
        extradata = template.codec_context.extradata
        with av.open(str(out), "w", format="mp4", options={"movflags": MOVFLAGS}) as output:
            stream = output.add_stream_from_template(template)
            offset = 0
            for part in parts:
                with av.open(str(part)) as container:
                    source = container.streams.video[0]
                    if source.codec_context.extradata != extradata or source.time_base != template.time_base:
                        raise ValueError(f"{part} was encoded unlike {parts[0]} (codec parameters differ)")
                    end = offset
                    for packet in container.demux(source):
                        if packet.dts is None:  # the demuxer's empty flush packet
                            continue
                        packet.pts += offset
                        packet.dts += offset
                        end = max(end, packet.pts + (packet.duration or 0))
                        packet.stream = stream
                        output.mux(packet)
                    offset = end
