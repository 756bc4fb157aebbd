"""`camface train DATA_DIR -o OUT_DIR`: the original study's transfer-learning workflow, from a
folder of raw photos to a CAM graph that `camface live` runs.

  DATA_DIR/<class>/*.jpg --detect + crop (live loop code)--> OUT_DIR/crops/ (cache)
    --stratified split--> train / val / test
    --frozen backbone -> GAP -> Dense(softmax), then optional last-block fine-tuning-->
  OUT_DIR/model.keras (best val accuracy), labels.txt
    --camface export (self-checked)--> model.onnx
    --ONNX Runtime on the test split--> metrics.json, confusion.png, cam_montage.png, report.md

Heavy imports (TensorFlow, Keras, MediaPipe, ONNX Runtime) happen inside functions.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from camface.errors import ModelError, OutputError, SourceError, UsageError
from camface.models import builders, dataset, report
from camface.outputs import input_spec, output_path
from camface.realtime import config as live_config

log = logging.getLogger(__name__)

LIVE_DEFAULTS = live_config.DEFAULTS  # detector, margin, min_confidence: as `camface live`
PRECISE_BN_IMAGES = 64  # training crops that set BatchNorm statistics with --weights none
# What a run writes into OUT_DIR besides crops/: a new run sets the earlier run's aside before
# training (an earlier run's files, another DATA_DIR's labels or a model.int8.onnx of a run with
# --int8, are never left beside its own), puts them back if the training fails or is interrupted,
# and deletes them once its model is trained.
OUTPUTS = ("model.keras", "labels.txt", "model.onnx", "model.int8.onnx", "metrics.json",
           "confusion.png", "cam_montage.png", "report.md")


MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 1024  # crop side in pixels


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs, built once from the command line."""

    data_dir: Path
    out_dir: Path
    backbone: str = "resnet50"
    input_size: int = 224
    epochs: int = 20
    fine_tune_epochs: int = 0
    batch_size: int = 32
    weights: str = "imagenet"  # imagenet, none, or a path
    val_split: float = 0.15
    test_split: float = 0.15
    seed: int = 0
    detect: bool = True
    detector: str = LIVE_DEFAULTS["detector"]
    margin: float = LIVE_DEFAULTS["margin"]
    min_confidence: float = LIVE_DEFAULTS["min_confidence"]
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    patience: int = 5
    montage: int = 24
    int8: bool = False  # also model.int8.onnx (export/int8.py)

    def __post_init__(self) -> None:
        # --backbone's earlier spelling (vgg16-gap), as the command line takes it; an unknown name
        # is refused here, not as a KeyError once the photos were cropped
        object.__setattr__(self, "backbone", builders.backbone_name(self.backbone))
        if self.backbone not in builders.BACKBONES:
            raise UsageError(f"--backbone must be one of {', '.join(builders.BACKBONES)}, got {self.backbone!r}")
        # the live loop's checks of the crop options (UsageError naming the flag)
        live_config.LiveConfig(detector=self.detector, margin=self.margin, min_confidence=self.min_confidence)
        for flag, rate in (("--learning-rate", self.learning_rate),
                           ("--fine-tune-learning-rate", self.fine_tune_learning_rate)):
            if not 0 < rate < math.inf:  # NaN too: Adam trained on (or diverged) for every epoch
                raise UsageError(f"{flag} must be a finite number > 0, got {rate}")
        if not MIN_INPUT_SIZE <= self.input_size <= MAX_INPUT_SIZE:  # 100000: OpenCV's out-of-memory
            # traceback as the first photo was cropped (every crop is held in memory)
            raise UsageError(f"--input-size must be {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE} (the backbones need "
                             f"{MIN_INPUT_SIZE}+; they were trained at 224), got {self.input_size}")
        if not 0 <= self.seed < 2 ** 32:  # keras.utils.set_random_seed (numpy's legacy seed) refuses
            # it: a traceback once the photos were cropped
            raise UsageError(f"--seed must be 0..{2 ** 32 - 1}, got {self.seed}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        return cls(data_dir=Path(args.data_dir), out_dir=Path(args.out_dir), backbone=args.backbone,
                   input_size=args.input_size, epochs=args.epochs,
                   fine_tune_epochs=args.fine_tune_epochs, batch_size=args.batch_size,
                   weights=args.weights, val_split=args.val_split, test_split=args.test_split,
                   seed=args.seed, detect=not args.no_detect, detector=args.detector,
                   margin=args.margin, min_confidence=args.min_confidence,
                   learning_rate=args.learning_rate,
                   fine_tune_learning_rate=args.fine_tune_learning_rate, patience=args.patience,
                   montage=args.montage, int8=args.int8)

    def command(self) -> str:
        """The full command line (every flag explicit) that reproduces this run."""
        argv = ["camface", "train", str(self.data_dir), "-o", str(self.out_dir),
                "--backbone", self.backbone, "--input-size", str(self.input_size),
                "--epochs", str(self.epochs), "--fine-tune-epochs", str(self.fine_tune_epochs),
                "--batch-size", str(self.batch_size), "--weights", self.weights,
                "--val-split", str(self.val_split), "--test-split", str(self.test_split),
                "--seed", str(self.seed)]
        if self.detect:
            argv += ["--detector", self.detector, "--margin", str(self.margin),
                     "--min-confidence", str(self.min_confidence)]
        else:
            argv += ["--no-detect"]
        argv += ["--learning-rate", str(self.learning_rate),
                 "--fine-tune-learning-rate", str(self.fine_tune_learning_rate),
                 "--patience", str(self.patience), "--montage", str(self.montage)]
        if self.int8:
            argv += ["--int8"]
        return shlex.join(argv)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1)")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    from camface.realtime.config import add_arguments

    defaults = TrainConfig(Path("."), Path("."))
    parser.add_argument("data_dir", type=input_spec, metavar="DATA_DIR",
                        help="one sub-folder of photos per class (folder name = class name)")
    parser.add_argument("-o", "--out-dir", type=output_path, metavar="OUT_DIR", required=True,
                        help="where model.keras, model.onnx, metrics and the report go")
    parser.add_argument("--backbone", type=builders.backbone_name, choices=tuple(builders.BACKBONES),
                        default=defaults.backbone,
                        help="ImageNet backbone -> GAP -> Dense(softmax) (vgg16 adds Conv2D(1024) "
                             "before GAP, as the study did; 'vgg16-gap' is an alias of vgg16)")
    parser.add_argument("--input-size", type=_positive, default=defaults.input_size,
                        help=f"crop side in pixels (model input), {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}")
    parser.add_argument("--epochs", type=_positive, default=defaults.epochs,
                        help="epochs of the first stage: backbone frozen (with --weights none "
                             "the whole network trains from scratch)")
    parser.add_argument("--fine-tune-epochs", type=_non_negative, default=defaults.fine_tune_epochs,
                        help="then epochs with the backbone's last block unfrozen (0: skip)")
    parser.add_argument("--batch-size", type=_positive, default=defaults.batch_size,
                        help="crops per training step")
    parser.add_argument("--weights", type=input_spec, default=defaults.weights, metavar="imagenet|none|PATH",
                        help="backbone weights: ImageNet (Keras downloads them on first use), "
                             "random, or a local weights file")
    parser.add_argument("--val-split", type=_fraction, default=defaults.val_split,
                        help="fraction of each class for validation (checkpoint, early stopping)")
    parser.add_argument("--test-split", type=_fraction, default=defaults.test_split,
                        help="fraction of each class held out for the final metrics")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the split, the augmentation and the weights' initialisation")
    parser.add_argument("--no-detect", action="store_true",
                        help="photos are already face crops: resize them, detect nothing")
    # the live loop's own flags and defaults: training crops match live crops by construction
    add_arguments(parser, "detector", "margin", "min_confidence")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                        help="Adam learning rate with the backbone frozen")
    parser.add_argument("--fine-tune-learning-rate", type=float,
                        default=defaults.fine_tune_learning_rate,
                        help="Adam learning rate while fine-tuning the last block")
    parser.add_argument("--patience", type=_positive, default=defaults.patience,
                        help="early stopping: epochs without a better validation accuracy")
    parser.add_argument("--montage", type=_positive, default=defaults.montage,
                        help="test crops shown in cam_montage.png")
    parser.add_argument("--int8", action="store_true",
                        help="also write model.int8.onnx (int8 features for CPUs, as `camface export --int8`), "
                             "calibrated on the training crops, its agreement with model.onnx checked on the "
                             "test crops")


