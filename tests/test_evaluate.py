"""`camface evaluate`: the faithfulness metrics on a toy ONNX classifier whose probability is the
crop's mean brightness (values by hand), and the command on a tiny clip (JSON fields present and
consistent, clear errors). TensorFlow is never needed."""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest
from realtime_helpers import graph_log_of, photo_folder, write_clip

from camface.cli import main as camface_main
from camface.evaluate import metrics
from camface.graph_spec import GraphInfo
from camface.models import EMOTION_ONNX

# 4x4 crop: 12 pixels at 255 (rows 0-2), 4 at 0 (row 3): mean brightness 0.75
CROP = np.zeros((4, 4, 1), np.uint8)
CROP[:3] = 255


def toy_graph(path):
    """A contract-following CAM graph on GRAY 4x4 crops: x = image / 255, probs = [mean(x),
    1 - mean(x)] (classes bright, dark), activations = x, gradcam = x, gradcampp = 1 - x: the
    first map points at the bright pixels, the second at the dark ones."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array([1, 2, 3], np.int64), "all_axes"),
             numpy_helper.from_array(np.array([3], np.int64), "last")]
    nodes = [helper.make_node("Cast", ["image"], ["x_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x_f", "scale"], ["activations"]),
             helper.make_node("ReduceMean", ["activations", "all_axes"], ["bright_1"], keepdims=0),
             helper.make_node("Unsqueeze", ["bright_1", "one_axis"], ["bright"]),
             helper.make_node("Sub", ["one", "bright"], ["dark"]),
             helper.make_node("Concat", ["bright", "dark"], ["probs"], axis=1),
             helper.make_node("Squeeze", ["activations", "last"], ["gradcam"]),
             helper.make_node("Sub", ["one", "gradcam"], ["gradcampp"]),
             helper.make_node("Identity", ["class_index"], ["unused_class"])]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "one_axis"))
    inputs = [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 4, 4, 1]),
              helper.make_tensor_value_info("class_index", TensorProto.INT64, ["N"])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in
               (("probs", ["N", 2]), ("activations", ["N", 4, 4, 1]), ("gradcam", ["N", 4, 4]),
                ("gradcampp", ["N", 4, 4]))]
    model = helper.make_model(helper.make_graph(nodes, "toy", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    info = GraphInfo(labels=("bright", "dark"), input_size=(4, 4), color_order="GRAY", target_layer="x",
                     heatmaps=("gradcam", "gradcampp"), feature_size=(4, 4))
    helper.set_model_props(model, info.to_metadata())
    onnx.save(model, str(path))
    return path


def brightness(removed_bright, removed_dark, value):
    """Mean of CROP / 255 with that many bright / dark pixels set to `value`."""
    return (255 * (12 - removed_bright) + value * (removed_bright + removed_dark)) / (16 * 255)


def test_metrics_on_a_toy_classifier_by_hand(tmp_path):
    from camface.evaluate.scores import Scorer
    from camface.realtime.graph import CamGraph

    graph = CamGraph(toy_graph(tmp_path / "toy.onnx"), "cpu")
    scorer = Scorer(graph, steps=4, baseline="mean", device="cpu", threads=1)
    mean = 191  # round(0.75 * 255): the mean baseline
    np.testing.assert_array_equal(metrics.mean_baseline(CROP), np.full_like(CROP, mean))
    predicted, full, (bright_first, dark_first) = scorer.score(CROP[None], ["gradcam", "gradcampp"])
    assert predicted.tolist() == [0] and full[0] == pytest.approx(0.75)
    # 4 steps of 4 pixels; gradcam deletes the 12 bright pixels first, then the 4 dark ones
    deletion = [brightness(min(n, 12), max(n - 12, 0), mean) for n in (0, 4, 8, 12, 16)]
    insertion = [brightness(12 - min(n, 12), 4 - max(n - 12, 0), mean) for n in (0, 4, 8, 12, 16)]
    np.testing.assert_allclose(bright_first.deletion_curve, deletion, atol=1e-6)
    np.testing.assert_allclose(bright_first.insertion_curve, insertion, atol=1e-6)
    trapezoid = lambda v: (sum(v) - (v[0] + v[-1]) / 2) / (len(v) - 1)  # noqa: E731
    # the curves agree to 1e-6 (float32 probabilities), so do their trapezoid means
    assert bright_first.deletion_auc == pytest.approx(trapezoid(deletion), abs=1e-6)
    assert bright_first.insertion_auc == pytest.approx(trapezoid(insertion), abs=1e-6)
    # gradcampp deletes the dark pixels first: the probability rises, then falls
    deletion = [brightness(max(n - 4, 0), min(n, 4), mean) for n in (0, 4, 8, 12, 16)]
    np.testing.assert_allclose(dark_first.deletion_curve, deletion, atol=1e-6)
    assert dark_first.deletion_auc > bright_first.deletion_auc  # the faithful map deletes faster
    assert dark_first.insertion_auc < bright_first.insertion_auc
    # Average Drop: gradcam's map is 1 on the bright pixels, 0 on the dark: crop x map = crop
    assert (bright_first.average_drop, bright_first.increase_in_confidence) == (0.0, 0.0)
    # gradcampp's map is 0 on the bright pixels: the masked crop is black, probability 0
    assert dark_first.average_drop == pytest.approx(100.0)
    assert dark_first.per_crop["masked_prob"] == [0.0]


@pytest.mark.parametrize("chunk", [1, 5, 16, 40])
def test_scoring_in_small_chunks_gives_the_same_scores(tmp_path, chunk):
    """The perturbed crops are made and classified at most `chunk` at a time (8 crops x 2 K - 1
    held at once needed GBs at 224 x 224 and --steps 500), with the scores of one big chunk."""
    from camface.evaluate.scores import Scorer
    from camface.realtime.graph import CamGraph

    graph = CamGraph(toy_graph(tmp_path / "toy.onnx"), "cpu")
    crops = np.random.default_rng(3).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    names = ["gradcam", "gradcampp"]
    whole = Scorer(graph, steps=16, baseline="blur", device="cpu", threads=1, chunk=10_000)
    small = Scorer(graph, steps=16, baseline="blur", device="cpu", threads=1, chunk=chunk)
    held = []
    classify = small.classify
    small.classify = lambda images: held.append(len(images)) or classify(images)
    expected, got = whole.score(crops, names), small.score(crops, names)
    assert max(held[1:]) <= chunk  # held[0]: the baselines, one per crop
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], atol=1e-6)
    for mine, theirs in zip(got[2], expected[2]):
        assert mine.method == theirs.method
        for key in ("deletion_curve", "insertion_curve"):
            np.testing.assert_allclose(getattr(mine, key), getattr(theirs, key), atol=1e-6)
        for key in ("deletion_auc", "insertion_auc", "masked_prob"):
            np.testing.assert_allclose(mine.per_crop[key], theirs.per_crop[key], atol=1e-6)
        for key in ("deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence"):
            assert getattr(mine, key) == pytest.approx(getattr(theirs, key), abs=1e-4)


def tied_graph(path):
    """A CAM graph on GRAY 4x4 crops whose sigmoid saturates: logits [20, 30], probs [1.0, 1.0]
    (tied), class -1 -> the argmax of the logits (1); gradcam = x for class 0, 1 - x for class 1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array([20.0, 30.0], np.float32), "bias"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([1, 2, 3], np.int64), "all_axes"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "map_axes"),
             numpy_helper.from_array(np.array([3], np.int64), "last")]
    nodes = [helper.make_node("Cast", ["image"], ["x_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x_f", "scale"], ["activations"]),
             helper.make_node("ReduceMean", ["activations", "all_axes"], ["mean"], keepdims=1),  # [N, 1, 1, 1]
             helper.make_node("Squeeze", ["mean", "map_axes"], ["mean_2d"]),  # [N, 1]
             helper.make_node("Sub", ["mean_2d", "mean_2d"], ["nothing"]),
             helper.make_node("Add", ["nothing", "bias"], ["logits"]),  # [N, 2]: 20, 30
             helper.make_node("Sigmoid", ["logits"], ["probs"]),
             helper.make_node("ArgMax", ["logits"], ["argmax"], axis=1, keepdims=0),
             helper.make_node("Less", ["class_index", "zero"], ["asked_predicted"]),
             helper.make_node("Where", ["asked_predicted", "argmax", "class_index"], ["chosen"]),
             helper.make_node("Equal", ["chosen", "zero"], ["is_first"]),
             helper.make_node("Cast", ["is_first"], ["first_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["first_f", "map_axes"], ["first"]),  # [N, 1, 1]
             helper.make_node("Squeeze", ["activations", "last"], ["x"]),
             helper.make_node("Sub", ["one", "x"], ["dark"]),
             helper.make_node("Sub", ["x", "dark"], ["bright_minus_dark"]),
             helper.make_node("Mul", ["first", "bright_minus_dark"], ["picked"]),
             helper.make_node("Add", ["dark", "picked"], ["gradcam"])]
    inputs = [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 4, 4, 1]),
              helper.make_tensor_value_info("class_index", TensorProto.INT64, ["N"])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in
               (("probs", ["N", 2]), ("activations", ["N", 4, 4, 1]), ("gradcam", ["N", 4, 4]))]
    model = helper.make_model(helper.make_graph(nodes, "tied", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    info = GraphInfo(labels=("first", "second"), input_size=(4, 4), color_order="GRAY", target_layer="x",
                     heatmaps=("gradcam",), feature_size=(4, 4))
    helper.set_model_props(model, info.to_metadata())
    onnx.save(model, str(path))
    return path


def test_tied_top_probabilities_are_scored_on_the_map_of_the_class_named_predicted(tmp_path):
    """A saturated sigmoid ties its top probabilities (1.0, 1.0): the predicted class scored is
    the first of them (as live names it), but the maps were the graph's for class -1, the argmax
    of its logits (the other class): the curves then scored one class's map on another class's
    probability. The maps are now those of the class scored, as live explains it."""
    from camface.evaluate.scores import Scorer
    from camface.realtime.graph import CamGraph

    scorer = Scorer(CamGraph(tied_graph(tmp_path / "tied.onnx"), "cpu"), steps=4, baseline="mean",
                    device="cpu", threads=1)
    crops = np.stack([CROP, 255 - CROP])
    probs, maps = scorer.heatmaps(crops, ["gradcam"])
    np.testing.assert_array_equal(probs, np.ones((2, 2), np.float32))
    np.testing.assert_allclose(maps["gradcam"], crops[..., 0] / 255, atol=1e-6)  # class 0's map: x
    predicted, full, (scores,) = scorer.score(crops, ["gradcam"])
    assert predicted.tolist() == [0, 0] and full.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("full, masked, increase", [
    ([0.75, 0.5], [0.75 * (1 + 2 ** -23), 0.6], 50.0),  # the crop itself, one ulp apart: no increase
    ([0.75, 0.5], [0.75 * (1 + 2 ** -20), 0.5 * (1 - 2 ** -22)], 0.0),
    ([0.75, 0.5], [0.76, 0.6], 100.0),
    ([-0.5, 0.0], [-0.49, 1e-3], 100.0),  # cosine similarities (gallery graphs)
])
def test_increase_in_confidence_does_not_count_float_rounding(full, masked, increase):
    """Y (the crop) and O (the masked crop) come from two graph calls whose kernels may round
    differently: a masked crop equal to the crop (a map of ones) counted as an increase in
    confidence on a CPU that rounded O one ulp up."""
    assert metrics.increase_in_confidence(full, masked) == pytest.approx(increase)


@pytest.mark.parametrize("saliency, expected", [
    ([[3.0, 1.0], [2.0, 0.0]], [[0, 2], [1, 3]]),
    ([[1.0, 1.0], [5.0, 1.0]], None),  # ties: 5 first, then the three in a fixed random order
])
def test_pixel_ranks(saliency, expected):
    ranks = metrics.pixel_ranks(np.array(saliency))
    assert sorted(ranks.ravel().tolist()) == [0, 1, 2, 3]
    if expected is not None:
        np.testing.assert_array_equal(ranks, expected)
    else:
        assert ranks[1, 0] == 0
        np.testing.assert_array_equal(ranks, metrics.pixel_ranks(np.array(saliency)))  # fixed


def test_undefined_metrics_are_written_as_strict_json_null():
    from camface.evaluate.report import strict_json

    report = {"methods": {"gradcam": {"average_drop_pct": metrics.average_drop([-0.25], [-0.5]),
                                      "curve": [0.5, float("inf"), 1.0]}}, "frames": 3}
    text = json.dumps(strict_json(report), allow_nan=False)
    assert json.loads(text) == {"methods": {"gradcam": {"average_drop_pct": None, "curve": [0.5, None, 1.0]}},
                                "frames": 3}
    with pytest.raises(ValueError):
        json.dumps(report, allow_nan=False)


def test_series_average_drop_and_increase_by_hand():
    crop = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10
    base = np.full_like(crop, 7)
    ranks = np.arange(16).reshape(4, 4)  # row-major order
    deleted = metrics.perturbation_series(crop, base, ranks, 4, insert=False)
    assert deleted.shape == (3, 4, 4, 1)
    for step, image in enumerate(deleted, start=1):  # 4 more pixels (one row) per step
        np.testing.assert_array_equal(image[:step], base[:step])
        np.testing.assert_array_equal(image[step:], crop[step:])
    inserted = metrics.perturbation_series(crop, base, ranks, 4, insert=True)
    np.testing.assert_array_equal(inserted[0][:1], crop[:1])
    np.testing.assert_array_equal(inserted[0][1:], base[1:])
    assert metrics.auc([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert metrics.average_drop([0.8, 0.5], [0.4, 0.6]) == pytest.approx(25.0)  # (0.4/0.8 + 0) / 2
    # cosine similarities (gallery graphs): only crops with a positive score have a relative drop
    assert metrics.average_drop([0.8, -0.25, 0.0], [0.4, -0.5, -0.1]) == pytest.approx(50.0)  # 0.4/0.8
    assert np.isnan(metrics.average_drop([-0.25], [-0.5]))
    assert metrics.increase_in_confidence([0.8, 0.5], [0.4, 0.6]) == pytest.approx(50.0)
    half = np.full((4, 4), 0.5, np.float32)
    np.testing.assert_array_equal(metrics.masked_crop(crop, half), np.round(crop * 0.5).astype(np.uint8))
    blurred = metrics.blur_baseline(np.pad(np.full((8, 8, 1), 255, np.uint8), ((4, 4), (4, 4), (0, 0))))
    assert blurred.shape == (16, 16, 1) and 0 < blurred[0, 0, 0] < blurred[8, 8, 0] < 255


@pytest.fixture(scope="module")
def faces_clip(tmp_path_factory, astronaut_bgr):
    """4 frames of 640x480: the astronaut in frames 0, 1 and 3, plain grey in frame 2."""
    face = np.full((480, 640, 3), 128, np.uint8)
    face[48:432, 128:512] = cv2.resize(astronaut_bgr, (384, 384), interpolation=cv2.INTER_AREA)
    blank = np.full((480, 640, 3), 128, np.uint8)
    folder = tmp_path_factory.mktemp("evaluate")
    return {"faces": write_clip(folder / "faces.mp4", [face, face, blank, face]),
            "blank": write_clip(folder / "blank.mp4", [blank] * 3)}


def test_evaluate_cli_writes_consistent_json(tmp_path, faces_clip, capsys):
    out, figure = tmp_path / "scores.json", tmp_path / "curves.png"
    assert camface_main(["evaluate", "--source", str(faces_clip["faces"]), "--every", "1", "--steps", "4",
                         "--json", str(out), "--plot", str(figure)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert figure.stat().st_size > 10_000
    settings = report["settings"]
    assert settings["frames_read"] == 4 and settings["crops"] == 3 and settings["steps"] == 4
    assert settings["baseline"] == "blur" and settings["target_layer"] == "add_3"
    assert settings["scored"] == "probability of the explained class"  # the plot's y-axis
    assert report["crops"]["predicted_label"] == ["happy"] * 3
    probability = np.array(report["crops"]["probability"])
    names = list(report["methods"])
    assert names[-1] == "random" and len(names) >= 9 and "gradcam" in names
    for name, m in report["methods"].items():
        assert name in table
        for key in ("deletion_auc", "insertion_auc"):
            assert m[key] == pytest.approx(np.mean(m["per_crop"][key]), abs=1e-5)
            assert 0 <= m[key] <= 1
        assert len(m["deletion_curve"]) == len(m["insertion_curve"]) == 5
        assert m["deletion_curve"][0] == pytest.approx(probability.mean(), abs=1e-5)  # the crop itself
        assert m["insertion_curve"][-1] == pytest.approx(probability.mean(), abs=1e-5)
        assert m["deletion_curve"][-1] == pytest.approx(m["insertion_curve"][0])  # the blurred crop
        masked = np.array(m["per_crop"]["masked_prob"])
        assert m["average_drop_pct"] == pytest.approx(100 * np.mean(np.maximum(0, probability - masked) / probability),
                                                      abs=1e-3)
        assert m["crops_per_second"] > 0
    for metric, ranks in report["ranks"].items():
        assert sorted(ranks.values()) == list(range(1, len(names) + 1)), metric
    assert report["ranking"] == sorted(names[:-1], key=lambda n: report["methods"][n]["deletion_auc"])
    random = report["methods"]["random"]
    for name, beats in report["beats_random"].items():
        assert beats["deletion"] == (report["methods"][name]["deletion_auc"] < random["deletion_auc"])


def test_evaluate_reads_snapshots(tmp_path, faces_clip, capsys):
    """Crops saved by `camface live --snapshot-every` score as the same crops from the clip."""
    snapshots = tmp_path / "snaps"
    # --detect-every 1: the clip's face pops back in at frame 3, which carried boxes would box
    # only at the next key frame
    assert camface_main(["live", "--source", str(faces_clip["faces"]), "--no-show", "--snapshot-every", "1",
                         "--detect-every", "1", "--snapshot-dir", str(snapshots)]) == 0
    out = tmp_path / "snap.json"
    assert camface_main(["evaluate", str(snapshots), "--methods", "gradcam,layercam", "--steps", "4",
                         "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["crops"] == 3 and list(report["methods"]) == ["gradcam", "layercam", "random"]
    # no frames read, none skipped (it said every 5, --every's default for a clip)
    assert report["settings"]["frames_read"] is None and report["settings"]["every"] is None

    # outputs that would destroy an input, or fail after the scoring, are refused before it
    snapshot = next(f for f in sorted(snapshots.iterdir()) if json.loads((f / "snapshot.json").read_text())["faces"])
    crop = snapshot / json.loads((snapshot / "snapshot.json").read_text())["faces"][0]["crop"]
    graph = tmp_path / "graph.onnx"
    graph.write_bytes(EMOTION_ONNX.read_bytes())
    before = {p: p.read_bytes() for p in (graph, *snapshot.iterdir())}
    for flags, message in [
        (["--model", str(graph), "--json", str(graph)], f"--json {graph} is an input"),
        (["--json", str(snapshot / "snapshot.json")], f"is a file of the input folder {snapshots}"),
        (["--plot", str(crop)], "is a file of the input folder"),
        (["--json", str(tmp_path / "same.png"), "--plot", str(tmp_path / "same.png")], "name the same file"),
        (["--plot", str(tmp_path / "curves.xyz")], f"--plot {tmp_path / 'curves.xyz'}: a figure is one of"),
    ]:
        assert camface_main(["evaluate", str(snapshots), "--methods", "gradcam", "--steps", "2", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
    assert all(p.read_bytes() == data for p, data in before.items())

    # a crop of the wrong size, or a face without a crop, names the file
    cv2.imwrite(str(crop), np.zeros((10, 10), np.uint8))
    assert camface_main(["evaluate", str(snapshot), "--methods", "gradcam", "--steps", "2"]) == 2
    assert f"{crop.name} is 10x10, not the 64x64 crop its snapshot.json says" in capsys.readouterr().err
    meta = json.loads((snapshot / "snapshot.json").read_text())
    meta["faces"][0].pop("crop")
    (snapshot / "snapshot.json").write_text(json.dumps(meta))
    assert camface_main(["evaluate", str(snapshot), "--methods", "gradcam", "--steps", "2"]) == 2
    assert "face 0 names no crop file" in capsys.readouterr().err


@pytest.mark.parametrize("bundled, flags", [("EMOTION_ONNX", []), ("EMOTION_KERAS", ["--sanity"])])
def test_json_over_the_bundled_model_it_reads_is_refused(tmp_path, faces_clip, capsys, monkeypatch, bundled, flags):
    """Without --model evaluate reads the bundled graph (and with --sanity the bundled Keras
    model): `--json` naming it was checked against --model, None, and the report replaced it."""
    import shutil

    import camface.models

    given = tmp_path / getattr(camface.models, bundled).name  # a copy stands for the bundled file
    shutil.copy(getattr(camface.models, bundled), given)
    monkeypatch.setattr(camface.models, bundled, given)
    before = given.read_bytes()
    assert camface_main(["evaluate", "--source", str(faces_clip["faces"]), "--methods", "gradcam", "--steps", "2",
                         *flags, "--json", str(given)]) == 2
    err = capsys.readouterr().err
    assert f"--json {given} is an input" in err and "Traceback" not in err, err
    assert given.read_bytes() == before


def test_json_over_the_keras_model_beside_the_graph_is_refused_with_sanity(tmp_path, faces_clip, capsys):
    """--sanity reads the graph's source model beside it (Guided Backprop): `--json` naming it."""
    import shutil

    from camface.models import EMOTION_KERAS, EMOTION_ONNX

    graph, keras = tmp_path / "graph.onnx", tmp_path / EMOTION_KERAS.name
    shutil.copy(EMOTION_ONNX, graph)
    shutil.copy(EMOTION_KERAS, keras)
    before = keras.read_bytes()
    assert camface_main(["evaluate", "--source", str(faces_clip["faces"]), "--model", str(graph), "--methods",
                         "gradcam", "--steps", "2", "--sanity", "--json", str(keras)]) == 2
    assert f"--json {keras} is an input" in capsys.readouterr().err
    assert keras.read_bytes() == before


@pytest.mark.parametrize("given", ["one", "parent"])
def test_a_snapshot_folder_given_as_source_is_refused_naming_snapshot_dir(tmp_path, astronaut_bgr, capsys, given):
    """`--source SNAP` read a snapshot folder as a folder of images: its frame, its 64x64 crops and
    a guided figure were each detected and scored as photos. Refused, naming the way to score the
    snapshot's crops."""
    folder = tmp_path / "snaps" / "frame_000000"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "frame.png"), astronaut_bgr)
    cv2.imwrite(str(folder / "face_00.png"), cv2.resize(astronaut_bgr, (64, 64))[:, :, 0])
    (folder / "snapshot.json").write_text(json.dumps({"color_order": "GRAY", "input_size": [64, 64],
                                                      "faces": [{"crop": "face_00.png"}]}))
    source = folder if given == "one" else folder.parent
    assert camface_main(["evaluate", "--source", str(source), "--methods", "gradcam", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--source {source} holds camface snapshots: give it as SNAPSHOT_DIR (camface evaluate {source})" in err


@pytest.mark.parametrize("recorded, flags, scored_by, message", [
    ("other", [], "other", None),
    ("bundled", [], "bundled", None),
    ("other", ["--model", "bundled"], "bundled", None),  # an explicit --model wins
    ("gone", [], None, "was taken with the CAM graph {gone}, which is gone; pass the graph to score its crops "
                       "with --model"),
    ("changed", [], "other", None),  # used, with a warning (as camface guided reads it)
    ("bundled, changed", [], "bundled", None),  # an earlier export of the bundled graph: the bundled graph
    ("two", [], None, "the snapshots were taken with 2 CAM graphs"),
])
def test_snapshots_are_scored_by_the_graph_they_were_taken_with(tmp_path, astronaut_bgr, capsys, recorded, flags,
                                                                 scored_by, message):
    """`camface evaluate SNAPSHOT_DIR` scored the crops with the bundled graph whatever graph the
    snapshots were taken with (a gallery's or another 64x64 grey graph's crops pass its size
    check): another model's faithfulness, reported without a word. Without --model it now scores
    them with the graph their snapshot.json records (by path and sha256), and says so (a graph
    changed since with a warning); a graph that is gone, or snapshots of two graphs, are refused
    naming them."""
    import onnx

    from camface.hashing import sha256_file

    other = tmp_path / "other.onnx"  # the bundled graph with one more metadata entry: other bytes
    model = onnx.load(str(EMOTION_ONNX))
    model.metadata_props.add(key="note", value="another graph")
    onnx.save(model, str(other))
    graphs = {"other": (other, sha256_file(other)), "bundled": (EMOTION_ONNX, sha256_file(EMOTION_ONNX)),
              "gone": (tmp_path / "gone.onnx", sha256_file(other)), "changed": (other, "0" * 64),
              "bundled, changed": (EMOTION_ONNX, "0" * 64)}
    crop = cv2.cvtColor(cv2.resize(astronaut_bgr[30:280, 120:370], (64, 64)), cv2.COLOR_BGR2GRAY)
    snapshots = tmp_path / "snaps"
    for number, key in enumerate(["other", "bundled"] if recorded == "two" else [recorded]):
        folder = snapshots / f"frame_{number:06d}"
        folder.mkdir(parents=True)
        cv2.imwrite(str(folder / "face_00.png"), crop)
        path, digest = graphs[key]
        (folder / "snapshot.json").write_text(json.dumps({
            "color_order": "GRAY", "input_size": [64, 64], "model": {"path": str(path), "sha256": digest},
            "faces": [{"crop": "face_00.png"}]}))
    out = tmp_path / "report.json"
    flags = [str(EMOTION_ONNX) if flag == "bundled" else flag for flag in flags]
    code = camface_main(["evaluate", str(snapshots), "--methods", "gradcam", "--steps", "2", "--json", str(out),
                         *flags])
    err = capsys.readouterr().err
    if message is not None:
        assert code == 2 and message.format(gone=graphs["gone"][0]) in err and "Traceback" not in err, err
        assert not out.exists()
        return
    assert code == 0, err
    assert json.loads(out.read_text())["settings"]["model"] == str(graphs[scored_by][0])
    said = f"scoring with {other}, the CAM graph the snapshots were taken with"
    assert (said in err) == (scored_by == "other" and not flags), err
    assert ("changed since snapshot" in err) == (recorded == "changed"), err


@pytest.mark.parametrize("saved, message, edit", [
    ((8, 4), "face_00.png is 4x8, not the 8x4 crop its snapshot.json says", {}),  # the pixels of 4x8, turned
    ((4, 8), None, {}),
    # a hand-edited snapshot.json: an IndexError traceback, or only "'color_order'"
    ((4, 8), r"snapshot.json: input_size is \[4\], not \[height, width\]", {"input_size": [4]}),
    ((4, 8), r"snapshot.json: input_size is null, not \[height, width\]", {"input_size": None}),
    ((4, 8), r"snapshot.json: color_order is null, not GRAY, RGB or BGR", {"color_order": None}),
])
def test_a_snapshot_crop_is_checked_against_its_snapshot_json(tmp_path, saved, message, edit):
    """A non-square graph input (4 high, 8 wide): a crop saved 8 high and 4 wide holds as many
    pixels and was reshaped to 4x8, its rows scrambled, and scored; it is refused naming it. So
    is a snapshot.json whose input_size is not [height, width] or whose color_order is none."""
    from types import SimpleNamespace

    from camface.errors import SourceError
    from camface.evaluate.crops import from_snapshots

    crop = np.arange(32, dtype=np.uint8).reshape(saved) * 7
    cv2.imwrite(str(tmp_path / "face_00.png"), crop)
    (tmp_path / "snapshot.json").write_text(json.dumps(
        {"color_order": "GRAY", "input_size": [4, 8], "faces": [{"crop": "face_00.png"}], **edit}))
    info = SimpleNamespace(color_order="GRAY", input_size=(4, 8), channels=1)
    if message is None:
        np.testing.assert_array_equal(from_snapshots([tmp_path], info), crop[None, ..., None])
    else:
        with pytest.raises(SourceError, match=message):
            from_snapshots([tmp_path], info)


@pytest.mark.parametrize("argv, message", [
    (lambda clips, tmp: ["--source", str(clips["blank"])], "no faces found in 3 frames"),
    (lambda clips, tmp: ["--source", str(clips["faces"]), "--methods", "gradcam,nope"],
     "unknown method nope; choose from all, gradcam, gradcampp, cam, .*random"),
    (lambda clips, tmp: ["--source", str(clips["faces"]), "--model", str(tmp / "forward.onnx")],
     "forward.onnx is not a camface CAM graph: missing a heatmap output"),
    (lambda clips, tmp: ["--source", str(clips["faces"]), "--model", str(tmp / "old.onnx"), "--methods", "eigencam"],
     "has no eigencam heatmap; it offers gradcam, gradcampp, cam"),
    (lambda clips, tmp: [str(tmp), "--source", str(clips["faces"])], "SNAPSHOT_DIRs or --source, not both"),
    (lambda clips, tmp: [str(tmp)], "is not a camface snapshot folder"),
    # options that find and cut faces in a --source mean nothing to crops cut already: refused, not ignored
    (lambda clips, tmp: [str(tmp), "--max-faces", "1"], "^camface: error: --max-faces: for faces found in a --source"),
    (lambda clips, tmp: [str(tmp), "--margin", "0.3", "--frames", "10", "--every", "1"],
     "--margin, --frames, --every: for faces found in a --source; SNAPSHOT_DIRs hold the crops cut"),
    (lambda clips, tmp: ["--source", str(clips["faces"]), "--seed", "3", "--frames", "1", "--methods", "gradcam",
                         "--steps", "2"], "--seed is for the --sanity checks: add --sanity"),
    (lambda clips, tmp: ["--steps", "1"], "--steps must be at least 2"),
    (lambda clips, tmp: ["--steps", "100000"], "--steps must be at most 4096, the pixels of emotion.onnx's 64x64"),
])
def test_bad_inputs_are_clear_errors(tmp_path, faces_clip, capsys, argv, message):
    import re

    from camface.realtime.bench.heads import forward_only
    from realtime_helpers import tiny_cam_graph

    (tmp_path / "forward.onnx").write_bytes(forward_only(EMOTION_ONNX.read_bytes()))
    tiny_cam_graph(tmp_path / "old.onnx")
    assert camface_main(["evaluate", *argv(faces_clip, tmp_path)]) == 2
    assert re.search(message, capsys.readouterr().err), message


@pytest.mark.parametrize("spec, available, message", [
    # the graph has heatmaps: the baseline alone was refused as "the graph has no heatmap to evaluate"
    ("random", ("gradcam", "cam", "random"), "--methods random: the random baseline alone is nothing to compare; "
                                              r"it is added to the methods named \(the graph offers gradcam, cam, random"),
    ("all", ("random",), "the graph has no heatmap to evaluate"),
    ("random", ("random",), "the graph has no heatmap to evaluate"),
])
def test_methods_that_leave_nothing_to_score_say_why(spec, available, message):
    from camface.errors import CamfaceError
    from camface.evaluate.cli import resolve_methods

    with pytest.raises(CamfaceError, match=message):
        resolve_methods(spec, available)
    assert resolve_methods("cam,random", available if "cam" in available else ("cam", "random")) == ("cam", "random")


def test_sanity_on_a_one_class_graph_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A one-output classifier (a binary sigmoid head) has no other class for the random-logit
    test: said at once, naming the graph, not after the whole randomisation cascade. (Every
    front end now refuses such a graph when it loads it: `graph_spec.one_class`.)"""
    import onnx
    from onnx import TensorProto, helper

    from camface.evaluate.scores import Scorer

    path = toy_graph(tmp_path / "one.onnx")
    model = onnx.load(str(path))
    concat = next(node for node in model.graph.node if node.op_type == "Concat")
    concat.CopyFrom(helper.make_node("Identity", ["bright"], ["probs"]))
    probs = next(value for value in model.graph.output if value.name == "probs")
    probs.CopyFrom(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 1]))
    info = GraphInfo(labels=("bright",), input_size=(4, 4), color_order="GRAY", target_layer="x",
                     heatmaps=("gradcam", "gradcampp"), feature_size=(4, 4))
    helper.set_model_props(model, info.to_metadata())
    onnx.save(model, str(path))
    monkeypatch.setattr(Scorer, "score", lambda *args, **kwargs: pytest.fail("scored before refusing"))
    assert camface_main(["evaluate", "--model", str(path), "--sanity", "--frames", "5"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: its output has 1 class" in err and "Traceback" not in err


def _half_weights(model):
    from onnx import numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float16), "half"))


def _quantized(model):
    from onnx import helper, numpy_helper

    model.graph.initializer.extend([numpy_helper.from_array(np.ones(2, np.int8), "q"),
                                    numpy_helper.from_array(np.array(0.1, np.float32), "q_scale")])
    model.graph.node.append(helper.make_node("DequantizeLinear", ["q", "q_scale"], ["dequantized"]))


@pytest.mark.parametrize("change, message", [
    (None, "the CAM graph's forward pass has no weights held as initializers"),  # the toy graph: x / 255
    (_half_weights, "this is a float16 CAM graph"),
    (_quantized, "this is an int8 CAM graph"),
])
def test_a_graph_the_sanity_checks_cannot_randomise_is_named(tmp_path, capsys, monkeypatch, change, message):
    """evaluate/randomize.py's refusals said what was wrong, not of which graph: now they name it."""
    import onnx

    from camface.evaluate.scores import Scorer

    path = toy_graph(tmp_path / "toy.onnx")
    if change is not None:
        model = onnx.load(str(path))
        change(model)
        onnx.save(model, str(path))
    monkeypatch.setattr(Scorer, "score", lambda *args, **kwargs: pytest.fail("scored before refusing"))
    assert camface_main(["evaluate", "--model", str(path), "--sanity", "--frames", "1"]) == 2
    err = capsys.readouterr().err
    assert f"camface: error: --sanity on {path}: {message}" in err and "Traceback" not in err


def test_a_folder_of_photos_is_scored_photo_by_photo(tmp_path, astronaut_bgr, capsys):
    """--every's default skips near-duplicate video frames; in a folder of images each is its own
    photo: all are looked at (the first, faceless, photo left the two faces unseen with every 5th)."""
    folder = photo_folder(tmp_path / "photos", np.full((480, 640, 3), 128, np.uint8), astronaut_bgr)
    out = tmp_path / "photos.json"
    assert camface_main(["evaluate", "--source", str(folder), "--methods", "gradcam", "--steps", "2",
                         "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert (settings["crops"], settings["every"], settings["frames_read"]) == (2, 1, 3)
    assert camface_main(["evaluate", "--source", str(folder), "--methods", "gradcam", "--every", "5"]) == 2
    err = capsys.readouterr().err
    assert "no faces found in 3 frames" in err and "photos (only the first frame looked at" in err


def test_every_photo_of_a_folder_and_one_photo_are_scored_whatever_the_frame_cap(tmp_path, astronaut_bgr,
                                                                                monkeypatch):
    """--frames' default (300) capped a folder of images, which the README says is scored whole,
    and a single photo was scored as a clip's frames ("every 5 of 1 frames"): a folder's every
    image and a photo are scored (the cap made 2 here), a clip keeps the first 300 frames."""
    from camface.evaluate import cli

    monkeypatch.setattr(cli, "FRAMES", 2)
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(3):
        cv2.imwrite(str(folder / f"{k}.png"), astronaut_bgr if k % 2 == 0 else astronaut_bgr[:, ::-1])
    out = tmp_path / "photos.json"
    assert camface_main(["evaluate", "--source", str(folder), "--methods", "gradcam", "--steps", "2",
                         "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert (settings["crops"], settings["every"], settings["frames_read"]) == (3, 1, 3)
    assert (cli.default_every(str(folder / "0.png")), cli.default_frames(str(folder / "0.png"))) == (1, sys.maxsize)
    assert (cli.default_every("sample"), cli.default_frames("sample")) == (cli.EVERY, 2)


@pytest.mark.parametrize("every, read, words", [
    (1, None, "every frame"), (2, None, "every 2nd frame"), (3, None, "every 3rd frame"), (5, None, "every 5th frame"),
    (11, None, "every 11th frame"), (21, None, "every 21st frame"), (112, None, "every 112th frame"),
    (122, None, "every 122nd frame"),
    # too few frames for a second look: said so, not "every 5th frame" of 3
    (5, 300, "every 5th frame"), (5, 6, "every 5th frame"), (5, 5, "only the first frame"),
    (5, 3, "only the first frame"), (5, 1, "only the first frame"), (1, 3, "every frame"), (1, 1, "every frame"),
])
def test_how_often_is_said_in_words(every, read, words):
    from camface.realtime.config import every_nth_frame

    assert every_nth_frame(every, read) == words


def test_a_clip_shorter_than_every_says_only_its_first_frame_was_scored(faces_clip, capsys):
    """A 4-frame clip at --every's default of 5: its table said "every 5th frame of 4", while
    one frame was looked at."""
    assert camface_main(["evaluate", "--source", str(faces_clip["faces"]), "--methods", "gradcam",
                         "--steps", "2"]) == 0
    table = capsys.readouterr().out
    assert f"camface evaluate: {faces_clip['faces']} (only the first frame of 4, 1 face crops)" in table, table


@pytest.mark.parametrize("flag, name, breaks", [
    ("--json", "scores.json", "pathlib.Path.write_text"),
    ("--plot", "curves.png", "matplotlib.figure.Figure.savefig"),
])
def test_a_full_disk_leaves_the_earlier_output_whole(tmp_path, astronaut_bgr, capsys, monkeypatch, flag, name,
                                                     breaks):
    """--json and --plot are written beside and renamed: a write that fails midway (a full disk)
    is one error line naming the file, and the file of an earlier run stays as it was."""
    import errno
    import importlib

    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "face.png"), astronaut_bgr)
    out = tmp_path / name
    out.write_bytes(b"an earlier run's output")
    module, owner, method = breaks.rsplit(".", 2)
    cls = getattr(importlib.import_module(module), owner)

    def half_then_full(self, *args, **kwargs):
        target = self if isinstance(self, type(out)) else args[0]
        with open(target, "wb") as file:
            file.write(b"{half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cls, method, half_then_full)
    assert camface_main(["evaluate", "--source", str(folder), "--methods", "gradcam", "--steps", "2",
                         flag, str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}" in err and "No space left on device" in err and "Traceback" not in err
    assert out.read_bytes() == b"an earlier run's output"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["photos", name])  # no partial file left


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("steps, fails", [("2", False), ("5000", True)])
def test_the_graph_log_shows_under_debug_only_and_is_left_as_it_was(debug, steps, fails, tmp_path, astronaut_bgr,
                                                                     caplog):
    """evaluate set the graph's logger to WARNING for good (it hides "CAM graph NAME on PROVIDER",
    which the table says): every later load in the process was silenced, --debug or not. Now as
    export does: hidden while the command runs, unless --debug, and the level restored after it,
    whether the command ends well or fails after the graph has loaded (--steps above its 64x64
    pixels; --debug raises the error rather than printing it)."""
    import logging

    from camface.errors import UsageError

    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "face.png"), astronaut_bgr)
    shown, after = graph_log_of(camface_main, caplog, ["evaluate", "--source", str(folder), "--methods", "gradcam",
                                                       "--steps", steps], debug,
                                pytest.raises(UsageError, match="--steps must be at most 4096") if fails else None)
    assert (f"CAM graph {EMOTION_ONNX.name} on CPUExecutionProvider" in shown) == debug, shown
    assert after == logging.INFO


def test_a_device_that_falls_back_to_the_cpu_is_said_once(tmp_path, astronaut_bgr, caplog):
    """`--device cuda` where ONNX Runtime has no CUDA: the graph says it runs on the CPU; the
    scorer's sessions said it again, each (three lines for one fallback)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "face.png"), astronaut_bgr)
    with caplog.at_level("WARNING"):
        assert camface_main(["evaluate", "--source", str(folder), "--methods", "gradcam", "--steps", "2",
                             "--device", "cuda"]) == 0
    said = [r.getMessage() for r in caplog.records if "is not usable here" in r.getMessage()]
    assert said == ["camface: device 'cuda' is not usable here; running the CAM graph on CPU"]


def test_a_file_url_of_a_folder_or_photo_is_scored_as_that_folder_or_photo(tmp_path, astronaut_bgr, capsys):
    """A file:// URL is read as the path it names (sources.local_spec), but evaluate's defaults
    (and export's ranking, which takes them) looked at the URL as a path: a folder of images
    given as file:///... was scored by every 5th of its first 300 images, not whole, and a
    --plot naming the photo given as --source was not seen as its input (written over it)."""
    from camface.evaluate import cli

    folder = tmp_path / "photos"
    folder.mkdir()
    photo = folder / "0.png"
    cv2.imwrite(str(photo), astronaut_bgr)
    for path in (folder, photo):
        assert (cli.default_every(path.as_uri()), cli.default_frames(path.as_uri())) == (1, sys.maxsize), path
    before = photo.read_bytes()
    assert camface_main(["evaluate", "--source", photo.as_uri(), "--methods", "gradcam", "--steps", "2",
                         "--plot", str(photo)]) == 2
    err = capsys.readouterr().err
    assert f"--plot {photo} is an input" in err and "Traceback" not in err, err
    assert photo.read_bytes() == before
