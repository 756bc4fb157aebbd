"""camface train end to end: synthetic photos of the astronaut in three colour casts, one photo
with no face, one with two faces and one unreadable file -> a MobileNetV2-GAP trained from random
weights (--weights none trains the whole network) -> model.onnx and the report.

One training run (module fixture) serves every test here; it takes well under a minute.
"""

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Keras 3.15 saves variables with np.array(variable); numpy 2.4 warns once per variable per save.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

from camface import cli, graph_spec  # noqa: E402
from camface.models import dataset  # noqa: E402

# BGR gains per class: strong colour casts a random-feature backbone can tell apart.
CASTS = {"cool": (1.5, 1.0, 0.5), "neutral": (1.0, 1.0, 1.0), "warm": (0.5, 1.0, 1.5)}
PHOTOS_PER_CLASS = 12
SIZE = 96


def _cast(image_bgr: np.ndarray, gains) -> np.ndarray:
    return np.clip(image_bgr.astype(np.float32) * np.float32(gains), 0, 255).astype(np.uint8)


def _jitter(image_bgr: np.ndarray, rng: np.random.Generator, out_side: int = 256) -> np.ndarray:
    """A 'photo': the image scaled by 0.9-1.1 and shifted by up to 12 px, downsized."""
    scale = rng.uniform(0.9, 1.1)
    dx, dy = rng.uniform(-12, 12, 2)
    h, w = image_bgr.shape[:2]
    matrix = np.float32([[scale, 0, (1 - scale) * w / 2 + dx], [0, scale, (1 - scale) * h / 2 + dy]])
    moved = cv2.warpAffine(image_bgr, matrix, (w, h), borderMode=cv2.BORDER_REFLECT)
    return cv2.resize(moved, (out_side, out_side), interpolation=cv2.INTER_AREA)


def make_dataset(root: Path, astronaut_bgr: np.ndarray, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for label, gains in CASTS.items():
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(PHOTOS_PER_CLASS):
            cv2.imwrite(str(folder / f"{label}_{i}.jpg"), _jitter(_cast(astronaut_bgr, gains), rng))
    # no face: the astronaut's lower body
    cv2.imwrite(str(root / "neutral" / "body.png"), np.ascontiguousarray(astronaut_bgr[300:, :]))
    # two faces side by side
    head = astronaut_bgr[30:230, 125:325]
    cv2.imwrite(str(root / "warm" / "two.png"), _cast(np.hstack([head, head]), CASTS["warm"]))
    (root / "cool" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, astronaut_bgr):
    """(exit code, OUT_DIR, stderr) of one `camface train` run."""
    root = tmp_path_factory.mktemp("train")
    data = make_dataset(root / "data", astronaut_bgr)
    out = root / "out"
    argv = ["train", str(data), "-o", str(out), "--backbone", "mobilenetv2", "--weights", "none",
            "--input-size", str(SIZE), "--epochs", "8", "--batch-size", "8",
            "--fine-tune-epochs", "2", "--val-split", "0.2", "--test-split", "0.25",
            "--seed", "0"]
    rc = cli.main(argv)
    return rc, out, data


@pytest.fixture(scope="module")
def int8_memo():
    """{key: Int8Result}: the int8 tests quantise the same model.onnx on the same crops; each
    asks export_int8 for it, and the quantisation (minutes of the suite) runs once."""
    return {}


@pytest.fixture
def to_int8_once(int8_memo, monkeypatch):
    """camface.export.int8.to_int8, its result kept per (graph, crops, arguments): the same
    inputs give the result the first call computed, any other input is quantised afresh."""
    import hashlib

    from camface.export import int8

    real = int8.to_int8

    def once(model, *args, crops=None, **kwargs):
        digest = hashlib.sha256(model.SerializeToString())
        for part in (crops.source, crops.calibration, crops.held_out):
            digest.update(part.encode() if isinstance(part, str) else np.ascontiguousarray(part).tobytes())
        key = (digest.hexdigest(), args, tuple(sorted(kwargs.items())))
        if key not in int8_memo:
            int8_memo[key] = real(model, *args, crops=crops, **kwargs)
        return int8_memo[key]

    monkeypatch.setattr(int8, "to_int8", once)


@pytest.fixture(scope="module")
def converted(trained, tmp_path_factory):
    """(bytes, ExportResult) of model.keras exported once as train.export_graph exports it (what
    the staging tests below replay; the conversion and its self-check take a quarter of a minute).
    The export writes its graph and nothing beside it."""
    from camface.export.exporter import ExportOptions, export
    from camface.models import train

    _, out, _ = trained
    folder = tmp_path_factory.mktemp("converted")
    labels = tuple((out / "labels.txt").read_text().split())
    options = ExportOptions(labels=labels, preset=train.backbone_preprocessing("mobilenetv2").preset)
    result = export(out / "model.keras", folder / "model.onnx", options)
    assert [p.name for p in folder.iterdir()] == ["model.onnx"]
    return (folder / "model.onnx").read_bytes(), result, options


def test_run_succeeds_and_writes_every_output(trained):
    rc, out, _ = trained
    assert rc == 0
    for name in ("model.keras", "labels.txt", "model.onnx", "metrics.json", "confusion.png",
                 "cam_montage.png", "report.md", "crops/index.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*"))  # no file written beside one left behind
    for figure in ("confusion.png", "cam_montage.png"):
        image = cv2.imread(str(out / figure))
        assert image is not None and min(image.shape[:2]) > 100 and image.std() > 10