def main(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from camface.export import ranking

    config = TrainConfig.from_args(args)
    with ranking.quiet_graph_log(getattr(args, "debug", False)):
        run(config)
    return 0


def _prepare_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".camface-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write to OUT_DIR {out_dir}: {exc.strerror or exc}") from exc


def _progress(items):
    from tqdm import tqdm

    return tqdm(items, desc="detect + crop", unit="photo", disable=None, leave=False)


def run(config: TrainConfig) -> dict:
    """Train, export and report; returns the test metrics (as written to metrics.json)."""
    from camface.models import transfer

    started = time.perf_counter()
    transfer.check_weights_file(config.weights, config.backbone)  # Keras read it after every photo was cropped
    data_dir, out_dir = config.data_dir.resolve(), config.out_dir.resolve()  # symlinks too
    if out_dir == data_dir or data_dir in out_dir.parents:
        raise OutputError(f"-o {config.out_dir} is inside DATA_DIR {config.data_dir}: its crops and figures "
                          "would become a class of the next run; write it elsewhere")
    if config.out_dir.exists() and not config.out_dir.is_dir():  # said "File exists"
        raise OutputError(f"cannot write to OUT_DIR {config.out_dir}: it is a file; give a folder")
    if config.val_split + config.test_split >= 1:  # before the photos are cropped, not after
        raise UsageError(f"--val-split {config.val_split} and --test-split {config.test_split} "
                         "leave no training data: they must sum to less than 1")
    classes = dataset.scan_classes(config.data_dir)
    _prepare_out_dir(config.out_dir)
    out = config.out_dir

    # 1. photos -> face crops (cached), skipped photos counted
    labels = list(classes)
    settings = crop_settings(config)
    photos = dataset.prepare_crops(config.data_dir, classes, out / "crops", settings,
                                   open_cropper=lambda: _open_cropper(config), progress=_progress)
    counts = dataset.count_statuses(photos)
    unreadable = {str(p.source): p.why for p in photos if p.status == dataset.UNREADABLE}  # path -> why
    _log_counts(counts, unreadable)
    photos, copies = dataset.drop_duplicates(photos)
    for copy, first in copies:
        log.warning("%s is a copy of %s: used once", copy, first)
    duplicates = [str(copy) for copy, _ in copies]
    paths, targets = dataset.usable_crops(photos, labels, config.data_dir)
    groups = dataset.split_groups(photos, labels, config.data_dir)
    names = dataset.split_names(photos, labels, config.data_dir)
    try:
        split = dataset.stratified_split(targets, config.val_split, config.test_split, config.seed,
                                         labels, groups, names)
    except ValueError as exc:
        raise SourceError(f"DATA_DIR {config.data_dir}: {exc} (--val-split {config.val_split}, --test-split "
                          f"{config.test_split}): add photos to that class folder or lower the fractions") from exc
    log.info("split (stratified, each sub-folder of a class folder in one part, seed %d): %d train, "
             "%d validation, %d test", config.seed, len(split.train), len(split.val), len(split.test))
    if config.int8:
        _check_int8_split(split, config)
    images = dataset.load_crops(paths, config.input_size)
    _warn_near_identical(images, split, dataset.usable_sources(photos, labels))
    # 2. Keras: frozen backbone (or from scratch), head, optional fine-tuning
    model_path = out / "model.keras"
    labels_path = out / "labels.txt"
    earlier = _set_aside_earlier_outputs(out)
    try:
        stages = _fit(config, labels, images, targets, split, model_path, names)
        report.write_text(labels_path, "\n".join(labels) + "\n")
    except BaseException:  # a failed or interrupted training: the earlier run's outputs back as they were
        _put_back(earlier, out)
        raise
    _drop(earlier)  # the new model is trained: from here on OUT_DIR is this run's

    # 3. the CAM graph, through the exporter (with its self-check)
    onnx_path = out / "model.onnx"
    export_graph(model_path, onnx_path, labels, config.backbone, images[split.test])

    # 4. the test split on model.onnx: metrics and figures
    metrics = _evaluate_and_report(config, labels, images[split.test], targets[split.test],
                                   counts, unreadable, duplicates, split, stages, started)
    log.info("test accuracy %.3f on %d crops (chance %.3f, always %s %.3f); outputs in %s",
             metrics["accuracy"], metrics["test_images"], metrics["chance"],
             metrics["majority_class"], metrics["majority"], out)
    if metrics["accuracy"] <= metrics["majority"]:
        log.warning("test accuracy %.3f does not beat always predicting the largest class, %s (%.3f)",
                    metrics["accuracy"], metrics["majority_class"], metrics["majority"])
    # 5. last, so that an int8 graph that fails its check leaves model.onnx's report written
    if config.int8:
        export_int8(onnx_path, out / "model.int8.onnx", images[split.train], images[split.test])
    return metrics


