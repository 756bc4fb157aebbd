"""camface.outputs' write-beside-then-rename (`written_beside`, `replace_whole`) and the writers
that use it (`convert.save`, the batch state's files): all or nothing, errors that name the file
asked for (never a temporary one, never this file for another file's error), nothing left beside."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from camface.errors import OutputError
from camface.outputs import QUIET_S, beside, left_by_dead, place_over, replace_whole, written_beside


def _failing_rename(monkeypatch, target: str, error=None):
    """os.replace raises when it moves a temporary file over `target` (a full disk, a file another
    program holds on Windows); every other rename works."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == target and ".partial" in Path(src).name:
            raise error or OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


FINALS = ("g.png", "g.onnx", "g.npz", "g.md")  # g.png: a figure not drawn this time, so removed


@pytest.mark.parametrize("hard_links", [True, False])
@pytest.mark.parametrize("failing, error", [
    ("g.onnx", None),  # the first written: g.png already removed
    ("g.npz", None),  # g.onnx was already new
    ("g.md", None),  # the last, a final without an earlier file
    ("g.npz", KeyboardInterrupt),  # Ctrl-C between two renames
])
def test_a_rename_that_fails_leaves_every_final_as_it_was(tmp_path, monkeypatch, failing, error, hard_links):
    """written_beside renamed its finals one after another: when the second rename failed, the
    first final was already the new file (enroll's graph new, its gallery old). Now each final
    gets its earlier file back (or is removed where there was none) and nothing is left beside."""
    earlier = {name: f"earlier {name}" for name in FINALS if name != "g.md"}
    for name, text in earlier.items():
        (tmp_path / name).write_text(text)
    if not hard_links:  # a file system without them: the earlier files are moved aside instead
        monkeypatch.setattr(os, "link", lambda *args, **kwargs: (_ for _ in ()).throw(OSError(errno.EPERM, "no")))
    _failing_rename(monkeypatch, failing, error and error())
    with pytest.raises(error or OutputError) as raised:
        with written_beside(*(tmp_path / name for name in FINALS)) as staged:
            for path in staged[1:]:
                path.write_text(f"new {path.name}")
    if error is None:
        assert str(raised.value) == f"cannot write {tmp_path / failing}: No space left on device"
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == earlier


@pytest.mark.parametrize("hard_links", [True, False])
def test_finals_renamed_together_leave_no_earlier_file_beside_them(tmp_path, monkeypatch, hard_links):
    for name in FINALS[:2]:
        (tmp_path / name).write_text(f"earlier {name}")
    if not hard_links:
        monkeypatch.setattr(os, "link", lambda *args, **kwargs: (_ for _ in ()).throw(OSError(errno.EPERM, "no")))
    with written_beside(*(tmp_path / name for name in FINALS)) as staged:
        for path in staged[1:]:
            path.write_text("new")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"g.onnx": "new", "g.npz": "new", "g.md": "new"}


def test_a_final_whose_earlier_file_cannot_be_put_back_is_said_with_where_it_is(tmp_path, monkeypatch, caplog):
    """The rare case the file system refuses the way back too: the earlier file is not deleted;
    the log says where it is kept, and the error raised is the one that stopped the renames."""
    for name in FINALS[:2]:
        (tmp_path / name).write_text(f"earlier {name}")
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        if (dst.name, src.name.split(".")[-2]) in {("g.npz", "partial"), ("g.onnx", "previous")}:
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'g.npz'}: Input/output error"):
        with written_beside(tmp_path / "g.onnx", tmp_path / "g.npz") as staged:
            for path in staged:
                path.write_text("new")
    kept = [p for p in tmp_path.iterdir() if ".previous" in p.name]
    assert len(kept) == 1 and kept[0].read_text() == "earlier g.onnx"
    assert f"could not put back the earlier {tmp_path / 'g.onnx'} (Input/output error): it is kept as {kept[0]}" \
        in caplog.text


def test_temporary_names_differ_between_calls_of_one_process(tmp_path):
    """Two writers of one final in one process (threads, Ray tasks of one worker) never share a
    temporary file, which would rename one's half-written bytes over the final."""
    with written_beside(tmp_path / "a.json") as (first,), written_beside(tmp_path / "a.json") as (second,):
        assert first != second and first.parent == second.parent == tmp_path and first.suffix == ".json"


