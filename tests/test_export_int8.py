"""`--int8`: the bundled emotion graph's features quantized with ONNX Runtime, calibrated on the
sample clip's faces; agreement with float32, a float32 tail, dynamic batch, metadata, a bad
calibration caught, the live loop on the int8 graph, and the agreement maths on small arrays."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from realtime_helpers import BLOCK_TF, count_frames, write_clip  # noqa: E402

from camface import graph_spec  # noqa: E402
from camface.cli import main as camface_main  # noqa: E402
from camface.errors import ModelError  # noqa: E402
from camface.export import agreement, calibration, int8  # noqa: E402
from camface.models import EMOTION_ONNX  # noqa: E402
from camface.realtime.graph import CamGraph  # noqa: E402

pytestmark = pytest.mark.skipif(not EMOTION_ONNX.is_file(), reason="bundled emotion graph not exported yet")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def float32():
    return onnx.load(str(EMOTION_ONNX))


@pytest.fixture(scope="module")
def crops():
    return calibration.crop_sets("sample", (64, 64), "GRAY")


@pytest.fixture(scope="module")
def quantized(float32, crops):
    return int8.to_int8(float32, crops=crops)


@pytest.fixture(scope="module")
def int8_path(quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "emotion.int8.onnx"
    onnx.save(quantized.model, str(path))
    return path


def test_crops_are_cut_as_live_and_split_in_time(crops):
    assert crops.calibration.dtype == np.uint8 and crops.calibration.shape[1:] == (64, 64, 1)
    total = len(crops.calibration) + len(crops.held_out)
    assert total == calibration.MAX_CROPS  # the sample clip has ~2 faces in each of 300 frames
    assert len(crops.held_out) == round(total * calibration.HELD_OUT_FRACTION)
    assert 60 < crops.held_out.mean() < 200  # faces, not padding


@pytest.mark.parametrize("count, copied, held_out", [(24, [], 6), (24, [0, 5], 4), (16, [3], None)])
def test_held_out_crops_identical_to_a_calibration_crop_are_left_out(count, copied, held_out):
    """A folder of photos holding a photo and its copy (or a clip repeating a frame) put one in
    the calibration crops and the other among the held-out crops the agreement is judged on."""
    crops = np.stack([np.full((4, 4, 1), 10 * i, np.uint8) for i in range(count)])
    calibrated = count - max(calibration.MIN_HELD_OUT, round(count * calibration.HELD_OUT_FRACTION))
    for n, index in enumerate(copied):
        crops[calibrated + n] = crops[index]  # the first held-out crops: copies of calibration crops
    if held_out is None:
        with pytest.raises(ModelError, match="calibration source photos/: 3 of its 4 held-out face crops differ"):
            calibration.split("photos/", crops)
        return
    sets = calibration.split("photos/", crops)
    assert len(sets.calibration) == calibrated and len(sets.held_out) == held_out
    seen = {crop.tobytes() for crop in sets.calibration}
    assert not any(crop.tobytes() in seen for crop in sets.held_out)
    np.testing.assert_array_equal(sets.held_out, crops[calibrated + len(copied):])


def test_int8_agrees_with_float32_within_the_bars(float32, quantized):
    result = quantized.agreement
    assert result.failures(agreement.THRESHOLDS, quantized.floor) == []
    assert result.top1_agreement >= agreement.THRESHOLDS.top1_agreement
    assert result.mean_prob_difference <= agreement.THRESHOLDS.mean_prob_difference
    assert result.methods["gradcam"].pearson >= agreement.THRESHOLDS.heatmap_pearson
    from camface.graph_spec import GraphInfo

    info = GraphInfo.from_metadata({p.key: p.value for p in float32.metadata_props})
    # every heatmap of the graph, the gradient-free methods that run the int8 model again too (64
    # target channels: on every held-out crop; export/int8.py rerun_crops)
    assert set(result.methods) == set(info.heatmaps) and not result.not_compared
    assert result.methods["scorecam"].crops == result.crops


def test_features_are_int8_and_everything_after_the_target_float32(float32, quantized):
    model = quantized.model
    int8.check_float_tail(model)
    features, tail = int8.feature_nodes(model), int8.tail_nodes(model)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    feature_ops = {n.op_type for n in features}
    assert {"QuantizeLinear", "DequantizeLinear"} <= feature_ops
    assert any(inits.get(name) == TensorProto.INT8 for n in features for name in n.input)  # weights
    assert not {n.op_type for n in tail} & int8.QUANTIZED_OPS
    tail_dtypes = {inits[name] for n in tail for name in n.input if name in inits}
    assert tail_dtypes <= {TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL}
    # the tail is the float32 graph's tail, node for node (the quantizer may reorder them)
    assert sorted(n.op_type for n in tail) == sorted(n.op_type for n in int8.tail_nodes(float32))
    producers = {out: n for n in tail for out in n.output}
    assert all(name in producers for name in ("probs", "gradcam", "gradcampp"))
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in model.graph.output)


def test_a_quantize_node_in_the_tail_is_refused(quantized):
    model = onnx.ModelProto.FromString(quantized.model.SerializeToString())
    gradcam = next(n for n in model.graph.node if "gradcam" in n.output)
    gradcam.output[0] = "gradcam_f"
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0.01, np.float32), "s"),
                                    numpy_helper.from_array(np.array(0, np.uint8), "z")])
    model.graph.node.extend([helper.make_node("QuantizeLinear", ["gradcam_f", "s", "z"], ["gradcam_q"], name="q"),
                             helper.make_node("DequantizeLinear", ["gradcam_q", "s", "z"], ["gradcam"], name="dq")])
    with pytest.raises(ModelError, match="QuantizeLinear node 'q' lies after the target"):
        int8.check_float_tail(model)


@pytest.mark.parametrize("batch", [1, 3, 8, 17])
def test_dynamic_batch_gives_each_crop_its_own_answer(int8_path, crops, batch):
    graph = CamGraph(int8_path, "cpu")
    pool = crops.held_out[:batch]
    probs, heatmaps = graph.run(pool, np.full(batch, -1, np.int64), "gradcam")
    assert probs.shape == (batch, 7) and heatmaps.shape == (batch, 8, 8)
    for i in (0, batch - 1):
        one_p, one_h = graph.run(pool[i:i + 1], np.array([-1]), "gradcam")
        np.testing.assert_allclose(probs[i], one_p[0], atol=1e-5)
        np.testing.assert_allclose(heatmaps[i], one_h[0], rtol=1e-4, atol=1e-6 * float(np.abs(one_h).max()))


def test_metadata_records_what_an_independent_comparison_measures(int8_path, crops):
    graph = CamGraph(int8_path, "cpu")
    info = graph.info
    assert info.precision == "int8"
    report = info.quantization
    assert report["passed"] and report["calibration"] == {"source": "sample", "crops": len(crops.calibration),
                                                          "method": "percentile 99.999"}
    reference = CamGraph(EMOTION_ONNX, "cpu")
    ref_probs, ref_maps = reference.run(crops.held_out, np.full(len(crops.held_out), -1, np.int64), "gradcam")
    probs, maps = graph.run(crops.held_out, ref_probs.argmax(1), "gradcam")
    recorded = report["agreement"]
    assert recorded["crops"] == len(crops.held_out)
    assert recorded["top1_agreement"] == pytest.approx(np.mean(probs.argmax(1) == ref_probs.argmax(1)))
    assert recorded["mean_prob_difference"] == pytest.approx(np.abs(probs - ref_probs).max(1).mean(), rel=1e-3)
    again = agreement.compare(ref_probs, probs, {"gradcam": ref_maps}, {"gradcam": maps}, 64)
    assert recorded["methods"]["gradcam"]["pearson"] == pytest.approx(again.methods["gradcam"].pearson, abs=1e-4)
    assert report["thresholds"]["heatmaps"]["gradcampp"]["pearson"] < agreement.THRESHOLDS.heatmap_pearson


def test_info_shows_the_agreement(int8_path, capsys):
    assert camface_main(["info", str(int8_path)]) == 0
    out = capsys.readouterr().out
    assert "; int8" in out and "calibration: 192 face crops from sample, percentile 99.999" in out
    assert "top-1 agreement 100.0% on 64 held-out crops" in out and "gradcam: Pearson r 0.9" in out


def test_all_black_calibration_is_caught(float32, crops):
    black = calibration.CropSets("black.mp4", np.zeros_like(crops.calibration), crops.held_out)
    # the pixels keep their 0..255 range (int8.pixel_ranges): the layers after them fail on the maps
    with pytest.raises(ModelError, match=r"calibrated on black.mp4 no longer explains what the float32 graph "
                                         r"explains on 64 held-out crops: .*gradcam heatmap Pearson r 0\.\d+ < 0\.8"):
        int8.to_int8(float32, crops=black)


def test_a_float16_graph_is_refused(float32, crops):
    model = onnx.ModelProto.FromString(float32.SerializeToString())
    props = {p.key: p.value for p in model.metadata_props} | {graph_spec.META_PRECISION: "fp16"}
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    with pytest.raises(ModelError, match="int8 quantizes a float32 CAM graph; this one is fp16"):
        int8.to_int8(model, crops=crops)


def test_a_source_without_faces_is_a_clear_error(tmp_path, float32):
    folder = tmp_path / "blank"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((120, 160, 3), 90, np.uint8))
    with pytest.raises(ModelError, match=f"calibration source {folder}: 0 face crops found, int8 needs at least 12"):
        int8.to_int8(float32, str(folder))


def test_int8_graph_runs_live_with_tensorflow_blocked(tmp_path, int8_path, astronaut_bgr):
    frame = np.full((480, 640, 3), 128, np.uint8)
    frame[48:432, 128:512] = cv2.resize(astronaut_bgr, (384, 384), interpolation=cv2.INTER_AREA)
    clip = write_clip(tmp_path / "face.mp4", [np.roll(frame, 4 * i, axis=1) for i in range(12)])
    out = tmp_path / "live.mp4"
    run = subprocess.run([sys.executable, "-c", BLOCK_TF, "live", "--source", str(clip), "--no-show",
                          "--model", str(int8_path), "--method", "gradcampp", "--record", str(out)],
                         capture_output=True, text=True, env=ENV, timeout=180, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "recorded 12 frames" in run.stderr and count_frames(out) == 12


def test_fp16_and_int8_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        camface_main(["export", "model.keras", "-o", "x.onnx", "--fp16", "--int8"])
    assert "not allowed with argument" in capsys.readouterr().err


# ------------------------------------------------------------------ the agreement maths


@pytest.mark.parametrize("a, b, want", [
    ([[0, 1], [2, 3]], [[0, 2], [4, 6]], 1.0),  # same picture, twice as bright
    ([[0, 1], [2, 3]], [[3, 2], [1, 0]], -1.0),
    ([[1, 0], [0, 1]], [[1, 1], [0, 0]], 0.0),
    ([[5, 5], [5, 5]], [[0, 0], [0, 0]], 1.0),  # both constant: nothing to tell apart
    ([[5, 5], [5, 5]], [[0, 1], [0, 0]], 0.0),
])
def test_pearson(a, b, want):
    assert agreement.pearson(np.array(a, float), np.array(b, float)) == pytest.approx(want)


def test_top_region_overlap_is_intersection_over_union():
    a = np.arange(10, dtype=np.float32)  # top 20%: 8, 9
    assert agreement.top_region(a).tolist() == [False] * 8 + [True] * 2
    b = np.roll(a, 1)  # top 20% at 9, 0 -> shares 9 with a
    assert agreement.region_overlap(a, b) == pytest.approx(1 / 3)
    assert agreement.region_overlap(a, a) == 1.0
    assert agreement.region_overlap(np.zeros(10), np.zeros(10)) == 1.0  # no evidence in either
    assert agreement.region_overlap(np.zeros(10), a) == 0.0


def _agreement(top1=1.0, diff=0.0, r=1.0, overlap=1.0):
    return agreement.Agreement(8, top1, diff, diff, {"gradcam": agreement.MethodAgreement(r, overlap, r)})


@pytest.mark.parametrize("result, floor, misses", [
    (_agreement(), None, []),
    (_agreement(top1=0.875), None, ["top-1 agreement 87.5% < 90%"]),
    (_agreement(diff=0.06), None, ["mean probability difference 0.060 > 0.050"]),
    (_agreement(r=0.8, overlap=0.5), None, ["gradcam heatmap Pearson r 0.800 < 0.900",
                                            "gradcam top-20% overlap 0.500 < 0.600"]),
    (_agreement(r=0.8, overlap=0.5), _agreement(r=0.85, overlap=0.55), []),  # an ill-conditioned map
    (_agreement(r=0.7, overlap=0.5), _agreement(r=0.85, overlap=0.55), ["gradcam heatmap Pearson r 0.700 < 0.750"]),
    # a bar the floor lowered to 0.8949 read "r 0.894 < 0.89"
    (_agreement(r=0.894), _agreement(r=0.9949), ["gradcam heatmap Pearson r 0.894 < 0.895"]),
    (_agreement(r=float("nan")), None, ["gradcam heatmap Pearson r nan < 0.900"]),
])
def test_failures_name_each_missed_bar(result, floor, misses):
    assert result.failures(agreement.THRESHOLDS, floor) == misses


def test_agreement_round_trips_through_json():
    result = _agreement(top1=0.9, r=0.95)
    assert agreement.Agreement.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_export_int8_from_keras_writes_a_checked_graph(tmp_path, capsys):
    from camface.models import EMOTION_KERAS, EMOTION_LABELS

    out = tmp_path / "emotion8.onnx"
    assert camface_main(["export", str(EMOTION_KERAS), "-o", str(out), "--labels", str(EMOTION_LABELS),
                         "--preset", "emotion", "--target-layer", "add_3", "--int8", "--no-rank"]) == 0
    printed = capsys.readouterr().out
    assert ", int8" in printed and "int8 calibration: 192 face crops from sample, percentile 99.999" in printed
    assert "int8   top-1 agreement" in printed
    info = CamGraph(out, "cpu").info
    assert info.precision == "int8" and info.quantization["passed"] and info.source_model == EMOTION_KERAS.name
    int8.check_float_tail(onnx.load(str(out)))


def test_a_nan_map_is_a_failure_even_where_the_reference_map_is_zero():
    # normalize() shows a NaN map as zeros, so against a zero float32 map Pearson r reads 1.0
    zero, nan = np.zeros((3, 4, 4), np.float32), np.zeros((3, 4, 4), np.float32)
    nan[1, 2, 2] = np.nan
    probs = np.full((3, 2), 0.5, np.float32)
    result = agreement.compare(probs, probs, {"gradcam": zero}, {"gradcam": nan}, side=8)
    assert result.methods["gradcam"].nonfinite == 1 and result.methods["gradcam"].pearson == 1.0
    assert result.failures() == ["gradcam heatmap not finite (NaN or inf) on 1 of 3 crops where the reference's "
                                 "is finite"]
    assert "gradcam: Pearson r 1.000 (worst crop 1.000), top-20% overlap 1.000, NOT FINITE on 1 crops" \
        in result.lines()
    same = agreement.compare(probs, probs, {"gradcam": nan}, {"gradcam": nan}, side=8)  # NaN in both: not int8's
    assert same.methods["gradcam"].nonfinite == 0


# ------------------------------------------------------------------ a small ONNX classifier


def _small_classifier(channels: int = 6, size: int = 16):
    """A forward ONNX classifier: Conv(3 -> channels) -> Relu [target] -> GlobalAveragePool -> Gemm
    -> Softmax on [N, 3, size, size]."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32) * 0.01, "w"),
               numpy_helper.from_array(rng.standard_normal((4, channels)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["conv"], ["target"], name="relu"),
             helper.make_node("GlobalAveragePool", ["target"], ["pooled"], name="gap"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1, name="fc"),
             helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name="softmax")]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _small_cam_graph():
    """`_small_classifier` as a float32 CAM graph (ONNX engine, self-check off) with every method,
    Score-CAM and Ablation-CAM included."""
    from camface.export import convert, onnx_export
    from camface.export.exporter import ExportOptions

    cam_graph, info, _ = onnx_export.build(_small_classifier(), ExportOptions(preset="unit", target_layer="target",
                                                                              verify=False))
    convert.set_metadata(cam_graph, info.to_metadata())
    return cam_graph, info


