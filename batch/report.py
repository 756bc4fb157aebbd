"""summary.json and report.md (with one PNG per class) from the videos' records.

The per-class picture is the mean, over every face whose heatmap explains that class, of the
display-normalised heatmap (`camface.methods.normalize`, [0, 1]) in face-crop coordinates (the
graph's feature grid spans the crop square), drawn by the one overlay function over the mean
crop of those faces: "for 'happy' it looks at the mouth", across the whole archive.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from camface.batch.state import DONE, Outputs, describe_incomplete
from camface.color_order import ColorOrder
from camface.errors import OutputError
from camface.native import opencv_path
from camface.outputs import replace_whole

PICTURE_SIDE = 256  # pixels of each class picture


def _class_sums(outputs: Outputs, video_ids, classes: int):
    count = np.zeros(classes, np.int64)
    heat = crop = None
    for video_id in video_ids:
        path = outputs.sums_path(video_id)
        if not path.is_file():
            continue
        with np.load(path) as sums:
            count += sums["count"]
            crop = sums["crop_sum"] if crop is None else crop + sums["crop_sum"]
            if "heatmap_sum" in sums:
                heat = sums["heatmap_sum"] if heat is None else heat + sums["heatmap_sum"]
    return count, heat, crop


def _picture(mean_heat: np.ndarray, mean_crop: np.ndarray, color_order: str, method: str, colormap: str,
             alpha: float) -> np.ndarray:
    import cv2

    from camface.realtime.overlay import overlay

    crop = ColorOrder.of(color_order).to_bgr(np.clip(mean_crop + 0.5, 0, 255).astype(np.uint8))
    crop = cv2.resize(crop, (PICTURE_SIDE, PICTURE_SIDE), interpolation=cv2.INTER_CUBIC)
    return overlay(crop, mean_heat.astype(np.float32), method, colormap, alpha)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label) or "class"


PICTURE_NAME = re.compile(r"\d{2,}-[A-Za-z0-9_-]+\.png")  # report/<k:02d>-<slug>.png (100-<slug>.png on)


def _cell(value) -> str:
    """`value` as one cell of a Markdown table: `|` (a cell's end) and `\\` escaped, line
    breaks (a row's end) made spaces."""
    text = " ".join(str(value).splitlines())
    return text.replace("\\", "\\\\").replace("|", "\\|")


def write_report(outputs: Outputs, videos, labels: tuple[str, ...], color_order: str, method: str,
                 colormap: str, alpha: float, run: dict, settings: dict | None = None) -> dict:
    """Write summary.json, report.md and report/<class>.png for `videos` (inputs, in order);
    `run` (plan, timings, interrupted...) goes into the summary as is. Returns the summary.
    settings: the run's (`BatchJob.settings`); given, a video done earlier with other options or
    from another version of its file (a resume stopped before it was done again) is not finished,
    its outputs left out. OutputError naming the file that cannot be written (a full disk); each
    file is replaced whole or not at all."""
    try:
        return _write_report(outputs, videos, labels, color_order, method, colormap, alpha, run, settings)
    except OSError as exc:  # not a file written (replace_whole names those): a record or class sums read
        raise OutputError(f"cannot write the report in {outputs.root}: {exc}") from exc


def _write_report(outputs: Outputs, videos, labels, color_order, method, colormap, alpha, run, settings) -> dict:
    import cv2

    from camface.batch.pipeline import done_alike, options_changed

    records = outputs.records()
    rows = []
    for video in videos:
        record = now(outputs, video, records.get(video.id) or {"status": "not finished"})
        if settings is not None and record["status"] == DONE and not done_alike(record, settings, video.path):
            changed = sorted(options_changed(record, settings))
            why = f"with other options ({', '.join(changed)})" if changed else "from an earlier version of its file"
            record = now(outputs, video, {"status": "not finished", "reason": f"done earlier {why}; --resume does it again"})
        rows.append(record)
    done_ids = [r["video"] for r in rows if r["status"] == DONE]
    count, heat, crop = _class_sums(outputs, done_ids, len(labels))
    total_faces = int(count.sum())
    folder = outputs.root / "report"
    folder.mkdir(exist_ok=True)
    classes, pictures = {}, set()
    for k, label in enumerate(labels):
        entry = {"faces": int(count[k]), "share": float(count[k] / total_faces) if total_faces else 0.0}
        if count[k] and heat is not None:
            mean_heat = heat[k] / count[k]
            picture = folder / f"{k:02d}-{_slug(label)}.png"
            replace_whole(picture, lambda tmp: cv2.imwrite(opencv_path(tmp), _picture(
                mean_heat, crop[k] / count[k], color_order, method, colormap, alpha)))
            pictures.add(picture.name)
            entry.update(mean_heatmap=np.round(mean_heat, 5).tolist(), picture=str(picture.relative_to(outputs.root)))
        classes[label] = entry
    failed = [r for r in rows if r["status"] not in (DONE,)]
    summary = {
        "videos": rows,
        "totals": {"videos": len(rows), "done": len(done_ids), "failed": sum(r["status"] == "failed" for r in rows),
                   "not_finished": sum(r["status"] == "not finished" for r in rows),
                   "incomplete": sum(r["status"] == DONE and "incomplete" in r for r in rows),
                   "frames": int(sum(r.get("frames", 0) for r in rows if r["status"] == DONE)),
                   "faces": total_faces},
        "method": method, "labels": list(labels), "classes": classes, "run": run,
    }
    replace_whole(outputs.root / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    _write_markdown(outputs.root / "report.md", summary, failed)
    for stale in folder.iterdir():  # an earlier run's class now without faces, or another model's labels
        if PICTURE_NAME.fullmatch(stale.name) and stale.name not in pictures:
            stale.unlink(missing_ok=True)
    return summary


def now(outputs: Outputs, video, record: dict) -> dict:
    """A video's entry in the summary: its record saying where the video is now (the summary is
    written each run; a record, and the rows, say where the file was when it was explained, before
    the archive moved), and its outputs named from OUT_DIR ("rows/<id>.parquet"), as the record and
    the class pictures name theirs: absolute, they named OUT_DIR's old place once it moved, until
    the next run (an earlier camface's record names them where OUT_DIR was then), `video`, `key`
    and `path` first."""
    moved = {name: outputs.relative(outputs.file(record[name])) for name in ("video_file", "rows_file") if name in record}
    entry = {"video": video.id, "key": video.key, "path": video.path}
    return {**entry, **record, **entry, **moved}


def _write_markdown(path: Path, summary: dict, failed: list) -> None:
    totals, labels = summary["totals"], summary["labels"]
    lines = ["# camface batch report", "",
             f"{totals['done']} of {totals['videos']} videos explained ({totals['failed']} failed, "
             f"{totals['not_finished']} not finished, {totals['incomplete']} incomplete), {totals['frames']} frames, "
             f"{totals['faces']} faces; "
             f"heatmaps: {summary['method']}.", "",
             "## Videos", "", "| video | frames | faces | class shares | status |", "|---|---|---|---|---|"]
    for r in summary["videos"]:
        counts = r.get("class_counts", {})
        faces = sum(counts.values())
        shares = ", ".join(f"{name} {n / faces:.0%}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])) \
            if faces else ""
        if faces and "unknown_faces" in r:  # a gallery graph: the shares are of the best matches
            shares += f"; unknown (below the threshold) {r['unknown_faces'] / faces:.0%}"
        status = r["status"] if r["status"] != "failed" else f"failed: {r.get('reason', '')}"
        if r["status"] == DONE and "incomplete" in r:
            status = f"incomplete: {describe_incomplete(r)}"
        cells = (r["video"], r.get("frames", ""), faces if r["status"] == DONE else "", shares, status)
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    lines += ["", "## Where the classifier looked, per class",
              "", "Mean heatmap over every face explained as that class, in face-crop coordinates, "
              "over the mean crop.", ""]
    for label in labels:
        entry = summary["classes"][label]
        lines.append(f"### {label}: {entry['faces']} faces ({entry['share']:.0%})")
        if "picture" in entry:
            lines += ["", f"![{label}]({entry['picture']})"]
        lines.append("")
    cut = [r for r in summary["videos"] if r["status"] == DONE and "incomplete" in r]
    if cut:
        lines += ["## Incomplete (explained up to where the file ends early)", ""] + \
            [f"- {r['path']}: {describe_incomplete(r)}" for r in cut] + [""]
    if failed:
        lines += ["## Not explained", ""] + [f"- {r['path']}: {r.get('reason', r['status'])}" for r in failed]
    replace_whole(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def load_summary(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())