def _evaluate_and_report(config: TrainConfig, labels: list[str], test_crops: np.ndarray,
                         y_true: np.ndarray, counts: dict, unreadable: dict[str, str | None],
                         duplicates: list[str], split: dataset.Split, stages: list,
                         started: float) -> dict:
    """model.onnx on the test crops (uint8 BGR) -> metrics.json, confusion.png,
    cam_montage.png and report.md in OUT_DIR; returns the metrics."""
    out = config.out_dir
    probs, heatmaps = run_graph(out / "model.onnx", test_crops)
    y_pred = probs.argmax(axis=1)
    metrics = report.classification_metrics(y_true, y_pred, labels)
    metrics["skipped"] = {status: sum(c[status] for c in counts.values())
                          for status in dataset.STATUSES if status != dataset.OK}
    metrics["unreadable_files"] = list(unreadable)
    metrics["duplicate_files"] = duplicates  # copies of another photo, left out
    metrics["split"] = {"train": len(split.train), "val": len(split.val), "test": len(split.test)}
    metrics["stages"] = [asdict(s) for s in stages]
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    report.write_json(out / "metrics.json", metrics)
    report.save_confusion(np.asarray(metrics["confusion"]), labels, out / "confusion.png")
    shown = report.pick_montage(y_true, y_pred, config.montage)
    report.save_cam_montage(test_crops[shown], heatmaps[shown], y_true[shown], probs[shown], labels,
                            out / "cam_montage.png")
    report.write_report(out / "report.md", command=config.command(), labels=labels, counts=counts,
                        unreadable=unreadable, duplicates=duplicates, split_sizes=metrics["split"],
                        stages=metrics["stages"], metrics=metrics,
                        settings=_settings_for_report(config), seconds=metrics["seconds"])
    return metrics