def test_bad_photos_are_skipped_and_counted(trained):
    _, out, data = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"] == {"no_face": 1, "many_faces": 1, "unreadable": 1}
    assert metrics["unreadable_files"] == [str(data / "cool" / "broken.jpg")]
    report = (out / "report.md").read_text()
    assert "| neutral | 13 | 12 | 1 | 0 | 0 |" in report
    assert "| warm | 13 | 12 | 0 | 1 | 0 |" in report
    assert "| cool | 13 | 12 | 0 | 0 | 1 |" in report
    assert "broken.jpg" in report


def test_beats_chance_on_the_test_split(trained):
    _, out, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == {"train": 21, "val": 6, "test": 9}  # 12 per class: 7 / 2 / 3
    assert metrics["test_images"] == 9 and metrics["chance"] == pytest.approx(1 / 3)
    assert metrics["accuracy"] >= 2 * metrics["chance"], metrics
    assert sum(m["support"] for m in metrics["per_class"].values()) == 9
    assert np.trace(metrics["confusion"]) == round(9 * metrics["accuracy"])
    assert set(metrics["per_class"]) == set(CASTS)


def test_graph_metadata_and_labels(trained):
    import onnx

    _, out, _ = trained
    assert (out / "labels.txt").read_text().split() == sorted(CASTS)
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    info = graph_spec.GraphInfo.from_metadata(props)
    assert info.labels == tuple(sorted(CASTS))
    assert info.input_size == (SIZE, SIZE) and info.color_order == "RGB"
    assert info.source_model == "model.keras" and "gradcam" in info.heatmaps
    # the methods are ranked on the test split's crops: here too few of them (9 < 16), and it says so
    assert info.ranking["skipped"].endswith("face crops in the test split, fewer than the 16 a ranking needs")


def test_keras_model_and_graph_agree_on_training_preprocessing(trained):
    """The normalisation used in training equals the one the graph bakes in: model.keras on
    transfer.normalise(crops) and model.onnx on the uint8 crops give the same probabilities."""
    import keras

    from camface.models import train, transfer

    _, out, _ = trained
    crops = dataset.load_crops(sorted((out / "crops" / "warm").glob("*.png"))[:4], SIZE)
    probs_onnx, heatmaps = train.run_graph(out / "model.onnx", crops)
    model = keras.models.load_model(out / "model.keras", compile=False)
    preprocessing = train.backbone_preprocessing("mobilenetv2")
    probs_keras = model(transfer.normalise(crops, preprocessing), training=False).numpy()
    np.testing.assert_allclose(probs_onnx, probs_keras, atol=1e-4)
    assert heatmaps.shape == (4, 3, 3) and heatmaps.max() > 0