def _write_other(tmp_path):
    def write(partial):
        (tmp_path / "missing.png").read_bytes()  # an input the writer reads
    return write


def _write_naming(which):
    def write(partial):
        Path(partial).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", *([str(partial)] if which else []))
    return write


@pytest.mark.parametrize("make_write, error, said", [
    (lambda tmp_path: _write_naming(True), OutputError, "cannot write {path}: No space left on device"),
    (lambda tmp_path: _write_naming(False), OutputError, "cannot write {path}: No space left on device"),
    (lambda tmp_path: lambda partial: False, OutputError, "cannot write {path}: the file could not be written"),
    (_write_other, FileNotFoundError, "No such file or directory: '{folder}/missing.png'"),
])
def test_replace_whole_names_its_file_only_for_errors_about_it(tmp_path, make_write, error, said):
    """replace_whole set its path as the filename of any OSError `write` raised: an input that
    could not be read was said as the output. Now an error about the partial file (or naming
    none: write() on a full disk) names the path asked for, an error about another file names
    that file, and either way the earlier file stays whole with nothing beside it."""
    path = tmp_path / "summary.json"
    path.write_text("earlier")
    with pytest.raises(error) as raised:
        replace_whole(path, make_write(tmp_path))
    assert said.format(path=path, folder=tmp_path) in str(raised.value)
    if error is FileNotFoundError:
        assert raised.value.filename == str(tmp_path / "missing.png")
    assert ".partial" not in str(raised.value)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"summary.json": "earlier"}


def test_replace_whole_over_a_folder_is_an_error_naming_it_that_leaves_the_folder(tmp_path):
    """A folder at the path was handed to `write` as if it were /dev/stdout (write_text raised
    IsADirectoryError as it is); it is refused as the file it cannot be, the folder untouched."""
    folder = tmp_path / "summary.json"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(OutputError, match=f"^cannot write {folder}: Is a directory$"):
        replace_whole(folder, lambda partial: partial.write_text("{}"))
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"] and [p.name for p in folder.iterdir()] == ["inside"]


def test_replace_whole_checks_before_it_renames(tmp_path):
    """before_rename (a batch worker asking whether its run still owns OUT_DIR) runs after the
    write; what it raises leaves the earlier file and no partial file."""
    path = tmp_path / "a.json"
    path.write_text("earlier")
    seen = []

    def check():
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        raise OutputError("superseded")

    with pytest.raises(OutputError, match="superseded"):
        replace_whole(path, lambda partial: partial.write_text("new"), check)
    assert len(seen[0]) == 2 and [p.name for p in tmp_path.iterdir()] == ["a.json"] and path.read_text() == "earlier"


@pytest.mark.parametrize("name", ["g.onnx", "g.json", "g.txt"])
def test_convert_save_writes_binary_protobuf_whatever_the_suffix(tmp_path, name):
    """convert.save writes beside the final name, which keeps its suffix (numpy and matplotlib
    choose formats by it): onnx does too, and would write g.json as JSON text unless told."""
    onnx = pytest.importorskip("onnx")
    from camface.export import convert

    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    convert.save(model, tmp_path / name)
    assert onnx.ModelProto.FromString((tmp_path / name).read_bytes()) == model
    assert [p.name for p in tmp_path.iterdir()] == [name]


# ------------------------------------------------------------------ the batch state's files


