"""INPUT... -> the videos to explain: files (tried whatever their suffix), folders of videos (not
recursive; hidden files, as a glob's *, skipped) and glob patterns (their files with a video
suffix, as a folder's; the others named in a warning).

Each video gets a stable id, `<stem>-<8 hex digits of its absolute path's sha1>` (the stem cut to
MAX_STEM_BYTES), which names its outputs: two `clip.mp4` in different folders get different ids,
and a rerun (`--resume`) finds the same ids whatever the order of the arguments.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from camface.errors import CamfaceError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
SKIPPED_NAMED = 10  # files a glob skipped that its warning names; the others are counted


class InputError(CamfaceError):
    """No video matched the inputs, or an input names nothing."""


@dataclass(frozen=True)
class Video:
    """One input video. path: absolute. id: stable name of its outputs (see module doc)."""

    path: str
    id: str


def stamp(path: str | Path) -> dict | None:
    """What says a file is still the one explained: {"size", "mtime_ns"} (None: unreadable).
    A record keeps the stamp of the file it read; --resume redoes a video whose file changed."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# The longest file name made from an id, its rows' temporary file (`camface.outputs.beside`):
# ".<id>.parquet.<pid, up to 7 digits>-<6>.partial.parquet", 40 bytes more than the id, within
# the 255 bytes of a name; a longer stem is cut (the digest of the whole path keeps ids apart).
# `beside` now cuts a temporary name to fit by itself; the cut stays as it was, so that a
# `--resume` finds the ids an earlier run gave.
MAX_STEM_BYTES = 255 - 40 - 9


def video_id(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    stem = path.stem.encode()[:MAX_STEM_BYTES].decode(errors="ignore")  # never half a character
    return f"{stem}-{digest}"


def _expand(spec: str, out_dir: Path | None = None) -> list[Path]:
    """The files of one INPUT; out_dir: the run's OUT_DIR, whose files a glob's warning of
    skipped non-videos leaves out (they are the run's own, found by a glob over an archive
    that holds OUT_DIR)."""
    path = Path(spec)
    if path.is_dir():
        # hidden files are skipped, as a glob's * skips them: macOS leaves a "._clip.mp4" of
        # metadata beside each video on shared drives, which would fail as a corrupt video
        found = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))
        if not found:  # said, not skipped without a word (an archive of day folders gave nothing)
            below = sum(1 for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            log.warning("camface batch: folder %s holds no videos%s", spec,
                        f"; its {below} subfolder(s) are not read: pass '{path / '**' / '*.mp4'}' (quoted) to "
                        "read them" if below else "")
        return found
    if path.is_file():
        return [path]
    if glob.has_magic(spec):
        matched = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        ours = out_dir.resolve() if out_dir is not None else None
        others = [p for p in matched if p.suffix.lower() not in VIDEO_SUFFIXES  # skipped, as a folder skips them
                  and (ours is None or ours not in p.resolve().parents)]
        if others:
            named = ", ".join(map(str, others[:SKIPPED_NAMED]))
            more = f" and {len(others) - SKIPPED_NAMED} more" if len(others) > SKIPPED_NAMED else ""
            log.warning("camface batch: %s matched %d file(s) with no video suffix, skipped: %s%s "
                        "(not a video: name it alone to try it)", spec, len(others), named, more)
        return [p for p in matched if p.suffix.lower() in VIDEO_SUFFIXES]
    raise InputError(f"input not found: {spec} (expected a video file, a folder of videos or a glob pattern)")


def find_videos(specs: list[str], out_dir: Path | None = None) -> list[Video]:
    """The videos named by `specs`, in argument order (folders and globs sorted by name),
    each once, but none of the outputs in `out_dir` of another of them (its annotated video
    OUT_DIR/videos/<id>.mp4 or its segments' parts OUT_DIR/parts/<id>/, which a recursive glob
    over an archive holding OUT_DIR finds on a --resume). Raises InputError naming the inputs
    when none matched."""
    seen: dict[Path, None] = {}
    for spec in specs:
        for path in _expand(spec, out_dir):
            seen.setdefault(path.resolve(), None)
    ours = _outputs_among(list(seen), out_dir) if out_dir is not None else []
    if ours:
        log.warning("camface batch: skipping %d file(s) that this run writes in %s, e.g. %s",
                    len(ours), out_dir, ours[0])
    for path in ours:
        del seen[path]
    if not seen:
        raise InputError(f"no videos matched {' '.join(specs)} (video suffixes: "
                         f"{', '.join(sorted(VIDEO_SUFFIXES))})")
    return [Video(str(path), video_id(path)) for path in seen]


def _outputs_among(paths: list[Path], out_dir: Path) -> list[Path]:
    """The `paths` (resolved) that are outputs in `out_dir` of others among them."""
    root = out_dir.resolve()
    ids = {video_id(path) for path in paths}
    videos = {root / "videos" / f"{id_}.mp4" for id_ in ids}
    parts = {root / "parts" / id_ for id_ in ids}
    return [path for path in paths if path in videos or path.parent in parts]