def _check_int8_split(split: dataset.Split, config: TrainConfig) -> None:
    """--int8 calibrates on the training crops and checks on the test crops: fail before
    training, not after it, when the split leaves too few of either."""
    from camface.export.calibration import MIN_CALIBRATION, MIN_HELD_OUT

    if len(split.train) < MIN_CALIBRATION or len(split.test) < MIN_HELD_OUT:
        raise UsageError(
            f"--int8 needs at least {MIN_CALIBRATION} training and {MIN_HELD_OUT} test crops to "
            f"calibrate and check the int8 graph; the split of DATA_DIR {config.data_dir} gives "
            f"{len(split.train)} and {len(split.test)} (--test-split {config.test_split}): add "
            "photos, raise --test-split, or leave out --int8")


def _warn_near_identical(images: np.ndarray, split: dataset.Split, sources: list[Path],
                         shown: int = 10) -> None:
    """A warning for each test crop near-identical to a training crop (dataset.near_identical),
    naming both photos: frames of one clip not kept in a sub-folder of their own."""
    pairs = dataset.near_identical(images, split.test, split.train)
    for test, train, difference in pairs[:shown]:
        log.warning("test photo %s is near-identical to training photo %s (mean absolute difference "
                    "%.1f <= %.1f of 255 on %dx%d thumbnails): its accuracy counts for little; put "
                    "each clip or session in its own sub-folder of the class folder", sources[test],
                    sources[train], difference, dataset.NEAR_MAD, dataset.NEAR_THUMB, dataset.NEAR_THUMB)
    if len(pairs) > shown:
        log.warning("%d more test photos are near-identical to a training photo", len(pairs) - shown)


EARLIER_PREFIX = ".earlier-run."  # the hidden folder in OUT_DIR an earlier run's outputs wait in


