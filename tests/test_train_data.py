"""camface train, the parts without TensorFlow: folder scan, crop cache, split, metrics, errors."""

import errno
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from camface import cli
from camface.models import dataset, report


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


class FakeCropper:
    """Returns as many crops as `faces[name]` says (by file size, which differs per photo)."""

    def __init__(self, faces_by_mean: dict[int, int], size: int):
        self.faces_by_mean = faces_by_mean
        self.size = size
        self.calls = 0
        self.closed = False

    def crop_faces(self, image_bgr):
        self.calls += 1
        n = self.faces_by_mean[int(round(image_bgr.mean()))]
        return [np.full((self.size, self.size, 3), 7 * i, np.uint8) for i in range(n)]

    def close(self):
        self.closed = True


def test_scan_classes_sorted_ignores_hidden_and_other_files(tmp_path):
    grey = np.full((8, 8, 3), 100, np.uint8)
    _write(tmp_path / "bob" / "b.png", grey)
    _write(tmp_path / "bob" / "nested" / "a.jpg", grey)
    _write(tmp_path / "alice" / "x.PNG", grey)
    _write(tmp_path / ".hidden" / "x.png", grey)
    _write(tmp_path / "alice" / ".thumbs" / "y.png", grey)
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    classes = dataset.scan_classes(tmp_path)
    assert list(classes) == ["alice", "bob"]
    assert [p.name for p in classes["alice"]] == ["x.PNG"]
    assert [p.relative_to(tmp_path / "bob").as_posix() for p in classes["bob"]] == ["b.png", "nested/a.jpg"]


def test_scan_classes_orders_names_as_every_machine_does(tmp_path):
    """Windows sorts paths ignoring case, POSIX by code point ("B" before "a"): the labels'
    order and the photos' (which the stratified split draws from) were another on another
    machine. Both ignore case now, as Windows does, on every machine."""
    grey = np.full((8, 8, 3), 100, np.uint8)
    for name in ("b.png", "A.png", "sub/C.png", "Sub2/a.png"):
        _write(tmp_path / "alice" / name, grey)
    _write(tmp_path / "Bob" / "x.png", grey)
    classes = dataset.scan_classes(tmp_path)
    assert list(classes) == ["alice", "Bob"]
    assert [p.relative_to(tmp_path / "alice").as_posix() for p in classes["alice"]] == [
        "A.png", "b.png", "sub/C.png", "Sub2/a.png"]