def test_report_names_the_exact_command_and_both_stages(trained):
    _, out, data = trained
    report = (out / "report.md").read_text()
    assert "| from scratch |" in report and "| fine-tune last block |" in report
    assert f"camface train {data} -o {out} --backbone mobilenetv2 --input-size 96" in report
    assert "--weights none" in report and "--epochs 8" in report and "--seed 0" in report


def test_crop_cache_is_reused(trained):
    _, out, data = trained

    def must_not_open():
        raise AssertionError("all photos are cached")

    index = json.loads((out / "crops" / "index.json").read_text())
    settings = dataset.CropSettings(**index["settings"])
    photos = dataset.prepare_crops(data, dataset.scan_classes(data), out / "crops", settings,
                                   must_not_open)
    assert sum(p.status == dataset.OK for p in photos) == 36


def test_graph_runs_in_camface_live(trained, tmp_path, astronaut_bgr):
    pytest.importorskip("camface.realtime.cli")
    _, out, _ = trained
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 320))
    rng = np.random.default_rng(1)
    for _ in range(8):
        writer.write(_jitter(_cast(astronaut_bgr, CASTS["warm"]), rng, out_side=320))
    writer.release()
    record = tmp_path / "live.mp4"
    rc = cli.main(["live", "--source", str(clip), "--model", str(out / "model.onnx"), "--no-show",
                   "--record", str(record)])
    assert rc == 0
    capture = cv2.VideoCapture(str(record))
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    assert frames == 8


def test_crops_use_the_live_loops_defaults():
    """Training crops look like live crops: same detector, threshold and margin by default."""
    import argparse

    from camface.models import train
    from camface.realtime import cli as live_cli

    live, mine = argparse.ArgumentParser(), argparse.ArgumentParser()
    live_cli.configure(live)
    train.configure(mine)
    for dest in ("margin", "detector", "min_confidence"):
        assert mine.get_default(dest) == live.get_default(dest), dest


@pytest.mark.parametrize("given, meant", [
    ("vgg16", "vgg16"), ("vgg16-gap", "vgg16"), ("resnet50", "resnet50"), ("mobilenetv2", "mobilenetv2"),
])
def test_train_and_bench_name_each_backbone_alike(given, meant):
    """`camface bench --backbone` offered vgg16 and `camface train --backbone` vgg16-gap for the
    same architecture: both now offer the same names, and train's old spelling still works."""
    import argparse

    from camface.models import train
    from camface.realtime.bench import config as bench_config

    trainer, bench = argparse.ArgumentParser(), argparse.ArgumentParser()
    train.configure(trainer)
    bench_config.configure(bench)
    choices = [next(a.choices for a in p._actions if a.dest == "backbone") for p in (trainer, bench)]
    assert list(choices[0]) == list(choices[1])
    assert trainer.parse_args(["data", "-o", "out", "--backbone", given]).backbone == meant
    assert bench.parse_args(["--backbone", given]).backbone == meant


@pytest.mark.parametrize("given, meant", [("vgg16-gap", "vgg16"), ("vgg16", "vgg16"), ("mobilenetv2", "mobilenetv2"),
                                          ("vgg19", None)])