def _set_aside_earlier_outputs(out_dir: Path) -> Path | None:
    """Move an earlier run's OUTPUTS into a hidden folder of `out_dir` (None when there are
    none): out of the way of this run's, and back in place (`_put_back`) if this run fails or is
    interrupted before its model is trained, so a failed run never costs the earlier model. A
    folder that a run killed outright left is named in a warning (its files are not ours to drop);
    an empty one (a run interrupted between making it and moving the first file) is removed."""
    import tempfile

    for left in sorted(out_dir.glob(EARLIER_PREFIX + "*")):
        with contextlib.suppress(OSError):  # empty (a run interrupted as it made it): nothing to name
            left.rmdir()
            continue
        log.warning("%s holds the outputs of an earlier run that a killed run set aside: move them back "
                    "into %s or delete the folder", left, out_dir)
    names = [name for name in OUTPUTS if os.path.lexists(out_dir / name)]
    for name in names:  # (set aside, it would be deleted whole with them; unlink refused it before)
        if (out_dir / name).is_dir() and not (out_dir / name).is_symlink():
            raise OutputError(f"{out_dir / name} is a folder, not an output of camface train: move it "
                              "out of OUT_DIR or give another OUT_DIR")
    if not names:
        return None
    try:
        aside = Path(tempfile.mkdtemp(prefix=EARLIER_PREFIX, dir=out_dir))
    except OSError as exc:
        raise OutputError(f"cannot make a folder in {out_dir} to set an earlier run's outputs aside in: "
                          f"{exc.strerror or exc}") from exc
    for name in names:
        try:
            os.replace(out_dir / name, aside / name)
        except BaseException as exc:  # Ctrl-C too: those moved so far go back
            _put_back(aside, out_dir, new=False)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot move {out_dir / name} of an earlier run aside: "
                                  f"{exc.strerror or exc}") from exc
            raise
    return aside


@contextlib.contextmanager
def _ctrl_c_held():
    """A Ctrl-C (SIGINT) that comes inside the block is held until it ends, then raised: a second
    Ctrl-C never stops the earlier run's outputs half put back. (Only the main thread gets signals.)"""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if before is None else before)
    if held:
        raise KeyboardInterrupt


def _put_back(aside: Path | None, out_dir: Path, new: bool = True) -> None:
    """This run's OUTPUTS removed (new=False: it wrote none) and the earlier run's
    (`_set_aside_earlier_outputs`) put back, a Ctrl-C meanwhile held until they are."""
    with _ctrl_c_held():
        _put_back_now(aside, out_dir, new)


def _put_back_now(aside: Path | None, out_dir: Path, new: bool) -> None:
    for name in OUTPUTS if new else ():
        with contextlib.suppress(OSError):
            (out_dir / name).unlink(missing_ok=True)
    if aside is None:
        return
    try:
        for moved in aside.iterdir():
            os.replace(moved, out_dir / moved.name)
        aside.rmdir()
    except OSError as exc:  # (the error that ended the run is the one raised)
        log.warning("could not put the earlier run's outputs back from %s: %s", aside, exc.strerror or exc)


def _drop(aside: Path | None) -> None:
    """The earlier run's outputs set aside, deleted: this run's model replaced them (a Ctrl-C
    meanwhile held until they are: a half-deleted folder would pass for a killed run's)."""
    if aside is None:
        return
    try:
        with _ctrl_c_held():
            shutil.rmtree(aside)
    except OSError as exc:
        log.warning("could not remove %s (the earlier run's outputs): %s", aside, exc.strerror or exc)


def _settings_for_report(config: TrainConfig) -> dict:
    keys = ("backbone", "input_size", "weights", "epochs", "fine_tune_epochs", "batch_size",
            "learning_rate", "fine_tune_learning_rate", "val_split", "test_split", "seed", "detect")
    out = {k: getattr(config, k) for k in keys}
    if config.detect:
        out |= {"detector": config.detector, "margin": config.margin,
                "min_confidence": config.min_confidence}
    return out


