"""`camface batch` without Ray running: inputs, bad input, output folder, the actor plan."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from camface.batch.cluster import ClusterError, Plan, plan
from camface.batch.inputs import InputError, find_videos, video_id
from camface.cli import main


def test_inputs_files_folders_globs_each_once_in_order(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/2.mp4", "a/10.avi", "a/notes.txt", "a/._2.mp4", "b.mkv", "c.mov"):  # ._2.mp4: macOS metadata
        (tmp_path / name).write_bytes(b"x")
    videos = find_videos([str(tmp_path / "c.mov"), str(tmp_path / "a"), str(tmp_path / "*.m*"), str(tmp_path / "c.mov")])
    assert [v.path.rsplit("/", 1)[1] for v in videos] == ["c.mov", "10.avi", "2.mp4", "b.mkv"]
    assert len({v.id for v in videos}) == 4 and videos[0].id.startswith("c-")


def test_the_runs_own_outputs_are_never_inputs(tmp_path, caplog):
    """A recursive glob over an archive that holds OUT_DIR finds, on a --resume, the annotated
    videos and segment parts of the run itself; the user's videos under OUT_DIR stay inputs."""
    archive = tmp_path / "archive"
    out = archive / "out"
    a, b = video_id(archive / "a.mp4"), video_id(archive / "day2" / "b.mp4", "archive/day2/b.mp4")
    earlier = "c-0123abcd"  # a video OUT_DIR holds a record of, under an id an earlier camface gave
    for path in (archive / "a.mp4", archive / "day2" / "b.mp4", out / "videos" / f"{a}.mp4",
                 out / "parts" / b / "00000-0-300.mp4", out / "videos" / "mine.mp4",
                 out / "state" / f"{earlier}.json", out / "videos" / f"{earlier}.mp4",
                 out / "parts" / "d-4567cdef" / "00000-0-300.mp4"):  # an earlier id's parts, not joined yet
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    videos = find_videos([str(archive / "**" / "*.mp4")], out)
    assert [v.path for v in videos] == [str(archive / "a.mp4"), str(archive / "day2" / "b.mp4"),
                                        str(out / "videos" / "mine.mp4")]
    assert "skipping 4 file(s) that this run writes in" in caplog.text
    # OUT_DIR above the archive (`camface batch recordings/ -o .`): the inputs are inputs
    assert [v.path for v in find_videos([str(archive / "a.mp4"), str(archive / "day2")], tmp_path)] == [
        str(archive / "a.mp4"), str(archive / "day2" / "b.mp4")]
    # named beside their video, they are skipped too
    assert [v.path for v in find_videos([str(out / "videos" / f"{a}.mp4"), str(archive / "a.mp4")], out)] == [
        str(archive / "a.mp4")]


def test_a_folder_without_videos_is_named_with_its_subfolders(tmp_path, caplog):
    """A folder holding only subfolders of videos (an archive of days) gave nothing without a
    word beside other inputs; alone, 'no videos matched' said nothing of the subfolders."""
    (tmp_path / "archive" / "day1").mkdir(parents=True)
    (tmp_path / "archive" / "day1" / "a.mp4").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "b.mp4").write_bytes(b"x")
    videos = find_videos([str(tmp_path / "archive"), str(tmp_path / "empty"), str(tmp_path / "b.mp4")])
    assert [v.path for v in videos] == [str(tmp_path / "b.mp4")]
    assert f"folder {tmp_path / 'archive'} holds no videos; its 1 subfolder(s) are not read: pass " \
           f"'{tmp_path / 'archive' / '**' / '*.mp4'}'" in caplog.text
    assert f"folder {tmp_path / 'empty'} holds no videos\n" in caplog.text + "\n"
    assert [v.path for v in find_videos([str(tmp_path / "archive" / "**" / "*.mp4")])] == [
        str(tmp_path / "archive" / "day1" / "a.mp4")]  # the pattern it gives finds them