def test_a_train_config_built_in_code_takes_the_backbones_names_as_the_command_line(tmp_path, given, meant):
    """TrainConfig(backbone='vgg16-gap'), built in code, kept the earlier spelling the README says still
    works, and the run failed with a KeyError once the photos were cropped (builders.BACKBONES and
    transfer.LAST_BLOCK_PREFIXES know vgg16 only); it is read as vgg16, and an unknown name is a
    UsageError naming the option and the choices before anything runs."""
    from camface.errors import UsageError
    from camface.models import builders, train

    if meant is None:
        with pytest.raises(UsageError, match=r"--backbone must be one of resnet50, vgg16, mobilenetv2, got 'vgg19'"):
            train.TrainConfig(tmp_path / "data", tmp_path / "out", backbone=given)
        return
    config = train.TrainConfig(tmp_path / "data", tmp_path / "out", backbone=given)
    assert config.backbone == meant and config.backbone in builders.BACKBONES
    assert f"--backbone {meant} " in config.command()


@pytest.mark.parametrize("backbone, head", [
    ("mobilenetv2", ["gap", "predictions"]),
    ("vgg16", ["cam_conv", "gap", "predictions"]),
])
def test_backbone_frozen_head_trains_and_last_block_unfreezes(backbone, head):
    import keras

    from camface.models import transfer

    classifier = transfer.build_model(backbone, 32, 2, "none", seed=0)
    model = classifier.model
    trainable = [layer.name for layer in model.layers if layer.trainable and layer.weights]
    assert trainable == [n for n in head if model.get_layer(n).weights]
    assert all(layer not in classifier.backbone_layers for layer in map(model.get_layer, head))
    n = transfer.set_backbone_trainable(classifier, "last-block")
    unfrozen = {layer.name for layer in classifier.backbone_layers if layer.trainable}
    prefixes = transfer.LAST_BLOCK_PREFIXES[backbone]
    assert n == len(unfrozen) > 0 and all(name.startswith(prefixes) for name in unfrozen)
    assert not any(isinstance(model.get_layer(name), keras.layers.BatchNormalization)
                   for name in unfrozen)
    assert transfer.set_backbone_trainable(classifier, "all") == len(classifier.backbone_layers)
    assert transfer.set_backbone_trainable(classifier, "none") == 0


def test_a_checkpoint_is_saved_whole_or_the_earlier_one_kept(tmp_path, monkeypatch):
    """The best checkpoint was saved over model.keras in place: a full disk (or Ctrl-C) while a
    better epoch was saved, the fine-tuning stage's say, left half a zip where the first stage's
    best model was, and a traceback. It is saved beside and renamed; the error names model.keras."""
    import errno

    import keras

    from camface.errors import OutputError
    from camface.models import transfer

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="dense")])
    path = tmp_path / "model.keras"
    keeper = transfer.best_checkpoint(path, patience=3)
    keeper.set_model(model)
    keeper.on_epoch_end(0, {"val_accuracy": 0.5, "val_loss": 1.0})
    saved = keras.models.load_model(path, compile=False)
    np.testing.assert_array_equal(saved.get_layer("dense").get_weights()[0], model.get_layer("dense").get_weights()[0])
    first = path.read_bytes()

    def half_then_full(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"PK half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")  # write() names no file

    monkeypatch.setattr(type(model), "save", half_then_full)
    with pytest.raises(OutputError, match=f"cannot write {path}: No space left on device"):
        keeper.on_epoch_end(1, {"val_accuracy": 0.75, "val_loss": 0.5})
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]  # no partial left