@pytest.mark.parametrize("layout, match", [
    ({}, "holds no class folders with images"),
    ({"only": 2}, "one class only \\('only'\\)"),
])
def test_scan_classes_errors(tmp_path, layout, match):
    for label, n in layout.items():
        for i in range(n):
            _write(tmp_path / label / f"{i}.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(dataset.SourceError, match=match):
        dataset.scan_classes(tmp_path)


def test_scan_classes_missing_folder(tmp_path):
    with pytest.raises(dataset.SourceError, match="is not a folder"):
        dataset.scan_classes(tmp_path / "nope")


def test_prepare_crops_counts_statuses_and_reuses_cache(tmp_path):
    data = tmp_path / "data"
    # pixel mean -> faces the fake detector reports: 10 -> 1, 20 -> 0, 30 -> 2
    _write(data / "a" / "one.png", np.full((20, 30, 3), 10, np.uint8))
    _write(data / "a" / "none.png", np.full((20, 30, 3), 20, np.uint8))
    _write(data / "b" / "one.jpg", np.full((20, 30, 3), 10, np.uint8))
    _write(data / "b" / "one.png", np.full((20, 30, 3), 10, np.uint8))  # same stem, other ext
    _write(data / "b" / "two.png", np.full((20, 30, 3), 30, np.uint8))
    (data / "b" / "broken.jpg").write_bytes(b"this is not a JPEG")
    classes = dataset.scan_classes(data)
    settings = dataset.CropSettings(size=16, detect=True, detector="full", margin=0.25,
                                    min_confidence=0.5)
    cropper = FakeCropper({10: 1, 20: 0, 30: 2}, 16)
    photos = dataset.prepare_crops(data, classes, tmp_path / "crops", settings, lambda: cropper)
    assert cropper.closed and cropper.calls == 5  # the broken file never reaches the detector
    status = {(p.label, p.source.name): p.status for p in photos}
    assert status == {("a", "none.png"): "no_face", ("a", "one.png"): "ok",
                      ("b", "broken.jpg"): "unreadable", ("b", "one.jpg"): "ok",
                      ("b", "one.png"): "ok", ("b", "two.png"): "many_faces"}
    assert dataset.count_statuses(photos) == {
        "a": {"ok": 1, "no_face": 1, "many_faces": 0, "unreadable": 0},
        "b": {"ok": 2, "no_face": 0, "many_faces": 1, "unreadable": 1}}
    crops = [p.crop for p in photos if p.status == "ok"]
    assert len(set(crops)) == 3 and all(c.is_file() for c in crops)
    assert cv2.imread(str(crops[0])).shape == (16, 16, 3)

    def must_not_open():
        raise AssertionError("every photo is cached: the detector must not be opened")

    again = dataset.prepare_crops(data, classes, tmp_path / "crops", settings, must_not_open)
    assert again == photos
    # other settings invalidate the cache
    other = dataset.CropSettings(size=16, detect=True, detector="full", margin=0.5,
                                 min_confidence=0.5)
    cropper2 = FakeCropper({10: 1, 20: 0, 30: 2}, 16)
    dataset.prepare_crops(data, classes, tmp_path / "crops", other, lambda: cropper2)
    assert cropper2.calls == 5


@pytest.mark.parametrize("touched", ["same mtime", "new mtime"])
def test_a_photo_replaced_by_another_of_its_size_is_cropped_again(tmp_path, touched):
    """The cache knew a photo by its size and mtime: another photo of the same size copied over
    it with its time (cp -p, rsync -a, unzip), or written within one tick of the clock, kept the
    first photo's crop. The photo's bytes decide now."""
    import os

    data = tmp_path / "data"
    photo = _write(data / "a" / "x.bmp", np.full((12, 12, 3), 50, np.uint8))  # BMP: size by shape only
    _write(data / "b" / "y.bmp", np.full((12, 12, 3), 90, np.uint8))
    settings = dataset.CropSettings(size=8, detect=False, detector="", margin=0.0, min_confidence=0.0)

    def crop_means():
        photos = dataset.prepare_crops(data, dataset.scan_classes(data), tmp_path / "c", settings)
        return [int(c.mean()) for c in dataset.load_crops([p.crop for p in photos], 8)]

    assert crop_means() == [50, 90]
    before = photo.stat()
    _write(photo, np.full((12, 12, 3), 200, np.uint8))
    assert photo.stat().st_size == before.st_size
    if touched == "same mtime":
        os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert crop_means() == [200, 90]


def test_a_cache_made_before_boxes_were_clipped_at_the_edges_is_made_again(tmp_path):
    """Crops cached with MediaPipe's boxes (a face cut by the left or top edge boxed a whole face
    wide from it) differ from today's for such faces: a crop cache whose index predates the
    clipped boxes (its settings have no `boxes`) is not reused."""
    from dataclasses import asdict

    data = tmp_path / "data"
    _write(data / "a" / "one.png", np.full((20, 30, 3), 10, np.uint8))
    _write(data / "b" / "one.png", np.full((20, 30, 3), 10, np.uint8))
    classes = dataset.scan_classes(data)
    settings = dataset.CropSettings(size=16, detect=True, detector="full", margin=0.25, min_confidence=0.5)
    dataset.prepare_crops(data, classes, tmp_path / "crops", settings, lambda: FakeCropper({10: 1}, 16))
    index, = (tmp_path / "crops").rglob("*.json")
    stored = json.loads(index.read_text())
    before = {key: value for key, value in asdict(settings).items() if key != "boxes"}
    assert stored["settings"] == {**before, "boxes": "clipped"}
    index.write_text(json.dumps({**stored, "settings": before}))  # as an older camface wrote it
    cropper = FakeCropper({10: 1}, 16)
    dataset.prepare_crops(data, classes, tmp_path / "crops", settings, lambda: cropper)
    assert cropper.calls == 2


@pytest.mark.parametrize("change, recropped", [
    ("nothing", False),
    ("another detector model file", True),
    ("another crop code version", True),
    ("made before both were recorded", True),
])
def test_a_cache_made_by_another_detector_file_or_crop_code_is_made_again(tmp_path, caplog, change, recropped):
    """The cache's settings named the detector ("short") but not its model file nor the version
    of the crop code: crops cut by another detector model (a camface upgrade, a replaced .onnx)
    or by older crop code were reused. Both are in the settings now, and the log names them."""
    import logging
    from dataclasses import asdict, replace

    data = tmp_path / "data"
    _write(data / "a" / "one.png", np.full((20, 30, 3), 10, np.uint8))
    _write(data / "b" / "one.png", np.full((20, 30, 3), 10, np.uint8))
    classes = dataset.scan_classes(data)
    settings = dataset.CropSettings(size=16, detect=True, detector="short", margin=0.25, min_confidence=0.5,
                                    detector_sha256="1" * 64)
    cache = tmp_path / "crops"
    dataset.prepare_crops(data, classes, cache, settings, lambda: FakeCropper({10: 1}, 16))
    index = cache / dataset.CACHE_INDEX
    stored = json.loads(index.read_text())
    assert stored["settings"]["detector_sha256"] == "1" * 64
    assert stored["settings"]["crop_code"] == dataset.CROP_CODE_VERSION
    now, named = settings, []
    if change == "another detector model file":
        now, named = replace(settings, detector_sha256="2" * 64), ["detector_sha256"]
    elif change == "another crop code version":
        index.write_text(json.dumps({**stored, "settings": {**stored["settings"],
                                                           "crop_code": dataset.CROP_CODE_VERSION - 1}}))
        named = ["crop_code"]
    elif change == "made before both were recorded":
        older = {k: v for k, v in asdict(settings).items() if k not in ("detector_sha256", "crop_code")}
        index.write_text(json.dumps({**stored, "settings": older}))
        named = ["crop_code", "detector_sha256"]
    cropper = FakeCropper({10: 1}, 16)
    with caplog.at_level(logging.INFO, logger=dataset.__name__):
        dataset.prepare_crops(data, classes, cache, now, lambda: cropper)
    assert cropper.calls == (2 if recropped else 0)
    said = [r.getMessage() for r in caplog.records if "other settings" in r.getMessage()]
    assert said == ([f"crop cache {cache} was made with other settings ({', '.join(named)}): cropping again"]
                    if recropped else [])


def test_train_keys_its_crop_cache_on_the_detector_model_file(tmp_path, monkeypatch):
    """`camface train` records the sha256 of the model file the live loop's detector loads (none
    with --no-detect); a file that cannot be read is an error naming it."""
    import hashlib
    import re

    from camface import models
    from camface.errors import ModelError
    from camface.models import train

    model = tmp_path / "detector.onnx"
    model.write_bytes(b"one detector")
    monkeypatch.setitem(models.DETECTORS_ONNX, "short", model)
    config = train.TrainConfig(tmp_path / "data", tmp_path / "out", detector="short")
    first = train.crop_settings(config)
    assert first.detector_sha256 == hashlib.sha256(b"one detector").hexdigest()
    assert first.crop_code == dataset.CROP_CODE_VERSION and first.detector == "short"
    model.write_bytes(b"another detector")
    assert train.crop_settings(config).detector_sha256 == hashlib.sha256(b"another detector").hexdigest()
    no_detect = train.TrainConfig(tmp_path / "data", tmp_path / "out", detect=False)
    assert train.crop_settings(no_detect).detector_sha256 == ""
    model.unlink()
    with pytest.raises(ModelError, match=re.escape(f"face detector model {model} cannot be read")):
        train.crop_settings(config)


def test_prepare_crops_no_detect_resizes(tmp_path):
    data = tmp_path / "data"
    _write(data / "a" / "x.png", np.full((40, 20, 3), 50, np.uint8))
    _write(data / "b" / "y.png", np.full((10, 10), 200, np.uint8))  # grayscale file
    settings = dataset.CropSettings(size=24, detect=False, detector="", margin=0.0,
                                    min_confidence=0.0)
    photos = dataset.prepare_crops(data, dataset.scan_classes(data), tmp_path / "c", settings)
    images = dataset.load_crops([p.crop for p in photos], 24)
    assert images.shape == (2, 24, 24, 3) and images.dtype == np.uint8
    assert images[0].min() == images[0].max() == 50 and images[1].min() == 200


def test_crop_cache_never_hands_one_photo_another_photos_crop(tmp_path):
    """Each photo its own crop file: "x/y.png" and "x__y.png" in one class, and the same
    class/file name in two DATA_DIRs cropped into one reused cache (then the first again)."""
    settings = dataset.CropSettings(size=8, detect=False, detector="", margin=0.0, min_confidence=0.0)
    cache = tmp_path / "out" / "crops"

    def mean_of_crops(data):
        photos = dataset.prepare_crops(data, dataset.scan_classes(data), cache, settings)
        crops = dataset.load_crops([p.crop for p in photos], 8)
        return {p.source.relative_to(data).as_posix(): int(c.mean()) for p, c in zip(photos, crops)}

    first, second = tmp_path / "first", tmp_path / "second"
    _write(first / "a" / "x" / "y.png", np.full((8, 8, 3), 10, np.uint8))
    _write(first / "a" / "x__y.png", np.full((8, 8, 3), 20, np.uint8))
    _write(first / "b" / "z.png", np.full((8, 8, 3), 30, np.uint8))
    _write(second / "a" / "x__y.png", np.full((8, 8, 3), 120, np.uint8))
    _write(second / "b" / "z.png", np.full((8, 8, 3), 130, np.uint8))
    want_first = {"a/x/y.png": 10, "a/x__y.png": 20, "b/z.png": 30}
    assert mean_of_crops(first) == want_first
    assert mean_of_crops(second) == {"a/x__y.png": 120, "b/z.png": 130}
    assert mean_of_crops(first) == want_first  # cached crops, still each photo's own


def test_usable_crops_names_the_class_folder(tmp_path):
    photos = [dataset.Photo(tmp_path / "a" / f"{i}.png", "a", "ok", tmp_path / f"{i}.png", 1)
              for i in range(3)]
    photos += [dataset.Photo(tmp_path / "b" / "0.png", "b", "no_face", None, 0),
               dataset.Photo(tmp_path / "b" / "1.png", "b", "ok", tmp_path / "b1.png", 1)]
    with pytest.raises(dataset.SourceError,
                       match=r"class folder .*data[/\\]b has 1 usable face photo\(s\) of 2 \(1 no face\)"):
        dataset.usable_crops(photos, ["a", "b"], tmp_path / "data")
    paths, targets = dataset.usable_crops(photos[:3] + photos[:3], ["a"], tmp_path / "data")
    assert targets.tolist() == [0] * 6


def test_stratified_split_keeps_class_shares_and_is_deterministic():
    targets = np.array([0] * 20 + [1] * 10 + [2] * 5)
    split = dataset.stratified_split(targets, 0.2, 0.2, seed=3)
    parts = np.concatenate([split.train, split.val, split.test])
    assert sorted(parts.tolist()) == list(range(35))  # disjoint and complete
    assert np.bincount(targets[split.test]).tolist() == [4, 2, 1]
    assert np.bincount(targets[split.val]).tolist() == [4, 2, 1]
    assert np.bincount(targets[split.train]).tolist() == [12, 6, 3]
    again = dataset.stratified_split(targets, 0.2, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(
        (split.train, split.val, split.test), (again.train, again.val, again.test)))
    other = dataset.stratified_split(targets, 0.2, 0.2, seed=4)
    assert not np.array_equal(split.test, other.test)


@pytest.mark.parametrize("targets, val, test, labels, match", [
    ([0, 0, 1, 1, 1], 0.2, 0.2, None, "class 0 has 2 items: too few"),
    ([0, 0, 0, 1, 1, 1, 1], 0.4, 0.4, ["alice", "bob"], "class 'bob' has 4 items: too few"),
    ([0, 0, 0, 1, 1, 1], 0.6, 0.5, None, "sum to less than 1"),
])
def test_stratified_split_errors(targets, val, test, labels, match):
    with pytest.raises(ValueError, match=match):
        dataset.stratified_split(np.array(targets), val, test, seed=0, labels=labels)


def _one_by_one(targets, val, test, seed):
    """The documented split of items each in a group of its own (named by its index): a class's
    items in the order of sha256(f"{seed}:{index}"), the first round(n * test) to test, the next
    round(n * val) to validation, the rest to training."""
    parts = {"train": [], "val": [], "test": []}
    for cls in np.unique(targets):
        members = sorted(np.flatnonzero(targets == cls),
                         key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        n_test, n_val = max(1, round(len(members) * test)), max(1, round(len(members) * val))
        parts["test"] += list(members[:n_test])
        parts["val"] += list(members[n_test:n_test + n_val])
        parts["train"] += list(members[n_test + n_val:])
    return {name: sorted(int(i) for i in v) for name, v in parts.items()}


@pytest.mark.parametrize("sizes_per_class, val, test, seed", [
    ([[1] * 20, [1] * 10, [1] * 5], 0.2, 0.2, 3),  # no sub-folders: the documented order, exactly
    ([[5, 5, 5, 5], [4, 4, 4, 4, 4]], 0.15, 0.15, 0),  # frames of clips, one sub-folder each
    ([[5, 5, 5, 5], [4, 4, 4, 4, 4]], 0.15, 0.15, 7),
    ([[8, 1, 1, 1, 1, 1, 1, 1, 1, 2, 3], [30, 2, 2]], 0.2, 0.2, 1),  # sub-folders and loose photos
    ([[10, 10, 10]], 0.15, 0.15, 5),  # every group larger than a part's share
])
def test_stratified_split_keeps_each_group_in_one_part(sizes_per_class, val, test, seed):
    """Consecutive frames of one clip (near-identical) were split at random, t in train and t+1
    in test, which inflated the test accuracy. A group (a sub-folder of a class folder) now stays
    whole in one part; every part still gets some of every class, near its share."""
    targets, groups = [], []
    for cls, sizes in enumerate(sizes_per_class):
        for size in sizes:
            targets += [cls] * size
            groups += [len(set(groups))] * size
    targets, groups = np.array(targets), np.array(groups)
    split = dataset.stratified_split(targets, val, test, seed=seed, groups=groups)
    parts = {"train": split.train, "val": split.val, "test": split.test}
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(targets)))
    part_of_group = {}
    for name, indices in parts.items():
        for g in groups[indices]:
            assert part_of_group.setdefault(int(g), name) == name, f"group {g} in two parts"
        assert set(targets[indices].tolist()) == set(range(len(sizes_per_class)))  # every class
    if all(size == 1 for sizes in sizes_per_class for size in sizes):
        assert {k: v.tolist() for k, v in parts.items()} == _one_by_one(targets, val, test, seed)
        assert dataset.stratified_split(targets, val, test, seed=seed).test.tolist() == split.test.tolist()
    for cls, sizes in enumerate(sizes_per_class):  # a part overshoots its share by less than a group
        n = sum(sizes)
        for name, fraction in (("test", test), ("val", val)):
            got = int(np.sum(targets[parts[name]] == cls))
            assert got < max(1, round(n * fraction)) + max(sizes), (cls, name, got)