def _log_counts(counts: dict, unreadable: dict[str, str | None]) -> None:
    """Per class what became of its photos; a warning per unreadable photo, saying why (path -> why)."""
    for label, c in counts.items():
        log.info("%s: %d photo(s), %d used, %d no face, %d several faces, %d unreadable", label,
                 sum(c.values()), c[dataset.OK], c[dataset.NO_FACE], c[dataset.MANY_FACES],
                 c[dataset.UNREADABLE])
    for path, why in unreadable.items():
        log.warning("unreadable image skipped: %s: %s", path, why)


def _face_detector(config: TrainConfig):
    """The live loop's face detector for the crop options, not yet opened."""
    from camface.api import face_detector
    from camface.realtime.config import LiveConfig

    return face_detector(LiveConfig(detector=config.detector, min_confidence=config.min_confidence))


def crop_settings(config: TrainConfig) -> dataset.CropSettings:
    """The settings the crop cache is kept by: the crop options and, when detecting, the sha256
    of the detector's model file (another file under the same name finds other faces). Raises
    ModelError naming the model file when it cannot be read."""
    if not config.detect:
        return dataset.CropSettings(size=config.input_size, detect=False, detector="", margin=0.0,
                                    min_confidence=0.0)
    from camface.hashing import sha256_file

    model = _face_detector(config).model_path
    try:
        digest = sha256_file(model)
    except OSError as exc:
        raise ModelError(f"face detector model {model} cannot be read: {exc.strerror or exc}") from exc
    return dataset.CropSettings(size=config.input_size, detect=True, detector=config.detector,
                                margin=config.margin, min_confidence=config.min_confidence,
                                detector_sha256=digest)


def _open_cropper(config: TrainConfig):
    return dataset.LiveCropper(_face_detector(config), margin=config.margin, size=config.input_size)


def precise_bn_sample(train: np.ndarray, names: list[str], seed: int) -> np.ndarray:
    """int64 indices: the training crops (`train`, indices into `names`) that set BatchNorm
    statistics with --weights none, the first PRECISE_BN_IMAGES of them in the split's seeded
    order (`dataset.draw_order` of their names): a function of the seed and the names only, not
    of numpy's Generator streams (which may change between versions) nor of the listing order."""
    index = {names[i]: int(i) for i in train}
    drawn = dataset.draw_order(index, seed)[:PRECISE_BN_IMAGES]
    return np.array([index[name] for name in drawn], np.int64)


def _fit(config: TrainConfig, labels: list[str], images: np.ndarray, targets: np.ndarray,
         split: dataset.Split, model_path: Path, names: list[str]) -> list:
    """Train the model and save the best at `model_path`; names: each crop's (`dataset.split_names`)."""
    from camface.models import transfer

    preprocessing = backbone_preprocessing(config.backbone)
    classifier = transfer.build_model(config.backbone, config.input_size, len(labels),
                                      config.weights, config.seed)
    model = classifier.model
    callbacks: tuple = ()
    if config.weights == "none":
        layers = transfer.set_backbone_trainable(classifier, "all")
        sample = precise_bn_sample(split.train, names, config.seed)
        callbacks = (transfer.precise_batchnorm(transfer.normalise(images[sample], preprocessing)),)
        log.info("--weights none: training all %d backbone layers from scratch (BatchNorm "
                 "statistics re-estimated on %d training crops before each validation)", layers,
                 min(len(split.train), PRECISE_BN_IMAGES))
    train_ds = transfer.tf_dataset(images[split.train], targets[split.train], config.batch_size,
                                   preprocessing, augment=transfer.augmentation(config.seed),
                                   shuffle_seed=config.seed)
    val_ds = transfer.tf_dataset(images[split.val], targets[split.val], config.batch_size,
                                 preprocessing)
    weights = dataset.class_weights(targets[split.train], len(labels))
    first = "from scratch" if config.weights == "none" else "frozen backbone"
    stages = [transfer.fit_stage(model, first, train_ds, val_ds, config.epochs,
                                 config.learning_rate, model_path, weights, config.patience,
                                 callbacks=callbacks)]
    if config.fine_tune_epochs:
        model.load_weights(model_path)
        unfrozen = transfer.set_backbone_trainable(classifier, "last-block")
        log.info("fine-tuning: %d layers of the backbone's last block unfrozen", unfrozen)
        stages.append(transfer.fit_stage(
            model, "fine-tune last block", train_ds, val_ds, config.fine_tune_epochs,
            config.fine_tune_learning_rate, model_path, weights, config.patience,
            best_so_far=(stages[0].best_val_accuracy, stages[0].best_val_loss)))
    return stages