def test_same_name_in_two_folders_gets_two_ids(tmp_path):
    (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
    assert video_id(tmp_path / "x" / "clip.mp4") != video_id(tmp_path / "y" / "clip.mp4")
    assert video_id(tmp_path / "x" / "clip.mp4") == video_id(tmp_path / "x" / "clip.mp4")


ARCHIVE = ("archive/a.mp4", "archive/day1/clip.mp4", "archive/day2/clip.mp4")


@pytest.mark.parametrize("inputs", [
    ["archive/**/*.mp4"],  # one glob over the sub-folders
    ["archive", "archive/day1", "archive/day2"],  # folders; day1/ and day2/ hold the same name
    ["archive/day2/clip.mp4", "archive/a.mp4", "archive/day1/clip.mp4"],  # files named alone
    ["archive/day1/*.mp4", "archive/day2/clip.mp4", "archive"],
])
def test_ids_follow_the_archive_moved_under_another_parent_and_stay_apart(tmp_path, monkeypatch, inputs):
    """Ids hashed the absolute path: an archive moved or renamed above its own folder got new
    ids on --resume, and every video was done again, its rows beside the earlier ones. Ids come
    from the path below the folder above each input now; two files of one name in two folders
    keep two ids, whatever the order of the inputs."""
    import shutil

    for name in ARCHIVE:
        (tmp_path / "old" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "old" / name).write_bytes(b"x")

    def ids(parent, specs):
        return {v.path: v.id for v in find_videos([str(parent / spec) for spec in specs])}

    before = ids(tmp_path / "old", inputs)
    assert len(before) == len(ARCHIVE) and len(set(before.values())) == len(ARCHIVE)
    assert ids(tmp_path / "old", inputs[::-1]) == before  # the order of the inputs does not count
    shutil.move(tmp_path / "old", tmp_path / "elsewhere" / "new")
    after = ids(tmp_path / "elsewhere" / "new", inputs)
    assert after == {path.replace(str(tmp_path / "old"), str(tmp_path / "elsewhere" / "new")): id_
                     for path, id_ in before.items()}
    monkeypatch.chdir(tmp_path / "elsewhere" / "new")  # relative inputs name the same files
    assert ids(Path("."), inputs) == after


def test_a_video_done_under_an_id_of_its_absolute_path_keeps_that_id(tmp_path):
    """OUT_DIR of a camface whose ids hashed the absolute path: a --resume gives the same file
    (its name, size and modification time) its earlier id, so it is not done again beside its
    earlier rows; a file not matched one to one keeps its own id."""
    import hashlib
    import json

    from camface.batch.inputs import stamp
    from camface.batch.pipeline import earlier_ids
    from camface.batch.state import Outputs

    for name in ("a/one.mp4", "a/two.mp4", "b/two.mp4"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * 10)
    outputs = Outputs(tmp_path / "out")
    outputs.make()
    old = {}
    for name in ("a/one.mp4", "a/two.mp4"):
        path = tmp_path / name
        old[name] = f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        outputs.record_path(old[name]).write_text(json.dumps(
            {"video": old[name], "path": str(path), "status": "done", "source": stamp(path)}))
    os.utime(tmp_path / "b" / "two.mp4", ns=(0, (tmp_path / "a" / "two.mp4").stat().st_mtime_ns))
    videos = find_videos([str(tmp_path / "a"), str(tmp_path / "b")])
    kept = earlier_ids(outputs, videos)
    assert [v.path for v in kept] == [v.path for v in videos]
    assert [v.id for v in kept] == [old["a/one.mp4"], videos[1].id, videos[2].id]  # two.mp4: two matches
    os.utime(tmp_path / "a" / "one.mp4", ns=(0, 1))  # another version of the file: redone under its id
    assert earlier_ids(outputs, videos) == videos


@pytest.mark.parametrize("make, args, message", [
    (lambda p: (p / "empty").mkdir(), ["{p}/empty"], "no videos matched"),
    (lambda p: None, ["{p}/*.mp4"], "no videos matched"),
    (lambda p: None, ["{p}/missing.mp4"], "input not found"),
    (lambda p: (p / "v.mp4").write_bytes(b"x") and (p / "out").write_text("file"),
     ["{p}/v.mp4", "-o", "{p}/out"], "it is a file"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--address", "127.0.0.1:1"],
     "cannot reach a Ray cluster at 127.0.0.1:1"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--address", "nonsense"], "expected HOST:PORT"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--max-faces", "0"], "--max-faces must be"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--graph-actors", "0"], "--graph-actors must be"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--segment-frames", "-1"], "--segment-frames must be"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--smooth", "0.5", "--segment-frames", "100"],
     "--segment-frames cannot be used with --smooth"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--smooth", "1.5"], "--smooth must be in [0, 1)"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--graph-gpus", "-1"], "--graph-gpus must be a number >= 0"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--graph-gpus", "nan"], "--graph-gpus must be a number >= 0"),
    # Ray refuses these inside the pipeline (a ValueError after OUT_DIR was made and Ray started)
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--graph-gpus", "1.5"],
     "--graph-gpus 1.5: a share of a GPU is a fraction from 0.0001 to 1, and more than one GPU per actor a whole"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--graph-gpus", "0.00001"],
     "--graph-gpus 1e-05: a share of a GPU is a fraction from 0.0001 to 1"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--model", "{p}/missing.onnx"], "missing.onnx"),
    (lambda p: (p / "v.mp4").write_bytes(b"x"), ["{p}/v.mp4", "--graph-gpus", "1", "--no-split-stages"],
     "--graph-gpus 1 puts the graph in its own actors on GPUs, which --no-split-stages rules out"),
])
def test_bad_input_is_a_clear_error_before_any_work(tmp_path, capsys, make, args, message):
    make(tmp_path)
    argv = [a.format(p=tmp_path) for a in args]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "result")]
    assert main(["batch", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "result").exists()  # nothing made: no empty OUT_DIR, lock or Ray left behind


def tiny_clip(path: Path) -> Path:
    """A 2-frame 32x32 MP4 that opens as a video."""
    import numpy as np

    from tests.realtime_helpers import write_clip

    return write_clip(path, [np.full((32, 32, 3), 40 * k, np.uint8) for k in range(2)])


def test_inputs_of_which_none_opens_are_refused_before_the_model_loads_and_out_dir_is_kept(tmp_path, capsys,
                                                                                         monkeypatch):
    """Inputs that are all damaged or not videos loaded the model and started Ray, then failed
    every video. Refused now in one line naming the first few (and a count) and why, exit 2,
    before the model loads; OUT_DIR of an earlier run is left as it was (a --resume with good
    inputs still continues it)."""
    import camface.api
    from camface.batch import cluster

    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "a.mp4").write_bytes(b"x")
    (archive / "b.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)  # a header, then noise
    (archive / "c.mkv").write_bytes(b"")
    (archive / "d.avi").write_bytes(b"RIFF" + b"\x00" * 60)
    (tmp_path / "notes.txt").write_text("not a video")  # named alone: tried whatever its suffix
    out = tmp_path / "out"
    (out / "state").mkdir(parents=True)
    earlier = {"state/old-0123abcd.json": '{"video": "old-0123abcd", "status": "done"}', "report.md": "# earlier"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    monkeypatch.setattr(camface.api, "load", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(cluster, "connect", lambda address: pytest.fail("Ray started"))
    assert main(["batch", str(archive), str(tmp_path / "notes.txt"), "-o", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err == (f"camface: error: none of the 5 input file(s) opens as a video: {archive / 'a.mp4'}, "
                   f"{archive / 'b.mp4'}, {archive / 'c.mkv'} (not a video OpenCV can decode); and 2 more; "
                   "nothing was run\n")
    assert {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()} == earlier

    # one that opens among them: the run goes on (the others fail in it, each in its record),
    # and the probe stopped at the first that opened
    from camface.batch.inputs import check_one_opens
    from camface.realtime.sources import VideoFileSource

    tiny_clip(archive / "e.mp4")
    tried = []
    real = VideoFileSource.check
    monkeypatch.setattr(VideoFileSource, "check", lambda self: (tried.append(self.path.name), real(self))[1])
    assert check_one_opens(find_videos([str(tmp_path / "*" / "[eab].mp4")])) is None
    assert tried == ["a.mp4", "b.mp4", "e.mp4"]
    tried.clear()
    assert check_one_opens(find_videos([str(archive / "e.mp4"), str(archive)])) is None
    assert tried == ["e.mp4"]


@pytest.mark.parametrize("resources, kwargs, expected", [
    # (cluster, options) -> (fused, detect actors, detect cpu, graph gpus, graph cpu, render actors, render cpu)
    ({"CPU": 2}, {}, (True, 2, 1.0, 0.0, 0.0, 2, 0.0)),  # no GPU: one actor per CPU runs every stage
    ({"CPU": 16}, {"videos": 3}, (True, 3, 1.0, 0.0, 0.0, 3, 0.0)),  # never more actors than videos
    ({"CPU": 2}, {"detect_actors": 4}, (True, 4, 0.5, 0.0, 0.0, 4, 0.0)),  # scaled so all four start
    ({"CPU": 2}, {"split": True}, (False, 1, 0.8, 0.0, 0.4, 1, 0.8)),  # 2.5 CPUs asked: scaled to fit
    ({"CPU": 16}, {"split": True}, (False, 9, 1.0, 0.0, 0.5, 6, 1.0)),
    ({"CPU": 16, "GPU": 2}, {}, (False, 10, 1.0, 1.0, 0.0, 6, 1.0)),  # a GPU: the graph goes there
    ({"CPU": 16, "GPU": 2}, {"record": False}, (False, 15, 1.0, 1.0, 0.0, 1, 1.0)),  # rows only: one render
    ({"CPU": 16, "GPU": 1}, {"graph_gpus": 0.25, "graph_actors": 4}, (False, 10, 1.0, 0.25, 0.0, 6, 1.0)),
    ({"CPU": 1, "GPU": 1}, {"split": True, "graph_gpus": 0}, (False, 1, 0.4, 0.0, 0.2, 1, 0.4)),  # scaled
    ({"CPU": 4, "GPU": 1}, {"graph_gpus": 0}, (True, 4, 1.0, 0.0, 0.0, 4, 0.0)),
    # asked for more actors than units of work: one per unit (the others would load models and wait)
    ({"CPU": 2}, {"detect_actors": 4, "videos": 2}, (True, 2, 1.0, 0.0, 0.0, 2, 0.0)),
    ({"CPU": 16, "GPU": 1}, {"detect_actors": 8, "render_actors": 5, "videos": 3},
     (False, 3, 1.0, 1.0, 0.0, 3, 1.0)),
])
def test_plan_asks_only_for_what_the_cluster_has(resources, kwargs, expected):
    p = plan(resources, **kwargs)
    assert (p.fused, p.detect_actors, p.detect_cpus, p.graph_gpus, p.graph_cpus, p.render_actors,
            p.render_cpus) == expected
    total = p.detect_actors * p.detect_cpus + (0 if p.fused else p.graph_actors * p.graph_cpus
                                               + p.render_actors * p.render_cpus)
    assert total <= resources["CPU"] + 1e-9
    assert p.graph_gpus * p.graph_actors <= resources.get("GPU", 0)
    assert isinstance(p, Plan) and f"{resources['CPU']:g} CPU" in p.describe()


def test_plan_says_where_the_graph_runs():
    assert "no GPU in the cluster: the graph runs on CPU; no GPU to hand the graph to" in plan({"CPU": 2}).describe()
    text = plan({"CPU": 4, "GPU": 1}, split=False).describe()  # --no-split-stages on a GPU cluster
    assert "graph on CPU" in text and "the cluster's GPUs are not used" in text and "runs on it" not in text


def test_plan_starts_at_most_one_cpu_graph_actor_per_cpu():
    """1000 CPU graph actors on 2 CPUs started 144 Ray workers and made no progress."""
    p = plan({"CPU": 2}, graph_actors=1000, split=True)
    assert p.graph_actors == 2
    assert "--graph-actors 1000: the graph runs on CPU, one thread an actor, so 2 (one per CPU)" in p.describe()
    assert plan({"CPU": 2}, graph_actors=2, split=True).graph_actors == 2
    assert "--graph-actors" not in plan({"CPU": 2}, graph_actors=2, split=True).describe()
    assert plan({"CPU": 16, "GPU": 8}, graph_actors=8).graph_actors == 8  # on GPUs: as asked


def test_plan_says_when_it_starts_fewer_actors_than_asked():
    text = plan({"CPU": 16, "GPU": 1}, detect_actors=8, render_actors=5, videos=3).describe()
    assert "--detect-actors 8: 3 unit(s) of work, so 3 actor(s)" in text
    assert "--render-actors 5: 3 unit(s) of work, so 3 actor(s)" in text
    assert "unit(s) of work" not in plan({"CPU": 2}, detect_actors=2, videos=2).describe()


@pytest.mark.parametrize("kwargs, note", [
    ({"render_actors": 3, "graph_actors": 2}, "--graph-actors 2 and --render-actors 3 not used: they size the separate "
                                              "stages (--split-stages)"),
    ({"render_actors": 2}, "; --render-actors 2 not used"),
    ({}, None),
    ({"render_actors": 3, "split": True}, None),  # separate stages: used
])
def test_plan_says_which_actor_counts_one_actor_per_unit_does_not_use(kwargs, note):
    """Without a GPU one actor per unit runs every stage: --graph-actors and --render-actors were
    dropped without a word."""
    text = plan({"CPU": 4}, **kwargs).describe()
    assert (note in text) if note else ("not used" not in text), text


@pytest.mark.parametrize("resources, kwargs, message", [
    ({"CPU": 4}, {"graph_gpus": 1}, "more GPUs than the cluster has"),
    ({"CPU": 4, "GPU": 1}, {"graph_gpus": 1, "graph_actors": 2}, "would wait forever"),
    ({"CPU": 0}, {}, "no CPU"),
])
def test_plan_refuses_what_would_wait_forever(resources, kwargs, message):
    with pytest.raises(ClusterError, match=message):
        plan(resources, **kwargs)


def test_no_inputs_error_names_them(tmp_path):
    with pytest.raises(InputError, match="no videos matched .*nothing"):
        find_videos([str(tmp_path / "nothing*")])


def test_help_says_how_many_workers_and_their_memory_and_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--detect-actors N the most workers running at once" in text
    assert "~0.5 GB of memory each" in text and "Lower N where memory is short" in text
    assert "Memory: ~0.5 GB per worker (--detect-actors caps them), ~0.3 GB for this driver" in text
    assert "3 every video explained, some only in part" in text


def test_without_an_address_a_run_starts_its_own_local_ray(monkeypatch):
    """No --address and no RAY_ADDRESS: a new local Ray, not the last one started on this machine
    (plain `ray.init()` joins that one, found in /tmp/ray/ray_current_cluster: another camface
    batch run's, which ends it under this run). An address, given or in RAY_ADDRESS, is joined."""
    ray = pytest.importorskip("ray")
    from camface.batch import cluster

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(cluster, "quiet_ray_data", lambda: None)
    monkeypatch.setattr(cluster, "check_reachable", lambda address: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.connect(None) is True
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert cluster.connect(None) is True
    assert cluster.connect("auto") is True
    assert [call["address"] for call in calls] == ["local", "head:6379", "auto"]


@pytest.mark.parametrize("drawing", [dict(colormap="viridis"), dict(alpha=0.2), dict(cam_boxes=True),
                                     dict(bars=True)])
def test_drawing_options_are_in_the_resume_key_only_when_videos_are_drawn(drawing):
    """With --no-record nothing is drawn per video: another --colormap, --alpha, --cam-boxes or
    --bars on --resume keeps the videos done (it did every video again); recorded, it does not."""
    from pathlib import Path

    from camface.batch.inputs import Video
    from camface.batch.pipeline import BatchJob, changed_since
    from camface.realtime.config import LiveConfig

    def settings(record, **options):
        return BatchJob((), "out", LiveConfig(model=Path("g.onnx"), **options), record=record).settings()

    assert settings(False, **drawing) == settings(False)
    assert settings(True, **drawing) != settings(True)
    assert settings(False, method="none") != settings(False)  # what the rows hold still counts

    class Outputs:  # videos done earlier with these settings
        def __init__(self, earlier):
            self.earlier = earlier

        def records(self):
            return {"v": {"status": "done", "settings": self.earlier, "source": None}}

    def changed(earlier, now):
        return changed_since(Outputs(earlier), [Video("missing.mp4", "v")], now)[0]

    assert changed(settings(True, **drawing), settings(False)) == ["record"]  # the drawing goes with it
    assert changed(settings(True, **drawing), settings(True)) == sorted(drawing)
    older = {**settings(False), **settings(True, **drawing), "record": False}  # stored by an earlier camface
    assert changed(older, settings(False)) == ["alpha", "bars", "cam_boxes", "colormap"]


def test_a_glob_skips_non_videos_as_a_folder_does_naming_them(tmp_path, caplog):
    """'dir/*' took notes.txt, which then failed as a corrupt video, while the folder `dir`
    skipped it: a glob now keeps the video suffixes too, and says in one line which files it
    skipped; a file named on its own is still tried, whatever its suffix."""
    (tmp_path / "a").mkdir()
    for name in ("a/1.mp4", "a/2.MOV", "a/notes.txt", "a/thumb.jpg", "a/raw.bin"):
        (tmp_path / name).write_bytes(b"x")
    pattern = str(tmp_path / "a" / "*")
    assert find_videos([pattern]) == find_videos([str(tmp_path / "a")])
    skipped = [r.getMessage() for r in caplog.records if "not a video" in r.getMessage()]
    assert skipped == [f"camface batch: {pattern} matched 3 file(s) with no video suffix, skipped: "
                       f"{tmp_path / 'a' / 'notes.txt'}, {tmp_path / 'a' / 'raw.bin'}, {tmp_path / 'a' / 'thumb.jpg'}"
                       " (not a video: name it alone to try it)"]
    caplog.clear()
    videos = find_videos([str(tmp_path / "a" / "raw.bin"), str(tmp_path / "a" / "*.mp4")])
    assert [v.path for v in videos] == [str(tmp_path / "a" / "raw.bin"), str(tmp_path / "a" / "1.mp4")]
    assert caplog.text == ""
    many = tmp_path / "many"
    many.mkdir()
    for k in range(12):
        (many / f"{k:02d}.txt").write_bytes(b"x")
    with pytest.raises(InputError, match="no videos matched"):
        find_videos([str(many / "*")])
    assert f"{many / '09.txt'} and 2 more (not a video" in caplog.text


def test_a_glob_over_an_archive_holding_out_dir_does_not_name_the_runs_own_files(tmp_path, caplog):
    """A recursive glob over an archive that holds OUT_DIR (a --resume) matched the run's own
    summary.json, report.md and records, and its warning named them as files to try alone; the
    files in OUT_DIR are the run's, not skipped inputs. Others are still named."""
    archive = tmp_path / "archive"
    (archive / "out" / "records").mkdir(parents=True)
    for name in ("a.mp4", "notes.txt", "out/summary.json", "out/report.md", "out/records/a.json"):
        (archive / name).write_bytes(b"x")
    videos = find_videos([str(archive / "**" / "*")], archive / "out")
    assert [v.path for v in videos] == [str(archive / "a.mp4")]
    skipped = [r.getMessage() for r in caplog.records if "no video suffix" in r.getMessage()]
    assert len(skipped) == 1 and "matched 1 file(s)" in skipped[0] and str(archive / "notes.txt") in skipped[0]
    assert str(archive / "out") not in skipped[0]


def test_a_resume_with_other_options_refuses_to_leave_other_videos_rows_of_other_options(tmp_path, capsys,
                                                                                        monkeypatch):
    """OUT_DIR holds a video done with another model that is not among a --resume's inputs: the
    run did not do it again and left its rows in OUT_DIR/rows beside its own (two models' rows in
    one folder, a table that reads them all mixing them). Refused before Ray starts, naming the
    option and the video; a video done with the same options is kept as before."""
    import json

    from camface.api import load
    from camface.batch import cluster
    from camface.batch.pipeline import BatchJob, done_otherwise
    from camface.batch.inputs import Video
    from camface.batch.state import Outputs
    from camface.realtime.config import LiveConfig

    tiny_clip(tmp_path / "v.mp4")  # a video that opens: one that does not is refused before this check
    out = tmp_path / "out"
    outputs = Outputs(out)
    outputs.make()
    with load(device="cpu") as opened:  # as the driver resolves the bundled graph and --method auto
        config = LiveConfig(model=opened.model_path.resolve(), method=opened.config.method)
    settings = BatchJob((), str(out), config).settings()
    for name, model in (("old", "/models/other.onnx"), ("same", settings["model"])):
        outputs.record_path(f"{name}-0123abcd").write_text(json.dumps(
            {"video": f"{name}-0123abcd", "path": f"/archive/{name}.mp4", "status": "done",
             "settings": {**settings, "model": model}}))
    assert done_otherwise(outputs, [], settings) == (["/archive/old.mp4"], ["model"])
    assert done_otherwise(outputs, [], {**settings, "model": "/models/other.onnx"}) == (["/archive/same.mp4"],
                                                                                       ["model"])
    assert done_otherwise(outputs, [Video("/archive/old.mp4", "old-0123abcd")], settings) == ([], [])  # redone
    monkeypatch.setattr(cluster, "connect", lambda address: pytest.fail("Ray started"))
    assert main(["batch", str(tmp_path / "v.mp4"), "-o", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds 1 video(s) done with other options (model) that are not among the inputs, " \
           "e.g. /archive/old.mp4" in err
    assert sorted(p.name for p in outputs.state.iterdir()) == ["old-0123abcd.json", "same-0123abcd.json"]
    assert json.loads((out / ".camface-run.json").read_text())["token"] is None  # the lock released


@pytest.mark.parametrize("stem", ["a" * 230, "é" * 120, "a" * 205 + "é"])
def test_a_video_with_a_long_name_gets_an_id_its_outputs_can_be_written_under(tmp_path, stem):
    """A name of up to 255 bytes is a valid file, but its id named outputs whose temporary files
    (".<id>.parquet.<pid>-<6>.partial.parquet") passed the 255 bytes a name may have: the video
    failed ('File name too long') and so did its record. The stem is cut, the digest keeps two
    such videos apart, and shorter names keep their ids (a resume finds their outputs)."""
    from camface.batch.inputs import MAX_STEM_BYTES
    from camface.batch.state import Outputs, write_json

    first, second = tmp_path / f"{stem}1.mp4", tmp_path / f"{stem}2.mp4"
    ids = [video_id(path) for path in (first, second)]
    assert ids[0] != ids[1] and ids[0][:-9] == ids[1][:-9] and stem.startswith(ids[0][:-9])
    assert len(ids[0][:-9].encode()) <= MAX_STEM_BYTES and ids[0][:-9].encode() == stem.encode()[:len(ids[0][:-9].encode())]
    outputs = Outputs(tmp_path / "out")
    outputs.make()
    for path in (outputs.parquet(ids[0]), outputs.video(ids[0]), outputs.sums_path(ids[0])):
        outputs.write(path, lambda tmp: tmp.write_bytes(b"x"))
    write_json(outputs.record_path(ids[0]), {"status": "done"})
    assert sorted(p.name for p in outputs.state.iterdir()) == sorted([f"{ids[0]}.json", f"{ids[0]}.npz"])
    short = tmp_path / ("b" * MAX_STEM_BYTES + ".mp4")
    assert video_id(short).startswith("b" * MAX_STEM_BYTES + "-")  # as before