@pytest.mark.parametrize("alice_groups", [[0] * 6, [0, 0, 0, 1, 1, 1]])
def test_a_class_in_too_few_sub_folders_is_split_photo_by_photo_and_says_so(alice_groups, caplog):
    """A class whose photos all sit in one or two sub-folders (alice/photos/*.jpg) cannot keep each
    whole in one of three parts: it was refused, though it trained before sub-folders were groups;
    it is split as a folder without sub-folders is, and a warning names it."""
    targets = np.array([0] * 6 + [1] * 6)
    names = [f"alice/photos{g}/{i}.jpg" for i, g in enumerate(alice_groups)] + [f"bob/{i}.jpg" for i in range(6)]
    groups = np.array([f"alice/photos{g}" for g in alice_groups] + names[6:])
    with caplog.at_level(logging.WARNING, logger="camface.models.dataset"):
        got = dataset.stratified_split(targets, 0.2, 0.2, seed=0, labels=["alice", "bob"], groups=groups,
                                       names=names)
    flat = dataset.stratified_split(targets, 0.2, 0.2, seed=0, labels=["alice", "bob"], names=names)
    for part in ("train", "val", "test"):
        assert getattr(got, part).tolist() == getattr(flat, part).tolist()
    assert "class 'alice' has its 6 photos in" in caplog.text and "split one by one" in caplog.text
    assert "'bob'" not in caplog.text


def test_split_groups_are_the_class_folders_sub_folders(tmp_path):
    """A sub-folder of a class folder (at any depth below it) is one group, named by its path
    under DATA_DIR; a photo directly in the class folder is its own; both follow usable_crops'
    order, as split_names (each photo's path under DATA_DIR) does."""
    data = tmp_path / "data"
    names = {"a": ["x.png", "y.png", "clip1/0.png", "clip1/1.png", "clip1/deep/2.png", "clip2/0.png"],
             "b": ["clip1/0.png", "z.png"]}
    photos = [dataset.Photo(data / label / name, label, "ok", tmp_path / f"{label}{i}.png", 1)
              for label, files in names.items() for i, name in enumerate(files)]
    photos.insert(1, dataset.Photo(data / "a" / "noface.png", "a", "no_face", None, 0))
    paths, _ = dataset.usable_crops(photos, ["a", "b"], data, min_per_class=1)
    groups = dataset.split_groups(photos, ["a", "b"], data)
    assert len(groups) == len(paths)
    names = dataset.split_names(photos, ["a", "b"], data)
    assert names == [f"{p.label}/{p.source.relative_to(data / p.label).as_posix()}"
                     for p in photos if p.status == "ok"]
    by_name = dict(zip(names, groups.tolist()))
    assert by_name["a/clip1/0.png"] == by_name["a/clip1/1.png"] == by_name["a/clip1/deep/2.png"] == "a/clip1"
    assert by_name["a/x.png"] == "a/x.png"
    assert len({by_name[k] for k in ("a/x.png", "a/y.png", "a/clip1/0.png", "a/clip2/0.png",
                                     "b/clip1/0.png", "b/z.png")}) == 6