def test_offline_imagenet_weights_give_a_clear_error(tmp_path, capsys, monkeypatch, astronaut_bgr):
    """With no network Keras' get_file raises Exception('URL fetch failure ...'): camface says
    what happened and what to do instead."""
    from keras.src.utils import file_utils

    def offline(fname, origin=None, *args, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure "
                        "in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    data = tmp_path / "data"
    for label, gains in CASTS.items():
        (data / label).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(data / label / f"{i}.png"), _cast(astronaut_bgr[i:64 + i, :64], gains))  # 3 photos, not 3 copies
    rc = cli.main(["train", str(data), "-o", str(tmp_path / "out"), "--no-detect",
                   "--backbone", "mobilenetv2", "--input-size", "64"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot download the ImageNet weights of mobilenetv2" in err
    assert "--weights none" in err and "--weights PATH" in err
    # the file that is missing, and only the command line's advice (not the Python API's)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 is not in ~/.keras/models" in err
    assert "weights=None" not in err


def test_missing_weights_file(tmp_path, capsys, astronaut_bgr):
    data = tmp_path / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(data / label / f"{i}.png"), astronaut_bgr[:64, :64])
    rc = cli.main(["train", str(data), "-o", str(tmp_path / "out"), "--no-detect",
                   "--backbone", "mobilenetv2", "--input-size", "64",
                   "--weights", str(tmp_path / "nope.h5")])
    assert rc == 2 and "nope.h5: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, said", [
    ("notes.txt", b"my notes", "not a Keras weights file (Keras reads .weights.h5, .h5, .hdf5, .keras and sharded "
                               ".weights.json files; use imagenet, none or a path to a weights file of the "
                               "mobilenetv2 backbone without its top)"),
    ("w.h5", b"not hdf5", "not a Keras weights file (a .h5 file is an HDF5 file; this one is not"),
    ("w.weights.h5", b"", "not a Keras weights file (a .weights.h5 file is an HDF5 file; this one is not"),
    ("w.keras", b"not a zip", "not a Keras weights file (a .keras file is a zip archive; this one is not"),
    ("w.weights.json", b"\xff\xfe", "not a Keras weights file (a .weights.json file is a JSON index of weight shards"),
])
def test_a_file_keras_cannot_read_as_weights_is_refused_before_any_photo_is_cropped(tmp_path, capsys, astronaut_bgr,
                                                                                     name, content, said):
    """`--weights notes.txt` (or a text file named .h5) was Keras' refusal once every photo had
    been cropped into OUT_DIR; now one line naming the flag and the file, before OUT_DIR is made."""
    data = tmp_path / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(data / label / f"{i}.png"), astronaut_bgr[:64, :64])
    (tmp_path / name).write_bytes(content)
    rc = cli.main(["train", str(data), "-o", str(tmp_path / "out"), "--no-detect", "--backbone", "mobilenetv2",
                   "--input-size", "64", "--weights", str(tmp_path / name)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"camface: error: --weights {tmp_path / name}: {said}"), err
    assert not (tmp_path / "out").exists()  # no photo was cropped


def _hdf5(path, **kwargs):
    import h5py

    with h5py.File(path, "w", **kwargs) as f:
        f.create_dataset("model_weights/dense/kernel:0", data=np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("name, make", [
    ("keras2.h5", _hdf5),  # Keras 2's model.save / save_weights: legacy HDF5
    ("w.hdf5", _hdf5),
    ("w.weights.h5", _hdf5),
    ("blocked.h5", lambda path: _hdf5(path, userblock_size=512)),  # HDF5 after a user block: h5py's check finds it
    ("w.keras", lambda path: __import__("zipfile").ZipFile(path, "w").writestr("model.weights.h5", b"")),
    ("w.weights.json", lambda path: path.write_text('{"metadata": {}, "weight_map": {}}')),  # shards' index
])
def test_the_weights_files_keras_reads_pass_the_early_check(tmp_path, name, make):
    """The signature check refuses files Keras cannot read; these it reads (its formats, a legacy
    .h5 from Keras 2 and a sharded save's .weights.json among them) pass it."""
    from camface.errors import ModelError
    from camface.models import transfer

    make(tmp_path / name)
    assert transfer.check_weights_file(str(tmp_path / name), "mobilenetv2") is None
    (tmp_path / "other.bin").write_bytes((tmp_path / name).read_bytes())  # the same bytes, a name Keras does not read
    with pytest.raises(ModelError, match=r"other.bin: not a Keras weights file \(Keras reads"):
        transfer.check_weights_file(str(tmp_path / "other.bin"), "mobilenetv2")


def test_int8_export_of_the_trained_graph(trained, to_int8_once, tmp_path):
    """`camface train --int8`'s step: model.onnx -> model.int8.onnx, calibrated on training
    crops, its agreement checked on held-out ones (as the flag does with the test split). This
    toy MobileNetV2 (8 epochs from scratch, 36 photos) sits near the bars: runs measured top-1
    agreement from 83% to 100%, so either outcome is allowed, each checked for what it must be."""
    import onnx

    from camface.errors import ModelError
    from camface.models import train

    _, out, _ = trained
    paths = sorted(p for p in (out / "crops").rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    crops = dataset.load_crops(paths, SIZE)
    target = tmp_path / "model.int8.onnx"
    try:
        result = train.export_int8(out / "model.onnx", target, crops[::2], crops[1::2])
    except ModelError as exc:
        assert "calibrated on the training split no longer explains" in str(exc)
        assert f"on {len(crops[1::2])} held-out crops" in str(exc) and not target.exists()
        return
    info = graph_spec.GraphInfo.from_metadata({p.key: p.value for p in onnx.load(str(target)).metadata_props})
    assert info.precision == "int8" and info.quantization["passed"]
    assert info.quantization["calibration"]["source"] == "the training split"
    assert result.agreement.crops == len(crops[1::2]) and result.agreement.top1_agreement >= 0.9


def test_int8_that_fails_its_check_writes_nothing_and_gives_trains_advice(trained, to_int8_once, tmp_path, monkeypatch):
    from camface.errors import ModelError
    from camface.export import agreement
    from camface.models import train

    monkeypatch.setattr(agreement.Agreement, "failures",
                        lambda self, thresholds=None, floor=None: ["top-1 agreement 50% < 90%"])
    _, out, _ = trained
    paths = sorted(p for p in (out / "crops").rglob("*.png"))
    crops = dataset.load_crops(paths, SIZE)
    target = tmp_path / "model.int8.onnx"
    with pytest.raises(ModelError) as caught:
        train.export_int8(out / "model.onnx", target, crops[::2], crops[1::2])
    message = str(caught.value)
    assert not target.exists() and "top-1 agreement 50% < 90%" in message
    assert "leave out --int8" in message and "--calibration" not in message  # no such flag in train


def test_an_int8_graph_that_fails_to_be_written_keeps_the_earlier_one_whole(trained, to_int8_once, tmp_path, monkeypatch):
    """model.int8.onnx was written in place: a full disk midway left half a graph where an
    earlier one was. It is now written beside it and renamed when whole (as model.onnx): the
    earlier file stays as it was, no partial file is left, and the error names model.int8.onnx."""
    import errno

    import onnx

    from camface.errors import OutputError
    from camface.export import agreement
    from camface.models import train

    real_save = onnx.save_model

    def half_then_full(model, target, *args, **kwargs):
        if Path(target).parent != tmp_path:  # the quantiser's own temporary models
            return real_save(model, target, *args, **kwargs)
        Path(target).write_bytes(b"half a graph")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(agreement.Agreement, "failures", lambda self, thresholds=None, floor=None: [])
    monkeypatch.setattr(onnx, "save_model", half_then_full)
    monkeypatch.setattr(onnx, "save", half_then_full)
    _, out, _ = trained
    crops = dataset.load_crops(sorted((out / "crops").rglob("*.png")), SIZE)
    target = tmp_path / "model.int8.onnx"
    target.write_bytes(b"an earlier run's int8 graph")
    with pytest.raises(OutputError, match=f"cannot write {target}: No space left on device"):
        train.export_int8(out / "model.onnx", target, crops[::2], crops[1::2])
    assert target.read_bytes() == b"an earlier run's int8 graph"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.parametrize("ranked", [False, True])
def test_model_onnx_is_replaced_only_once_ranked(ranked, trained, converted, tmp_path, monkeypatch):
    """train exported model.onnx, then ranked its methods: a failed ranking (or Ctrl-C) left an
    unranked graph in place. It is now written and ranked beside model.onnx, then renamed.
    The conversion itself is the `converted` fixture's, written again where export_graph asks."""
    from dataclasses import replace

    from camface.export import exporter, ranking
    from camface.models import train
    from camface.realtime.graph import CamGraph

    _, out, _ = trained
    graph_bytes, exported, options = converted
    staged = []

    def export_again(model_path, output, given):
        assert Path(model_path) == out / "model.keras" and given == options
        assert Path(output).parent == tmp_path and Path(output) != tmp_path / "model.onnx"  # beside it
        Path(output).write_bytes(graph_bytes)
        staged.append(Path(output))
        return replace(exported, path=Path(output))

    monkeypatch.setattr(exporter, "export", export_again)
    labels = (out / "labels.txt").read_text().split()
    crops = dataset.load_crops(sorted((out / "crops").rglob("*.png"))[:4], SIZE)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"an earlier run's graph")
    if not ranked:
        def fails(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(ranking, "rank_crops", fails)
        with pytest.raises(KeyboardInterrupt):
            train.export_graph(out / "model.keras", target, labels, "mobilenetv2", crops)
        assert target.read_bytes() == b"an earlier run's graph"
    else:
        result = train.export_graph(out / "model.keras", target, labels, "mobilenetv2", crops)
        assert result.path == target and CamGraph(target, "cpu").info.ranking == result.info.ranking
    assert len(staged) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # nothing left beside it


def test_int8_runs_after_the_report_of_model_onnx(tmp_path, monkeypatch):
    """A failing int8 check must not cost the float32 graph its metrics and report."""
    from camface.errors import ModelError
    from camface.models import train

    calls = []
    monkeypatch.setattr(train, "_fit", lambda *a, **k: calls.append("fit") or [])
    monkeypatch.setattr(train, "export_graph", lambda *a, **k: calls.append("export"))
    monkeypatch.setattr(train, "_evaluate_and_report",
                        lambda *a, **k: calls.append("report") or {"accuracy": 1.0, "test_images": 8,
                                                                    "chance": 0.5, "majority": 0.5,
                                                                    "majority_class": "a"})

    def int8_fails(*args, **kwargs):
        calls.append("int8")
        raise ModelError("int8 check failed")

    monkeypatch.setattr(train, "export_int8", int8_fails)
    data = tmp_path / "data"
    for label, value in (("a", 40), ("b", 200)):
        for i in range(14):
            (data / label).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(data / label / f"{i}.png"), np.full((12, 12, 3), value + i, np.uint8))
    config = train.TrainConfig(data, tmp_path / "out", backbone="mobilenetv2", input_size=32,
                               weights="none", detect=False, test_split=0.3, int8=True)
    with pytest.raises(ModelError, match="int8 check failed"):
        train.run(config)
    assert calls == ["fit", "export", "report", "int8"]


def test_int8_flag_is_part_of_the_command(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    train_module = __import__("camface.models.train", fromlist=["configure"])
    train_module.configure(parser)
    config = train_module.TrainConfig.from_args(parser.parse_args([str(tmp_path), "-o", str(tmp_path / "o"), "--int8"]))
    assert config.int8 and config.command().endswith(" --int8")


@pytest.mark.parametrize("debug", [False, True])
def test_train_logs_the_graph_loads_under_debug_only_as_export_does(debug, tmp_path, monkeypatch, caplog):
    """train ranks and scores the graph it writes, each load saying "CAM graph model.onnx on
    CPUExecutionProvider"; as export (and enroll), it says so under --debug only."""
    import logging

    from camface.models import train

    graph_log = logging.getLogger("camface.realtime.graph")
    monkeypatch.setattr(train, "run", lambda config: graph_log.info("CAM graph model.onnx on CPUExecutionProvider"))
    caplog.set_level(logging.DEBUG)
    assert cli.main(["train", str(tmp_path), "-o", str(tmp_path / "out"), *(["--debug"] if debug else [])]) == 0
    shown = [r.getMessage() for r in caplog.records if r.name == graph_log.name]
    assert shown == (["CAM graph model.onnx on CPUExecutionProvider"] if debug else [])
    assert graph_log.level == logging.NOTSET  # as it was


def _precise_bn_names(tmp_path, monkeypatch, seed: int, reverse: bool) -> list[str]:
    """The names of the crops `_fit` hands `precise_batchnorm` with --weights none (Keras stubbed
    out), numpy's random generators made to raise; reverse: the crops listed the other way round."""
    from types import SimpleNamespace

    from camface.models import train, transfer

    def no_numpy_random(*args, **kwargs):
        raise AssertionError("numpy's random streams may change between versions")

    names = [f"{label}/clip{i % 5}/{i}.png" for label in ("a", "b") for i in range(90)]
    order = list(range(len(names)))[::-1] if reverse else list(range(len(names)))
    listed = [names[i] for i in order]
    images = np.array(order, np.float32).reshape(-1, 1, 1, 1)  # each crop says which name it is
    targets = np.array([i // 90 for i in order], np.int64)
    train_part = np.array(sorted(k for k, name in enumerate(listed) if not name.endswith(("0.png", "7.png"))), np.int64)
    split = dataset.Split(train_part, np.array([], np.int64), np.array([], np.int64))
    seen = []
    monkeypatch.setattr(np.random, "default_rng", no_numpy_random)
    monkeypatch.setattr(np.random, "permutation", no_numpy_random)
    monkeypatch.setattr(transfer, "build_model", lambda *a, **k: SimpleNamespace(model=None))
    monkeypatch.setattr(transfer, "set_backbone_trainable", lambda *a, **k: 0)
    monkeypatch.setattr(transfer, "normalise", lambda images, preprocessing: images)
    monkeypatch.setattr(transfer, "precise_batchnorm", lambda images: seen.append(images))
    monkeypatch.setattr(transfer, "augmentation", lambda seed: None)
    monkeypatch.setattr(transfer, "tf_dataset", lambda *a, **k: None)
    monkeypatch.setattr(transfer, "fit_stage", lambda *a, **k: None)
    config = train.TrainConfig(tmp_path, tmp_path / "out", backbone="mobilenetv2", input_size=32,
                               weights="none", detect=False, seed=seed)
    train._fit(config, ["a", "b"], images, targets, split, tmp_path / "model.keras", listed)
    assert len(seen) == 1
    return [names[int(value)] for value in seen[0].ravel()]


@pytest.mark.parametrize("seed", [0, 3])
def test_precise_bn_crops_are_drawn_in_the_splits_seeded_order_not_numpys(tmp_path, monkeypatch, seed):
    """--weights none sets BatchNorm statistics on a sample of the training crops; it was drawn by
    numpy's Generator.permutation, whose stream may change between numpy versions. It is the
    first PRECISE_BN_IMAGES training crops by sha256(f"{seed}:{name}"), as the split draws: the
    same for a seed whatever numpy and the listing order, another for another seed."""
    import hashlib

    from camface.models.train import PRECISE_BN_IMAGES

    sample = _precise_bn_names(tmp_path, monkeypatch, seed, reverse=False)
    names = [f"{label}/clip{i % 5}/{i}.png" for label in ("a", "b") for i in range(90)]
    training = [name for name in names if not name.endswith(("0.png", "7.png"))]
    expected = sorted(training, key=lambda name: hashlib.sha256(f"{seed}:{name}".encode()).hexdigest())
    assert len(training) > PRECISE_BN_IMAGES
    assert sample == expected[:PRECISE_BN_IMAGES]
    assert _precise_bn_names(tmp_path, monkeypatch, seed, reverse=True) == sample
    assert _precise_bn_names(tmp_path, monkeypatch, seed + 1, reverse=False) != sample