def _smooth_crops(count: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 [count, size, size, 3]: coarse random blocks, bilinearly enlarged (images, not noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, 4, 4, 3)).astype(np.float32)
    return np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_LINEAR) for c in coarse]).round().astype(np.uint8)


@pytest.fixture(scope="module")
def small():
    cam_graph, info = _small_cam_graph()
    crops = calibration.CropSets("smooth.png", _smooth_crops(24), _smooth_crops(8, seed=1))
    return cam_graph, info, crops


def test_score_cam_and_ablation_cam_are_compared_with_float32(small):
    cam_graph, info, crops = small
    assert {"scorecam", "ablationcam"} <= set(info.heatmaps)
    result = int8.to_int8(cam_graph, crops=crops)
    assert set(result.agreement.methods) == set(info.heatmaps)  # every heatmap, the reruns too
    assert set(result.floor.methods) == set(info.heatmaps)
    held = crops.held_out
    reference = CamGraph.from_bytes(cam_graph.SerializeToString(), "float32.onnx", "cpu")
    graph = CamGraph.from_bytes(result.model.SerializeToString(), "int8.onnx", "cpu")
    probs_ref, maps_ref = reference.run(held, np.full(len(held), -1, np.int64), "scorecam")
    _, maps = graph.run(held, probs_ref.argmax(1), "scorecam")
    again = agreement.compare(probs_ref, probs_ref, {"scorecam": maps_ref}, {"scorecam": maps}, 16)
    recorded = result.report["agreement"]["methods"]["scorecam"]
    assert recorded["pearson"] == pytest.approx(again.methods["scorecam"].pearson, abs=1e-4)
    assert recorded["crops"] == len(held) and "scorecam" in result.report["thresholds"]["heatmaps"]


