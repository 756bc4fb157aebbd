"""The method ranking recorded at export (camface/export/ranking.py) and `--method auto`: the
ranking equals `camface evaluate`'s on the same crops, `auto` resolves to its first displayable
method in every front end, an explicit `--method` wins, a graph without a ranking falls back to
Grad-CAM and says so once, `camface info` shows it, and the time budget thins or skips. A tiny
ONNX classifier goes through the real `camface export` (ONNX engine); no TensorFlow."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from realtime_helpers import tiny_cam_graph, write_clip

from camface import graph_spec, methods
from camface.cli import main as camface_main
from camface.errors import ModelError
from camface.evaluate.report import METRICS
from camface.export import ranking
from camface.export.exporter import ExportResult
from camface.graph_spec import GraphInfo, auto_method
from camface.realtime.explainer import FrameExplainer, check_method
from camface.realtime.graph import CamGraph
from camface.realtime.results import Face
from camface.realtime.controls import Controls

SIZE = 16


def tiny_classifier(path: Path) -> Path:
    """A forward ONNX classifier on RGB 16x16 (NCHW float): Conv 3->6 (3x3) -> Relu -> GAP ->
    Gemm -> 4 logits, fixed random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def export(tmp_path, *flags) -> tuple[Path, GraphInfo]:
    out = tmp_path / "cam.onnx"
    assert camface_main(["export", str(tiny_classifier(tmp_path / "m.onnx")), "-o", str(out), "--preset", "unit",
                         *flags]) == 0
    return out, CamGraph(out, "cpu").info


def blank_folder(folder: Path) -> Path:
    """Four grey photos: no face anywhere."""
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"wall{i}.png"), np.full((120, 160, 3), 90 + 20 * i, np.uint8))
    return folder


def with_ranking(path: Path, ranked: dict) -> Path:
    """The tiny contract graph (gradcam, gradcampp, cam) with `ranked` as its recorded ranking."""
    import onnx

    tiny_cam_graph(path)
    model = onnx.load(str(path))
    info = GraphInfo.from_metadata({p.key: p.value for p in model.metadata_props})
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dataclasses.replace(info, ranking=ranked).to_metadata())
    onnx.save(model, str(path))
    return path


RANKED = {"rule": "deletion_auc (lower is better)", "ranking": ["gradcampp", "cam", "gradcam"],
          "scores": {name: {key: 0.1 * i for key, _, _ in METRICS.values()}
                     for i, name in enumerate(("gradcampp", "cam", "gradcam"))},
          "settings": {"source": "sample", "frames_read": 300, "every": 5, "crops": 117, "steps": 16,
                       "baseline": "blur", "seconds": 1.0}}


