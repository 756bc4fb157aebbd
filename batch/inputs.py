"""INPUT... -> the videos to explain: files (tried whatever their suffix), folders of videos (not
recursive; hidden files, as a glob's *, skipped) and glob patterns (their files with a video
suffix, as a folder's; the others named in a warning).

Each video gets a stable id, `<stem>-<8 hex digits of the sha1 of its key>` (the stem cut to
MAX_STEM_BYTES), which names its outputs. Its key is its path from the folder above the input
that named it: a folder's files and a file named alone count from their folder's name, a glob's
from the name of its last folder before the first wildcard (`day1/clip.mp4` from `archive/day1/`
or `archive/day1/clip.mp4`, `archive/day1/clip.mp4` from `'archive/**/*.mp4'`). So the same archive moved or copied under another parent keeps its ids, and a
`--resume` there redoes nothing. Videos of the same key (`a/day1/clip.mp4`, `b/day1/clip.mp4`
named as `a/day1 b/day1`) each take one folder more, until their keys differ (at worst the
absolute path). A file named by several inputs takes the longest of their keys: the ids do not
depend on the order of the arguments.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from camface.errors import CamfaceError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
SKIPPED_NAMED = 10  # files a glob skipped that its warning names; the others are counted
UNOPENED_NAMED = 3  # videos that do not open that `check_one_opens`' error names; the others are counted


class InputError(CamfaceError):
    """No video matched the inputs, or an input names nothing."""


@dataclass(frozen=True)
class Video:
    """One input video. path: absolute, resolved. id: stable name of its outputs. key: its path
    from the folder above the input that named it, "/"-separated (see the module doc; "": its
    folder's name and its own, as a file named alone gets), which a move of the archive keeps:
    rows and records carry it beside `path`, where the file was when it was explained."""

    path: str
    id: str
    key: str = ""

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", _key(_absolute(Path(self.path)), 2))


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


def video_id(path: Path, key: str | None = None) -> str:
    """The id of the video at `path` whose key (see the module doc) is `key`; None: its folder's
    name and its own, as a file named alone, or found by a folder or a `*` glob, gets it."""
    key = key if key is not None else _key(_absolute(path), 2)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    stem = path.stem.encode()[:MAX_STEM_BYTES].decode(errors="ignore")  # never half a character
    return f"{stem}-{digest}"


def key_of(id_: str, path: str) -> str | None:
    """The key that the video id `id_` was made from, found among the trailing parts of `path` (where the
    video was when it was explained: its record's or rows' path): the one whose digest the id
    carries. None when none does: an id an earlier camface hashed from the absolute path (it says
    nothing of the input that named the video), or a path recorded through other links."""
    if not path:
        return None
    absolute = _absolute(Path(path))
    for depth in range(1, len(absolute.parts)):  # not the whole path: see above
        key = _key(absolute, depth)
        if video_id(absolute, key) == id_:
            return key
    return None


def _absolute(path: Path) -> Path:
    """`path` absolute, `..` taken out, links kept (as the user sees the archive)."""
    return Path(os.path.abspath(path))


def _key(absolute: Path, depth: int) -> str:
    """The last `depth` parts of `absolute` joined by '/' (the whole path when it has fewer)."""
    parts = absolute.parts
    return "/".join(parts[-depth:]) if depth < len(parts) else absolute.as_posix()


def _root(spec: str) -> Path:
    """The folder an input's files count from (their key starts with its name): a folder itself,
    a glob's last folder before its first wildcard, a file's own folder."""
    path = Path(spec)
    if path.is_dir():
        return _absolute(path)
    if glob.has_magic(spec):
        fixed = []
        for part in path.parts[:-1]:
            if glob.has_magic(part):
                break
            fixed.append(part)
        return _absolute(Path(*fixed) if fixed else Path("."))
    return _absolute(path).parent


def _keys(found: dict[Path, int]) -> dict[Path, str]:
    """Per file (absolute, as found) its key: its last `found[file]` parts; files whose keys
    meet take one part more each time, until no two meet."""
    depth = dict(found)
    while True:
        keys: dict[str, list[Path]] = {}
        for path, parts in depth.items():
            keys.setdefault(_key(path, parts), []).append(path)
        clashes = [path for paths in keys.values() if len(paths) > 1 for path in paths
                   if depth[path] < len(path.parts)]
        if not clashes:  # (a whole absolute path meets no other: distinct files)
            return {path: _key(path, parts) for path, parts in depth.items()}
        for path in clashes:
            depth[path] += 1


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
    each once, but none of the outputs in `out_dir` of another of them or of a video OUT_DIR
    holds a record or parts of (its annotated video OUT_DIR/videos/<id>.mp4 or its segments'
    parts OUT_DIR/parts/<id>/, which a recursive glob over an archive holding OUT_DIR finds on a
    --resume; their id may be one an earlier camface gave: `pipeline.earlier_ids`).
    Raises InputError naming the inputs when none matched."""
    seen: dict[Path, tuple[Path, int]] = {}  # resolved -> (absolute as found, parts of its key)
    for spec in specs:
        root = _root(spec)
        for path in _expand(spec, out_dir):
            found = _absolute(path)
            parts = len(found.relative_to(root).parts) + 1 if found.is_relative_to(root) else 2
            earlier = seen.setdefault(path.resolve(), (found, parts))
            if earlier != (found, parts) and (parts, found.as_posix()) > (earlier[1], earlier[0].as_posix()):
                seen[path.resolve()] = (found, parts)  # the longest key, whatever the order of the inputs
    keys = _keys(dict(seen.values()))
    ours = _outputs_among({path: video_id(found, keys[found]) for path, (found, _) in seen.items()}, out_dir) \
        if out_dir is not None else []
    if ours:
        log.warning("camface batch: skipping %d file(s) that this run writes in %s, e.g. %s",
                    len(ours), out_dir, ours[0])
    for path in ours:
        del seen[path]
    if not seen:
        raise InputError(f"no videos matched {' '.join(specs)} (video suffixes: "
                         f"{', '.join(sorted(VIDEO_SUFFIXES))})")
    keys = _keys(dict(seen.values()))  # without those: the same ids as a run that did not find them
    return [Video(str(path), video_id(found, keys[found]), keys[found]) for path, (found, _) in seen.items()]


def _outputs_among(ids: dict[Path, str], out_dir: Path) -> list[Path]:
    """The files of `ids` (resolved -> id) that are outputs in `out_dir`: of another of them,
    or of a video OUT_DIR holds a record or parts of (an earlier run's, under an id it gave)."""
    root = out_dir.resolve()
    known = set(ids.values()) | {path.stem for path in (root / "state").glob("[!.]*.json")} \
        | {path.name for path in (root / "parts").glob("[!.]*") if path.is_dir()}
    videos = {root / "videos" / f"{id_}.mp4" for id_ in known}
    parts = {root / "parts" / id_ for id_ in known}
    return [path for path in ids if path in videos or path.parent in parts]


def check_one_opens(videos: list[Video]) -> None:
    """InputError naming the videos (the first UNOPENED_NAMED, then a count) and why, when not
    one of them opens as a video: each damaged, or not a video (a file named alone is tried
    whatever its suffix). The run would load its model and start Ray to fail every one. Each is
    opened as a worker opens it (`VideoFileSource.check`: the header, no frame decoded; a file
    cut short opens up to its last whole part), and only up to the first that opens: one
    that does not among videos that do is that video's failure in the run, said in its record."""
    from camface.errors import SourceError
    from camface.outputs import shown
    from camface.realtime.sources import VideoFileSource

    unopened: dict[str, list[str]] = {}  # why -> the paths it was said of, in input order
    for count, video in enumerate(videos):
        try:
            VideoFileSource(video.path).check()
            return
        except SourceError as exc:
            if count < UNOPENED_NAMED:
                said = str(exc).removeprefix(f"cannot open video file {video.path}: ")  # the path is named once
                unopened.setdefault(said, []).append(shown(video.path))
    named = "; ".join(f"{', '.join(paths)} ({why})" for why, paths in unopened.items())
    more = f"; and {len(videos) - UNOPENED_NAMED} more" if len(videos) > UNOPENED_NAMED else ""
    raise InputError(f"none of the {len(videos)} input file(s) opens as a video: {named}{more}; nothing was run")