def _class_folders(layout: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """targets, groups and names of class folders; layout: class -> sizes of its groups (1: a
    photo directly in the class folder, more: a sub-folder of that many frames)."""
    targets, groups, names = [], [], []
    for cls, sizes in enumerate(layout.values()):
        label = list(layout)[cls]
        for g, size in enumerate(sizes):
            for frame in range(size):
                group = f"{label}/{g}.jpg" if size == 1 else f"{label}/clip{g}"
                names.append(group if size == 1 else f"{group}/{frame}.jpg")
                targets.append(cls)
                groups.append(group)
    return np.array(targets), np.array(groups), names


def _parts_by_name(split, names) -> dict[str, set[str]]:
    return {part: {names[i] for i in getattr(split, part)} for part in ("train", "val", "test")}


LAYOUT = {"alice": [1] * 12, "bob": [3, 3, 4, 2, 3, 1, 1]}  # loose photos; clips and loose photos


@pytest.mark.parametrize("numpy_now", [
    lambda seed=None: np.random.Generator(np.random.MT19937(seed)),  # another bit stream
    lambda seed=None: pytest.fail("the split drew from numpy's generator"),
], ids=["other-stream", "no-generator"])
def test_the_split_depends_on_the_seed_and_names_not_on_numpys_generator(monkeypatch, numpy_now):
    """numpy keeps no Generator stream across its versions (NEP 19): a split drawn with
    Generator.permutation could give another test set for the same folder and --seed after an
    upgrade. The order is sha256(f"{seed}:{name}"): numpy's generator changed or gone, the split
    is the same; another seed still gives another split."""
    targets, groups, names = _class_folders(LAYOUT)
    before = {seed: _parts_by_name(dataset.stratified_split(targets, 0.2, 0.2, seed, groups=groups, names=names),
                                   names) for seed in (0, 1)}
    assert before[0]["test"] != before[1]["test"]
    monkeypatch.setattr(np.random, "default_rng", numpy_now)
    for seed in (0, 1):
        after = dataset.stratified_split(targets, 0.2, 0.2, seed, groups=groups, names=names)
        assert _parts_by_name(after, names) == before[seed]
    order = dataset.draw_order(["alice/0.jpg", "alice/1.jpg", "bob/clip0"], 5)
    assert order == sorted(order, key=lambda key: hashlib.sha256(f"5:{key}".encode()).hexdigest())


@pytest.mark.parametrize("listing", [
    lambda n: np.arange(n)[::-1],  # the folder listed backwards
    lambda n: np.roll(np.arange(n), 7),
    lambda n: np.argsort([hashlib.md5(str(i).encode()).hexdigest() for i in range(n)]),  # shuffled
], ids=["backwards", "rolled", "shuffled"])
def test_a_class_folders_split_is_a_function_of_its_names_not_of_their_listing_order(listing):
    """The same photos listed in another order (another file system, another sort) get the same
    parts, sub-folders and loose photos alike; and a class's split does not move when another
    class gains a photo."""
    targets, groups, names = _class_folders(LAYOUT)
    split = _parts_by_name(dataset.stratified_split(targets, 0.2, 0.2, 3, groups=groups, names=names), names)
    order = listing(len(names))
    shuffled = dataset.stratified_split(targets[order], 0.2, 0.2, 3, groups=groups[order],
                                        names=[names[i] for i in order])
    assert _parts_by_name(shuffled, [names[i] for i in order]) == split
    grown, grown_groups, grown_names = _class_folders({"alice": [1] * 13, "bob": LAYOUT["bob"]})
    alice = {part: {n for n in got if n.startswith("alice/")} for part, got in split.items()}
    bobs = {part: {n for n in got if n.startswith("bob/")} for part, got in split.items()}
    again = _parts_by_name(dataset.stratified_split(grown, 0.2, 0.2, 3, groups=grown_groups, names=grown_names),
                           grown_names)
    assert {part: {n for n in got if n.startswith("bob/")} for part, got in again.items()} == bobs
    assert sum(len(v) for v in alice.values()) == 12


def _split_of_run(tmp_path, monkeypatch, data: Path, seed: int = 0) -> dict[str, set[str]]:
    """The split `camface train` makes of `data`, as photo names (relative to `data`) per part;
    each photo is one grey level, its name's number (`_grey`)."""
    from camface.models import train

    class Stop(Exception):
        pass

    seen = {}

    def capture(config, labels, images, targets, split, model_path, names=None):
        seen.update(images=images, split=split)
        raise Stop

    monkeypatch.setattr(train, "_fit", capture)
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    config = train.TrainConfig(data, out, backbone="mobilenetv2", input_size=32, weights="none",
                               detect=False, seed=seed)
    with pytest.raises(Stop):
        train.run(config)
    name_of = {int(p.stem): p.relative_to(data).as_posix() for p in data.rglob("*.png")}
    return {part: {name_of[int(round(seen["images"][i].mean()))] for i in getattr(seen["split"], part)}
            for part in ("train", "val", "test")}


def _grey(path: Path) -> Path:
    return _write(path, np.full((12, 12, 3), int(path.stem), np.uint8))


def test_train_splits_by_the_photos_names(tmp_path, monkeypatch):
    """`camface train` hands the photos' names to the split: a class split photo by photo (all in
    one sub-folder) keeps its parts when another class gains a photo (its photos' places in the
    list move, their names do not), and --seed still changes the split."""
    data = tmp_path / "data"
    for i in range(6):
        _grey(data / "b" / "photos" / f"{150 + 5 * i}.png")
    for i in range(5):
        _grey(data / "a" / f"{10 + 5 * i}.png")
    before = _split_of_run(tmp_path, monkeypatch, data)
    _grey(data / "a" / "60.png")
    after = _split_of_run(tmp_path, monkeypatch, data)
    assert sum(len(v) for v in after.values()) == 12
    assert {part: {n for n in got if n.startswith("b/")} for part, got in after.items()} == \
        {part: {n for n in got if n.startswith("b/")} for part, got in before.items()}
    seeds = [_split_of_run(tmp_path, monkeypatch, data, seed)["test"] for seed in range(4)]
    assert len({frozenset(t) for t in seeds}) > 1


def test_a_name_copied_from_macos_in_decomposed_unicode_is_split_as_its_composed_form():
    """macOS may hand a name as "e" + a combining accent where Linux lists one "é": the split
    hashes the NFC form, so the folder copied across gives the same parts."""
    import unicodedata

    targets, groups, names = _class_folders({"renée": [1] * 9, "zoë": [2, 3, 2, 1, 1]})
    split = _parts_by_name(dataset.stratified_split(targets, 0.2, 0.2, 1, groups=groups, names=names), names)
    nfd = [unicodedata.normalize("NFD", n) for n in names]
    assert nfd != names
    copied = dataset.stratified_split(targets, 0.2, 0.2, 1, groups=[unicodedata.normalize("NFD", g) for g in groups],
                                      names=nfd)
    assert _parts_by_name(copied, names) == split


def test_stratified_split_refuses_names_that_are_not_one_per_item():
    with pytest.raises(ValueError, match="one distinct name per item: got 2 names"):
        dataset.stratified_split(np.zeros(3, np.int64), 0.2, 0.2, 0, names=["a", "b"])
    with pytest.raises(ValueError, match=r"got 3 names \(2 distinct\)"):
        dataset.stratified_split(np.zeros(3, np.int64), 0.2, 0.2, 0, names=["a", "b", "a"])


@pytest.mark.parametrize("alice, val, test, off", [
    ([30, 2, 2], 0.2, 0.2, True),  # one large clip: test and validation get 2 photos each, not 7
    ([10, 10, 10], 0.15, 0.15, True),  # a third each, where 0.70 / 0.15 / 0.15 was asked
    ([12, 1, 1, 1], 0.2, 0.2, True),  # validation gets 1 photo of 15, for 3 asked
    ([5, 5, 5, 5], 0.15, 0.15, False),  # 10 / 5 / 5 for 14 / 3 / 3: within a factor 2 of each
    ([4, 3, 5, 4, 1, 1, 3], 0.2, 0.2, False),
    ([1] * 20, 0.2, 0.2, False),  # loose photos: the parts are the targets
    ([8, 8], 0.2, 0.2, False),  # two clips: split photo by photo (said otherwise), on target
])
def test_a_class_whose_sub_folders_leave_a_part_far_from_its_fraction_is_warned_about(alice, val, test, off,
                                                                                      caplog):
    """Sub-folders kept whole can leave a part far from its fraction (three clips of 30, 2 and 2
    frames give test 2 of 34 photos for 0.2 asked) and nothing said so: one warning names the
    class, the fractions asked for and those obtained, when a part holds less than half or more
    than twice the photos its fraction asks for."""
    targets, groups, names = _class_folders({"alice": alice, "bob": [1] * 10})
    with caplog.at_level(logging.WARNING, logger="camface.models.dataset"):
        split = dataset.stratified_split(targets, val, test, seed=0, labels=["alice", "bob"], groups=groups,
                                         names=names)
    warned = [r.getMessage() for r in caplog.records if "keeping its sub-folders whole" in r.getMessage()]
    if not off:
        assert warned == []
        return
    n = len(names) - 10
    got = [int(np.sum(targets[getattr(split, part)] == 0)) for part in ("train", "val", "test")]
    wanted = [n - max(1, round(n * val)) - max(1, round(n * test)), max(1, round(n * val)), max(1, round(n * test))]
    assert any(g < w / 2 or g > 2 * w for g, w in zip(got, wanted))  # the table's case is off indeed
    message, = warned
    assert message.startswith("class 'alice':") and "'bob'" not in message
    assert " / ".join(f"{g / n:.2f}" for g in got) in message
    assert f"where {1 - val - test:.2f} / {val:.2f} / {test:.2f} was asked for" in message


def test_train_keeps_a_clips_frames_in_one_part(tmp_path, monkeypatch):
    """`camface train` splits by the class folders' sub-folders: no clip's frames are both
    trained on and tested."""
    from camface.models import train

    seen = {}

    class Stop(Exception):
        pass

    def capture(config, labels, images, targets, split, model_path, names=None):
        seen.update(images=images, split=split)
        raise Stop

    monkeypatch.setattr(train, "_fit", capture)
    data = tmp_path / "data"
    for label, base in (("a", 0), ("b", 120)):
        for clip in range(4):
            for frame in range(5):  # each frame its own value: no copies
                _write(data / label / f"clip{clip}" / f"{frame}.png",
                       np.full((12, 12, 3), base + 20 * clip + frame, np.uint8))
    config = train.TrainConfig(data, tmp_path / "out", backbone="mobilenetv2", input_size=32,
                               weights="none", detect=False)
    with pytest.raises(Stop):
        train.run(config)
    clip_of = {}
    for name in ("train", "val", "test"):
        for i in getattr(seen["split"], name):
            clip = int(seen["images"][i].mean()) // 20
            assert clip_of.setdefault(clip, name) == name, f"clip {clip} in {clip_of[clip]} and {name}"
    assert set(clip_of.values()) == {"train", "val", "test"}


def _face(astronaut_bgr, dx=0, dy=0):
    return cv2.resize(astronaut_bgr[30 + dy:230 + dy, 125 + dx:325 + dx], (64, 64), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("test_shift, near", [
    ((0, 0), True),  # the same frame
    ((1, 0), True),  # the next frame of a steady clip: half a percent of the crop's side
    ((4, 0), True),  # the next frame of a moving face: 2% of the side
    ((12, 6), False),  # another photo of the face (moved by 6% of the side)
    ((0, 60), False),
])
def test_near_identical_finds_a_test_crop_that_is_a_neighbouring_frame(astronaut_bgr, test_shift, near):
    """Frames of one clip put directly in a class folder (not in a sub-folder of their own) are
    still split one by one: train warns, naming both photos, when a test crop's nearest training
    crop differs by at most NEAR_MAD (of 255) on NEAR_THUMB-pixel thumbnails."""
    crops = np.stack([_face(astronaut_bgr, 30, 30), _face(astronaut_bgr), _face(astronaut_bgr, 0, 40),
                      _face(astronaut_bgr, *test_shift)])
    found = dataset.near_identical(crops, np.array([3]), np.array([0, 1, 2]))
    if near:
        (test, train, difference), = found
        assert (test, train) == (3, 1) and 0 <= difference <= dataset.NEAR_MAD
    else:
        assert found == []
    assert dataset.near_identical(crops, np.array([], np.int64), np.array([0, 1])) == []


SAMPLE_FRAMES = range(56, 114)  # the sample clip's A at its worst (86, 106, 110); B entering at the edge (72)


@pytest.fixture(scope="module")
def sample_clip_faces(tmp_path_factory) -> dict[str, np.ndarray]:
    """Face crops of consecutive frames of the bundled sample clip, cut as `camface train` cuts
    them (live margin, 224 px, uint8 BGR) from frames written as an mp4 and decoded again: "A"
    (drifting, growing and shrinking, up to ~2 px a frame) and "B" (the mirrored face crossing the
    frame at ~3.5 px a frame, half outside it at first), [len(SAMPLE_FRAMES), 224, 224, 3] each."""
    from camface.realtime.config import DEFAULTS
    from camface.realtime.crop import crop_faces
    from camface.realtime.results import Face
    from camface.realtime.sample import SampleSource
    from camface.realtime.sinks import VideoSink

    sample = SampleSource()
    width, height = sample.size
    path = tmp_path_factory.mktemp("sample") / "clip.mp4"
    with VideoSink(path, sample.fps, codec="mp4v") as sink:
        for index in SAMPLE_FRAMES:
            sink.write(sample.frame(index))
    capture = cv2.VideoCapture(str(path))
    faces: dict[str, list[np.ndarray]] = {"A": [], "B": []}
    for index in SAMPLE_FRAMES:
        ok, frame = capture.read()
        assert ok, f"frame {index} of {path} not decoded"
        for x, y, w, h in sample.face_boxes(index):
            name = "B" if y + h / 2 > height / 2 else "A" if x + w / 2 < width / 2 else None  # C: upper right
            if name:
                crops, _ = crop_faces(frame, (Face((x, y, w, h), 1.0),), DEFAULTS["margin"], (224, 224), "BGR")
                faces[name].append(crops[0])
    capture.release()
    return {name: np.stack(crops) for name, crops in faces.items()}


@pytest.mark.parametrize("face", ["A", "B"])
def test_consecutive_frames_of_the_sample_clip_are_near_identical(sample_clip_faces, face):
    """NEAR_MAD was set on the astronaut still shifted by a pixel; on the sample clip's decoded
    frames a face moving 2-3.5 px a frame differed from the previous frame by up to 9.3 (A) and
    11.8 (B, half outside the frame) of 255, and 6 missed 20 of A's 299 pairs and 17 of B's 183:
    every pair of consecutive frames is near-identical now, and so is every frame of the clip split
    one by one."""
    crops = sample_clip_faces[face]
    assert len(crops) == len(SAMPLE_FRAMES) - (0 if face == "A" else 2)  # B is half inside from frame 58
    missed = [k for k in range(len(crops) - 1) if not dataset.near_identical(crops, np.array([k + 1]), np.array([k]))]
    assert missed == []
    odd, even = np.arange(1, len(crops), 2), np.arange(0, len(crops), 2)
    assert [test for test, _, _ in dataset.near_identical(crops, odd, even)] == odd.tolist()


def test_different_people_are_not_near_identical(sample_clip_faces, astronaut_bgr):
    """The astronaut (the still, and the sample clip's faces A and mirrored B) against Grace Hopper,
    and A against B: far apart (45 of 255 and more, measured), never warned about."""
    from matplotlib import cbook

    from camface.realtime.config import DEFAULTS
    from camface.realtime.crop import crop_faces
    from camface.realtime.results import Face

    hopper_bgr = cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    stills, _ = crop_faces(astronaut_bgr, (Face((173, 67, 103, 103), 1.0),), DEFAULTS["margin"], (224, 224), "BGR")
    hopper, _ = crop_faces(hopper_bgr, (Face((166, 130, 199, 199), 1.0),), DEFAULTS["margin"], (224, 224), "BGR")
    a, b = sample_clip_faces["A"], sample_clip_faces["B"]
    crops = np.concatenate([hopper, stills, a, b])
    clip_a, clip_b = np.arange(2, 2 + len(a)), np.arange(2 + len(a), len(crops))
    for test, train in ((np.array([1]), np.array([0])), (np.array([0]), np.concatenate([[1], clip_a, clip_b])),
                        (clip_a, np.array([0])), (clip_b, np.array([0])), (clip_a, clip_b), (clip_b, clip_a)):
        assert dataset.near_identical(crops, test, train) == []


def test_train_warns_of_test_photos_near_identical_to_training_photos(tmp_path, monkeypatch, caplog):
    import logging
    import re

    from camface.models import train

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(train, "_fit", stop)
    data = _square_photos(tmp_path / "data", 5)  # within a class the grey levels differ by 1 to 4
    config = train.TrainConfig(data, tmp_path / "out", backbone="mobilenetv2", input_size=32,
                               weights="none", detect=False)
    with caplog.at_level(logging.WARNING, logger=train.__name__), pytest.raises(Stop):
        train.run(config)
    pairs = [re.match(r"test photo (.+) is near-identical to training photo (.+) \(mean absolute", r.getMessage())
             for r in caplog.records if "near-identical" in r.getMessage()]
    assert len(pairs) == 2 and all(pairs)  # one test photo per class, each near its class's others
    for pair in pairs:
        test, trained = Path(pair[1]), Path(pair[2])
        assert test.parent == trained.parent and test != trained and test.parent.parent == data


def test_class_weights_balance_the_loss():
    weights = dataset.class_weights(np.array([0, 0, 0, 1]), 2)
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})
    assert 3 * weights[0] == pytest.approx(1 * weights[1] * 1)  # each class sums to the same