# ------------------------------------------------------------------------------ export = evaluate
def test_export_records_the_ranking_evaluate_computes_on_the_same_crops(tmp_path, capsys):
    """`camface export` (default --calibration sample) and `camface evaluate` (its defaults) on
    the same graph: the same crops, the same order, the same means."""
    out, info = export(tmp_path)
    printed = capsys.readouterr().out
    ranked = info.ranking
    assert set(ranked) == {"rule", "ranking", "scores", "settings"} and ranked["rule"].startswith("deletion_auc")
    settings = ranked["settings"]
    assert [settings[k] for k in ("source", "frames_read", "every", "steps", "baseline")] == ["sample", 300, 5, 16, "blur"]
    assert ranked["ranking"] == sorted(ranked["ranking"], key=lambda m: ranked["scores"][m]["deletion_auc"])
    assert set(ranked["ranking"]) == set(graph_spec.methods_of(info)) and "random" in ranked["scores"]
    assert f"ranking 1   {ranked['ranking'][0]}" in printed

    report_path = tmp_path / "scores.json"
    assert camface_main(["evaluate", "--model", str(out), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["settings"]["crops"] == settings["crops"] > ranking.MIN_CROPS
    assert ranked["ranking"] == [m for m in report["ranking"] if m in methods.names(display_only=True)]
    for name, scores in ranked["scores"].items():
        for key, _, _ in METRICS.values():
            assert scores[key] == pytest.approx(report["methods"][name][key], abs=1e-4), (name, key)
    capsys.readouterr()
    assert camface_main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"method ranking (--method auto shows {ranked['ranking'][0]}):" in shown
    assert (f"on {settings['crops']} face crops of sample (every 5th frame of 300), 16 steps, removed pixels -> blur; "
            "`camface evaluate --source sample` reproduces it") in shown
    best = ranked["scores"][ranked["ranking"][0]]
    assert f"1   {ranked['ranking'][0]:<20}{best['deletion_auc']:>16.3f}{best['insertion_auc']:>16.3f}" in shown


@pytest.mark.parametrize("flags, why", [
    (["--no-rank"], "exported with --no-rank"),
    (["--calibration", "BLANK"], "0 face crops in BLANK"),
])
def test_an_export_without_calibration_crops_falls_back_to_gradcam_and_says_so_once(tmp_path, caplog, capsys,
                                                                                    flags, why):
    blank = str(blank_folder(tmp_path / "walls"))
    flags = [blank if f == "BLANK" else f for f in flags]
    out, info = export(tmp_path, *flags)
    why = why.replace("BLANK", blank)
    assert info.ranking["skipped"].startswith(why) and f"ranking none: {why}" in capsys.readouterr().out
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="camface.realtime.explainer"):
        assert check_method(CamGraph(out, "cpu"), "auto") == "gradcam"
    (record,) = [r for r in caplog.records if r.name == "camface.realtime.explainer"]
    assert record.levelno == logging.WARNING and why in record.getMessage() and "gradcam" in record.getMessage()
    assert camface_main(["info", str(out)]) == 0
    assert f"method ranking (--method auto shows gradcam):\n  none: {why}" in capsys.readouterr().out


# ------------------------------------------------------------------------------ --method auto
@pytest.mark.parametrize("ranked, expected, why", [
    (RANKED, "gradcampp", ""),
    ({**RANKED, "ranking": ["layercam", "random", "cam", "gradcam"]}, "cam", ""),  # absent, baseline skipped
    ({**RANKED, "ranking": ["layercam"]}, "gradcam", "names none of the heatmaps"),
    ({"skipped": "exported with --no-rank"}, "gradcam", "its export ranked no methods: exported with --no-rank"),
    ({}, "gradcam", "records no method ranking"),
])
def test_auto_is_the_first_ranked_method_the_graph_shows(ranked, expected, why):
    info = GraphInfo(labels=("a", "b"), input_size=(8, 8), color_order="GRAY", target_layer="t",
                     heatmaps=("gradcam", "gradcampp", "cam", "random"), ranking=ranked)
    method, fallback = auto_method(info)
    assert method == expected and why in fallback and bool(fallback) == bool(why)
    assert GraphInfo.from_metadata(info.to_metadata()).ranking == ranked  # round trip through the metadata


GALLERY = {"scale": 10.0, "embedding_dim": 4}  # a `camface enroll` graph's metadata (enough for ranked_by)


@pytest.mark.parametrize("gallery, ranker, skipped, doing", [
    ({}, "`camface export`", "exported with --no-rank", "export"),
    (GALLERY, "`camface enroll`", "enrolled with --no-rank", "enrolment"),
])
def test_an_unranked_graph_names_the_command_that_ranks_it(tmp_path, caplog, gallery, ranker, skipped, doing):
    """A gallery graph of `camface enroll` without a ranking was told that `camface export` ranks
    the methods, and `enroll --no-rank` recorded 'exported with --no-rank': enroll ranks them (on
    the enrolled faces) unless --no-rank."""
    graph = CamGraph(tiny_cam_graph(tmp_path / "g.onnx"), "cpu")
    graph.info = dataclasses.replace(graph.info, ranking={}, gallery=gallery)
    assert graph_spec.ranked_by(graph.info) == ranker
    with caplog.at_level(logging.WARNING, logger="camface.realtime.explainer"):
        check_method(graph, "auto")
    assert caplog.messages == [f"camface: --method auto shows gradcam on g.onnx: it records no method ranking (made "
                               f"by an older camface, or not by {ranker}); {ranker} ranks the methods, --method "
                               "NAME picks one"]
    assert ranking.summary_lines({}, "gradcam", graph_spec.ranked_by(graph.info)) == [
        f"none recorded (made by an older camface, or not by {ranker}): --method auto shows gradcam"]

    result = ExportResult(tmp_path / "g.onnx", graph.info)
    recorded = ranking.record(result, None).info.ranking
    assert recorded == {"skipped": skipped}
    assert auto_method(dataclasses.replace(graph.info, ranking=recorded)) == (
        "gradcam", f"its {doing} ranked no methods: {skipped}")


def test_an_explicit_method_always_wins(tmp_path, caplog):
    graph = CamGraph(with_ranking(tmp_path / "ranked.onnx", RANKED), "cpu")
    with caplog.at_level(logging.INFO):
        assert check_method(graph, "auto") == "gradcampp"
        for name in ("gradcam", "cam", "none"):
            assert check_method(graph, name) == name
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(ModelError, match="has no 'layercam' heatmap"):
        check_method(graph, "layercam")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from camface.realtime.sample import SampleSource

    sample = SampleSource()
    return write_clip(tmp_path_factory.mktemp("clip") / "faces.mp4", [sample.frame(i) for i in (100, 110, 120)])


@pytest.mark.parametrize("flags, expected", [([], "gradcampp"), (["--method", "cam"], "cam")])
def test_live_shows_the_top_ranked_method_unless_told_otherwise(tmp_path, clip, flags, expected):
    graph = with_ranking(tmp_path / "ranked.onnx", RANKED)
    snaps = tmp_path / "snaps"
    assert camface_main(["live", "--source", str(clip), "--model", str(graph), "--no-show", "--snapshot-every", "1",
                         "--snapshot-dir", str(snaps), "--max-frames", "2", *flags]) == 0
    metas = [json.loads(p.read_text()) for p in sorted(snaps.glob("*/snapshot.json"))]
    assert len(metas) == 2 and {m["method"] for m in metas} == {expected}


def test_serve_and_the_python_api_resolve_auto(tmp_path):
    from camface.realtime.config import LiveConfig
    from camface.serve.state import ServeOptions, ServeState

    assert LiveConfig().method == "auto"
    path = with_ranking(tmp_path / "ranked.onnx", RANKED)
    graph = CamGraph(path, "cpu")
    state = ServeState(LiveConfig(model=path), ServeOptions(record_dir=tmp_path / "r", snapshot_dir=tmp_path / "s"),
                       graph, path)
    try:
        assert state.config.method == "gradcampp"
    finally:
        state.close()
    frame = np.full((64, 64, 3), 128, np.uint8)
    face = Face((8, 8, 40, 40), 0.9)
    explainer = FrameExplainer.from_config(LiveConfig(model=path), graph)
    result = explainer.explain(frame, (face,), Controls(method="auto")).result
    want = explainer.explain(frame, (face,), Controls(method="gradcampp")).result
    assert result.method == "gradcampp" and result.predictions[0].method == "gradcampp"
    np.testing.assert_array_equal(result.predictions[0].heatmap, want.predictions[0].heatmap)


def test_a_live_run_on_an_unranked_graph_warns_once(tmp_path, clip, caplog):
    from camface.realtime.loop import LiveConfig, LiveLoop

    graph = tiny_cam_graph(tmp_path / "old.onnx")
    with caplog.at_level(logging.WARNING):
        summary = LiveLoop(LiveConfig(source=str(clip), model=graph, max_frames=3)).run()
    assert summary.frames == 3
    warnings = [r.getMessage() for r in caplog.records if "--method auto" in r.getMessage()]
    assert len(warnings) == 1 and "shows gradcam" in warnings[0] and "records no method ranking" in warnings[0]


def test_crops_given_by_the_caller_are_ranked_and_named(tmp_path):
    """`camface train`'s way: the exporter's result ranked on crops it already holds."""
    from camface.export.exporter import ExportResult

    path = tiny_cam_graph(tmp_path / "tiny.onnx")
    crops = np.random.default_rng(1).integers(0, 256, (20, 32, 32, 1), dtype=np.uint8)
    result = ranking.record(ExportResult(path, CamGraph(path, "cpu").info), None, crops=crops,
                            settings={"source": "the test split"})
    ranked = CamGraph(path, "cpu").info.ranking
    assert ranked == result.info.ranking and ranked["settings"]["source"] == "the test split"
    assert ranked["settings"]["crops"] == 20 and set(ranked["ranking"]) == {"gradcam", "gradcampp", "cam"}
    assert ranking.summary_lines(ranked)[0].startswith("by deletion_auc (lower is better) on 20 face crops of "
                                                       "the test split, 16 steps")


# ------------------------------------------------------------------------------ the time budget
@pytest.mark.parametrize("estimate, seconds, crops, skipped", [
    (10.0, 30.0, 40, False),   # fits: every crop
    (100.0, 50.0, 20, False),  # twice over: half the crops, evenly
    (100.0, 10.0, None, True),  # 4 of 40 crops would fit: fewer than MIN_CROPS, nothing scored
    (1e9, 0.0, 40, False),     # 0: no budget
])
def test_the_budget_thins_the_crops_or_skips(tmp_path, monkeypatch, estimate, seconds, crops, skipped):
    graph = CamGraph(tiny_cam_graph(tmp_path / "tiny.onnx"), "cpu")
    monkeypatch.setattr(ranking, "_estimate", lambda scorer, crops, count: estimate)
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 1), dtype=np.uint8)
    ranked = ranking.rank_crops(graph, images, {"source": "noise"}, seconds)
    if skipped:
        assert set(ranked) == {"skipped"} and f"over the {seconds:g} s budget (--rank-seconds)" in ranked["skipped"]
    else:
        assert ranked["settings"]["crops"] == crops and ranked["ranking"][0] in graph.methods
        assert ranked["settings"].get("crops_found", 40) == 40
        thinned = f"on {crops} (evenly spaced) of 40 face crops of noise" if crops < 40 else f"on {crops} face crops"
        assert thinned in ranking.summary_lines(ranked)[0]


def test_the_estimate_is_the_classifications_scoring_makes(tmp_path):
    """crops x (2 K - 1) perturbed crops per method, at the timed per-crop cost."""
    from camface.evaluate.scores import Scorer

    graph = CamGraph(tiny_cam_graph(tmp_path / "tiny.onnx"), "cpu")
    calls = []

    class Timed(Scorer):
        def classify(self, images):
            calls.append(len(images))
            return super().classify(images)

    crops = np.zeros((50, 32, 32, 1), np.uint8)
    estimate = ranking._estimate(Timed(graph), crops, 3)
    assert calls == [32] * 7 and 0 < estimate < 60
    per_image = estimate / (50 * (2 * ranking.STEPS - 1) * 3)
    assert per_image < 0.1