def backbone_preprocessing(backbone: str):
    """The exporter's Preprocessing for `backbone` (colour order and x * scale + offset)."""
    from camface.export.preprocess import Preprocessing

    return Preprocessing.resolve(3, builders.PRESETS[builders.BACKBONES[backbone]])


def export_graph(model_path: Path, onnx_path: Path, labels: list[str], backbone: str, test_bgr: np.ndarray):
    """model.keras -> model.onnx through the exporter, which verifies ONNX Runtime against
    TensorFlow (largest difference per output, logged) and raises ModelError when they differ;
    then its methods are ranked on the test crops (uint8 BGR, cut as live) as `camface export`
    ranks them on its calibration crops (camface.export.ranking). The graph is written and
    ranked beside `onnx_path`, renamed over it when ranked: a failure leaves no unranked graph."""
    from dataclasses import replace

    from camface.export import calibration, ranking
    from camface.export.exporter import ExportOptions, export
    from camface.outputs import written_beside

    preset = backbone_preprocessing(backbone).preset
    with written_beside(onnx_path, tag="unranked") as (staging,):
        result = export(model_path, staging, ExportOptions(labels=tuple(labels), preset=preset))
        for difference in result.differences:
            log.info("export self-check: %s", difference)
        crops = calibration.from_bgr(test_bgr, result.info.color_order) if len(test_bgr) else test_bgr
        result = ranking.record(result, None, crops=crops, settings={"source": "the test split"},
                                name=onnx_path)
    result = replace(result, path=Path(onnx_path))
    for line in ranking.summary_lines(result.info.ranking):
        log.info("method ranking: %s", line)
    return result


def export_int8(onnx_path: Path, int8_path: Path, train_bgr: np.ndarray, test_bgr: np.ndarray):
    """model.onnx -> model.int8.onnx (camface.export.int8), calibrated on training crops and
    checked on test crops (uint8 BGR, cut as live); raises ModelError when they disagree, with
    `camface train`'s advice, and writes nothing then. Written beside `int8_path`, renamed over
    it when whole: a failure (a full disk, Ctrl-C) leaves an earlier file as it was, no partial one."""
    import onnx

    from camface.export import calibration, convert
    from camface.export.int8 import summary_lines, to_int8
    from camface.outputs import written_beside

    model = onnx.load(str(onnx_path))
    color_order = {p.key: p.value for p in model.metadata_props}["color_order"]
    crops = calibration.CropSets("the training split", calibration.from_bgr(calibration.evenly(train_bgr), color_order),
                                 calibration.from_bgr(calibration.evenly(test_bgr, 64), color_order))
    result = to_int8(model, crops=crops, enforce=False)
    failures = result.agreement.failures(floor=result.floor)
    if failures:  # the advice of `camface export --int8` names flags that train has not
        raise ModelError(
            f"model.int8.onnx not written (model.onnx and its report are): the int8 graph calibrated "
            f"on {crops.source} no longer explains what model.onnx explains on {result.agreement.crops} "
            f"held-out crops of the test split: {'; '.join(failures)}; more, varied photos per "
            "class may help, or leave out --int8")
    with written_beside(int8_path) as (staging,):  # a failure midway leaves no half graph
        convert.save(result.model, staging)
    for line in summary_lines(result.report):
        log.info("int8: %s", line)
    return result


def run_graph(onnx_path: Path, crops_bgr: np.ndarray, method: str = "gradcam"
              ) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [N, classes] and `method` heatmaps [N, h, w] (predicted class) of the CAM
    graph on uint8 BGR crops [N, S, S, 3], batched by the contract's limit."""
    from camface.realtime.graph import MAX_BATCH, CamGraph

    graph = CamGraph(onnx_path, device="cpu", threads=0)
    crops = np.ascontiguousarray(graph.info.color_order.from_bgr(crops_bgr))
    probs, maps = [], []
    for start in range(0, len(crops), MAX_BATCH):
        chunk = crops[start:start + MAX_BATCH]
        p, h = graph.run(chunk, np.full(len(chunk), -1, np.int64), method)
        probs.append(p)
        maps.append(h)
    return np.concatenate(probs), np.concatenate(maps)