def test_classification_metrics_hand_computed():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 0, 1])
    m = report.classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    assert m["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3,
                                                 "f1": 2 / 3, "support": 3})
    assert m["per_class"]["b"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 2,
                                                 "f1": 0.4, "support": 2})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro"]["recall"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


@pytest.mark.parametrize("supports, predicted, majority, beaten", [
    ((9, 2, 2, 2, 2), "always a", 9 / 17, False),  # chance 0.200, and always "a" scores 0.529
    ((9, 2, 2, 2, 2), "right but 1", 9 / 17, True),  # 16 / 17 right
    ((2, 5, 2), "always b", 5 / 9, False),  # the largest class need not be the first
    ((3, 3), "right but 1", 3 / 6, True),  # a tie: the first class in label order
    ((3, 3), "always a", 3 / 6, False),  # equal to the majority share does not beat it
])
def test_the_report_sets_the_accuracy_beside_the_majority_class_share(tmp_path, supports, predicted,
                                                                      majority, beaten):
    """The report's only baseline was chance, 1 / classes: with imbalanced test counts (9/2/2/2/2)
    always predicting the first class scored 0.53 against "chance 0.200". The test split's
    majority-class share stands beside it now, and report.md says when it is not beaten."""
    labels = "abcde"[:len(supports)]
    y_true = np.repeat(np.arange(len(supports)), supports)
    largest = int(np.argmax(supports))
    if predicted.startswith("always"):
        y_pred = np.full_like(y_true, "abcde".index(predicted[-1]))
    else:
        y_pred = y_true.copy()
        y_pred[-1] = (y_pred[-1] + 1) % len(supports)
    m = report.classification_metrics(y_true, y_pred, list(labels))
    assert m["chance"] == pytest.approx(1 / len(supports))
    assert m["majority"] == pytest.approx(majority) and m["majority_class"] == labels[largest]
    report.write_json(tmp_path / "metrics.json", m)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["majority"] == pytest.approx(majority) and written["majority_class"] == labels[largest]
    report.write_report(tmp_path / "report.md", command="camface train", labels=list(labels),
                        counts={}, unreadable=[], split_sizes={}, stages=[], metrics=m, settings={},
                        seconds=1.0)
    text = (tmp_path / "report.md").read_text()
    assert f"always predicting the test split's largest class, {labels[largest]}, scores {majority:.3f}" in text
    assert ("does not beat always predicting" in text) is not beaten