def test_a_target_too_wide_to_compare_the_reruns_says_so(small, monkeypatch, caplog):
    cam_graph, info, crops = small
    monkeypatch.setattr(int8, "RERUN_VARIANTS", 6 * (calibration.MIN_HELD_OUT - 1))  # 3 crops at 6 channels
    with caplog.at_level("WARNING"):
        result = int8.to_int8(cam_graph, crops=crops)
    assert set(result.agreement.not_compared) == {"scorecam", "ablationcam"}
    assert not {"scorecam", "ablationcam"} & set(result.agreement.methods)
    assert "int8: ablationcam, scorecam not compared with float32 (6 target channels" in caplog.text
    lines = int8.summary_lines(result.report)
    assert any(line.strip().startswith("scorecam: not compared (6 target channels") for line in lines)


@pytest.mark.parametrize("held_out, channels, want", [(64, 64, 64), (64, 512, 8), (64, 1024, 4), (64, 2048, 0),
                                                       (10, 8, 10), (9, 1024, 4)])
def test_rerun_crops_are_as_many_as_fit_spread_over_the_held_out_crops(held_out, channels, want):
    """One crop from each of `want` equal stretches of the held-out crops (the first ones were
    taken: a clip's frames right after the calibration crops, and in train the held-out crops of
    the first class only)."""
    picked = int8.rerun_crops(np.arange(held_out), channels).tolist()
    assert len(picked) == want
    stretch = [index * want // held_out for index in picked]
    assert stretch == list(range(want))  # one in each stretch, in order
    if 0 < want < held_out:
        assert 0 not in picked  # not the crop next to the calibration crops


def test_rerun_crops_of_train_s_class_by_class_test_split_cover_every_class():
    """train's held-out crops are its test split, class after class (4 classes of 16 here): a
    1024-channel target's 4 reruns were all of the first class."""
    classes = np.repeat(np.arange(4), 16)
    assert sorted(int8.rerun_crops(classes, 1024).tolist()) == [0, 1, 2, 3]


def _previous_graph_beside_a_model(small, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """net.onnx (the small classifier) and cam.onnx holding b"the previous graph", in tmp_path;
    calibration and ranking read the small crops."""
    from camface.export import ranking

    _, _, crops = small
    model = tmp_path / "net.onnx"
    onnx.save(_small_classifier(), str(model))
    out = tmp_path / "cam.onnx"
    out.write_bytes(b"the previous graph")
    monkeypatch.setattr(calibration, "crop_sets", lambda *args: crops)
    monkeypatch.setattr(ranking, "source_crops", lambda source, graph: (crops.held_out, {"source": "smooth.png"}))
    return model, out


@pytest.mark.parametrize("stage", ["int8", "ranking"])
def test_a_failed_export_keeps_the_previous_graph(stage, small, tmp_path, monkeypatch, capsys):
    """The ranking runs after the graph is written: a failure there (or Ctrl-C) left the new,
    unranked graph in place of the previous one."""
    from camface.export import ranking

    model, out = _previous_graph_beside_a_model(small, tmp_path, monkeypatch)

    def fail(*args, **kwargs):
        raise ModelError(f"{stage} failed")

    monkeypatch.setattr(int8 if stage == "int8" else ranking, "to_int8" if stage == "int8" else "rank_crops", fail)
    assert camface_main(["export", str(model), "-o", str(out), "--preset", "unit", "--target-layer", "target",
                         "--int8"]) != 0
    assert f"{stage} failed" in capsys.readouterr().err
    assert out.read_bytes() == b"the previous graph"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.onnx", "net.onnx"]  # nothing left beside it


def test_an_export_replaces_the_previous_graph_whole(small, tmp_path, monkeypatch, capsys):
    model, out = _previous_graph_beside_a_model(small, tmp_path, monkeypatch)
    assert camface_main(["export", str(model), "-o", str(out), "--preset", "unit", "--target-layer", "target",
                         "--int8"]) == 0
    assert f"wrote {out} (" in capsys.readouterr().out
    info = CamGraph(out, "cpu").info
    assert info.precision == "int8" and info.ranking and "skipped" in info.ranking  # 8 crops: fewer than 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.onnx", "net.onnx"]


def test_a_bar_lowered_by_the_noise_floor_is_warned_about(small, monkeypatch, caplog):
    """A float32 map that moves under the nudge lowers its bars (agreement.py); the export then
    passed a weaker check in silence (the bars showed only in the summary lines)."""
    cam_graph, _, crops = small
    noise = np.random.default_rng(5)
    monkeypatch.setattr(int8, "nudge", lambda held: noise.integers(0, 256, held.shape).astype(np.uint8))
    with caplog.at_level("WARNING"):
        result = int8.to_int8(cam_graph, crops=crops)
    pearson_bar, _ = result.agreement.bars(agreement.THRESHOLDS, result.floor)["gradcam"]
    assert pearson_bar < agreement.THRESHOLDS.heatmap_pearson - int8.LOWERED
    assert "int8: gradcam: the float32 map itself moves under a one-grey-level nudge (Pearson r" in caplog.text
    quiet = int8.lowered_bars(result.agreement, result.agreement)  # a floor at r 1.0: nothing lowered
    assert quiet == []


def test_pixels_brighter_than_the_calibration_crops_are_not_clipped(small):
    """The cast and normalised pixels have a known range, 0..255 through the normalisation; it was
    calibrated instead, so a clip darker than the live frames clipped every brighter pixel."""
    cam_graph, _, crops = small
    dim = calibration.CropSets("dim.mp4", crops.calibration // 3, crops.held_out // 3)  # pixels 0..85
    quantized = int8.to_int8(cam_graph, crops=dim).model
    bright = crops.held_out  # pixels up to 255
    reference = CamGraph.from_bytes(cam_graph.SerializeToString(), "float32.onnx", "cpu")
    graph = CamGraph.from_bytes(quantized.SerializeToString(), "int8.onnx", "cpu")
    a_ref = reference.session.run(["activations"], {"image": bright, "class_index": np.full(len(bright), -1)})[0]
    a = graph.session.run(["activations"], {"image": bright, "class_index": np.full(len(bright), -1)})[0]
    # the activations' own range was calibrated on the dim crops: compare where it holds them
    calibrated = graph.session.run(["activations"], {"image": dim.calibration,
                                                     "class_index": np.full(len(dim.calibration), -1)})[0].max()
    inside = a_ref <= calibrated
    assert inside.mean() > 0.5
    assert np.abs(a - a_ref)[inside].max() < 0.05 * calibrated
    ranges = int8.pixel_ranges(cam_graph, bright.shape[1:])
    assert ranges[next(iter(ranges))] == (0.0, 255.0)  # the cast: every uint8 value


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError])
def test_an_interrupted_write_leaves_the_previous_graph_and_no_partial_file(error, tmp_path, monkeypatch):
    from camface.export import convert

    out = tmp_path / "cam.onnx"
    out.write_bytes(b"the previous graph")

    def interrupted(model, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a gra")
        raise error("stopped")

    monkeypatch.setattr(onnx, "save_model", interrupted)
    with pytest.raises(error):
        convert.save(onnx.ModelProto(), out)
    assert out.read_bytes() == b"the previous graph" and [p.name for p in tmp_path.iterdir()] == ["cam.onnx"]


def test_a_crop_whose_activations_are_all_zero_gets_zero_maps_never_nan(small):
    """A black crop: the small model's bias-free convolution gives zero activations after the ReLU;
    every int8 map of it is finite and zero (nothing to point at), at batch 1 and beside other crops."""
    cam_graph, info, crops = small
    quantized = int8.to_int8(cam_graph, crops=crops).model
    graph = CamGraph.from_bytes(quantized.SerializeToString(), "int8.onnx", "cpu")
    black = np.zeros((1, *crops.held_out.shape[1:]), np.uint8)
    for batch in (black, np.concatenate([crops.held_out[:2], black])):
        names = ["activations", *info.heatmaps]
        outputs = dict(zip(names, graph.session.run(names, {"image": batch, "class_index": np.full(len(batch), -1)})))
        assert not outputs["activations"][-1].any()
        for name in info.heatmaps:
            assert np.isfinite(outputs[name]).all(), name
            assert not outputs[name][-1].any(), name


@pytest.mark.parametrize("preset", ["tf", "facenet", "unit", "torch", "imagenet-caffe"])
def test_no_pixel_value_sits_on_a_rounding_tie(preset, small):
    """x / 127.5 - 1 over its exact range [-1, 1] quantises to p - 127.5 steps: every pixel on a
    tie, rounded up or down by the last bit of the float sums (another CPU; Score-CAM's masked
    copies: `camface train --int8`'s check of Score-CAM failed). The pixels are quantised once, as
    the model reads them (not at each step of the normalisation, rounding the rounding), on a scale
    that leaves every pixel value at least TIE_MARGIN from a half step."""
    from onnx import numpy_helper

    from camface.export import convert, onnx_export, onnx_rerun
    from camface.export.exporter import ExportOptions

    _, _, crops = small
    cam_graph, info, _ = onnx_export.build(_small_classifier(), ExportOptions(preset=preset, target_layer="target",
                                                                              verify=False))
    convert.set_metadata(cam_graph, info.to_metadata())
    quantized = int8.to_int8(cam_graph, crops=crops, enforce=False).model
    chain = list(int8.pixel_ranges(onnx_rerun.without(cam_graph, info)[0], (16, 16, 3)))  # as quantised
    scales = {i.name: float(numpy_helper.to_array(i)) for i in quantized.graph.initializer if i.data_type == 1
              and numpy_helper.to_array(i).size == 1}
    quantizers = [(n.input[0], scales[n.input[1]]) for n in quantized.graph.node
                  if n.op_type == "QuantizeLinear" and n.input[0] in chain]
    assert len(quantizers) == 1 and quantizers[0][0] == chain[-1]  # once, where the model reads them
    probe = onnx.ModelProto.FromString(quantized.SerializeToString())
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name, _ in quantizers)
    session = CamGraph.from_bytes(probe.SerializeToString(), "int8.onnx", "cpu").session
    ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1), 3, axis=3)  # every pixel value
    values = session.run([name for name, _ in quantizers], {"image": ramp, "class_index": np.array([-1])})
    for (name, scale), x in zip(quantizers, values):
        steps = x.astype(np.float64) / scale
        assert np.abs(np.abs(steps - np.floor(steps)) - 0.5).min() >= int8.TIE_MARGIN / 2, name


