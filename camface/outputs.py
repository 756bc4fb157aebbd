"""Checks on output paths (recordings, graphs, JSON) and on model files read, run before any
slow work starts."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from camface.errors import CamfaceError, OutputError

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes in one file name (Linux, macOS, Windows' NTFS counts 255 UTF-16 units)


def output_path(value: str) -> Path:
    """argparse `type` of every option that names a file or folder to write (`--record`, `-o`,
    `--json`, ...): an empty value (`--record ""`, `-o "$OUT"` with OUT unset) is a usage error
    that argparse reports naming the option (exit 2). Path("") is "." and was taken as the
    working folder: "--record .: ..." named a path never given, and a folder output
    (`camface batch -o ""`, `--snapshot-dir ""`) was written into the working folder."""
    if value == "":
        raise argparse.ArgumentTypeError("the value is empty; give a path to write")
    return Path(value)


def output_file(value: str) -> Path:
    """argparse `type` of an option that names a file to write (`--record`, `-o OUT.onnx`,
    `--json`): `output_path`'s checks, and a value ending in a path separator (`--record
    out.mp4/`, a folder by its spelling) is a usage error; Path() dropped the separator and the
    file was written as out.mp4."""
    path = output_path(value)
    if value.endswith(tuple({os.sep, os.altsep or os.sep})):
        raise argparse.ArgumentTypeError(f"{value!r} ends with {value[-1]!r}, a folder; give a file to write")
    return path


def input_spec(value: str) -> str:
    """argparse `type` of every option that names a file, folder, glob or source to read (a
    model, photos, `--labels`, ...): an empty value (`--model "$M"` with M unset) is a usage
    error naming the option (exit 2). Path("") is ".": "--model ''" said ". is a folder", `compare
    --model ''` was a TypeError traceback, and `camface batch ''` explained every video of the
    working folder."""
    if value == "":
        raise argparse.ArgumentTypeError("the value is empty; give a path to read")
    return value


def input_path(value: str) -> Path:
    """`input_spec` as a Path (options whose type was Path)."""
    return Path(input_spec(value))


def check_output_file(path: str | Path, overwrite: bool = False) -> Path:
    """Return `path` if it can be written, else raise OutputError naming it: its folder must
    exist, be a folder and be writable; the path must not be a folder; an existing file is
    replaced only with `overwrite`."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot write {path}: permission denied")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; pass --overwrite to replace it")
    return path


def beside(final: Path, tag: str = "partial") -> Path:
    """A hidden temporary name beside `final`, in its folder (so that renaming it over `final` is
    atomic), unique to this call (the process id and a random part: two threads, or two Ray tasks
    of one worker, writing the same final never share it) and ending in `final`'s suffix (numpy
    and matplotlib choose the format by it): cam.onnx -> .cam.onnx.1234-5f0c2a.partial.onnx.
    `final`'s name is cut in it so that it stays within NAME_MAX bytes (a final named near the
    limit would otherwise get a temporary name too long to create)."""
    final = Path(final)
    return final.with_name(_hidden_name(final, f".{os.getpid()}-{uuid.uuid4().hex[:6]}.{tag}{final.suffix}"))


def _hidden_name(final: Path, tail: str) -> str:
    """`beside`'s name: "." + `final`'s name, cut to leave room for `tail`, + `tail`."""
    room = NAME_MAX - 1 - len(os.fsencode(tail))
    name = os.fsencode(final.name)
    if len(name) > room:  # whole UTF-8 characters (a file system may refuse half of one)
        name = name[:room].decode("utf-8", "ignore").encode("utf-8")
    return f".{os.fsdecode(name)}{tail}"


def place_over(staged: Path, final: Path, staged_fd: int | None = None,
               moved: Callable[[Path], None] | None = None) -> int | None:
    """Put the file `staged` (written `beside` the existing file `final`) in `final`'s place,
    so that `final`'s name, its other hard links, its owner, group and mode all show the new
    bytes. `staged_fd`: a descriptor open on `staged` (one is opened when None).

    Renamed over it (atomic: a reader sees the earlier file or the new one, never half) where
    that changes nothing but the bytes: `final` a regular file with one link, owned by the user
    and group that own `staged` (made so with fchown where this process may: root; the mode then
    set again, as chown clears set-id bits); returns None, `staged` gone. Otherwise (another
    hard link would keep the earlier bytes; another owner or group, e.g. a user's file that root
    records over, a setgid folder's group, would be lost; or the rename is refused: a sticky
    folder such as /tmp, another user's file) the bytes are copied into `final`'s own inode
    (`copy_into`) and a descriptor open for writing on it, after them, is returned: the caller
    goes on writing through it (or closes it) and removes `staged`.

    OSError when neither can be done. `staged` is left holding the new bytes; `final` holds the
    earlier ones, or, when the copy failed part-way (a full disk), a cut copy of the new ones.
    While the copy runs `staged` is named `beside` `final` under the tag "unplaced": a kill (or
    Ctrl-C) during it leaves `final` cut and the new bytes there, which the next recording to
    `final` keeps (it removes the "partial" files of killed runs). `moved(path)`, when given, is
    told each name the new bytes take meanwhile (the "unplaced" one, then `staged` again), so that
    a caller asked where they are while the copy runs (a forced exit's line, a Ctrl-C in it) names
    the file that holds them."""
    try:
        earlier = os.stat(final)
    except FileNotFoundError:  # removed meanwhile: nothing to keep
        os.replace(staged, final)
        return None
    opened = staged_fd is None
    if opened:
        staged_fd = os.open(staged, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        renames = stat.S_ISREG(earlier.st_mode) and earlier.st_nlink == 1 and _owned_as(staged_fd, earlier)
    finally:
        if opened:
            os.close(staged_fd)
    if renames:
        try:
            os.replace(staged, final)
            return None
        except PermissionError as exc:  # a sticky folder: another user's file is theirs to replace
            log.debug("%s cannot be renamed over (%s); copied into it", final, exc.strerror or exc)
    moved = moved or (lambda path: None)
    copied = keep_unplaced(staged, final)  # (`staged` itself where it cannot be renamed: Windows, open)
    moved(copied)
    try:
        fd = copy_into(copied, final)
    except OSError:
        with contextlib.suppress(OSError):  # (the caller keeps it: `keep_unplaced`)
            os.replace(copied, staged)
            moved(staged)
        raise
    with contextlib.suppress(OSError):  # (a kill now leaves it "partial": `final` holds it whole)
        os.replace(copied, staged)
        moved(staged)
    return fd


def keep_unplaced(staged: Path, final: Path) -> Path:
    """The staged file that `place_over` could not put in `final`'s place, renamed `beside` it
    under the tag "unplaced" (a writer may still hold it open: its frames go on there) so that
    the next recording to `final`, which removes what killed recordings left ("partial"), keeps
    it; the name it now has (`staged` where even that rename fails)."""
    kept = beside(final, "unplaced")
    try:
        os.replace(staged, kept)
    except OSError:
        return staged
    return kept


def _owned_as(fd: int, earlier: os.stat_result) -> bool:
    """Whether the file open as `fd` is owned by `earlier`'s user and group, made so (fchown)
    where this process may; its mode then set to `earlier`'s again."""
    new = os.fstat(fd)
    if (new.st_uid, new.st_gid) == (earlier.st_uid, earlier.st_gid):
        return True
    try:
        os.fchown(fd, earlier.st_uid, earlier.st_gid)
    except (PermissionError, AttributeError):  # not root (no fchown: Windows)
        return False
    with contextlib.suppress(OSError):
        os.chmod(fd, stat.S_IMODE(earlier.st_mode))
    return True


def copy_into(staged: Path, final: Path) -> int:
    """Write `staged`'s bytes over `final`'s in `final`'s own inode (its links, owner, group
    and mode stay); returns a descriptor open for writing on `final`, just after them. Opened
    without O_CREAT (in a sticky folder Linux refuses O_CREAT on another user's existing file:
    fs.protected_regular) and emptied after the open, so a refused open changes nothing."""
    fd = os.open(final, os.O_WRONLY | getattr(os, "O_BINARY", 0))
    try:
        os.ftruncate(fd, 0)
        with open(staged, "rb") as source, open(fd, "wb", closefd=False) as target:
            shutil.copyfileobj(source, target)
    except BaseException:
        os.close(fd)
        raise
    return fd


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (someone else's counts: it may not be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # a pid beyond what the system takes
        return False
    return True


QUIET_S = 10.0  # a temporary file touched within this long may be written still (see `left_by_dead`)


def left_by_dead(final: str | Path, tag: str = "partial", quiet_s: float = QUIET_S) -> list[Path]:
    """The temporary files `beside(final, tag)` named for `final` itself (not for another file
    of its folder) whose process is dead (a hard kill left them) and that nobody wrote to for
    `quiet_s`: a process of another machine writing to a shared folder has a pid this one cannot
    look up. A process id this machine reuses meanwhile keeps its file (for a later start)."""
    import re
    import time

    final = Path(final)
    pattern = re.compile(rf"\..*(\.(\d+)-[0-9a-f]{{6}}\.{re.escape(tag)}{re.escape(final.suffix)})")
    found = []
    for path in left_beside(final.parent, tag):
        match = pattern.fullmatch(path.name)
        if match is None or path.name != _hidden_name(final, match.group(1)):
            continue
        try:
            quiet = time.time() - path.lstat().st_mtime >= quiet_s
        except OSError:  # gone meanwhile
            continue
        if quiet and not process_alive(int(match.group(2))):
            found.append(path)
    return found


def left_beside(folder: str | Path, tag: str = "partial") -> list[Path]:
    """The temporary files `beside` names with `tag` that lie in `folder`: a process killed
    while writing leaves them (the caller knows whether any such process may still run).
    `written_beside` keeps an earlier file, while it renames several, under the tag "previous"."""
    folder = Path(folder)
    return sorted(folder.glob(f".*.{tag}*")) if folder.is_dir() else []


@contextlib.contextmanager
def written_beside(*finals: str | Path, tag: str = "partial") -> Iterator[tuple[Path, ...]]:
    """Write a command's `finals` whole or not at all: yields one temporary path `beside` each, in
    order, for the block to write. When the block ends without an error, each is renamed over its
    final (a final whose temporary file the block did not write is removed: no earlier run's file
    is left beside this run's); on an error, Ctrl-C included, the temporary files are removed and
    the finals stay as they were (an earlier run's, or none).

    All or none: with several finals, each earlier file is first kept beside its final (a hard
    link, so the final never goes missing; moved aside where the file system has none) and, when
    any rename fails (or Ctrl-C comes), the finals renamed so far get their earlier files back (or
    are removed, where there was none) before the error is raised; on success the kept files are
    removed. What the file system cannot promise: a process killed (SIGKILL, power) in the
    moment between two renames leaves some finals new and the rest as before, the earlier files
    kept beside them as .NAME.PID-XXXXXX.previous.SUFFIX (`left_beside(folder, "previous")`).

    OutputError naming a final that cannot be renamed into place. Errors name the finals, never a
    temporary file: an OSError about one, or about a final (a full disk while numpy or matplotlib
    writes it), becomes an OutputError naming its final; a camface error whose message names one
    (`convert.save`'s "cannot write ...") names its final instead; an OSError about any other
    file (an input read while writing) is raised as it is, naming that file."""
    finals = tuple(Path(final) for final in finals)
    staged = tuple(beside(final, tag) for final in finals)
    try:
        try:
            yield staged
        except CamfaceError as exc:  # first: SourceError is an OSError too (ConnectionError)
            exc.args = tuple(naming_finals(arg, staged, finals) if isinstance(arg, str) else arg for arg in exc.args)
            raise
        except OSError as exc:
            final = next((final for tmp, final in zip(staged, finals)
                          for name in (exc.filename, exc.filename2)
                          if name is not None and os.path.abspath(os.fsdecode(name)) in
                          (os.path.abspath(tmp), os.path.abspath(final))),
                         None)
            if final is None:
                raise
            why = naming_finals(exc.strerror or str(exc), staged, finals)
            raise OutputError(f"cannot write {final}: {why}") from exc
        _rename_all(staged, finals)
    finally:
        for tmp in staged:
            try:
                tmp.unlink(missing_ok=True)
            except OSError as exc:  # never in place of the error that ended the block
                log.warning("could not remove the temporary file %s: %s", tmp, exc.strerror or exc)


def _rename_all(staged: tuple[Path, ...], finals: tuple[Path, ...]) -> None:
    """Rename each of `staged` over its final (remove the final where the block wrote none), all
    or none (see `written_beside`). One final needs nothing kept: its one rename is atomic."""
    kept: list[tuple[Path, Path | None]] = []  # (final, its earlier file kept, or None: there was none)
    try:
        for tmp, final in zip(staged, finals):
            try:
                earlier = _keep_earlier(final) if len(finals) > 1 else None
                if earlier is not None or not os.path.lexists(final):
                    kept.append((final, earlier))
                if tmp.exists():
                    os.replace(tmp, final)
                else:
                    final.unlink(missing_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from exc
    except BaseException:
        _put_back(kept)
        raise
    for _, earlier in kept:
        if earlier is not None:
            with contextlib.suppress(OSError):  # all renamed: the earlier file is no longer needed
                earlier.unlink()


def _keep_earlier(final: Path) -> Path | None:
    """Keep `final`'s current file beside it (None when there is none to keep, or a folder, which
    the rename then refuses): a hard link where the file system has them, so that `final` stays
    in place until it is replaced, else the file moved aside."""
    if not os.path.lexists(final) or (final.is_dir() and not final.is_symlink()):
        return None
    earlier = beside(final, "previous")
    try:
        os.link(final, earlier, follow_symlinks=False)
    except (OSError, NotImplementedError):  # FAT, some network shares: no hard links
        os.replace(final, earlier)
    return earlier


def _put_back(kept: list[tuple[Path, Path | None]]) -> None:
    """Undo the renames of `_rename_all` that were done: each final gets its earlier file back, or
    is removed where it had none. A file that cannot be put back stays where it was kept, said
    in the log (the error that stopped the renames is the one raised)."""
    for final, earlier in reversed(kept):
        if earlier is None:
            try:
                final.unlink(missing_ok=True)
            except OSError as exc:
                log.error("could not remove the new %s (%s), which had no earlier file", final, exc.strerror or exc)
        else:
            try:
                os.replace(earlier, final)
                # still there when final was never replaced: renaming one of two links of a file does nothing
                earlier.unlink(missing_ok=True)
            except OSError as exc:
                log.error("could not put back the earlier %s (%s): it is kept as %s", final, exc.strerror or exc,
                          earlier)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """The block writes `path`: an OSError that names no file (write() on a full disk, as numpy's
    savez or Path.write_text raise it) is raised again naming `path`, so that `written_beside`
    says which of its finals could not be written, never a bare traceback."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and not isinstance(exc, CamfaceError):
            exc.filename = str(path)
        raise


def naming_finals(text: str, staged, finals) -> str:
    """`text` with each temporary file of `staged` named as its final (the same folder: its name
    is enough, whether the text holds the whole path or the name alone)."""
    for tmp, final in zip(staged, finals):
        text = text.replace(Path(tmp).name, Path(final).name)
    return text


def replace_whole(path: str | Path, write, before_rename=None) -> None:
    """`write(partial)` a file beside `path`, then rename it over `path`: a failure or a kill
    midway (a full disk, Ctrl-C) leaves the previous file as it was, never half a file, and no
    partial file (a kill leaves one, for `left_beside`). `before_rename()`, when given, runs
    after the write and before the rename: an error it raises (a batch worker whose run lost
    OUT_DIR) writes nothing. A write that fails on the partial file (an OSError naming it, or
    naming no file: write() on a full disk), or that returns False (cv2.imwrite says a failure
    so, raising nothing), is an OutputError naming `path`; an OSError about another file (an
    input that `write` reads) is raised as it is, naming that file."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # /dev/stdout, a pipe: nothing
        write(path)                                                  # to replace, written as is
        return
    with written_beside(path) as (partial,):
        with writing(partial):
            written = write(partial)
        if written is False:
            raise OutputError(f"cannot write {path}: the file could not be written (is the disk full?)")
        if before_rename is not None:
            before_rename()


def check_not_an_input(output: str | Path, inputs, what: str = "") -> None:
    """OutputError when writing `output` would destroy one of the command's `inputs` (files or
    folders): the same file, or a file that already exists inside an input folder (a new file
    beside the inputs is fine). `what` names the output's flag in the message ("--json", ...)."""
    output = Path(output).absolute()
    for given in inputs:
        if given is None:
            continue
        if isinstance(given, str) and given[:7].lower() == "file://":  # a --source read as the path it names
            from camface.realtime.sources import local_spec

            given = local_spec(given)
        given = Path(given).absolute()
        if not given.exists():
            continue
        if given.is_dir():
            if output.exists() and (output == given or given in output.parents):
                raise OutputError(f"{what + ' ' if what else ''}{output} is a file of the input folder {given}; "
                                  "write it elsewhere")
        elif output.exists() and os.path.samefile(output, given):
            raise OutputError(f"{what + ' ' if what else ''}{output} is an input ({given}); write it elsewhere")


def shown(path: str | os.PathLike[str]) -> str:
    """A path as a one-line message shows it: as it is, or quoted with escapes when it holds a
    control character or ends in whitespace (a line read from a list kept its newline: the
    message broke in two and the newline could not be seen)."""
    text = os.fspath(path)
    return text if text.isprintable() and text == text.strip() else repr(text)


def check_model_file(path: Path, what: str = "model file") -> None:
    """ModelError naming `path` when it is not a file: a folder, nothing there (a dangling link
    too), or something that is not a regular file (a pipe, a device: said "not found", or a read
    of a pipe without a writer waited for good)."""
    from camface.errors import ModelError

    if not path.is_file():
        article = "an" if what[0] in "AEIOU" else "a"
        raise ModelError(f"{path} is a folder, not {article} {what}" if path.is_dir() else
                         f"{path} is not a regular file (a pipe, a device or a socket), not {article} {what}"
                         if path.exists() else f"{what} not found: {shown(path)}")


def kept_by_a_stopped_copy(path: Path, written: Path, staged: Path) -> Path | None:
    """Where a recording to `path` is when a Ctrl-C (or another exception than OSError) cut
    `place_over` short: `written`, the file its `moved` last named, said in a warning, when that
    is not `staged` (the copy had begun: `staged` renamed aside as "unplaced"); else None."""
    if written == staged:
        return None
    log.warning("camface: %s: stopped while the new recording was copied over the earlier file: the new "
                "recording is kept as %s", path, written)
    return written