def test_metrics_json_of_a_diverged_stage_is_strict_json(tmp_path):
    """A stage whose loss diverged (--learning-rate too high) wrote NaN into metrics.json, which
    strict JSON readers (jq, a browser) refuse; an undefined number is null now."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    stages = [{"name": "frozen backbone", "history": {"loss": [0.7, float("nan")], "val_loss": [0.6, float("inf")]},
               "best_val_accuracy": 0.5, "best_val_loss": float("nan"), "best_epoch": 1}]
    report.write_json(tmp_path / "metrics.json", {"accuracy": 0.5, "stages": stages})
    written = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert written["stages"][0]["history"] == {"loss": [0.7, None], "val_loss": [0.6, None]}
    assert written["stages"][0]["best_val_loss"] is None and written["accuracy"] == 0.5


def test_pick_montage_covers_classes_mistakes_first():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 0, 1, 1, 2])
    picked = report.pick_montage(y_true, y_pred, 4)
    assert picked.tolist() == [1, 3, 5, 0]


def test_overlay_heatmap_blends_new_image():
    crop = np.full((32, 32, 3), 128, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    assert np.array_equal(report.overlay_heatmap(crop, heat), crop)
    heat[0, 0] = 5.0
    out = report.overlay_heatmap(crop, heat)
    assert out is not crop and np.array_equal(crop, np.full((32, 32, 3), 128, np.uint8))
    # JET: the hot corner turns red (BGR channel 2 > channel 0), the cold one blue
    assert out[0, 0, 2] > out[0, 0, 0] + 40 and out[31, 31, 0] > out[31, 31, 2] + 40


# ------------------------------------------------------------------ CLI errors (exit 2)

def _train(argv, capsys):
    rc = cli.main(["train", *argv])
    return rc, capsys.readouterr().err


def test_cli_empty_data_dir(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    rc, err = _train([str(tmp_path / "data"), "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "holds no class folders with images" in err
    assert err.strip().startswith("camface: error: DATA_DIR")


def test_cli_one_class(tmp_path, capsys):
    _write(tmp_path / "data" / "solo" / "a.png", np.zeros((8, 8, 3), np.uint8))
    rc, err = _train([str(tmp_path / "data"), "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "one class only ('solo')" in err


def test_cli_class_without_a_usable_face(tmp_path, capsys, astronaut_bgr):
    data = tmp_path / "data"
    for i in range(3):
        _write(data / "astronaut" / f"{i}.png", np.roll(astronaut_bgr, 4 * i, axis=1))
    for i in range(3):  # the astronaut's lower body: no face
        _write(data / "noface" / f"{i}.png", np.ascontiguousarray(astronaut_bgr[300 + 10 * i:, :]))
    rc, err = _train([str(data), "-o", str(tmp_path / "out"), "--detector", "short"], capsys)
    assert rc == 2
    assert "class folder" in err and "noface has 0 usable face photo(s) of 3 (3 no face)" in err
    index = (tmp_path / "out" / "crops" / "index.json").read_text()
    assert index.count('"ok"') == 3 and index.count('"no_face"') == 3


def test_cli_out_dir_inside_the_data_is_refused(tmp_path, capsys):
    """Its crops and figures would be read as a class by the next run."""
    for name in ("a", "b"):
        _write(tmp_path / "data" / name / "0.png", np.zeros((8, 8, 3), np.uint8))
    for out in (tmp_path / "data", tmp_path / "data" / "run1"):
        rc, err = _train([str(tmp_path / "data"), "-o", str(out)], capsys)
        assert rc == 2 and f"-o {out} is inside DATA_DIR" in err, err
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["a", "b"]


def test_cli_out_dir_inside_the_data_through_a_symlink_is_refused(tmp_path, capsys):
    for name in ("a", "b"):
        _write(tmp_path / "photos" / name / "0.png", np.zeros((8, 8, 3), np.uint8))
    try:
        (tmp_path / "data").symlink_to(tmp_path / "photos", target_is_directory=True)
    except OSError:  # Windows without the symlink privilege
        pytest.skip("cannot make a symlink here")
    out = tmp_path / "photos" / "run1"
    rc, err = _train([str(tmp_path / "data"), "-o", str(out)], capsys)
    assert rc == 2 and f"-o {out} is inside DATA_DIR" in err, err
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["a", "b"]


def test_cli_split_fractions_leaving_no_training_data_fail_before_cropping(tmp_path, capsys, monkeypatch):
    def must_not_crop(*args, **kwargs):
        raise AssertionError("the fractions leave no training data: no photo needs cropping")

    monkeypatch.setattr(dataset, "prepare_crops", must_not_crop)
    for name in ("a", "b"):
        _write(tmp_path / "data" / name / "0.png", np.zeros((8, 8, 3), np.uint8))
    rc, err = _train([str(tmp_path / "data"), "-o", str(tmp_path / "o"), "--val-split", "0.5",
                      "--test-split", "0.5"], capsys)
    assert rc == 2 and "--val-split 0.5 and --test-split 0.5 leave no training data" in err


def test_cli_a_class_too_small_for_the_split_fractions_is_named(tmp_path, capsys):
    """Four photos at --val-split 0.4 --test-split 0.4 leave that class no training photo: the
    error said "class 0 has 4 items", an index, not the class folder or the flags."""
    data = _square_photos(tmp_path / "data", 4)
    _write(data / "b" / "4.png", np.full((12, 12, 3), 250, np.uint8))  # 5 in b: 2 / 2 / 1
    rc, err = _train([str(data), "-o", str(tmp_path / "o"), "--no-detect", "--input-size", "32",
                      "--weights", "none", "--val-split", "0.4", "--test-split", "0.4"], capsys)
    assert rc == 2 and "class 'a' has 4 items: too few" in err, err
    assert "--val-split 0.4, --test-split 0.4" in err


def test_cli_bad_split_fraction(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", str(tmp_path), "-o", str(tmp_path / "o"), "--val-split", "1.5"])
    assert "not a fraction" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--margin", "-0.5"], "--margin must be in [0, 2]"),  # the live loop's own checks of the crop options
    (["--min-confidence", "2"], "--min-confidence must be in [0, 1]"),
])
def test_cli_bad_crop_options_name_the_flag(tmp_path, capsys, flags, message):
    rc, err = _train([str(tmp_path), "-o", str(tmp_path / "o"), *flags], capsys)
    assert rc == 2 and message in err


def test_train_crop_defaults_are_the_live_ones():
    import argparse

    from camface.models.train import configure
    from camface.realtime.config import LiveConfig

    parser = argparse.ArgumentParser()
    configure(parser)
    live = LiveConfig()
    for name in ("detector", "margin", "min_confidence"):
        assert parser.get_default(name) == getattr(live, name)


def _square_photos(data: Path, per_class: int) -> Path:
    for label, value in (("a", 40), ("b", 200)):
        for i in range(per_class):
            _write(data / label / f"{i}.png", np.full((12, 12, 3), value + i, np.uint8))
    return data


def test_cli_int8_with_too_few_test_crops_fails_before_training(tmp_path, capsys, monkeypatch):
    from camface.models import train

    def must_not_train(*args, **kwargs):
        raise AssertionError("--int8 cannot work on this split: training must not start")

    monkeypatch.setattr(train, "_fit", must_not_train)
    data = _square_photos(tmp_path / "data", 5)  # test split: 1 crop per class, int8 needs 4
    rc = cli.main(["train", str(data), "-o", str(tmp_path / "out"), "--no-detect",
                   "--input-size", "32", "--weights", "none", "--int8"])
    err = capsys.readouterr().err
    assert rc == 2 and "--int8 needs at least 8 training and 4 test crops" in err
    assert "gives 6 and 2" in err


@pytest.mark.parametrize("fault, named, message", [
    ("photo deleted", "data/b/1.png", "cannot be read"),
    ("crop folder is a file", "out/crops/b", "cannot create the crop folder"),
])
def test_a_photo_gone_or_a_crop_folder_not_made_is_an_error_naming_it(tmp_path, capsys, monkeypatch,
                                                                     fault, named, message):
    """A photo deleted after DATA_DIR was scanned (the cache's fingerprint stat) and a crop folder
    that cannot be made (a file of its name, no permission) gave tracebacks. Each is one error line
    naming the path and exit 2; the crops cached before it stay in the index."""
    from camface.models import train

    data = _square_photos(tmp_path / "data", 3)
    out = tmp_path / "out"
    if fault == "photo deleted":
        def deleting(items):
            for label, source in items:
                if source == data / "b" / "1.png":
                    source.unlink()
                yield label, source

        monkeypatch.setattr(train, "_progress", deleting)
    else:
        (out / "crops").mkdir(parents=True)
        (out / "crops" / "b").write_text("a file where the class's crop folder goes")
    rc, err = _train([str(data), "-o", str(out), "--no-detect", "--input-size", "32",
                      "--weights", "none"], capsys)
    assert rc == 2 and "Traceback" not in err, err
    line, = err.strip().splitlines()
    assert line.startswith("camface: error:") and message in line
    assert str(tmp_path.joinpath(*named.split("/"))) in line
    index = json.loads((out / "crops" / dataset.CACHE_INDEX).read_text())
    assert sorted(Path(key).relative_to(data.resolve()).as_posix() for key in index["photos"]) == [
        "a/0.png", "a/1.png", "a/2.png", *(["b/0.png"] if fault == "photo deleted" else [])]


EARLIER_OUTPUTS = ("model.keras", "labels.txt", "model.onnx", "model.int8.onnx", "metrics.json", "confusion.png",
                   "cam_montage.png", "report.md")


def _after_an_earlier_run(tmp_path: Path):
    """(OUT_DIR holding an earlier run's EARLIER_OUTPUTS, a quick TrainConfig of a new run into it)."""
    from camface.models import train

    out = tmp_path / "out"
    out.mkdir()
    for name in EARLIER_OUTPUTS:
        (out / name).write_text(f"the earlier run's {name}")
    data = _square_photos(tmp_path / "data", 4)
    return out, train.TrainConfig(data, out, backbone="mobilenetv2", input_size=32, weights="none", detect=False)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, MemoryError], ids=["ctrl-c", "a-failure"])
