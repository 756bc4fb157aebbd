"""Checks on output paths (recordings, graphs, JSON) and on model files read, run before any
slow work starts."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from camface.errors import CamfaceError, OutputError


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
    atomic), unique to this process and ending in `final`'s suffix (numpy and matplotlib choose
    the format by it): cam.onnx -> .cam.onnx.1234.partial.onnx."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.{tag}{final.suffix}")


def left_beside(folder: str | Path, tag: str = "partial") -> list[Path]:
    """The temporary files `beside` names with `tag` that lie in `folder`: a process killed
    while writing leaves them (the caller knows whether any such process may still run)."""
    folder = Path(folder)
    return sorted(folder.glob(f".*.{tag}*")) if folder.is_dir() else []


@contextlib.contextmanager
def written_beside(*finals: str | Path, tag: str = "partial") -> Iterator[tuple[Path, ...]]:
    """Write a command's `finals` whole or not at all: yields one temporary path `beside` each, in
    order, for the block to write. When the block ends without an error, each is renamed over its
    final (a final whose temporary file the block did not write is removed: no earlier run's file
    is left beside this run's); on an error, Ctrl-C included, the temporary files are removed and
    the finals stay as they were (an earlier run's, or none). OutputError naming a final that
    cannot be renamed into place. Errors name the finals, never a temporary file: an OSError
    about one (a full disk while numpy or matplotlib writes it) becomes an OutputError naming its
    final, and a camface error whose message names one (`convert.save`'s "cannot write ...")
    names its final instead."""
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
                          if name is not None and os.path.abspath(os.fsdecode(name)) == os.path.abspath(tmp)),
                         None)
            if final is None:
                raise
            raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from exc
        for tmp, final in zip(staged, finals):
            try:
                if tmp.exists():
                    os.replace(tmp, final)
                else:
                    final.unlink(missing_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from exc
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


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


def replace_whole(path: str | Path, write) -> None:
    """`write(partial)` a file beside `path`, then rename it over `path`: a failure or a kill
    midway (a full disk, Ctrl-C) leaves the previous file as it was, never half a file. A
    failed write is an OSError naming `path`, never the partial file; so is a `write` that
    returns False (cv2.imwrite says a failure so, raising nothing)."""
    path = Path(path)
    if path.exists() and not path.is_file():  # /dev/stdout, a pipe: nothing to replace, written as is
        write(path)
        return
    with written_beside(path) as (partial,):
        try:
            written = write(partial)
        except OSError as exc:
            exc.filename = str(path)
            raise
        if written is False:
            raise OSError(errno.EIO, "the file could not be written (is the disk full?)", str(path))


def check_not_an_input(output: str | Path, inputs, what: str = "") -> None:
    """OutputError when writing `output` would destroy one of the command's `inputs` (files or
    folders): the same file, or a file that already exists inside an input folder (a new file
    beside the inputs is fine). `what` names the output's flag in the message ("--json", ...)."""
    output = Path(output).absolute()
    for given in inputs:
        if given is None:
            continue
        given = Path(given).absolute()
        if not given.exists():
            continue
        if given.is_dir():
            if output.exists() and (output == given or given in output.parents):
                raise OutputError(f"{what + ' ' if what else ''}{output} is a file of the input folder {given}; "
                                  "write it elsewhere")
        elif output.exists() and os.path.samefile(output, given):
            raise OutputError(f"{what + ' ' if what else ''}{output} is an input ({given}); write it elsewhere")


def check_model_file(path: Path, what: str = "model file") -> None:
    """ModelError naming `path` when it is not a file: a folder, or nothing there."""
    from camface.errors import ModelError

    if not path.is_file():
        raise ModelError(f"{path} is a folder, not {'an' if what[0] in 'AEIOU' else 'a'} {what}"
                         if path.is_dir() else f"{what} not found: {path}")