@pytest.mark.parametrize("writer", ["parquet", "npz", "record"])
@pytest.mark.parametrize("named", [True, False])
def test_a_batch_file_that_cannot_be_written_is_named_and_the_earlier_one_stays(tmp_path, monkeypatch, writer, named):
    """The batch state wrote through its own temporary files (.a.1234abcd.tmp.parquet): a full
    disk was recorded as "OSError: [Errno 28] No space left on device: '.../.a.1234abcd.tmp.npz'"
    (or with no file named at all). It now says the file asked for, keeps the earlier one and
    leaves no temporary file."""
    from camface.batch.state import Outputs, write_json

    outputs = Outputs(tmp_path)
    outputs.make()
    final = {"parquet": outputs.parquet("a"), "npz": outputs.sums_path("a"), "record": outputs.record_path("a")}[writer]
    final.write_text("earlier")

    def full(partial, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", *([str(partial)] if named else []))

    with pytest.raises(OutputError) as raised:
        if writer == "record":
            monkeypatch.setattr(Path, "write_text", full)
            write_json(final, {"status": "done"}, outputs.check)
        else:
            monkeypatch.setattr(np, "savez", full)
            outputs.write(final, lambda tmp: np.savez(tmp, count=np.zeros(2)))
    assert str(raised.value) == f"cannot write {final}: No space left on device"
    monkeypatch.undo()
    assert final.read_text() == "earlier" and [p.name for p in final.parent.iterdir()] == [final.name]


def test_a_drawn_video_the_disk_refuses_is_named_and_the_earlier_one_stays(tmp_path, monkeypatch):
    """The annotated video had its own write-and-rename: a sink failing midway named its
    temporary file (or no file); now the video asked for, the earlier one kept. An error about
    the input (frames that no longer decode) still names the input."""
    from camface.batch import state
    from camface.errors import SourceError

    outputs = state.Outputs(tmp_path)
    outputs.make()
    final = outputs.video("a")
    final.write_text("earlier")
    out = {"path": "/in/a.mp4", "fps": 10.0, "frames": 1, "counts": np.array([0]), "faces": [[]],
           "probs": np.zeros((0, 2), np.float32), "heatmaps": np.zeros((0, 4, 4), np.float32),
           "class_index": np.zeros(0, np.int64), "dropped": np.array([0]), "provider": "CPUExecutionProvider",
           "crops": np.zeros((0, 8, 8, 3), np.uint8)}

    def full(tmp, *args):
        Path(tmp).write_bytes(b"half a video")
        raise OSError(errno.ENOSPC, "No space left on device")

    def gone(tmp, *args):
        raise SourceError("/in/a.mp4: 0 frames decoded for drawing, 1 detected")

    for fails, error, said in [(full, OutputError, f"cannot write {final}: No space left on device"),
                               (gone, SourceError, "/in/a.mp4: 0 frames decoded for drawing, 1 detected")]:
        monkeypatch.setattr(state, "_write_video", fails)
        with pytest.raises(error) as raised:
            state.write_video_outputs(outputs, "a", dict(out), object(), "gradcam", None, ("x", "y"))
        assert str(raised.value) == said
        assert final.read_text() == "earlier" and [p.name for p in outputs.videos.iterdir()] == ["a.mp4"]


def test_a_figure_failing_on_another_file_names_both(tmp_path, monkeypatch):
    """evaluate's figures: savefig failing to read another file was said as the figure itself
    ("cannot write f.png: No such file or directory"); the other file is named too."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from camface.evaluate.plot import _save

    font = tmp_path / "fonts" / "x.ttf"
    monkeypatch.setattr(Figure, "savefig", lambda self, target, **kwargs: open(font))
    path = tmp_path / "f.png"
    with pytest.raises(OutputError) as raised:
        _save(Figure(), path, dpi=50)
    assert str(raised.value) == f"cannot write {path}: [Errno 2] No such file or directory: '{font}'"
    assert list(tmp_path.iterdir()) == []


def test_the_report_names_a_record_it_cannot_read_as_read_not_written(tmp_path, monkeypatch):
    """write_report said "cannot write OUT/state/a.json" for a record it could not read."""
    from camface.batch.inputs import Video
    from camface.batch.report import write_report
    from camface.batch.state import Outputs

    outputs = Outputs(tmp_path)
    outputs.make()
    record = outputs.record_path("a")
    record.write_text("{}")
    real = Path.read_text

    def unreadable(self, *args, **kwargs):
        if self == record:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(OutputError) as raised:
        write_report(outputs, [Video("/archive/a.mp4", "a")], ("x",), "BGR", "gradcam", "jet", 0.5, {})
    assert f"cannot write {record}" not in str(raised.value)
    assert f"Permission denied: '{record}'" in str(raised.value)


@pytest.mark.parametrize("name", ["a" * 230 + ".mp4", "é" * 115 + ".json", "a" * 250 + ".md"])
def test_a_final_named_near_the_limit_is_written_through_a_temporary_name_within_it(tmp_path, name):
    """The temporary name is the final's and 24 bytes more: a final of 232-255 bytes could not be
    written ('File name too long'), and removing its temporary then raised that error again, in
    place of the one that named the final."""
    final = tmp_path / name
    with written_beside(final) as (partial,):
        assert len(os.fsencode(partial.name)) <= 255 and partial.suffix == final.suffix
        partial.write_bytes(b"whole")
    assert final.read_bytes() == b"whole" and sorted(tmp_path.iterdir()) == [final]


def test_a_temporary_that_cannot_be_removed_does_not_hide_the_error(tmp_path, monkeypatch):
    real = Path.unlink

    def unlink(path, missing_ok=False):
        if ".partial" in path.name:
            raise OSError(errno.EACCES, "Permission denied", str(path))
        return real(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(OutputError, match="cannot write .*g.json: No space left on device"):
        with written_beside(tmp_path / "g.json") as (partial,):
            raise OSError(errno.ENOSPC, "No space left on device", str(partial))


@pytest.fixture(scope="module")
def dead_pid():
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _left(final: Path, pid: int, tag: str = "partial", age: float = 2 * QUIET_S, of: Path | None = None) -> Path:
    """A file as `beside(of or final, tag)` names it in process `pid`, last written `age` s ago."""
    with pytest.MonkeyPatch.context() as patch:  # the name cut for that pid's digits
        patch.setattr(os, "getpid", lambda: pid)
        path = beside(of or final, tag)
    path.write_bytes(b"half")
    os.utime(path, (time.time() - age,) * 2)
    return path


@pytest.mark.parametrize("name", ["clip.mp4", "a.b.mp4", "a" * 240 + ".mp4", "é" * 118 + ".mp4"])
def test_left_by_dead_finds_only_a_dead_process_s_quiet_files_for_that_final(tmp_path, dead_pid, name):
    """A hard-killed recording's partial file is found for its own final (names cut near the
    limit too); not one of a live process, one written to within QUIET_S (another machine's, on a
    shared folder), one of another final or tag, nor an ordinary file."""
    final = tmp_path / name
    final.write_bytes(b"earlier")
    dead = _left(final, dead_pid)
    kept = [_left(final, os.getpid()), _left(final, dead_pid, age=0), _left(final, dead_pid, "previous"),
            _left(final, dead_pid, of=tmp_path / ("x" + name)), _left(final, dead_pid, of=final.with_suffix(".json"))]
    assert left_by_dead(final) == [dead]
    assert all(path.exists() for path in kept)


@pytest.mark.parametrize("links, refused, renamed", [
    (1, False, True),  # one link, this user's: the atomic rename
    (2, False, False),  # another hard link: copied into the inode, which both names show
    (1, True, False),  # the rename refused (a sticky folder, another user's file): copied into it
], ids=["lone", "hard-link", "rename-refused"])
def test_place_over_renames_only_where_nothing_else_changes(tmp_path, monkeypatch, links, refused, renamed):
    """`place_over` puts a staged file in the earlier one's place: renamed where that changes
    nothing but the bytes, else copied into the earlier inode (a descriptor on it returned,
    after the bytes); the caller removes the staged file then."""
    final = tmp_path / "rec.mp4"
    final.write_bytes(b"earlier bytes, longer than the new ones")
    if links == 2:
        os.link(final, tmp_path / "other.mp4")
    if refused:
        def refuse(src, dst, **kwargs):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))

        monkeypatch.setattr(os, "replace", refuse)
    inode = final.stat().st_ino
    staged = beside(final)
    staged.write_bytes(b"new bytes")
    target = place_over(staged, final)
    monkeypatch.undo()
    assert (target is None) == renamed and final.read_bytes() == b"new bytes"
    assert (final.stat().st_ino == inode) == (not renamed) and staged.exists() == (not renamed)
    if target is not None:
        assert os.lseek(target, 0, os.SEEK_CUR) == len(b"new bytes")
        os.write(target, b"+more")
        os.close(target)
        assert final.read_bytes() == b"new bytes+more"
    if links == 2:
        assert (tmp_path / "other.mp4").read_bytes() == final.read_bytes()