def test_weights_leave_room_for_cpus_without_vnni(quantized):
    """Every int8 weight lies in [-64, 64]: on x86 CPUs without VNNI ONNX Runtime's uint8 x int8
    kernels add two products in 16 bits (255 x 64 x 2 = 32640 < 32767), which full 8-bit weights
    (255 x 127 x 2) overflow, so the graph answers there as on the CPU its agreement was
    measured on."""
    weights = [numpy_helper.to_array(i) for i in quantized.model.graph.initializer if i.data_type == TensorProto.INT8]
    assert weights, "no int8 weights: nothing was quantized"
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert 32 < largest <= int8.REDUCED_WEIGHT_MAX  # 7 bits, used (not a needlessly tiny scale)
    assert 255 * largest * 2 <= np.iinfo(np.int16).max


def test_readme_int8_score_cam_figures_are_the_bundled_graphs(quantized):
    """"Which precision where" quotes int8 Score-CAM's agreement on the bundled graph (`int8
    Score-CAM holds r R, overlap O`): what quantizing it on the sample measures, at the README's
    precision (half a printed step) plus 0.002 for another CPU's float32 reference."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = re.search(r"int8 Score-CAM holds r ([\d.]+), overlap ([\d.]+)", readme).groups()
    scorecam = quantized.agreement.methods["scorecam"]
    for text, measured in zip(shown, (scorecam.pearson, scorecam.overlap)):
        step = 10.0 ** -len(text.split(".")[1])
        assert abs(float(text) - measured) <= step / 2 + 0.002, (shown, scorecam.pearson, scorecam.overlap)