def test_a_run_stopped_while_training_keeps_the_earlier_runs_outputs(tmp_path, monkeypatch, stop):
    """Ctrl-C or a failure while training: the earlier run's model and outputs (removed before
    training, so lost) are back as they were, with nothing of the new run beside them (its model
    half-written); OUT_DIR keeps the crop cache."""
    from camface.models import train

    def stopped(config, labels, images, targets, split, model_path, names):
        model_path.write_text("half a model")
        raise stop

    monkeypatch.setattr(train, "_fit", stopped)
    out, config = _after_an_earlier_run(tmp_path)
    with pytest.raises(stop):
        train.run(config)
    assert sorted(p.name for p in out.iterdir()) == sorted(["crops", *EARLIER_OUTPUTS])
    assert all((out / name).read_text() == f"the earlier run's {name}" for name in EARLIER_OUTPUTS)
    assert len(list((out / "crops").rglob("*.png"))) == 8


def test_a_trained_run_replaces_the_earlier_runs_outputs_whole(tmp_path, monkeypatch):
    """Once the new model is trained, no file of the earlier run stays beside it (its
    model.int8.onnx, of a run with --int8, would pass for this one's), even when the export
    fails after; the folder they waited in is gone."""
    from camface.errors import ModelError
    from camface.models import train

    def trained(config, labels, images, targets, split, model_path, names):
        model_path.write_text("the new model")
        return []

    def export_fails(*args, **kwargs):
        raise ModelError("the export failed")

    monkeypatch.setattr(train, "_fit", trained)
    monkeypatch.setattr(train, "export_graph", export_fails)
    out, config = _after_an_earlier_run(tmp_path)
    with pytest.raises(ModelError, match="the export failed"):
        train.run(config)
    assert sorted(p.name for p in out.iterdir()) == ["crops", "labels.txt", "model.keras"]
    assert (out / "model.keras").read_text() == "the new model" and (out / "labels.txt").read_text() == "a\nb\n"


