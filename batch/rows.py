"""The Parquet rows: one per face per frame. Read them with `pyarrow.parquet.read_table(OUT/rows)`,
`pyarrow.dataset.dataset(OUT/rows)`, pandas, or `ray.data.read_parquet(OUT/rows)` (temporary files
start with "." and are skipped). Every file has the columns below: a run over an OUT_DIR rewrites
the files an earlier camface wrote without some of them (`upgrade_rows`), as those readers take
the first file's columns for all (a `key` missing there was dropped from every row, or was null in
the rows of files that lacked it).

Columns:
  video (str: the video's id), key (str: its path from the folder above the input that named it,
  "day1/clip.mp4", which a move of the archive keeps: `camface.batch.inputs`), path (str: the
  file's absolute path when it was explained; a moved archive's rows written before the move keep
  the earlier one), frame (int64, 0-based), timestamp_s (float64:
  frame / the file's fps), face (int32: rank in the frame, largest first), box and crop_box
  (list<int32> [x, y, w, h], pixels of the frame; the crop square may pass the frame's edges),
  score (float32, detector), track_id (int32, -1: not tracked), probs (list<float32> [classes]),
  predicted / explained (int32) and predicted_label / explained_label (str), method (str),
  heatmap (list<float32>, the unnormalised heatmap at feature resolution, row-major),
  heatmap_h / heatmap_w (int32), heatmap_peak (float32: its maximum), peak_row / peak_col
  (int32: where, in feature cells; -1 without a heatmap), similarity (list<float32>
  [identities]: a gallery graph's cosine similarities, [] for a classifier's graph; its
  predicted_label reads `unknown (best: NAME 0.31)` below the graph's threshold; where
  1 - similarity[explained] < graph_spec.SATURATED the heatmap explains the projection of the
  embedding on that identity's direction, not the saturated cosine: `Prediction.saturated`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def schema():
    import pyarrow as pa

    i32, f32 = pa.int32(), pa.float32()
    return pa.schema([
        ("video", pa.string()), ("key", pa.string()), ("path", pa.string()), ("frame", pa.int64()),
        ("timestamp_s", pa.float64()),
        ("face", i32), ("box", pa.list_(i32)), ("crop_box", pa.list_(i32)), ("score", f32), ("track_id", i32),
        ("probs", pa.list_(f32)), ("predicted", i32), ("predicted_label", pa.string()), ("explained", i32),
        ("explained_label", pa.string()), ("method", pa.string()), ("heatmap", pa.list_(f32)),
        ("heatmap_h", i32), ("heatmap_w", i32), ("heatmap_peak", f32), ("peak_row", i32), ("peak_col", i32),
        ("similarity", pa.list_(f32)),
    ])


def _label(labels, k: int) -> str:
    return labels[k] if 0 <= k < len(labels) else str(k)


def build_rows(video_id: str, path: str, fps: float, results, key: str = ""):
    """A pyarrow Table of the rows of `results` (FrameResults of one video, in frame order)."""
    import pyarrow as pa

    columns: dict[str, list] = {name: [] for name in schema().names}
    for result in results:
        for rank, (face, prediction) in enumerate(zip(result.faces, result.predictions)):
            heat = np.asarray(prediction.heatmap, np.float32)
            if heat.size:
                row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
                peak = float(heat[row, col])
            else:
                row = col = -1
                peak = float("nan")
            values = dict(
                video=video_id, key=key, path=path, frame=result.index, timestamp_s=result.index / fps if fps else 0.0,
                face=rank, box=list(face.box), crop_box=list(face.crop_box), score=face.score,
                track_id=face.track_id, probs=prediction.probs.astype(np.float32).tolist(),
                predicted=prediction.predicted, predicted_label=prediction.label(result.labels, result.threshold),
                explained=prediction.explained, explained_label=_label(result.labels, prediction.explained),
                method=prediction.method, heatmap=heat.ravel().tolist(),
                heatmap_h=heat.shape[0] if heat.ndim == 2 else 0, heatmap_w=heat.shape[1] if heat.ndim == 2 else 0,
                heatmap_peak=peak, peak_row=int(row), peak_col=int(col),
                similarity=prediction.similarity.astype(np.float32).tolist())
            for name, value in values.items():
                columns[name].append(value)
    return pa.table(columns, schema=schema())


def conformed(table, key: str | None = None):
    """`table`, rows an earlier camface wrote, with the columns of `schema()` in its order: a
    missing `key` column (before camface gave rows one) holds `key` (None: null, not known), any
    other missing column (`similarity`, before camface kept it) nulls: not recorded."""
    import pyarrow as pa

    target = schema()
    for field in target:
        if field.name not in table.column_names:
            value = key if field.name == "key" else None
            table = table.append_column(field.name, pa.array([value] * table.num_rows, field.type))
    return table.select(target.names).cast(target)


def upgrade_rows(outputs, keys: dict[str, str]) -> list[Path]:
    """Rewrite each rows file in `outputs` (a `camface.batch.state.Outputs`) that lacks columns
    of `schema()` (written by an earlier camface) as `conformed`, the key of a video that is
    among `keys` (id -> key: this run's inputs) filled in, else its record's key, else the key its
    id was made from, found in the path its rows or record name (`inputs.key_of`), else null (an
    id an earlier camface hashed from the absolute path: the input that named the video is not
    recorded anywhere).
    Each file is replaced whole (`Outputs.write`: atomic, only while this run owns OUT_DIR).
    Returns the files rewritten; a file Parquet cannot read is left as it is, with a warning."""
    import logging

    import pyarrow.parquet as pq

    from camface.batch.inputs import key_of

    log = logging.getLogger(__name__)
    names, rewritten = set(schema().names), []
    for path in sorted(outputs.rows.glob("[!.]*.parquet")) if outputs.rows.is_dir() else ():
        try:
            if names <= set(pq.read_schema(path).names):
                continue
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow's ArrowInvalid, OSError: a damaged file is no reason to stop
            log.warning("camface batch: cannot read %s to add the columns it lacks (%s); left as it is", path, exc)
            continue
        video_id = path.stem
        record = outputs.read_record(video_id) or {}
        key = keys.get(video_id) or record.get("key") or key_of(video_id, _recorded_path(table, record))
        upgraded = conformed(table, key)
        outputs.write(path, lambda tmp, upgraded=upgraded: write_parquet(upgraded, tmp))
        rewritten.append(path)
    return rewritten


def _recorded_path(table, record: dict) -> str:
    """Where a video was when it was explained: its rows' path, else (no rows) its record's."""
    paths = table.column("path").drop_null() if "path" in table.column_names else []
    return paths[0].as_py() if len(paths) else record.get("path", "")


def write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


def heatmaps_of(table) -> np.ndarray:
    """float32 [rows, h, w]: the heatmap column back as arrays (all rows share one shape)."""
    if table.num_rows == 0:
        return np.zeros((0, 0, 0), np.float32)
    h, w = table.column("heatmap_h")[0].as_py(), table.column("heatmap_w")[0].as_py()
    flat = np.asarray(table.column("heatmap").combine_chunks().flatten(), np.float32)
    return flat.reshape(table.num_rows, h, w)
