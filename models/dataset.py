"""Training data for `camface train`: class folders -> face crops (cached) -> stratified split.

The pipeline, in data-flow order:
  scan_classes(DATA_DIR)        one sub-folder per class, image files inside (recursively)
  prepare_crops(...)            each photo read (uint8 BGR), its face detected and cropped with the
                                live loop's own detector and crop code, the crop cached as PNG
  drop_duplicates(...)          copies of a photo used once (never in two split parts)
  usable_crops(...)             photos with exactly one face, per class; clear errors otherwise
  split_groups(...)             which usable photos must stay together (one sub-folder: one group)
  stratified_split(...)         train / val / test indices, same class ratios, groups kept whole,
                                in an order that depends only on --seed and the photos' names
  load_crops(...)               uint8 BGR [N, S, S, 3] arrays for Keras / ONNX Runtime

Photos with no face or several faces are skipped and counted (the original study removed those
by hand); unreadable files are listed and skipped. This module imports no TensorFlow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from camface.errors import OutputError, SourceError
from camface.native import opencv_path
from camface.realtime.sources import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


OK = "ok"
NO_FACE = "no_face"
MANY_FACES = "many_faces"
UNREADABLE = "unreadable"
STATUSES = (OK, NO_FACE, MANY_FACES, UNREADABLE)

CACHE_INDEX = "index.json"
# The version of the code that turns a photo into a crop (camface.realtime.crop.crop_faces, the
# boxes it is given, resize_square): raise it with any change that cuts another crop from the same
# photo and detections, and crop caches made before are cropped again.
CROP_CODE_VERSION = 1


class FaceCropper(Protocol):
    """Finds the faces in one still photo and returns them cropped as the live loop would."""

    def crop_faces(self, image_bgr: np.ndarray) -> list[np.ndarray]:
        """image_bgr: uint8 [H, W, 3] BGR. Returns one uint8 [S, S, 3] BGR crop per face found."""
        ...


class LiveCropper:
    """FaceCropper made of the live loop's own pieces (camface.realtime.detect.FaceDetector and
    camface.realtime.crop.crop_faces), so training crops look like the crops `camface live`
    feeds the graph: same detector model, confidence threshold, square margin and size.

    detector: a FaceDetector not yet opened (`camface.api.face_detector`); the cropper opens it.
    A context manager (MediaPipe's detector must be closed); close() is idempotent.
    """

    def __init__(self, detector, margin: float, size: int):
        self.margin = margin
        self.size = size
        self._opened = contextlib.ExitStack()
        self._detector = self._opened.enter_context(detector)

    def crop_faces(self, image_bgr: np.ndarray) -> list[np.ndarray]:
        from camface.realtime.crop import crop_faces

        faces = self._detector.detect(image_bgr)
        crops, _ = crop_faces(image_bgr, faces, self.margin, (self.size, self.size), "BGR")
        return list(crops)

    def close(self) -> None:
        self._opened.close()

    def __enter__(self) -> "LiveCropper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class CropSettings:
    """What makes a cached crop reusable: a change to any field invalidates the cache."""

    size: int  # crop side in pixels (the model's input size)
    detect: bool  # False: photos are already face crops, only resized
    detector: str  # live loop detector name ("short" / "full")
    margin: float  # live loop crop margin (fraction of the box side added around it)
    min_confidence: float
    # how a box of a face cut by the photo's edge is made: "clipped" at the edge (camface.realtime.
    # blazeface.frame_box); crops cached before, from MediaPipe's boxes moved inside the photo a
    # whole face wide, are made again
    boxes: str = "clipped"
    # sha256 of the face detector's model file ("" with detect False): another model file under
    # the same detector name (a camface upgrade, a converted or replaced .onnx) finds other faces
    detector_sha256: str = ""
    crop_code: int = CROP_CODE_VERSION


@dataclass(frozen=True)
class Photo:
    """One source photo and what became of it.

    source: the photo's path; label: its class (folder name); status: one of STATUSES;
    crop: the cached face crop (uint8 BGR PNG, `size` x `size`) when status is OK;
    faces: faces the detector found (-1 when not detected: unreadable or --no-detect).
    why: why it is unreadable (`read_photo`), else None.
    """

    source: Path
    label: str
    status: str
    crop: Path | None = None
    faces: int = -1
    why: str | None = None


def scan_classes(data_dir: Path) -> dict[str, list[Path]]:
    """Class name -> image files, one class per sub-folder of `data_dir`, both in name order
    ignoring case (`_name_order`: the same order on every machine).

    Hidden files and folders are ignored; files with other extensions are ignored. Raises
    SourceError naming `data_dir` when it is missing, holds no class folder with images, or
    holds only one class.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SourceError(f"DATA_DIR {data_dir} is not a folder")
    classes: dict[str, list[Path]] = {}
    # One order on every machine (Windows sorts paths ignoring case, POSIX does not): the labels'
    # order and the stratified split follow it.
    for folder in sorted((p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: _name_order(Path(p.name))):
        files = sorted(
            (p for p in folder.rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
            key=lambda p: _name_order(p.relative_to(folder)))
        if files:
            classes[folder.name] = files
        else:
            log.warning("skipping %s: no image files (%s)", folder, ", ".join(sorted(IMAGE_SUFFIXES)))
    if not classes:
        raise SourceError(
            f"DATA_DIR {data_dir} holds no class folders with images: put each class's photos in "
            f"its own sub-folder (e.g. {data_dir}/alice/*.jpg, {data_dir}/bob/*.jpg)")
    if len(classes) == 1:
        only = next(iter(classes))
        raise SourceError(
            f"DATA_DIR {data_dir} holds one class only ({only!r}): a classifier needs at least two "
            "class folders")
    return classes


def _name_order(relative: Path) -> tuple:
    """Sort key of a path relative to its folder: folder by folder, names ignoring case, then as
    written (so "a.jpg" and "A.jpg" keep one order too); the same on every operating system."""
    return tuple((part.casefold(), part) for part in relative.parts)


def read_photo(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(uint8 [H, W, 3] BGR, None), or (None, why) when OpenCV cannot decode the file: the one
    reason the live image folder gives (`camface.realtime.sources.imread`: gone, permission
    denied, over OpenCV's size limits with the variable that raises them, not an image).
    Grayscale, 16-bit and alpha images are converted; turned upright by their EXIF orientation."""
    from camface.realtime.sources import imread

    return imread(path, cv2.IMREAD_COLOR)


def resize_square(image_bgr: np.ndarray, size: int) -> np.ndarray:
    """An already-cropped face (uint8 [H, W, 3] BGR) resized to [size, size, 3], as is (--no-detect)."""
    interpolation = cv2.INTER_AREA if min(image_bgr.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image_bgr, (size, size), interpolation=interpolation)


def _cache_name(source: Path, class_dir: Path, key: str) -> str:
    # Photos may sit in sub-folders and share stems ("a.jpg", "a.png"): keep the whole relative
    # name, readable, plus a digest of the photo's absolute path (`key`), so that no two photos
    # share a crop file: neither "x/y.jpg" and "x__y.jpg", nor the same name in another DATA_DIR
    # written into a reused OUT_DIR (whose index would otherwise hand one photo the other's crop).
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return "__".join(source.relative_to(class_dir).parts) + f".{digest}.png"


def _fingerprint(path: Path) -> list:
    """[size, sha256 of the bytes] (sha256 None when the file cannot be read: it is then listed
    as unreadable). The bytes, not the modification time: a photo replaced by another of its size
    keeps its time when copied with it (cp -p, rsync -a, unzip) or written within one tick of the
    file system's clock, and its crop would be reused for the new photo.

    Raises SourceError naming the photo when it is gone (deleted or moved after DATA_DIR was
    scanned): the run would otherwise train on another set of photos than it reports."""
    from camface.hashing import sha256_file

    try:
        digest = sha256_file(path)
    except OSError:
        digest = None
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SourceError(f"photo {path} cannot be read: {exc.strerror or exc} (deleted or moved "
                          "while camface train ran?); run again") from exc
    return [size, digest]


def prepare_crops(
    data_dir: Path,
    classes: Mapping[str, Sequence[Path]],
    cache_dir: Path,
    settings: CropSettings,
    open_cropper: Callable[[], FaceCropper] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> tuple[Photo, ...]:
    """Detect, crop and cache every photo; returns one Photo per file, in class then file order.

    `classes` is what scan_classes(data_dir) returned (files under data_dir/<class>/).
    cache_dir/<class>/<file>.<digest>.png holds the crops (uint8 BGR, settings.size square) and
    cache_dir/index.json what each photo gave, keyed by path, size and digest of its bytes, so a
    re-run with the same settings detects no photo twice. `open_cropper` is called (once, lazily:
    not at all when every photo is cached) to make a FaceCropper; it may return a context
    manager, which is closed at the end. Required when settings.detect is True.
    """
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the crop cache {cache_dir}: {exc.strerror}") from exc
    index_path = cache_dir / CACHE_INDEX
    index = _read_index(index_path, settings)
    progress = progress or (lambda items: items)

    cropper = None
    photos: list[Photo] = []
    todo = [(label, Path(path)) for label, files in classes.items() for path in files]
    try:
        for label, source in progress(todo):
            class_dir = Path(data_dir) / label
            key = str(source.resolve())
            fingerprint = _fingerprint(source)
            cached = index.get(key)
            crop_path = cache_dir / label / _cache_name(source, class_dir, key)
            # an unreadable photo is tried again: what kept it unreadable may be gone (the size
            # limit raised with OPENCV_IO_MAX_IMAGE_PIXELS, as its reason says, or a permission)
            if cached and cached["fingerprint"] == fingerprint and cached["status"] != UNREADABLE and (
                    cached["status"] != OK or crop_path.is_file()):
                photos.append(Photo(source, label, cached["status"],
                                    crop_path if cached["status"] == OK else None, cached["faces"]))
                continue
            image, why = read_photo(source)
            if image is None:
                photo = Photo(source, label, UNREADABLE, why=why)
            elif not settings.detect:
                photo = _write_crop(Photo(source, label, OK, crop_path), resize_square(image, settings.size))
            else:
                if cropper is None:
                    if open_cropper is None:
                        raise ValueError("prepare_crops needs open_cropper when settings.detect is True")
                    cropper = open_cropper()
                crops = cropper.crop_faces(image)
                if len(crops) == 1:
                    photo = _write_crop(Photo(source, label, OK, crop_path, 1), crops[0])
                else:
                    photo = Photo(source, label, NO_FACE if not crops else MANY_FACES, None, len(crops))
            index[key] = {"fingerprint": fingerprint, "status": photo.status, "faces": photo.faces}
            photos.append(photo)
    finally:
        if cropper is not None and hasattr(cropper, "close"):
            cropper.close()
        _write_index(index_path, settings, index)
    return tuple(photos)


def _write_crop(photo: Photo, crop_bgr: np.ndarray) -> Photo:
    assert photo.crop is not None
    try:
        photo.crop.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, no permission, a full disk
        raise OutputError(f"cannot create the crop folder {photo.crop.parent}: "
                          f"{exc.strerror or exc}") from exc
    if not cv2.imwrite(opencv_path(photo.crop), crop_bgr):
        raise OutputError(f"cannot write the face crop {photo.crop}")
    return photo


def _read_index(path: Path, settings: CropSettings) -> dict:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    wanted = asdict(settings)
    made_with = stored.get("settings")
    if made_with != wanted:
        made_with = made_with if isinstance(made_with, dict) else {}
        changed = sorted(key for key in {*wanted, *made_with} if made_with.get(key) != wanted.get(key))
        log.info("crop cache %s was made with other settings (%s): cropping again", path.parent,
                 ", ".join(changed))
        return {}
    return stored.get("photos", {})


def _write_index(path: Path, settings: CropSettings, photos: dict) -> None:
    """Written beside `path` and renamed (an interrupted run never leaves a half-written index;
    two runs on one cache never share a partial file); a failure is an OutputError naming it."""
    from camface.outputs import replace_whole

    text = json.dumps({"settings": asdict(settings), "photos": photos}, indent=1)
    replace_whole(path, lambda partial: Path(partial).write_text(text))


def count_statuses(photos: Sequence[Photo]) -> dict[str, dict[str, int]]:
    """label -> {status: count} for every status (zeros included), labels in first-seen order."""
    counts: dict[str, Counter] = {}
    for photo in photos:
        counts.setdefault(photo.label, Counter())[photo.status] += 1
    return {label: {status: c[status] for status in STATUSES} for label, c in counts.items()}


def drop_duplicates(photos: Sequence[Photo], what: str = "class") -> tuple[tuple[Photo, ...], list[tuple[Path, Path]]]:
    """Usable photos whose face crops are identical, pixel for pixel (the same photo copied, under
    another name or in a sub-folder), are used once: a copy in the training split and another in
    the test split would score the model on a face it was trained on. The pixels, not the PNG
    files' bytes: a crop cached by an earlier run (another OpenCV, zlib or compression level)
    holds the same pixels in other bytes.

    Returns the photos without the copies (order kept) and (copy, first photo) source pairs.
    Raises SourceError naming both files when copies sit in two class folders (one face, two
    labels; `what` names those folders' kind: "class", or "person" for `camface enroll`).
    """
    first_by_digest: dict[str, Photo] = {}
    kept: list[Photo] = []
    copies: list[tuple[Path, Path]] = []
    for photo in photos:
        if photo.status != OK or photo.crop is None:
            kept.append(photo)
            continue
        pixels, why = read_photo(photo.crop)
        if pixels is None:
            raise SourceError(f"cached crop {photo.crop} cannot be read ({why}): delete it and run again")
        digest = hashlib.sha1(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
        first = first_by_digest.setdefault(digest, photo)
        if first is photo:
            kept.append(photo)
        elif first.label != photo.label:
            raise SourceError(f"{photo.source} ({what} {photo.label!r}) and {first.source} ({what} "
                              f"{first.label!r}) are the same photo: a face can have one label; "
                              "remove one of them")
        else:
            copies.append((photo.source, first.source))
    return tuple(kept), copies


def usable_crops(photos: Sequence[Photo], labels: Sequence[str], data_dir: Path,
                 min_per_class: int = 3) -> tuple[list[Path], np.ndarray]:
    """Crop paths of usable photos and their class indices (int64 [N], into `labels`).

    Raises SourceError naming the class folder when a class has fewer than `min_per_class`
    usable faces (the split needs one each for train, validation and test).
    """
    paths: list[Path] = []
    targets: list[int] = []
    for class_index, label in enumerate(labels):
        mine = [p for p in photos if p.label == label]
        ok = [p.crop for p in _usable(photos, label)]
        if len(ok) < min_per_class:
            tally = Counter(p.status for p in mine)
            why = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in tally.items() if s != OK)
            raise SourceError(
                f"class folder {Path(data_dir) / label} has {len(ok)} usable face photo(s) of "
                f"{len(mine)} ({why or 'none skipped'}); it needs at least {min_per_class} "
                "(train, validation and test each need one)")
        paths.extend(ok)
        targets.extend([class_index] * len(ok))
    return paths, np.asarray(targets, dtype=np.int64)


def _usable(photos: Sequence[Photo], label: str) -> list[Photo]:
    """The usable photos of class `label`, in the order usable_crops lists their crops."""
    return [p for p in photos if p.label == label and p.status == OK]


def usable_sources(photos: Sequence[Photo], labels: Sequence[str]) -> list[Path]:
    """The source photo of each crop usable_crops lists, in its order."""
    return [p.source for label in labels for p in _usable(photos, label)]


def split_names(photos: Sequence[Photo], labels: Sequence[str], data_dir: Path) -> list[str]:
    """The name of each crop usable_crops lists (same order): its photo's path relative to
    DATA_DIR, "/"-separated ("alice/clip1/0.png"), the same on every operating system."""
    return [photo.source.relative_to(Path(data_dir)).as_posix()
            for label in labels for photo in _usable(photos, label)]


def split_groups(photos: Sequence[Photo], labels: Sequence[str], data_dir: Path) -> np.ndarray:
    """str [N]: the group of each crop usable_crops lists (same order), named by its path relative
    to DATA_DIR. The photos under one sub-folder of a class folder (DATA_DIR/alice/clip1/..., at
    any depth) are one group, "alice/clip1": frames of one clip or one session are near-identical,
    and stratified_split keeps a group in one part, so no frame is trained on while its neighbour
    is tested. A photo directly in the class folder is a group of its own ("alice/x.jpg")."""
    return np.asarray(["/".join(name.split("/")[:2]) for name in split_names(photos, labels, data_dir)],
                      dtype=str)


@dataclass(frozen=True)
class Split:
    """Indices (int64, sorted) into the usable crops for each part of a stratified split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


# A part of a class whose sub-folders, kept whole, give it less than 1/SPLIT_OFF_FACTOR or more
# than SPLIT_OFF_FACTOR times the photos its fraction asks for is warned about.
SPLIT_OFF_FACTOR = 2.0


def draw_order(keys: Iterable[str], seed: int) -> list[str]:
    """`keys` in the split's seeded order: by sha256(f"{seed}:{key}") (hex, of the key's UTF-8 in
    Unicode's NFC form, which macOS file names may not be in), then by key.

    A function of the seed and the names only: the same on every machine and with every numpy
    (whose Generator streams may change between versions, NEP 19), whatever order the files
    are listed in, and one class's order does not move when another class changes."""
    def rank(key: str) -> tuple[str, str]:
        text = unicodedata.normalize("NFC", f"{seed}:{key}")
        return hashlib.sha256(text.encode("utf-8")).hexdigest(), str(key)

    return sorted(keys, key=rank)


def stratified_split(targets: np.ndarray, val_fraction: float, test_fraction: float,
                     seed: int, labels: Sequence[str] | None = None,
                     groups: np.ndarray | None = None, names: Sequence[str] | None = None) -> Split:
    """Split indices so that every class keeps its share in each part, and no group (one name
    per item, `split_groups`; None: every item its own group) spans two parts.

    Per class of n items, the targets are round(n * test_fraction) for test and
    round(n * val_fraction) for validation, each at least 1, the rest (at least 1) for training.
    The class's groups are drawn in the order `draw_order` gives their names (str of each group;
    of each item, `names`, when split item by item; an item without `names` is named by its
    index), so the split depends only on the seed and the names: not on numpy's version nor on
    the order the photos are listed in. Test, then validation, takes each drawn group that fits
    in what it still lacks (a part that has nothing yet and no group fits takes the smallest
    group), leaving at least one group for each later part; training gets the rest. With one
    item per group the parts are exactly the targets; a class whose whole groups leave a part
    off its target by more than a factor SPLIT_OFF_FACTOR is warned about, naming the fractions
    asked for and obtained. Raises ValueError naming the class (by `labels`, class index -> name,
    when given) when the fractions leave it no training item. A class in fewer than three groups
    is split item by item (a warning says so): its groups cannot each stay whole in one part.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"--val-split {val_fraction} and --test-split {test_fraction} must be in "
                         "(0, 1) and sum to less than 1")
    targets = np.asarray(targets)
    item_names = np.asarray([str(i) for i in range(len(targets))] if names is None else list(names), dtype=str)
    if len(item_names) != len(targets) or len(set(item_names.tolist())) != len(item_names):
        raise ValueError(f"stratified_split needs one distinct name per item: got {len(item_names)} "
                         f"names ({len(set(item_names.tolist()))} distinct) for {len(targets)} items")
    groups = item_names if groups is None else np.asarray(groups).astype(str)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for cls in np.unique(targets):
        name = repr(labels[cls]) if labels is not None else cls
        members = np.flatnonzero(targets == cls)
        n = len(members)
        n_test = max(1, round(n * test_fraction))
        n_val = max(1, round(n * val_fraction))
        if n - n_test - n_val < 1:
            raise ValueError(f"class {name} has {n} items: too few for a train/val/test split")
        by_key = _members_by_key(members, groups[members])
        if len(by_key) < 3:  # alice/photos/*.jpg: no way to keep a group whole; photo by photo, as before
            log.warning("class %s has its %d photos in %d sub-folder(s) (a photo directly in the class "
                        "folder counts as one): too few to keep each whole in one of train / validation "
                        "/ test, so its photos are split one by one (spread them over at least 3 "
                        "sub-folders to keep clips apart)", name, n, len(by_key))
            by_key = _members_by_key(members, item_names[members])
        drawn = [np.asarray(by_key[key], dtype=np.int64) for key in draw_order(by_key, seed)]
        taken: dict[str, list[np.ndarray]] = {}
        for part, wanted, later in (("test", n_test, 2), ("val", n_val, 1)):
            taken[part], count = [], 0
            while count < wanted and len(drawn) > later:
                pick = next((i for i, g in enumerate(drawn) if len(g) <= wanted - count), None)
                if pick is None:
                    if count:
                        break
                    pick = int(np.argmin([len(g) for g in drawn]))
                taken[part].append(drawn.pop(pick))
                count += len(taken[part][-1])
        taken["train"] = drawn
        _warn_if_off(name, n, {"train": n - n_test - n_val, "val": n_val, "test": n_test},
                     {part: sum(len(g) for g in chosen) for part, chosen in taken.items()},
                     {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction})
        for part, chosen in taken.items():
            parts[part].extend(chosen)
    return Split(**{name: np.sort(np.concatenate(chunks)).astype(np.int64)
                    for name, chunks in parts.items()})


def _members_by_key(members: np.ndarray, keys: np.ndarray) -> dict[str, list[int]]:
    """key -> the members (indices) that hold it, in one pass (a class may hold many photos)."""
    by_key: dict[str, list[int]] = {}
    for index, key in zip(members.tolist(), keys.tolist()):
        by_key.setdefault(key, []).append(index)
    return by_key


def _warn_if_off(name, n: int, wanted: Mapping[str, int], got: Mapping[str, int],
                 asked: Mapping[str, float]) -> None:
    """One warning when a part of class `name` (n items) holds less than 1/SPLIT_OFF_FACTOR or
    more than SPLIT_OFF_FACTOR times the items it wanted (its target, rounded and at least 1)."""
    if all(wanted[p] / SPLIT_OFF_FACTOR <= got[p] <= wanted[p] * SPLIT_OFF_FACTOR for p in wanted):
        return
    order = ("train", "val", "test")
    log.warning("class %s: keeping its sub-folders whole splits its %d photos %s (train / validation / "
                "test: %s photos) where %s was asked for: spread its photos over more sub-folders of "
                "similar sizes", name, n, " / ".join(f"{got[p] / n:.2f}" for p in order),
                " / ".join(str(got[p]) for p in order), " / ".join(f"{asked[p]:.2f}" for p in order))


NEAR_THUMB = 16  # side of the thumbnails near_identical compares
# Their mean absolute difference (of 255) at or below which two crops are near-identical. Measured
# on the sample clip's decoded frames (faces moving 2-3.5 px a frame): consecutive frames differ by
# up to 9.3, 11.8 for a face half outside the frame; the astronaut and Grace Hopper by 45 or more,
# the astronaut's face shifted by 6% of the crop's side by 29.
NEAR_MAD = 12.0


def near_identical(crops_bgr: np.ndarray, test: np.ndarray, train: np.ndarray,
                   threshold: float = NEAR_MAD) -> list[tuple[int, int, float]]:
    """(test index, train index, difference) for each test crop whose nearest training crop is
    near-identical: the mean absolute difference of their NEAR_THUMB-pixel thumbnails (uint8 BGR
    crops [N, S, S, 3] resized with INTER_AREA; 0-255 per channel) is at most `threshold`.
    Consecutive frames of a video put directly in a class folder (not each clip in its own
    sub-folder) look so; one of them tested while the other was trained on inflates the accuracy.
    """
    if not len(test) or not len(train):
        return []

    def thumbs(indices):
        return np.stack([cv2.resize(crops_bgr[i], (NEAR_THUMB, NEAR_THUMB), interpolation=cv2.INTER_AREA)
                         for i in indices]).reshape(len(indices), -1).astype(np.float32)

    trained = thumbs(train)
    found = []
    for i, thumb in zip(test, thumbs(test)):
        differences = np.abs(trained - thumb).mean(axis=1)
        nearest = int(np.argmin(differences))
        if differences[nearest] <= threshold:
            found.append((int(i), int(train[nearest]), float(differences[nearest])))
    return found


def load_crops(paths: Sequence[Path], size: int) -> np.ndarray:
    """uint8 [N, size, size, 3] BGR stack of cached crops."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        image, why = read_photo(Path(path))
        if image is None:
            raise SourceError(f"cached crop {path} cannot be read ({why}): delete it and run again")
        out[i] = image if image.shape[:2] == (size, size) else resize_square(image, size)
    return out


def class_weights(targets: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced class weights n / (classes * n_c) (the scikit-learn "balanced" rule), so each
    class contributes equally to the loss however many photos it has."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    total = counts.sum()
    return {c: float(total / (num_classes * counts[c])) if counts[c] else 0.0
            for c in range(num_classes)}