@pytest.mark.parametrize("when", ["setting aside", "putting back"])
def test_ctrl_c_while_the_earlier_outputs_move_leaves_them_in_place(tmp_path, monkeypatch, when):
    """Ctrl-C between the moves that set the earlier run's outputs aside put none back (they
    stayed in the hidden folder); a second Ctrl-C while they were put back, after a failed
    training, stopped that half way. Either way they are all back in OUT_DIR, the Ctrl-C raised."""
    import signal

    from camface.models import train

    replace = os.replace
    moves = []

    def interrupted(src, dst):
        moves.extend([src] if Path(src).name in EARLIER_OUTPUTS else [])
        if len(moves) == (2 if when == "setting aside" else len(EARLIER_OUTPUTS) + 1):
            os.kill(os.getpid(), signal.SIGINT)  # the (second) Ctrl-C, between two moves
        replace(src, dst)

    def fails(*args):
        raise MemoryError

    monkeypatch.setattr(train, "_fit", fails)
    monkeypatch.setattr(train.os, "replace", interrupted)
    out, config = _after_an_earlier_run(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train.run(config)
    assert sorted(p.name for p in out.iterdir()) == sorted(["crops", *EARLIER_OUTPUTS])
    assert all((out / name).read_text() == f"the earlier run's {name}" for name in EARLIER_OUTPUTS)


def test_ctrl_c_while_the_earlier_outputs_are_deleted_leaves_no_hidden_folder(tmp_path, monkeypatch):
    """Ctrl-C as the earlier run's outputs were deleted (the new model trained) left the hidden
    folder, which the next run named as a killed run's outputs to move back. It goes whole;
    the Ctrl-C is raised after, the new model kept."""
    import shutil
    import signal

    from camface.models import train

    def trained(config, labels, images, targets, split, model_path, names):
        model_path.write_text("the new model")
        return []

    rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(train, "_fit", trained)
    monkeypatch.setattr(train.shutil, "rmtree", interrupted)
    out, config = _after_an_earlier_run(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train.run(config)
    assert sorted(p.name for p in out.iterdir()) == ["crops", "labels.txt", "model.keras"]
    assert (out / "model.keras").read_text() == "the new model"


@pytest.mark.parametrize("fault", ["rename fails", "a folder"])
def test_earlier_outputs_that_cannot_be_set_aside_stop_the_run_with_all_in_place(tmp_path, monkeypatch, fault):
    """An output that cannot be moved aside: the run stops naming it, before training, with
    every earlier output back in OUT_DIR. A folder of an output's name (unlink refused it before)
    was moved aside and deleted whole once the new model was trained."""
    from camface.errors import OutputError
    from camface.models import train

    def must_not_train(*args, **kwargs):
        raise AssertionError("training must not start")

    out, config = _after_an_earlier_run(tmp_path)
    monkeypatch.setattr(train, "_fit", must_not_train)
    if fault == "a folder":
        (out / "report.md").unlink()
        (out / "report.md").mkdir()
        (out / "report.md" / "notes.txt").write_text("mine")
        message = f"{out / 'report.md'} is a folder, not an output of camface train"
    else:
        replace = os.replace

        def fails(src, dst):
            if Path(src).name == "model.onnx" and Path(dst).parent.name.startswith(train.EARLIER_PREFIX):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            replace(src, dst)

        monkeypatch.setattr(train.os, "replace", fails)
        message = f"cannot move {out / 'model.onnx'} of an earlier run aside: Invalid cross-device link"
    with pytest.raises(OutputError, match=re.escape(message)):
        train.run(config)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == sorted(["crops", *EARLIER_OUTPUTS])
    assert all((out / name).read_text() == f"the earlier run's {name}" for name in EARLIER_OUTPUTS
               if name != "report.md" or fault != "a folder")
    assert fault != "a folder" or (out / "report.md" / "notes.txt").read_text() == "mine"


def test_outputs_a_killed_run_set_aside_are_named_not_deleted(tmp_path, monkeypatch, caplog):
    from camface.models import train

    out = tmp_path / "out"
    (out / ".earlier-run.abc").mkdir(parents=True)
    (out / ".earlier-run.abc" / "model.keras").write_text("kept")
    assert train._set_aside_earlier_outputs(out) is None
    assert "out/.earlier-run.abc holds the outputs of an earlier run that a killed run set aside" in caplog.text
    assert (out / ".earlier-run.abc" / "model.keras").read_text() == "kept"


def test_an_empty_folder_an_interrupted_run_left_is_removed_not_named(tmp_path, caplog):
    """A Ctrl-C between making the folder and the first move left it empty; the next run named
    it as holding an earlier run's outputs, to move back or delete. It is removed."""
    from camface.models import train

    out = tmp_path / "out"
    (out / ".earlier-run.abc").mkdir(parents=True)
    (out / "model.keras").write_text("earlier")
    aside = train._set_aside_earlier_outputs(out)
    assert "set aside" not in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [aside.name] and aside.name != ".earlier-run.abc"
    assert (aside / "model.keras").read_text() == "earlier"


def test_copies_of_a_photo_are_used_once_and_never_span_two_classes(tmp_path, capsys, monkeypatch):
    from camface.models import train

    def must_not_train(*args, **kwargs):
        raise AssertionError("a face under two labels: training must not start")

    data = _square_photos(tmp_path / "data", 4)
    _write(data / "a" / "more" / "copy of 0.png", cv2.imread(str(data / "a" / "0.png")))
    settings = dataset.CropSettings(size=8, detect=False, detector="", margin=0.0, min_confidence=0.0)
    photos = dataset.prepare_crops(data, dataset.scan_classes(data), tmp_path / "crops", settings)
    kept, copies = dataset.drop_duplicates(photos)
    assert [p.source for p in photos if p not in kept] == [data / "a" / "more" / "copy of 0.png"]
    assert copies == [(data / "a" / "more" / "copy of 0.png", data / "a" / "0.png")]
    paths, targets = dataset.usable_crops(kept, ["a", "b"], data)
    assert targets.tolist() == [0] * 4 + [1] * 4

    monkeypatch.setattr(train, "_fit", must_not_train)
    _write(data / "b" / "4.png", cv2.imread(str(data / "a" / "1.png")))  # a's face, labelled b
    rc = cli.main(["train", str(data), "-o", str(tmp_path / "out"), "--no-detect",
                   "--input-size", "32", "--weights", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "4.png (class 'b') and" in err and "1.png (class 'a') are the same photo" in err


def test_a_copy_whose_crop_an_earlier_run_cached_in_other_bytes_is_still_a_copy(tmp_path):
    """Copies were found by their crop files' bytes: a crop cached by an earlier run (another
    OpenCV or zlib, another PNG compression) holds the same pixels in other bytes, so a copy
    added since was trained on while the first was tested. The pixels decide now."""
    data = _square_photos(tmp_path / "data", 3)
    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    _write(data / "a" / "face.png", face)
    settings = dataset.CropSettings(size=8, detect=False, detector="", margin=0.0, min_confidence=0.0)
    cache = tmp_path / "crops"
    first = dataset.prepare_crops(data, dataset.scan_classes(data), cache, settings)
    crop, = [p.crop for p in first if p.source.name == "face.png"]
    assert cv2.imwrite(str(crop), cv2.imread(str(crop)), [cv2.IMWRITE_PNG_COMPRESSION, 9])  # as another OpenCV
    _write(data / "a" / "later" / "face copy.png", face)
    photos = dataset.prepare_crops(data, dataset.scan_classes(data), cache, settings)
    copy, = [p.crop for p in photos if p.source.name == "face copy.png"]
    assert copy.read_bytes() != crop.read_bytes()
    kept, copies = dataset.drop_duplicates(photos)
    assert copies == [(data / "a" / "later" / "face copy.png", data / "a" / "face.png")]
    assert len(kept) == len(photos) - 1


@pytest.mark.parametrize("n", [1, 2, 7])
def test_cam_montage_titles_fit_and_do_not_overlap(n):
    """A small test split (one or two crops) and long class names: the figure's title stays
    inside the figure and no tile's title runs into its neighbour's."""
    labels = ["Grace Brewster Murray Hopper", "Eileen Marie Collins (astronaut)"]
    crops = np.full((n, 32, 32, 3), 128, np.uint8)
    probs = np.tile(np.float32([[0.16, 0.84]]), (n, 1))
    fig = report.cam_montage_figure(crops, np.zeros((n, 4, 4), np.float32), np.zeros(n, np.int64),
                                    probs, labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(boxes) == n
    for text in [fig._suptitle, *(ax.title for ax in fig.axes if ax.get_title())]:
        box = text.get_window_extent(renderer)
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, text.get_text()
    for a, b in zip(boxes, boxes[1:]):
        assert not a.overlaps(b)


def _full_disk_on_partials(monkeypatch):
    """Path.write_text raises ENOSPC for a file written beside its final (a hidden name), after
    writing half of it."""
    import errno

    real = Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        if self.name.startswith("."):
            real(self, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", half_then_full)


@pytest.mark.parametrize("what", ["crop index", "metrics.json", "report.md"])
def test_a_full_disk_keeps_train_s_earlier_file_whole_and_names_it(tmp_path, monkeypatch, what):
    """The crop cache's index (written to a fixed index.tmp: two runs on one cache shared it, and
    a failure left it and named it) and train's metrics.json and report.md (written in place:
    half a file on a full disk) are written beside and renamed; the error names the file."""
    from camface.errors import OutputError

    data = tmp_path / "data"
    _write(data / "a" / "x.png", np.full((20, 20, 3), 50, np.uint8))
    _write(data / "b" / "y.png", np.full((20, 20, 3), 90, np.uint8))
    settings = dataset.CropSettings(size=8, detect=False, detector="", margin=0.0, min_confidence=0.0)
    cache = tmp_path / "c"
    target = {"crop index": cache / dataset.CACHE_INDEX, "metrics.json": tmp_path / "metrics.json",
              "report.md": tmp_path / "report.md"}[what]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("an earlier run's file")
    _full_disk_on_partials(monkeypatch)
    with pytest.raises(OutputError, match=f"cannot write {target}: No space left on device"):
        if what == "crop index":
            dataset.prepare_crops(data, dataset.scan_classes(data), cache, settings)
        elif what == "metrics.json":
            report.write_json(target, {"accuracy": 1.0})
        else:
            metrics = report.classification_metrics(np.array([0, 1]), np.array([0, 0]), ["a", "b"])
            report.write_report(target, command="camface train", labels=["a", "b"], counts={"a": {}, "b": {}},
                                unreadable=[], split_sizes={}, stages=[], metrics=metrics, settings={}, seconds=1.0)
    assert target.read_text() == "an earlier run's file"
    assert [p.name for p in target.parent.iterdir() if p.is_file()] == [target.name]  # no partial left


@pytest.mark.parametrize("figure", ["confusion.png", "cam_montage.png"])
def test_a_full_disk_keeps_train_s_earlier_figure_whole_and_names_it(tmp_path, monkeypatch, figure):
    """confusion.png and cam_montage.png were saved in place: a full disk left half a PNG and a
    traceback naming no file. They are written beside and renamed, as metrics.json is."""
    import errno

    from matplotlib.figure import Figure

    from camface.errors import OutputError

    def half_then_full(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")  # write() names no file

    target = tmp_path / figure
    target.write_bytes(b"an earlier run's figure")
    monkeypatch.setattr(Figure, "savefig", half_then_full)
    with pytest.raises(OutputError, match=f"cannot write {target}: No space left on device"):
        if figure == "confusion.png":
            report.save_confusion(np.array([[2, 1], [0, 3]]), ["a", "b"], target)
        else:
            report.save_cam_montage(np.full((2, 32, 32, 3), 128, np.uint8), np.zeros((2, 4, 4), np.float32),
                                    np.array([0, 1]), np.float32([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"], target)
    assert target.read_bytes() == b"an earlier run's figure"
    assert [p.name for p in tmp_path.iterdir()] == [figure]  # no partial left
