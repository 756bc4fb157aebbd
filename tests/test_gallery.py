"""Face-recognition models explained: gallery graphs (`camface enroll`), their similarity maps
against torch / TensorFlow autograd, the unknown threshold, bad input, and `camface live` on a
gallery graph. Small random-weight embedders defined inline (tests/gallery_helpers.py); real
faces that scikit-image and matplotlib ship, augmented into several photos per person."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import onnxruntime as ort  # noqa: E402
from gallery_helpers import SIZE, centre_on, faces_bgr, people_dir, to_onnx, torch_embedder  # noqa: E402

from camface import graph_spec, methods  # noqa: E402
from camface.cli import main  # noqa: E402
from camface.errors import ModelError, SourceError, UsageError  # noqa: E402
from camface.export import enroll, gallery, threshold  # noqa: E402
from camface.export.exporter import ExportOptions  # noqa: E402
from camface.realtime.results import Prediction  # noqa: E402

ARCFACE = ExportOptions(preset="arcface")
SHOWN = ("gradcam", "gradcampp", "layercam", "hirescam")


def _session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model, images, classes):
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": images, "class_index": classes})))


def _maps_agree(got: np.ndarray, want: np.ndarray, name: str) -> None:
    """Normalised maps (as shown) within 2e-3 of the maximum: float32 gradients of the same
    function, summed in another order, differ by ~1e-6 relative; ReLU kinks stay continuous."""
    for n in range(len(want)):
        a, b = methods.normalize(got[n], name), methods.normalize(want[n], name)
        assert np.abs(a - b).max() <= 2e-3, (name, n, float(np.abs(a - b).max()))


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    """3 identities x 4 augmented photos, plus a photo without a face (a cat) and one with two
    faces in collins' folder: skipped and counted."""
    from skimage import data

    root = people_dir(tmp_path_factory.mktemp("people"), per_person=4)
    cv2.imwrite(str(root / "collins" / "cat.png"), data.chelsea()[:, :, ::-1])
    faces = faces_bgr()
    two = np.concatenate([faces["collins"], cv2.resize(faces["hopper"], (512, 512))], axis=1)
    cv2.imwrite(str(root / "collins" / "two.png"), two)
    return root


@pytest.fixture(scope="module")
def crops(people):
    """The enrolment's face crops (uint8 RGB [M, SIZE, SIZE, 3]) and their identities."""
    found, targets, _, _ = enroll.face_crops(people, enroll.scan_people(people), (SIZE, SIZE), "RGB")
    return found, targets


@pytest.fixture(scope="module")
def embedder(crops, tmp_path_factory):
    """(torch module, its ONNX file): a random CNN embedder centred on the enrolment crops."""
    model = centre_on(torch_embedder(), crops[0])
    return model, to_onnx(model, tmp_path_factory.mktemp("embedder") / "embedder.onnx")


@pytest.fixture(scope="module")
def enrolled(people, embedder, tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery") / "gallery.onnx"
    assert main(["enroll", str(people), "--model", str(embedder[1]), "-o", str(out), "--preset", "arcface",
                 "--no-rank"]) == 0
    return out


def _torch_similarity(model, crops_rgb, gallery_rows, classes):
    """(similarity [N, K], gradient of similarity[n, c_n] at the last conv [N, h, w, C],
    activations [N, h, w, C]) by torch autograd; c_n = argmax for -1."""
    x = torch.from_numpy(crops_rgb.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    a = model.features(x).detach().requires_grad_(True)
    e = model.fc(a.mean(dim=(2, 3))) - model.centre
    u = e / torch.sqrt((e * e).sum(1, keepdim=True) + gallery.EPS)
    sim = u @ torch.from_numpy(gallery_rows).T
    chosen = torch.where(torch.from_numpy(classes) < 0, sim.argmax(1), torch.from_numpy(classes))
    sim.gather(1, chosen[:, None]).sum().backward()
    nhwc = (lambda t: t.detach().permute(0, 2, 3, 1).numpy())
    return sim.detach().numpy(), nhwc(a.grad), nhwc(a)


def test_similarity_heatmaps_equal_torch_autograd(embedder, crops):
    model, path = embedder
    rows = gallery.normalise(np.random.default_rng(0).standard_normal((3, 16)))
    graph, info, _ = gallery.build(gallery.load(path, ARCFACE), rows, ("a", "b", "c"), ARCFACE, {"threshold": 0.3})
    images = crops[0][[0, 5, 9, 11]]
    classes = np.array([-1, 0, 2, 1], np.int64)
    got = _run(graph, images, classes)
    sim, grad, activations = _torch_similarity(model, images, rows, classes)
    assert np.abs(got["similarity"] - sim).max() <= 1e-5
    scaled = 30.0 * sim.astype(np.float64)
    softmax = np.exp(scaled - scaled.max(1, keepdims=True))
    assert np.abs(got["probs"] - softmax / softmax.sum(1, keepdims=True)).max() <= 1e-4
    assert np.abs(got["activations"] - activations).max() <= 1e-5 * np.abs(activations).max()
    for name in SHOWN:
        _maps_agree(got[name], methods.get(name).reference(activations, grad, None), name)
    # unnormalised too: the maps are of the cosine similarity itself, not of the scaled logits
    want = methods.get("gradcam").reference(activations, grad, None)
    assert np.abs(got["gradcam"] - want).max() <= 1e-3 * np.abs(want).max()
    assert info.gallery["scale"] == 30.0 and info.labels == ("a", "b", "c")


def test_keras_embedder_maps_equal_tensorflow_gradients(tmp_path):
    tf = pytest.importorskip("tensorflow")
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    a = keras.layers.Conv2D(12, 3, padding="same", name="last_conv")(x)
    e = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(a))
    model = keras.Model(inputs, e)
    path = tmp_path / "embedder.keras"
    model.save(path)
    rows = gallery.normalise(np.random.default_rng(1).standard_normal((2, 10)))
    graph, info, _ = gallery.build(gallery.load(path, ARCFACE), rows, ("p", "q"), ARCFACE, {})
    images = np.stack([cv2.resize(f, (SIZE, SIZE))[:, :, ::-1] for f in faces_bgr().values()])
    classes = np.array([-1, 1, 0], np.int64)
    got = _run(graph, images, classes)
    x = tf.constant(images.astype(np.float32) / 127.5 - 1)
    features = keras.Model(inputs, a)
    head = keras.Sequential([model.layers[-2], model.layers[-1]])
    activations = features(x)
    with tf.GradientTape() as tape:
        tape.watch(activations)
        emb = head(activations)
        unit = emb / tf.sqrt(tf.reduce_sum(emb * emb, 1, keepdims=True) + gallery.EPS)
        sim = unit @ tf.constant(rows.T)
        chosen = tf.where(classes < 0, tf.argmax(sim, 1), classes)
        target = tf.reduce_sum(tf.gather(sim, chosen, batch_dims=1))
    grad = tape.gradient(target, activations).numpy()
    assert np.abs(got["similarity"] - sim.numpy()).max() <= 1e-5
    assert np.abs(got["activations"] - activations.numpy()).max() <= 1e-4 * np.abs(activations.numpy()).max()
    for name in SHOWN:
        _maps_agree(got[name], methods.get(name).reference(activations.numpy(), grad, None), name)


@pytest.mark.parametrize("layer", ["merge", "mid_relu"])
def test_a_keras_layer_name_as_target_names_its_converted_tensor(layer, tmp_path):
    """A Keras embedder is converted by tf2onnx, whose tensors are named by scope
    (`functional_1/merge_1/Add:0`): `--target-layer merge`, the Keras layer's name, was refused
    with a list of 40 such names and no hint. The error now suggests the layer's output tensor,
    and that tensor is the layer's output (its activations equal Keras's)."""
    pytest.importorskip("tensorflow")
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    y = keras.layers.Activation("relu", name="mid_relu")(x)
    merged = keras.layers.Add(name="merge")([keras.layers.Conv2D(8, 3, padding="same")(y), x])
    a = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="last_conv")(merged)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(a)))
    path = tmp_path / "embedder.keras"
    model.save(path)
    rows = gallery.normalise(np.random.default_rng(1).standard_normal((2, 10)))
    embedder = gallery.load(path, ARCFACE)
    from dataclasses import replace

    with pytest.raises(ModelError, match=rf"no tensor, node or module named '{layer}' \(did you mean "
                                         rf"\S*/{layer}(_\d+)?/[^/ ]+\?\); candidate") as error:
        gallery.build(embedder, rows, ("p", "q"), replace(ARCFACE, target_layer=layer), {})
    suggested = str(error.value).split("did you mean ")[1].split("?)")[0]
    graph, info, _ = gallery.build(embedder, rows, ("p", "q"), replace(ARCFACE, target_layer=suggested), {})
    images = np.stack([cv2.resize(f, (SIZE, SIZE))[:, :, ::-1] for f in faces_bgr().values()])
    got = _run(graph, images, np.array([-1, 1, 0], np.int64))
    want = keras.Model(inputs, model.get_layer(layer).output)(images.astype(np.float32) / 127.5 - 1).numpy()
    assert np.abs(got["activations"] - want).max() <= 1e-4 * np.abs(want).max()


def test_transformer_embedder_maps_equal_torch_autograd_at_its_tokens(tmp_path):
    from test_onnx_export_models import TransformerBlock
    from torch import nn

    class ViTEmbedder(nn.Module):
        def __init__(self, dim=16):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, dim, 8, 8)
            self.class_token = nn.Parameter(torch.randn(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, (SIZE // 8) ** 2 + 1, dim))
            self.blocks = nn.Sequential(TransformerBlock(dim, 2))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 12)

        def forward(self, x):
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
            return self.head(self.norm(self.blocks(x))[:, 0])

    torch.manual_seed(0)
    model = ViTEmbedder().eval()
    path = to_onnx(model, tmp_path / "vit.onnx")
    rows = gallery.normalise(np.random.default_rng(2).standard_normal((3, 12)))
    graph, info, differences = gallery.build(gallery.load(path, ARCFACE), rows, ("a", "b", "c"), ARCFACE, {})
    assert info.target_layer.endswith("norm1") and info.token_grid == {"prefix": 1, "height": 6, "width": 6}
    assert info.feature_size == (6, 6)
    assert all(d.ok for d in differences)
    images = np.stack([cv2.resize(f, (SIZE, SIZE))[:, :, ::-1] for f in faces_bgr().values()])
    classes = np.array([-1, 2, 0], np.int64)
    got = _run(graph, images, classes)
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["tokens"] = out

    hook = model.blocks[0].norm1.register_forward_hook(keep)
    e = model(torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2))
    hook.remove()
    u = e / torch.sqrt((e * e).sum(1, keepdim=True) + gallery.EPS)
    sim = u @ torch.from_numpy(rows).T
    chosen = np.where(classes < 0, sim.detach().numpy().argmax(1), classes)
    sim[torch.arange(3), torch.from_numpy(chosen)].sum().backward()

    def on_grid(t):  # [N, 1 + 36, C] -> the patches [N, 6, 6, C]
        return t[:, 1:].reshape(3, 6, 6, -1).numpy()

    a, g = on_grid(seen["tokens"].detach()), on_grid(seen["tokens"].grad)
    assert np.abs(got["similarity"] - sim.detach().numpy()).max() <= 1e-5
    assert np.abs(got["activations"] - a).max() <= 1e-4 * np.abs(a).max()
    for name in SHOWN:
        _maps_agree(got[name], methods.get(name).reference(a, g, None), name)


def test_an_arcface_shaped_embedder_without_global_pooling(tmp_path):
    """IResNet ends BN2d -> flatten -> Linear -> BN1d, no pooling: the target is its last 7x7 map
    (bn2), PReLU stays before it, and the gradient passes flatten, the linear layer and BN1d."""
    from gallery_helpers import iresnet_like

    model = iresnet_like()
    path = to_onnx(model, tmp_path / "iresnet.onnx", size=112)
    rows = gallery.normalise(np.random.default_rng(3).standard_normal((5, 128)))
    graph, info, differences = gallery.build(gallery.load(path, ARCFACE), rows, tuple("abcde"), ARCFACE, {})
    assert info.target_layer == "bn2" and info.feature_size == (7, 7) and info.input_size == (112, 112)
    assert all(d.ok for d in differences) and "gradient" in {d.output for d in differences}
    images = np.stack([cv2.resize(f, (112, 112))[:, :, ::-1] for f in faces_bgr().values()])
    got = _run(graph, images, np.array([-1, 3, 1], np.int64))
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        e = model(x).numpy()
    assert np.abs(got["similarity"] - (e / np.linalg.norm(e, axis=1, keepdims=True)) @ rows.T).max() <= 1e-5
    # an earlier stage: PReLU between it and the embedding, differentiated too (finer maps)
    earlier = ExportOptions(preset="arcface", target_layer="layers/layers.2")
    _, info, differences = gallery.build(gallery.load(path, earlier), rows, tuple("abcde"), earlier, {})
    assert info.feature_size == (14, 14) and all(d.ok for d in differences)


def test_enroll_three_identities(enrolled, people, embedder, crops, capsys):
    report = json.loads(enrolled.with_suffix(".enroll.json").read_text())
    assert report["identities"] == ["cameraman", "collins", "hopper"]
    assert report["photos"]["collins"]["used"] == 4
    assert report["photos"]["collins"]["no_face"] == 1 and report["photos"]["collins"]["many_faces"] == 1
    assert report["photos"]["hopper"]["used"] == 4 and report["photos"]["hopper"]["no_face"] == 0
    assert report["leave_one_out"]["accuracy"] == 1.0 and report["leave_one_out"]["identified"] == 12
    loo = report["leave_one_out"]
    assert loo["impostor_mean"] < report["threshold"] < loo["genuine_mean"]
    assert enrolled.with_suffix(".similarity.png").stat().st_size > 5000
    # the gallery: L2-normalised means of the L2-normalised torch embeddings of each identity's crops
    stored = np.load(enrolled.with_suffix(".npz"))
    model, _ = embedder
    with torch.no_grad():
        e = model(torch.from_numpy(crops[0].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)).numpy()
    units = e / np.linalg.norm(e, axis=1, keepdims=True)
    means = np.stack([units[crops[1] == k].mean(0) for k in range(3)])
    assert np.abs(stored["embeddings"] - means / np.linalg.norm(means, axis=1, keepdims=True)).max() <= 1e-5
    assert list(stored["labels"]) == report["identities"] and len(stored["photos"]) == 12
    # the graph names each enrolled face, its similarity the cosine to its identity
    import onnx

    info = graph_spec.GraphInfo.from_metadata({p.key: p.value for p in onnx.load(str(enrolled)).metadata_props})
    assert info.labels == ("cameraman", "collins", "hopper") and info.threshold == report["threshold"]
    assert info.gallery["photos"] == {"cameraman": 4, "collins": 4, "hopper": 4}
    got = _run(onnx.load(str(enrolled)), crops[0], np.full(12, -1, np.int64))
    assert (got["similarity"].argmax(1) == crops[1]).all()
    assert np.abs(got["similarity"] - units @ stored["embeddings"].T).max() <= 1e-5
    capsys.readouterr()
    assert main(["info", str(enrolled)]) == 0
    shown = capsys.readouterr().out
    assert f"gallery: 3 identities, D = 16, embedder embedder.onnx; probs = softmax(30.0 * similarity); " \
           f"unknown below {report['threshold']}" in shown
    summary = next(line for line in shown.splitlines() if line.startswith("CAM graph: "))
    assert " crops -> 3 identities; " in summary  # it said "3 classes": a gallery's are people


@pytest.mark.parametrize("into", ["collins", "hopper"])
def test_enroll_uses_a_copied_photo_once_and_refuses_one_in_two_person_folders(into, people, embedder, tmp_path,
                                                                               capsys, caplog):
    """A copy of a photo in its person's folder was embedded twice: it weighed twice in the
    person's mean, and in the leave-one-out check it matched its own twin (a genuine score of 1,
    which moves the threshold); in another person's folder, one face was enrolled under two
    names. As `camface train` does: a copy is used once (a warning names it), and the same photo
    in two person folders is an error naming both, with nothing written."""
    import shutil

    root = tmp_path / "people"
    shutil.copytree(people, root)
    original = sorted((root / "collins").glob("0.*"))[0]
    copy = root / into / f"copy{original.suffix}"
    shutil.copyfile(original, copy)
    out = tmp_path / "g.onnx"
    code = main(["enroll", str(root), "--model", str(embedder[1]), "-o", str(out), "--preset", "arcface", "--no-rank"])
    err = capsys.readouterr().err
    if into == "hopper":
        assert code == 2 and f"{copy} (person 'hopper') and {original} (person 'collins') are the same photo" in err
        assert not out.exists() and "Traceback" not in err
        return
    assert code == 0, err
    assert f"{copy} is a copy of {original}: used once" in caplog.text
    saved = np.load(out.with_suffix(".npz"))
    assert str(copy) not in set(saved["photos"]) and str(original) in set(saved["photos"])
    report = json.loads(out.with_name("g.enroll.json").read_text())
    assert report["leave_one_out"]["identified"] == len(saved["photos"])
    units = saved["photo_embeddings"] / np.linalg.norm(saved["photo_embeddings"], axis=1, keepdims=True)
    same = units @ units.T - np.eye(len(units))
    assert same.max() < 1 - 1e-6  # no photo is enrolled twice


def test_enroll_prints_photos_accuracy_and_threshold(people, embedder, tmp_path, capsys):
    assert main(["enroll", str(people), "--model", str(embedder[1]), "-o", str(tmp_path / "g.onnx"),
                 "--preset", "arcface", "--no-rank", "--threshold", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "collins: 4 photo(s) used, skipped 1 no face, 1 many faces" in out
    assert "leave-one-out identification accuracy: 1.000 (12 photos)" in out
    assert "unknown below cosine similarity 0.250 (--threshold)" in out
    assert (tmp_path / "g.npz").is_file() and (tmp_path / "g.similarity.png").is_file()
    # beside a dotted name, named after it (not cut at its first dot)
    assert enroll.beside_paths(tmp_path / "people.v2.onnx") == {
        "npz": tmp_path / "people.v2.npz", "report": tmp_path / "people.v2.enroll.json",
        "figure": tmp_path / "people.v2.similarity.png"}


def test_a_gallery_of_one_identity_says_its_probs_are_always_one(embedder, crops, tmp_path, capsys):
    """One person enrolled: the softmax over one class is 1 for any face, so the similarity and
    the threshold (the default, with no impostor score) are what tell them from anyone else;
    enroll says so; the graph's similarity still varies with the face."""
    root = people_dir(tmp_path / "people", per_person=2, names=("collins",))
    out = tmp_path / "one.onnx"
    assert main(["enroll", str(root), "--model", str(embedder[1]), "-o", str(out), "--preset", "arcface",
                 "--no-rank"]) == 0
    text = capsys.readouterr().out
    assert "one identity: probs (a softmax over one class) is 1 for every face" in text
    assert f"unknown below cosine similarity {threshold.DEFAULT:.3f} (default" in text and "impostor (one identity)" in text
    found, _ = crops
    import onnx

    got = _run(onnx.load(str(out)), found, np.full(len(found), -1))
    np.testing.assert_array_equal(got["probs"], 1.0)
    assert got["similarity"].shape == (len(found), 1) and np.ptp(got["similarity"]) > 0.1  # it varies


# ---------------------------------------------------------------- the unknown threshold

def test_equal_error_threshold_on_hand_made_scores():
    t, rule = threshold.equal_error_threshold(np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.2, 0.3, 0.4]))
    assert t == pytest.approx(0.55) and "FRR 0.000, FAR 0.000" in rule  # the middle of the gap
    # overlapping: one genuine below one impostor; the best T errs once on each side of 4
    t, _ = threshold.equal_error_threshold(np.array([0.9, 0.8, 0.7, 0.35]), np.array([0.1, 0.2, 0.5, 0.3]))
    assert 0.35 < t <= 0.5
    assert threshold.equal_error_threshold(np.array([]), np.array([0.1]))[0] == threshold.DEFAULT


def test_leave_one_out_rebuilds_each_identity_without_the_photo():
    e = np.array([[1, 0], [1, 0.2], [1, -0.2], [0, 1], [0.1, 1], [-1, 0]], np.float64)
    targets = np.array([0, 0, 0, 1, 1, 2])
    loo = threshold.leave_one_out(e, targets, 3)
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    without_first = (u[1] + u[2]) / np.linalg.norm(u[1] + u[2])
    assert loo.genuine[0] == pytest.approx(float(without_first @ u[0]))
    assert len(loo.genuine) == 5 and len(loo.impostor) == 12  # identity 2 has one photo: no genuine
    assert list(loo.predicted) == [0, 0, 0, 1, 1, -1] and loo.accuracy == 1.0


@pytest.mark.parametrize("similarity, threshold_, label, caption", [
    ([0.31, 0.2], 0.4, "unknown (best: alice 0.31)", "unknown (best: alice 0.31)"),
    ([0.55, 0.2], 0.4, "alice", "alice 0.55"),
    ([], 0.4, "alice", "alice 0.70"),  # a classifier's graph: no similarity, the probability
    ([0.31, 0.2], None, "alice", "alice 0.31"),
])
def test_labels_say_unknown_below_the_threshold(similarity, threshold_, label, caption):
    p = Prediction(np.array([0.7, 0.3], np.float32), np.zeros((2, 2), np.float32), 0, 0, "gradcam",
                   np.array(similarity, np.float32))
    assert p.label(("alice", "bob"), threshold_) == label and p.caption(("alice", "bob"), threshold_) == caption
    assert Prediction.from_dict(p.to_dict()).label(("alice", "bob"), threshold_) == label


def test_a_face_not_enrolled_is_unknown_and_its_map_explains_the_best_match(people, embedder, crops, tmp_path):
    import shutil

    two = tmp_path / "two"
    for name in ("collins", "hopper"):
        shutil.copytree(people / name, two / name)
    out = tmp_path / "two.onnx"
    assert main(["enroll", str(two), "--model", str(embedder[1]), "-o", str(out), "--preset", "arcface",
                 "--no-rank"]) == 0
    from camface.realtime.graph import CamGraph

    graph = CamGraph(out, "cpu")
    stranger = crops[0][crops[1] == 0]  # the cameraman, not enrolled here
    probs, maps, similarity = graph.run_scores(stranger, np.full(len(stranger), -1, np.int64), "gradcam")
    best = similarity.max(1)
    assert (best < graph.info.threshold).all()
    labels = [Prediction(probs[i], maps[i], int(probs[i].argmax()), int(probs[i].argmax()), "gradcam",
                         similarity[i]).label(graph.info.labels, graph.info.threshold) for i in range(len(best))]
    assert all(t.startswith("unknown (best: ") and t.endswith(f"{b:.2f})") for t, b in zip(labels, best))
    assert (maps.reshape(len(maps), -1).max(1) > 0).any()  # the map explains the best match
    known = crops[0][crops[1] == 2]  # hopper, enrolled
    _, _, similarity = graph.run_scores(known, np.full(len(known), -1, np.int64), "gradcam")
    assert (similarity.max(1) >= graph.info.threshold).all()


# ---------------------------------------------------------------- bad input

def test_empty_people_dir_and_folders_without_a_usable_face(tmp_path, embedder, capsys):
    from skimage import data

    model = str(embedder[1])
    (tmp_path / "empty").mkdir()
    assert main(["enroll", str(tmp_path / "empty"), "--model", model, "-o", str(tmp_path / "g.onnx"),
                 "--preset", "arcface"]) == 2
    assert "holds no person folders" in capsys.readouterr().err
    (tmp_path / "p" / "alice").mkdir(parents=True)
    with pytest.raises(SourceError, match=r"person folder .*alice holds no photos"):
        enroll.scan_people(tmp_path / "p")
    cv2.imwrite(str(tmp_path / "p" / "alice" / "cat.png"), data.chelsea()[:, :, ::-1])
    assert main(["enroll", str(tmp_path / "p"), "--model", model, "-o", str(tmp_path / "g.onnx"),
                 "--preset", "arcface"]) == 2
    err = capsys.readouterr().err
    assert "person folder" in err and "alice has no usable face photo (1 no face)" in err
    assert len(err.strip().splitlines()) == 1


def test_photos_loose_beside_the_person_folders_are_named_once(tmp_path, caplog):
    """Photos directly in PEOPLE_DIR (no person folder) were ignored without a word: one warning
    says how many, names one, and says photos go in one folder per person; with no folders at
    all, the error says they lie loose."""
    root = tmp_path / "people"
    (root / "alice").mkdir(parents=True)
    cv2.imwrite(str(root / "alice" / "0.png"), np.zeros((8, 8, 3), np.uint8))
    for name in ("bob.jpg", "carol.png", ".hidden.png"):
        cv2.imwrite(str(root / name), np.zeros((8, 8, 3), np.uint8))
    (root / "notes.txt").write_text("not a photo")
    with caplog.at_level(logging.WARNING):
        assert enroll.scan_people(root) == {"alice": [root / "alice" / "0.png"]}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 photos directly in PEOPLE_DIR" in warnings[0] and "bob.jpg" in warnings[0] and \
        "one folder per person" in warnings[0]
    caplog.clear()
    (root / "alice" / "0.png").unlink()
    (root / "alice").rmdir()
    with pytest.raises(SourceError, match=r"holds no person folders \(2 photos lie in it loose, e.g. bob.jpg\)"):
        enroll.scan_people(root)


@pytest.mark.parametrize("first, second", [("alice", "Alice"), ("Jos\u00e9", "Jose\u0301"),  # NFC / NFD
                                           ("JOSE\u0301", "jos\u00e9")])
def test_person_folders_named_alike_are_refused_naming_both(first, second, tmp_path, embedder, capsys):
    """Two folders whose names differ only in case or Unicode normalisation would be two
    identities labelled alike (they were enrolled as two); refused before any work, nothing
    written."""
    root = tmp_path / "people"
    for name in (first, second):
        (root / name).mkdir(parents=True)
        cv2.imwrite(str(root / name / "0.png"), np.zeros((8, 8, 3), np.uint8))
    if len(list(root.iterdir())) < 2:
        pytest.skip("this file system folds the two names into one folder")
    out = tmp_path / "g.onnx"
    assert main(["enroll", str(root), "--model", str(embedder[1]), "-o", str(out), "--preset", "arcface"]) == 2
    err = capsys.readouterr().err
    assert "differ only in case or Unicode normalisation" in err and first in err and second in err
    assert len(err.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["people"]


@pytest.mark.parametrize("names", [("Strau\u00df", "Strauss"), ("Stra\u00dfe", "STRASSE")])
def test_distinct_names_that_casefold_alike_are_two_people(names, tmp_path):
    """str.casefold folds "ß" into "ss": Strauß and Strauss were refused as one
    name differing only in case. They are two names; only case and normalisation are compared."""
    root = tmp_path / "people"
    for name in names:
        (root / name).mkdir(parents=True)
        cv2.imwrite(str(root / name / "0.png"), np.zeros((8, 8, 3), np.uint8))
    if len(list(root.iterdir())) < 2:
        pytest.skip("this file system folds the two names into one folder")
    assert sorted(enroll.scan_people(root)) == sorted(names)


def test_a_model_whose_output_is_not_an_embedding(tmp_path):
    from torch import nn

    conv = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU())
    path = to_onnx(conv, tmp_path / "conv.onnx")
    with pytest.raises(ModelError, match=r"embedder .*conv.onnx: output 'embedding' is \[.*4, 48, 48\]; "
                                         r"camface needs an embedding \[N, D\]"):
        gallery.load(path, ARCFACE)


@pytest.mark.parametrize("flag", ["--model", "--embedding-from"])
def test_a_keras_embedder_with_an_op_the_conversion_leaves_unconverted_is_one_line(flag, people, tmp_path, capsys,
                                                                                  caplog):
    """tf2onnx keeps an op it has no handler for (CELU's Expm1) as it is: enroll stopped later
    with an error about the graph, after tf2onnx's own "Unsupported ops" lines. As `camface
    export` does, it now stops with one ModelError naming the op and its Keras layer (and
    tf2onnx's lines show under --debug only), writing nothing."""
    pytest.importorskip("tensorflow")
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="last_conv")(inputs)
    x = keras.layers.Dense(8, activation="celu", name="embed")(keras.layers.GlobalAveragePooling2D()(x))
    if flag == "--embedding-from":  # a classifier whose pooled features have the op
        x = keras.layers.Dense(3, activation="softmax", name="pred")(keras.layers.Dense(8, activation="celu")(x))
    path, out = tmp_path / "m.keras", tmp_path / "g.onnx"
    keras.Model(inputs, x).save(path)
    capsys.readouterr()
    assert main(["enroll", str(people), flag, str(path), "-o", str(out), "--preset", "arcface", "--no-rank"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("camface: error: TensorFlow op Expm1 in layer 'embed' has no ONNX "
                                               "conversion"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras"]
    assert not [r for r in caplog.records if r.name.startswith("tf2onnx") and r.levelno >= logging.WARNING]


def test_a_gallery_whose_dimension_differs_from_the_model(embedder):
    loaded = gallery.load(embedder[1], ARCFACE)
    with pytest.raises(ModelError, match=r"gallery's embeddings are \[3, 8\] but embedder embedder.onnx gives "
                                         r"D = 16"):
        gallery.with_similarity_head(loaded, np.ones((3, 8), np.float32))
    with pytest.raises(ModelError, match="NaN"):
        gallery.with_similarity_head(loaded, np.full((3, 16), np.nan, np.float32))


def test_a_gallery_too_large_for_one_onnx_file_is_refused_with_its_size(embedder, monkeypatch):
    """An ONNX file is one protobuf message of at most 2 GiB (about a million identities at D =
    512): past it, serialising failed with protobuf's own error; now a ModelError says the size.
    The limit is lowered here to the embedder plus 100 rows."""
    loaded = gallery.load(embedder[1], ARCFACE)
    monkeypatch.setattr(gallery, "MAX_GRAPH_BYTES", loaded.model.ByteSize() + 100 * 16 * 4)
    gallery.with_similarity_head(loaded, gallery.normalise(np.ones((100, 16))))
    with pytest.raises(ModelError, match=r"a gallery of 101 identities x D = 16 \(0\.00 GiB\) and embedder "
                                         r"embedder\.onnx make a 0\.00 GiB graph, over ONNX's 2 GiB file limit"):
        gallery.with_similarity_head(loaded, gallery.normalise(np.ones((101, 16))))


def test_embeddings_with_nans_are_refused(people, tmp_path, capsys):
    from torch import nn

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, 1, 1)

        def forward(self, x):
            return torch.sqrt(self.conv(x).mean(dim=(2, 3)) - 100.0)  # negative: NaN

    path = to_onnx(Broken(), tmp_path / "broken.onnx")
    assert main(["enroll", str(people), "--model", str(path), "-o", str(tmp_path / "g.onnx"),
                 "--preset", "arcface"]) == 2
    err = capsys.readouterr().err
    first = people / "cameraman" / "0.png"
    assert f"embedder broken.onnx: 12 of 12 embeddings hold NaN or infinity (first: {first} (cameraman))" in err


def test_the_one_photo_whose_embedding_is_not_finite_is_named_with_its_person(people, tmp_path, capsys):
    """An embedding that is infinite for one photo only (the cameraman's unaugmented photo, the one
    grey crop: log |red - green| is -inf there) names that photo and its person, not a row."""
    from torch import nn

    class GreyIsInfinite(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, 1, 1)

        def forward(self, x):
            colour = torch.log((x[:, 0] - x[:, 1]).abs().mean(dim=(1, 2)))[:, None]
            return self.conv(x).mean(dim=(2, 3)) + colour

    path = to_onnx(GreyIsInfinite(), tmp_path / "grey.onnx")
    assert main(["enroll", str(people), "--model", str(path), "-o", str(tmp_path / "g.onnx"),
                 "--preset", "arcface"]) == 2
    err = capsys.readouterr().err
    first = people / "cameraman" / "0.png"
    assert f"embedder grey.onnx: 1 of 12 embeddings hold NaN or infinity (first: {first} (cameraman))" in err


def test_embedding_from_a_classifier_uses_its_pooled_features(tmp_path, crops):
    from test_onnx_export_models import SmallCNN

    torch.manual_seed(0)
    classifier = SmallCNN(classes=5).eval()
    path = to_onnx(classifier, tmp_path / "classifier.onnx", output="probs")
    loaded = gallery.load(path, ARCFACE, from_classifier=True)
    assert loaded.dim == 12
    x = torch.from_numpy(crops[0][:3].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        pooled = classifier.features(x).mean(dim=(2, 3)).numpy()
    assert np.abs(gallery.embed(loaded, crops[0][:3]) - pooled).max() <= 1e-5



def test_embedding_from_a_vision_transformer_uses_its_class_token_features(tmp_path):
    """A ViT classifier's features are the class token after the last norm, which its linear
    head reads; the first linear layer after its default (token) target is the attention's qkv
    on tokens [N, T, C]. It was refused with the exporter's "pass --target-layer" message."""
    from test_onnx_export_models import SIZE as VIT_SIZE
    from test_onnx_export_models import ViT, legacy_onnx

    torch.manual_seed(0)
    classifier = ViT(True).eval()
    loaded = gallery.load(legacy_onnx(classifier, tmp_path / "vit.onnx"), ExportOptions(preset="unit"),
                          from_classifier=True)
    assert loaded.dim == 16
    images = np.random.default_rng(0).integers(0, 256, (3, VIT_SIZE, VIT_SIZE, 3), dtype=np.uint8)
    x = torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    with torch.no_grad():
        tokens = classifier.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([classifier.class_token.expand(3, -1, -1), tokens], 1) + classifier.pos
        features = classifier.norm(classifier.blocks(tokens))[:, 0].numpy()
    assert np.abs(gallery.embed(loaded, images) - features).max() <= 1e-4 * np.abs(features).max()

# ---------------------------------------------------------------- front ends

def test_live_names_the_faces_and_draws_the_maps(enrolled, tmp_path):
    from realtime_helpers import count_frames, write_clip

    faces = faces_bgr()
    clip = write_clip(tmp_path / "clip.mp4", [faces["hopper"][:512, :512], faces["collins"]] * 3)
    out = tmp_path / "live.mp4"
    assert main(["live", "--model", str(enrolled), "--source", str(clip), "--no-show", "--record", str(out),
                 "--snapshot-every", "1", "--snapshot-dir", str(tmp_path / "snaps"), "--detect-every", "1",
                 "--method", "gradcam"]) == 0
    assert count_frames(out) == 6
    named = {}
    for snap in sorted((tmp_path / "snaps").iterdir()):
        meta = json.loads((snap / "snapshot.json").read_text())
        named[meta["frame_index"]] = [(f["predicted_label"], len(f["similarity"])) for f in meta["faces"]]
    assert named[0] == [("hopper", 3)] and named[1] == [("collins", 3)]
    # the maps are drawn: inside the face box the recording departs from the clip by far more
    # (measured ~60 levels) than mp4v's compression does outside it (~4)
    meta = json.loads((tmp_path / "snaps" / "frame_000001" / "snapshot.json").read_text())
    x, y, w, h = meta["faces"][0]["box"]
    capture = cv2.VideoCapture(str(out))
    capture.read()
    _, drawn = capture.read()
    source = faces["collins"].astype(np.int16)
    inside = np.abs(drawn[y + 20:y + h - 5, x + 5:x + w - 5].astype(np.int16) - source[y + 20:y + h - 5, x + 5:x + w - 5])
    outside = np.abs(drawn[400:, 400:].astype(np.int16) - source[400:, 400:])
    assert inside.mean() > 25 and outside.mean() < 10, (inside.mean(), outside.mean())


# ---------------------------------------------------------------- camface compare

def test_compare_explains_each_face_s_similarity_to_the_other(people, embedder, tmp_path, capsys):
    from camface.export import compare

    model, path = embedder
    a, b = people / "collins" / "0.png", people / "collins" / "1.png"
    result = compare.compare(a, b, path, ARCFACE)
    x = torch.from_numpy(result.crops.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        e = model(x).numpy()
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    assert result.similarity == pytest.approx(float(u[0] @ u[1]), abs=1e-5)
    # map of A: d cos(u_A, u_B) / dA_A with B's embedding held as the gallery row (and B's likewise)
    _, grad, activations = _torch_similarity(model, result.crops, u[::-1].copy(), np.array([0, 1], np.int64))
    _maps_agree(result.maps, methods.get("gradcam").reference(activations, grad, None), "gradcam")
    figure = tmp_path / "compare.png"
    assert main(["compare", str(a), str(people / "hopper" / "0.png"), "--model", str(path), "--preset", "arcface",
                 "-o", str(figure), "--threshold", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "cosine similarity collins/0.png - hopper/0.png: " in out and "(different people at threshold 0.4)" in out
    assert figure.stat().st_size > 5000
    assert main(["compare", str(a), str(people / "collins" / "cat.png"), "--model", str(path),
                 "--preset", "arcface"]) == 2
    assert "cat.png: no face found; compare needs one face per photo" in capsys.readouterr().err
    assert main(["compare", str(a), str(a), "--model", str(path), "--preset", "arcface", "--threshold", "5"]) == 2
    assert "--threshold is a cosine similarity in [-1, 1], got 5.0" in capsys.readouterr().err
    assert compare._names(Path("a.jpg"), Path("a.jpg")) == ("a.jpg", "a.jpg")
    assert compare._names(Path("x/a.jpg"), Path("y/a.jpg")) == ("x/a.jpg", "y/a.jpg")


def test_compare_of_a_photo_with_itself_explains_the_projection_not_rounding_noise(people, embedder, tmp_path,
                                                                                   capsys):
    """The same photo twice: cosine 1, whose gradient vanishes, so a map of it is rounding noise
    (B's embedding moved by two ulps gave another normalised map, max difference 1.0). compare
    explains the projection e_A . u_B there: torch autograd's map, and the same map (within 1e-3
    of its maximum; measured 4e-7) when B's embedding moves by two ulps, on any CPU."""
    from camface.export import compare

    model, path = embedder
    a = people / "collins" / "0.png"
    result = compare.compare(a, a, path, ARCFACE)
    assert result.similarity == pytest.approx(1.0, abs=1e-6) and result.target == compare.PROJECTION
    x = torch.from_numpy(result.crops.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        e = model(x).numpy()
    rows = gallery.normalise(e)
    # d (e_A . u_B) / dA_A by autograd
    feats = model.features(x).detach().requires_grad_(True)
    projection = (model.fc(feats.mean(dim=(2, 3))) - model.centre) * torch.from_numpy(rows[::-1].copy())
    projection.sum().backward()
    nhwc = (lambda t: t.detach().permute(0, 2, 3, 1).numpy())
    _maps_agree(result.maps, methods.get("gradcam").reference(nhwc(feats), nhwc(feats.grad), None), "gradcam")
    embedder_ = gallery.load(path, ARCFACE)
    rng = np.random.default_rng(0)
    moved = (rows * (1 + rng.choice((-1.0, 1.0), rows.shape) * 2.0 ** -22)).astype(np.float32)
    again = compare.explain(embedder_, ARCFACE, result.crops, moved, "gradcam", result.target)
    for n in range(2):
        shown, moved_map = (methods.normalize(m[n], "gradcam") for m in (result.maps, again))
        assert np.abs(shown - moved_map).max() <= 1e-3
    assert main(["compare", str(a), str(a), "--model", str(path), "--preset", "arcface", "-o",
                 str(tmp_path / "same.png")]) == 0
    out = capsys.readouterr().out
    assert "cosine similarity collins/0.png - collins/0.png: 1.000" in out and "the similarity is saturated" in out
    different = compare.compare(a, people / "hopper" / "0.png", path, ARCFACE)
    assert different.target == compare.COSINE and different.note == ""


def test_a_face_that_is_an_enrolled_photo_gets_the_projection_map_not_rounding_noise(embedder, crops):
    """One photo per person enrolled, and that photo shown (batch / live over the enrolment
    photos): its similarity saturates (1 - cos < 1e-4), whose gradient vanishes, so a map of it
    was rounding noise (two ulps on the gallery rows gave another normalised map). The gallery
    graph explains the projection e . g there, in the same call: torch autograd's map of it, the
    same map (within 1e-3 of its maximum) with the rows moved by two ulps, on any CPU, and the
    similarity values unchanged. Other faces (another photo of the person, an unenrolled person)
    still get the cosine's map."""
    from camface.realtime.explainer import frame_result

    model, path = embedder
    found, targets = crops
    collins, hopper, cameraman = (int(np.flatnonzero(targets == k)[0]) for k in (1, 2, 0))
    other_collins = int(np.flatnonzero(targets == 1)[1])
    embedder_ = gallery.load(path, ARCFACE)
    rows = gallery.normalise(gallery.embed(embedder_, found[[collins, hopper]]))
    images = found[[collins, other_collins, cameraman]]
    classes = np.full(3, -1, np.int64)
    graph, info, _ = gallery.build(embedder_, rows, ("collins", "hopper"), ARCFACE, {})
    assert info.saturated_below == gallery.SATURATED
    got = _run(graph, images, classes)
    sim, grad, activations = _torch_similarity(model, images, rows, classes)
    assert np.abs(got["similarity"] - sim).max() <= 1e-5
    assert 1 - got["similarity"][0, 0] < gallery.SATURATED and (1 - got["similarity"][1:].max(1) > 1e-3).all()
    # the enrolled photo: d (e . g_collins) / dA by autograd
    x = torch.from_numpy(images[:1].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    feats = model.features(x).detach().requires_grad_(True)
    ((model.fc(feats.mean(dim=(2, 3))) - model.centre) @ torch.from_numpy(rows[0])).sum().backward()
    nhwc = (lambda t: t.detach().permute(0, 2, 3, 1).numpy())
    _maps_agree(got["gradcam"][:1], methods.get("gradcam").reference(nhwc(feats), nhwc(feats.grad), None), "gradcam")
    # the other faces: the cosine's map, as before
    _maps_agree(got["gradcam"][1:], methods.get("gradcam").reference(activations[1:], grad[1:], None), "gradcam")
    rng = np.random.default_rng(0)
    moved = (rows * (1 + rng.choice((-1.0, 1.0), rows.shape) * 2.0 ** -22)).astype(np.float32)
    again = _run(gallery.build(embedder_, moved, ("collins", "hopper"), ARCFACE, {})[0], images, classes)
    shown, moved_map = (methods.normalize(m[0], "gradcam") for m in (got["gradcam"], again["gradcam"]))
    assert np.abs(shown - moved_map).max() <= 1e-3
    # the result says which faces' maps explain the projection, and the caption shows it
    result = frame_result(0, tuple(_faces(3)), got["probs"], got["gradcam"], classes, 0, "gradcam", None,
                          ("collins", "hopper"), "", similarity=got["similarity"],
                          saturated_below=info.saturated_below)
    assert [p.saturated for p in result.predictions] == [True, False, False]
    # a gallery enrolled before the switch (no saturated_below in its metadata) explains the
    # cosine even there: its captions must not claim the projection
    older = frame_result(0, tuple(_faces(3)), got["probs"], got["gradcam"], classes, 0, "gradcam", None,
                         ("collins", "hopper"), "", similarity=got["similarity"], saturated_below=None)
    assert not any(p.saturated for p in older.predictions)
    assert "projection" not in older.predictions[0].caption(("collins", "hopper"))
    assert Prediction.from_dict(result.predictions[0].to_dict()) == result.predictions[0]
    assert result.predictions[0].caption(("collins", "hopper")).endswith("(map: projection)")
    assert "projection" not in result.predictions[1].caption(("collins", "hopper"))
    from camface.serve.protocol import result_message

    sent = result_message(0, result, {}, 0, 1, False)["faces"]
    assert [face.get("saturated", False) for face in sent] == [True, False, False]
    assert [face.get("saturated", False) for face in result.to_dict()["faces"]] == [True, False, False]


def _faces(n: int):
    from camface.realtime.results import Face

    return [Face(box=(10 * i, 0, 8, 8), score=0.9, crop_box=(10 * i, 0, 8, 8), track_id=i) for i in range(n)]


def test_evaluate_scores_the_similarity_of_a_gallery_graph(enrolled, crops):
    from camface.evaluate.scores import Scorer
    from camface.realtime.graph import CamGraph

    graph = CamGraph(enrolled, "cpu")
    scorer = Scorer(graph, steps=4, device="cpu", threads=1)
    predicted, full, scores = scorer.score(crops[0][:3], ["gradcam", "random"])
    _, _, similarity = graph.run_scores(crops[0][:3], np.full(3, -1, np.int64), "gradcam")
    assert list(predicted) == list(crops[1][:3])
    assert np.abs(full - similarity.max(1)).max() <= 1e-6  # the curves start at the similarity
    assert scores[0].deletion_curve[0] == pytest.approx(float(full.mean()), abs=1e-6)
    # the report, its table and the plot's y-axis say what was scored
    from camface.evaluate import plot
    from camface.evaluate.report import format_table, to_json

    report = to_json(scores, predicted, full, graph, source="crops", frames=0, every=1, steps=4, baseline="blur",
                     seconds={"crops": 0.0, "scores": 0.0})
    assert report["settings"]["scored"] == "cosine similarity to the explained identity"
    assert "curves and drops score the cosine similarity to the explained identity" in format_table(report)
    figures = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plot, "_save", lambda figure, path, dpi: figures.append(figure) or path)
        plot.plot_curves(report, Path("unused.png"))
    assert figures[0].axes[0].get_ylabel() == "cosine similarity to the explained identity"


def test_serve_messages_and_batch_rows_carry_the_similarities_and_the_unknown_label():
    from camface.realtime.explainer import frame_result
    from camface.realtime.results import Face, FrameResult

    faces = (Face((0, 0, 10, 10), 0.9), Face((20, 0, 10, 10), 0.8))
    similarity = np.array([[0.8, 0.1], [0.2, 0.31]], np.float32)
    probs = np.exp(30 * similarity) / np.exp(30 * similarity).sum(1, keepdims=True)
    result = frame_result(3, faces, probs, np.zeros((2, 2, 2), np.float32), np.array([-1, -1]), 0, "gradcam",
                          None, ("alice", "bob"), "cpu", similarity=similarity, threshold=0.4)
    message = result.to_dict()  # what `camface serve` sends
    assert [f["predicted_label"] for f in message["faces"]] == ["alice", "unknown (best: bob 0.31)"]
    assert message["faces"][1]["similarity"] == pytest.approx([0.2, 0.31]) and message["threshold"] == 0.4
    assert FrameResult.from_dict(message).to_dict() == message
    page = result._repr_html_()  # Jupyter
    assert "face 0: alice<br>" in page and "face 1: unknown (best: bob 0.31)<br>" in page
    from camface.serve.protocol import result_message

    sent = result_message(1, result, {}, 0, 1, False)  # what `camface serve` sends with each frame
    assert [f["predicted_label"] for f in sent["faces"]] == ["alice", "unknown (best: bob 0.31)"]
    assert sent["faces"][1]["similarity"] == pytest.approx([0.2, 0.31])
    pytest.importorskip("pyarrow")
    from camface.batch.rows import build_rows

    rows = build_rows("v", "v.mp4", 30.0, [result]).to_pydict()
    assert rows["predicted_label"] == ["alice", "unknown (best: bob 0.31)"]
    assert rows["similarity"][1] == pytest.approx([0.2, 0.31])


def test_serve_s_shared_graph_call_names_the_face_as_live_does(enrolled):
    """`explain_many` (serve's one call for every client's frame) on a gallery graph gives each
    result the similarities and the threshold that `FrameExplainer.explain` (live) gives."""
    from camface.realtime.controls import Controls
    from camface.realtime.explainer import FrameExplainer, explain_many
    from camface.realtime.graph import CamGraph
    from camface.realtime.results import Face

    graph = CamGraph(enrolled, "cpu")
    frame, faces = faces_bgr()["collins"], (Face((177, 82, 95, 95), 0.9),)  # conftest: where the face is
    many = explain_many([(FrameExplainer(graph), frame, faces, Controls("gradcam"), 0, 30.0, {})])[0].result
    one = FrameExplainer(graph).explain(frame, faces, Controls("gradcam")).result
    assert many.threshold == one.threshold == graph.info.threshold is not None
    assert many.predictions[0].similarity.shape == (3,)  # the three identities
    np.testing.assert_allclose(many.predictions[0].similarity, one.predictions[0].similarity, atol=1e-6)
    assert many.to_dict()["faces"][0]["predicted_label"] == one.to_dict()["faces"][0]["predicted_label"] == "collins"


def test_embedding_from_an_all_convolutional_classifier_pools_the_last_features():
    pytest.importorskip("tensorflow")
    from camface.models import EMOTION_KERAS

    loaded = gallery.load(EMOTION_KERAS, ExportOptions(preset="emotion"), from_classifier=True)
    assert loaded.dim == 128 and loaded.channels == 1  # GAP of add_3 (128 channels), not the 7 class maps
    e = gallery.embed(loaded, np.random.default_rng(0).integers(0, 256, (2, 64, 64, 1), dtype=np.uint8))
    assert e.shape == (2, 128) and np.isfinite(e).all()


def test_a_pt2_embedder_enrols_as_its_onnx_export_does(people, embedder, tmp_path, capsys):
    from onnx_helpers import save_program

    model, onnx_path = embedder
    program = save_program(model, tmp_path / "embedder.pt2", size=SIZE)
    for path, out in ((program, tmp_path / "pt2.onnx"), (onnx_path, tmp_path / "onnx.onnx")):
        assert main(["enroll", str(people), "--model", str(path), "-o", str(out), "--preset", "arcface",
                     "--no-rank"]) == 0
    a, b = np.load(tmp_path / "pt2.npz"), np.load(tmp_path / "onnx.npz")
    assert np.abs(a["embeddings"] - b["embeddings"]).max() <= 1e-5


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_an_embedder_of_dynamic_height_and_width_takes_the_input_size_its_error_names(
        suffix, people, embedder, tmp_path, capsys):
    """An embedder saved with a dynamic height and width is refused with "pass ... --input-size HxW";
    enroll and compare had no such flag (argparse refused it). They take it now, and its gallery
    equals that of the same embedder saved at the size."""
    import warnings

    model, onnx_path = embedder
    path = tmp_path / f"dynamic{suffix}"
    if suffix == ".pt2":
        sides = {0: torch.export.Dim("batch", min=1, max=32), 2: torch.export.Dim("height", min=16, max=256),
                 3: torch.export.Dim("width", min=16, max=256)}
        torch.export.save(torch.export.export(model, (torch.zeros(2, 3, SIZE, SIZE),), dynamic_shapes=(sides,)),
                          str(path))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["embedding"],
                              dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "embedding": {0: "N"}})
    enrol = ["enroll", str(people), "--model", str(path), "-o", str(tmp_path / "g.onnx"), "--preset", "arcface",
             "--no-rank", "--no-detect"]
    assert main(enrol) == 2
    assert "--input-size HxW" in capsys.readouterr().err
    assert main([*enrol, "--input-size", f"{SIZE}x{SIZE}"]) == 0
    assert main(["enroll", str(people), "--model", str(onnx_path), "-o", str(tmp_path / "fixed.onnx"),
                 "--preset", "arcface", "--no-rank", "--no-detect"]) == 0
    got, want = np.load(tmp_path / "g.npz"), np.load(tmp_path / "fixed.npz")
    assert np.abs(got["embeddings"] - want["embeddings"]).max() <= 1e-5
    a, b = people / "collins" / "0.png", people / "hopper" / "0.png"
    assert main(["compare", str(a), str(b), "--model", str(path), "--preset", "arcface", "--no-detect",
                 "--input-size", f"{SIZE}x{SIZE}"]) == 0
    assert "cosine similarity collins/0.png - hopper/0.png: " in capsys.readouterr().out


def test_a_transformer_embedder_whose_grid_camface_cannot_find_takes_the_token_grid_its_error_names(
        people, tmp_path, capsys):
    """A transformer embedder of 8x12 patches (4x4 of them on a 32x48 input, embedded by a linear
    layer: no patch-embedding map, and no square patches tile the input) is refused with "pass
    --token-grid HxW and --prefix-tokens N"; enroll and compare had neither flag. They take them
    now, and the gallery graph's maps lie on that grid."""
    from test_onnx_export_models import TransformerBlock
    from torch import nn

    from camface.graph_spec import GraphInfo

    class WidePatches(nn.Module):
        def __init__(self, dim=16):
            super().__init__()
            self.embed, self.pos = nn.Linear(3 * 8 * 12, dim), nn.Parameter(torch.randn(1, 16, dim))
            self.blocks, self.fc = nn.Sequential(TransformerBlock(dim, 2)), nn.Linear(dim, 8)

        def forward(self, x):
            n = x.shape[0]
            x = x.reshape(n, 3, 4, 8, 4, 12).permute(0, 2, 4, 1, 3, 5).reshape(n, 16, 3 * 8 * 12)
            return self.fc(self.blocks(self.embed(x) + self.pos).mean(1))

    torch.manual_seed(0)
    path = to_onnx(WidePatches().eval(), tmp_path / "wide.onnx", size=(32, 48))
    out = tmp_path / "g.onnx"
    enrol = ["enroll", str(people), "--model", str(path), "-o", str(out), "--preset", "arcface", "--no-rank",
             "--no-detect"]
    assert main(enrol) == 2
    assert "pass --token-grid HxW and --prefix-tokens N" in capsys.readouterr().err
    assert main([*enrol, "--token-grid", "4x4", "--prefix-tokens", "0"]) == 0
    import onnx

    info = GraphInfo.from_metadata({p.key: p.value for p in onnx.load(out).metadata_props})
    assert info.token_grid == {"prefix": 0, "height": 4, "width": 4} and info.feature_size == (4, 4)
    a, b = people / "collins" / "0.png", people / "hopper" / "0.png"
    assert main(["compare", str(a), str(b), "--model", str(path), "--preset", "arcface", "--no-detect",
                 "--token-grid", "4x4"]) == 0


@pytest.mark.parametrize("flag, chosen, dim", [("--model", "embedding", 4), ("--embedding-from", "logits", 6)])
def test_a_model_returning_several_outputs_takes_the_model_output_to_use(flag, chosen, dim, people, tmp_path,
                                                                          capsys):
    """A program returning {"embedding": ..., "logits": ...} (as many face models do) was refused
    by enroll with no way to pick one (--model), or told to pass --class-output, a flag enroll did
    not have (--embedding-from). --model-output names the one to use: the embedding, or the
    classifier's class scores whose pooled features (6 channels) become the embedding."""
    from onnx_helpers import save_program
    from torch import nn

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.embed = nn.Conv2d(3, 6, 3, 2, 1), nn.Linear(6, 5), nn.Linear(6, 4)

        def forward(self, x):
            pooled = torch.relu(self.conv(x)).mean((2, 3))
            return {"embedding": self.embed(pooled), "logits": self.fc(pooled)}

    torch.manual_seed(0)
    path = save_program(TwoOutputs().eval(), tmp_path / "two.pt2", size=SIZE)
    out = tmp_path / "g.onnx"
    enrol = ["enroll", str(people), flag, str(path), "-o", str(out), "--preset", "arcface", "--no-rank",
             "--no-detect"]
    assert main(enrol) == 2
    err = capsys.readouterr().err
    assert "['embedding', 'logits']" in err and "with --model-output NAME" in err and "--class-output" not in err
    assert main([*enrol, "--model-output", "nothing"]) == 2
    assert "--model-output 'nothing': no output of that name" in capsys.readouterr().err
    assert main([*enrol, "--model-output", chosen]) == 0
    assert np.load(tmp_path / "g.npz")["embeddings"].shape == (3, dim)
    a, b = people / "collins" / "0.png", people / "hopper" / "0.png"
    assert main(["compare", str(a), str(b), flag, str(path), "--preset", "arcface", "--no-detect",
                 "--model-output", chosen]) == 0


def test_the_contract_requires_similarity_of_a_gallery_graph():
    info = graph_spec.GraphInfo(labels=("a", "b"), input_size=(8, 8), color_order="RGB", target_layer="t",
                                heatmaps=("gradcam",), gallery={"scale": 30.0, "threshold": 0.4})
    outputs = {"probs": ["N", 2], "activations": ["N", 2, 2, 4], "gradcam": ["N", 2, 2], "gradcampp": ["N", 2, 2]}
    meta = info.to_metadata()
    assert graph_spec.GraphInfo.from_metadata(meta).threshold == 0.4
    with pytest.raises(ModelError, match="g.onnx: its metadata describes a gallery but it has no 'similarity' output"):
        graph_spec.validate("g.onnx", ["image", "class_index"], outputs, meta)
    assert graph_spec.validate("g.onnx", ["image", "class_index"], {**outputs, "similarity": ["N", 2]},
                               meta).gallery["scale"] == 30.0


def test_an_embedder_without_a_preset_is_refused_naming_the_recognition_presets(people, embedder, tmp_path,
                                                                                  capsys):
    assert main(["enroll", str(people), "--model", str(embedder[1]), "-o", str(tmp_path / "g.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"embedder {embedder[1]} does not say how it normalises its input" in err
    assert "arcface = RGB (x-127.5)/127.5" in err
    assert "facenet = RGB (x-127.5)/128" in err and not (tmp_path / "g.onnx").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--threshold", "31", "--threshold is a cosine similarity in [-1, 1], got 31.0"),
    ("--threshold", "nan", "--threshold is a cosine similarity in [-1, 1], got nan"),
    ("--softmax-scale", "nan", "--softmax-scale must be in [0.01, 1000], got nan"),  # was written as NaN
    ("--softmax-scale", "inf", "--softmax-scale must be in [0.01, 1000], got inf"),
    ("--softmax-scale", "0", "--softmax-scale must be in [0.01, 1000], got 0"),
    ("--softmax-scale", "-30", "--softmax-scale must be in [0.01, 1000], got -30"),
    # finite, but infinity in the float32 graph (probs NaN), or every face one identity's at 100%
    ("--softmax-scale", "1e300", "--softmax-scale must be in [0.01, 1000], got 1e+300"),
    ("--softmax-scale", "1000.5", "--softmax-scale must be in [0.01, 1000], got 1000.5"),
    ("--softmax-scale", "1e-50", "--softmax-scale must be in [0.01, 1000], got 1e-50"),  # 0 in float32
])
def test_a_threshold_outside_minus_one_to_one_or_a_scale_not_positive_is_refused(
        flag, value, message, people, embedder, tmp_path, capsys):
    assert main(["enroll", str(people), "--model", str(embedder[1]), "-o", str(tmp_path / "g.onnx"),
                 "--preset", "arcface", flag, value]) == 2
    assert message in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_outputs_that_would_destroy_a_file_or_fail_late_are_refused_first(people, embedder, tmp_path, capsys):
    """enroll -o must be an .onnx name (X.npz would be overwritten by the gallery written beside
    it) and not the embedder itself; compare -o must be a format matplotlib writes, checked
    before the photos are embedded. Nothing is written."""
    model = tmp_path / "embedder.onnx"
    model.write_bytes(embedder[1].read_bytes())
    a, b = people / "collins" / "0.png", people / "hopper" / "0.png"
    for argv, message in [
        (["enroll", str(people), "--model", str(model), "-o", str(tmp_path / "g.npz"), "--preset", "arcface"],
         "a CAM graph is an .onnx file"),
        (["enroll", str(people), "--model", str(model), "-o", str(model), "--preset", "arcface"],
         "is an input"),
        (["compare", str(a), str(b), "--model", str(model), "--preset", "arcface", "-o", str(tmp_path / "c.txt")],
         f"-o {tmp_path / 'c.txt'}: a figure is one of"),
        (["compare", str(a), str(b), "--model", str(model), "--preset", "arcface", "-o",
          str(tmp_path / "no" / "c.png")], "folder"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert model.read_bytes() == embedder[1].read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == [
        "embedder.onnx"]


@pytest.mark.parametrize("which", [0, 1])
def test_compare_refuses_a_figure_written_over_one_of_its_photos(which, people, embedder, tmp_path, capsys):
    """compare -o A.png (one of the photos compared) would replace the photo with the figure:
    refused before any work, naming it, and the photo is left as it was."""
    photos = [tmp_path / "a.png", tmp_path / "b.png"]
    for photo, source in zip(photos, (people / "collins" / "0.png", people / "hopper" / "0.png")):
        photo.write_bytes(source.read_bytes())
    before = photos[which].read_bytes()
    assert main(["compare", *map(str, photos), "--model", str(embedder[1]), "--preset", "arcface",
                 "-o", str(photos[which])]) == 2
    err = capsys.readouterr().err
    assert f"-o {photos[which]} is an input" in err and "Traceback" not in err, err
    assert photos[which].read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_compare_with_a_gallery_graph_points_to_the_embedder(enrolled, people, tmp_path, capsys):
    """compare --model GALLERY.onnx said to "export the classifier it was made from": a gallery
    is enrolled from an embedder, the model compare takes."""
    photos = [people / "collins" / "0.png", people / "hopper" / "0.png"]
    assert main(["compare", *map(str, photos), "--model", str(enrolled), "--preset", "arcface",
                 "-o", str(tmp_path / "fig.png")]) == 2
    err = capsys.readouterr().err
    assert f"{enrolled} is a CAM graph already (made by camface enroll" in err, err
    assert "give the face embedder it was enrolled from" in err and "classifier" not in err, err


@pytest.mark.parametrize("method, offered", [("random", False), ("gradcam", True), ("eigencam", True)])
def test_compare_offers_the_displayed_methods_not_the_random_baseline(method, offered):
    """compare --method random drew the random baseline's noise titled "random: why similar to B",
    as if it explained the match; like live's --method, compare offers the methods shown, not the
    baseline (which `camface evaluate` scores the others against)."""
    from camface.cli import build_parser

    argv = ["compare", "a.png", "b.png", "--model", "m.onnx", "--method", method]
    if offered:
        assert build_parser().parse_args(argv).method == method
    else:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 2


def test_an_undefined_average_drop_is_recorded_as_null_never_nan(monkeypatch):
    """A gallery graph whose ranking crops all score <= 0 (every face unknown, e.g. a random
    embedder) has no Average Drop (metrics.average_drop: NaN). The ranking recorded in the
    graph's metadata holds null there (strict JSON), ranks it last, and prints n/a; metadata that
    would hold NaN anyway is refused, not written."""
    from types import SimpleNamespace

    from camface.evaluate import scores as scores_module
    from camface.evaluate.report import METRICS, rank
    from camface.evaluate.scores import MethodScores
    from camface.export import ranking

    names = ("gradcam", "layercam", "random")
    deletion = {"gradcam": 0.2, "layercam": 0.1, "random": 0.3}

    class FakeScorer:
        def __init__(self, *args, **kwargs):
            pass

        def score(self, crops, methods_):
            return None, None, [MethodScores(m, deletion[m], 0.5, float("nan"), 10.0, (), (), 1.0) for m in methods_]

    monkeypatch.setattr(scores_module, "Scorer", FakeScorer)
    graph = SimpleNamespace(info=SimpleNamespace(heatmaps=names[:2]), provider="cpu")
    crops = np.zeros((ranking.MIN_CROPS, 8, 8, 3), np.uint8)
    ranked = ranking.rank_crops(graph, crops, {"source": "people/"}, seconds=0)
    assert ranked["ranking"] == ["layercam", "gradcam"]  # by deletion AUC, the NaN aside
    assert all(s["average_drop_pct"] is None for s in ranked["scores"].values())
    info = graph_spec.GraphInfo(labels=("a", "b"), input_size=(8, 8), color_order="RGB", target_layer="t",
                                heatmaps=("gradcam",), ranking=ranked, gallery={"scale": 30.0, "threshold": 0.3})

    def strict(constant):
        raise AssertionError(f"metadata holds {constant}")

    text = info.to_metadata()[graph_spec.META_RANKING]
    assert json.loads(text, parse_constant=strict) == ranked
    assert graph_spec.GraphInfo.from_metadata(info.to_metadata()).ranking == ranked
    lines = ranking.summary_lines(ranked)
    assert all("n/a" in line and "nan" not in line for line in lines if line.startswith(("1", "2", "-")))
    # rank(): an undefined score ranks last whatever its place in the table (NaN compares false)
    table = {m: {key: (float("nan") if m == "gradcam" and key == "average_drop_pct" else 1.0 + i)
                 for key, _, _ in METRICS.values()} for i, m in enumerate(names)}
    assert rank(table)["average_drop"]["gradcam"] == 3
    with pytest.raises(ModelError, match="holds NaN or infinity"):
        graph_spec.GraphInfo(labels=("a",), input_size=(8, 8), color_order="RGB", target_layer="t",
                             heatmaps=(), gallery={"scale": float("nan")}).to_metadata()


def test_equal_error_threshold_equals_the_pairwise_count_and_scales_to_a_thousand_people():
    """FRR / FAR counted by binary search equal the pairwise comparison they replace (which held a
    [candidates, genuine] array: 2.5 GB for 100 people x 5 photos, out of memory for 1000); 1000
    people x 5 photos (5 000 genuine, 5 million impostor scores) run in seconds."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        genuine = np.round(rng.normal(0.6, 0.2, rng.integers(1, 40)), 2)  # ties on purpose
        impostor = np.round(rng.normal(0.2, 0.2, rng.integers(1, 60)), 2)
        values = np.unique(np.concatenate([genuine, impostor]))
        candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
        cost = np.maximum((genuine[None] < candidates[:, None]).mean(1), (impostor[None] >= candidates[:, None]).mean(1))
        best = np.flatnonzero(cost == cost.min())
        want = (candidates[best[0]] + candidates[best[-1]]) / 2
        assert threshold.equal_error_threshold(genuine, impostor)[0] == pytest.approx(want, abs=1e-12), trial
    got, rule = threshold.equal_error_threshold(rng.normal(0.6, 0.1, 5_000), rng.normal(0.1, 0.1, 5_000_000))
    assert 0.3 < got < 0.4 and "(5000 genuine, 5000000 impostor)" in rule


def test_leave_one_out_in_chunks_equals_the_photo_by_photo_definition():
    """Chunked and vectorised (impostor scores float32: a list of Python floats took 1 GB for
    2000 people x 5 photos): the same scores and predictions as matching each photo alone."""
    rng = np.random.default_rng(3)
    e = rng.standard_normal((23, 6))
    targets = np.sort(rng.integers(0, 5, 23))
    targets[-1] = 5  # an identity with one photo: impostor scores only
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    genuine, impostor, predicted = [], [], []
    for i, (x, k) in enumerate(zip(u, targets)):
        rows = np.stack([u[targets == j].sum(0) for j in range(6)])
        impostor += [float(x @ (r / np.linalg.norm(r))) for j, r in enumerate(rows) if j != k]
        if (targets == k).sum() < 2:
            predicted.append(-1)
            continue
        rows[k] -= x
        scores = [float(x @ (r / np.linalg.norm(r))) for r in rows]
        genuine.append(scores[k])
        predicted.append(int(np.argmax(scores)))
    loo = threshold.leave_one_out(e, targets, 6, chunk=4)
    np.testing.assert_allclose(loo.genuine, genuine, atol=1e-12)
    np.testing.assert_allclose(loo.impostor, impostor, atol=1e-6)  # float32
    np.testing.assert_array_equal(loo.predicted, predicted)


@pytest.mark.parametrize("stage", ["ranking", "figure"])
def test_a_failure_while_writing_leaves_no_graph_without_its_gallery(stage, people, embedder, tmp_path, monkeypatch):
    """enroll wrote the graph, ranked it, then wrote the gallery, the figure and the report beside
    it: a failure midway (the ranking, the figure) removed the four files, an earlier run's
    complete gallery included. They are now written beside their names and renamed at the end:
    an earlier run's files stay as they were, and nothing of the failed run is left."""
    from camface.export import ranking

    out = tmp_path / "g.onnx"
    earlier = {path: f"earlier {path.name}" for path in (out, *enroll.beside_paths(out).values())}
    for path, text in earlier.items():
        path.write_text(text)

    def fails(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(*((ranking, "rank_crops") if stage == "ranking" else (enroll, "similarity_figure")), fails)
    with pytest.raises(OSError, match="disk full"):
        enroll.enroll(people, embedder[1], out, ARCFACE, rank_seconds=5.0)
    assert {path: path.read_text() for path in tmp_path.iterdir()} == earlier


def _disk_full(named: bool):
    """A writer that fails as on a full disk: naming the file it was given (as open() does) or not
    (as write() does)."""
    import errno

    def write(target, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", *([str(target)] if named else []))
    return write


@pytest.mark.parametrize("breaks, final", [
    (None, None),
    ("graph", "g.onnx"),  # onnx.save_model: convert.save's OutputError named the temporary graph
    ("gallery", "g.npz"),  # np.savez at open(): an OSError naming the temporary gallery
    ("figure", "g.similarity.png"),  # savefig mid-write: evaluate.plot's OutputError
    ("matplotlib", "g.similarity.png"),  # not installed: a warning that the figure is not drawn
])
def test_enroll_names_the_paths_asked_for_never_its_temporary_files(breaks, final, people, embedder, tmp_path,
                                                                    monkeypatch, capsys, caplog):
    """enroll writes its four files beside their names (.g.onnx.1234.partial.onnx, ...) and
    renames them when all are done; its log lines ("CAM graph .g.onnx.1234.partial.onnx on
    CPUExecutionProvider") and errors named those temporary files. They name the paths asked for."""
    import sys

    import onnx
    from matplotlib.figure import Figure

    out = tmp_path / "g.onnx"
    if breaks == "graph":
        monkeypatch.setattr(onnx, "save_model", _disk_full(named=False))
    elif breaks == "gallery":
        monkeypatch.setattr(np, "savez", _disk_full(named=True))
    elif breaks == "figure":
        monkeypatch.setattr(Figure, "savefig", lambda self, target, **kwargs: _disk_full(named=False)(target))
    elif breaks == "matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    caplog.set_level(logging.INFO)
    code = main(["enroll", str(people), "--model", str(embedder[1]), "-o", str(out), "--preset", "arcface",
                 "--rank-seconds", "5"])
    err = capsys.readouterr().err
    said = [r.getMessage() for r in caplog.records] + err.splitlines()
    assert not [line for line in said if ".partial" in line], said
    assert not [line for line in said if "CAM graph" in line], said  # as export: under --debug only
    if breaks in (None, "matplotlib"):
        assert code == 0
    else:
        assert code == 2 and err.strip().splitlines() == [f"camface: error: cannot write {tmp_path / final}: "
                                                          "No space left on device"], err
        assert list(tmp_path.iterdir()) == []
    if breaks == "matplotlib":
        assert f"no matplotlib: {tmp_path / final} not drawn" in said


def test_an_enrolment_replaces_an_earlier_run_s_files_whole(people, embedder, tmp_path, monkeypatch):
    """The four files of a run that succeeds replace the earlier run's; a figure matplotlib could
    not draw leaves no earlier figure beside them."""
    from camface.realtime.graph import CamGraph

    out = tmp_path / "g.onnx"
    for path in (out, *enroll.beside_paths(out).values()):
        path.write_text("earlier")
    monkeypatch.setattr(enroll, "similarity_figure", lambda *args, **kwargs: None)  # draws nothing
    report = enroll.enroll(people, embedder[1], out, ARCFACE)
    files = enroll.beside_paths(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (out, files["npz"], files["report"]))
    # the report lists the files written, not the figure that was not drawn
    assert report["files"] == {"npz": str(files["npz"]), "report": str(files["report"])}
    assert enroll.summary_lines(report)[-1] == f"  gallery {files['npz']}, report {files['report']}, no similarity matrix"
    assert json.loads(files["report"].read_text()) == report and report["graph"] == str(out)
    assert CamGraph(out, "cpu").info.labels == tuple(report["identities"])
    assert list(np.load(files["npz"])["labels"]) == report["identities"]


def test_the_similarity_figure_of_a_large_gallery_samples_its_photos(tmp_path, monkeypatch):
    """3000 photos of 1000 people: the photo-by-photo matrix is drawn for an evenly spaced 2000
    (said in the title; the whole M x M was 1.6 GB at 20 000 photos) and the 1000 names are left
    off the axes; a small gallery keeps every photo and name."""
    from camface.evaluate import plot

    drawn = {}

    def keep(figure, path, dpi=100):
        drawn["axes"] = figure.axes[0]
        return path

    monkeypatch.setattr(plot, "_save", keep)
    rng = np.random.default_rng(0)
    units = gallery.normalise(rng.standard_normal((3000, 8)))
    targets = np.repeat(np.arange(1000), 3)
    enroll.similarity_figure(units, targets, [f"p{k}" for k in range(1000)], tmp_path / "s.png", "title")
    ax = drawn["axes"]
    assert ax.get_images()[0].get_array().shape == (2000, 2000)
    assert ax.get_title() == "title\n2000 of 3000 photos, evenly spaced" and not ax.get_xticklabels()
    enroll.similarity_figure(units[:9], targets[:9], ["a", "b", "c"], tmp_path / "s.png", "small")
    ax = drawn["axes"]
    assert ax.get_images()[0].get_array().shape == (9, 9) and ax.get_title() == "small"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_a_full_disk_while_enrolling_names_the_output_not_its_temporary_file(people, embedder, tmp_path,
                                                                             monkeypatch, capsys):
    """The graph is written beside -o and renamed: a full disk there said 'cannot write
    .g.onnx.1234.partial.onnx'; the error names g.onnx (as before the graph was written beside),
    and the earlier run's files stay."""
    import errno

    import onnx

    out = tmp_path / "g.onnx"
    out.write_text("earlier")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    assert main(["enroll", str(people), "--model", str(embedder[1]), "-o", str(out), "--preset", "arcface",
                 "--no-rank"]) == 2
    err = capsys.readouterr().err
    assert f"camface: error: cannot write {out}: No space left on device" in err, err
    assert ".partial" not in err and "Traceback" not in err
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [("g.onnx", "earlier")]


@pytest.mark.parametrize("debug", [False, True])
def test_enroll_logs_the_graphs_it_ranks_under_debug_only_as_export_does(debug, people, embedder, tmp_path, caplog):
    """The ranking loads the graph several times: enroll said "CAM graph g.onnx on
    CPUExecutionProvider" two or three times where export says it under --debug only."""
    import camface.realtime.graph

    caplog.set_level(logging.DEBUG)
    out = tmp_path / "g.onnx"
    assert main(["enroll", str(people), "--model", str(embedder[1]), "-o", str(out), "--preset", "arcface",
                 "--rank-seconds", "5", *(["--debug"] if debug else [])]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == camface.realtime.graph.log.name]
    shown = [line for line in said if line == f"CAM graph {out.name} on CPUExecutionProvider"]
    assert (len(shown) >= 1) if debug else not shown, said
    assert not [line for line in said if ".partial" in line], said
    assert logging.getLogger(camface.realtime.graph.log.name).level == logging.NOTSET  # as it was


@pytest.mark.parametrize("breaks, final", [
    ("gallery", "g.npz"),  # np.savez: write() on a full disk names no file
    ("report", "g.enroll.json"),  # Path.write_text: the same
])
def test_a_full_disk_naming_no_file_while_enrolling_is_one_line_naming_the_output(
        breaks, final, people, embedder, tmp_path, monkeypatch, capsys):
    """An OSError naming no file in enroll's written-beside block was a raw traceback; it is one
    line naming the output being written, exit 2, and the earlier run's files stay."""
    out = tmp_path / "g.onnx"
    earlier = {path: f"earlier {path.name}" for path in (out, *enroll.beside_paths(out).values())}
    for path, text in earlier.items():
        path.write_text(text)
    if breaks == "gallery":
        monkeypatch.setattr(np, "savez", _disk_full(named=False))
    else:
        write_text = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, *args, **kwargs: _disk_full(named=False)(self)
                            if ".enroll.json" in self.name else write_text(self, *args, **kwargs))
    assert main(["enroll", str(people), "--model", str(embedder[1]), "-o", str(out), "--preset", "arcface",
                 "--no-rank"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"camface: error: cannot write {tmp_path / final}: No space left on device"], err
    assert {path: path.read_text() for path in tmp_path.iterdir()} == earlier


@pytest.mark.parametrize("where, refused", [("collins/g.onnx", True), ("collins/sub/g.onnx", True),
                                            ("g.onnx", False)])
def test_enroll_refuses_a_gallery_whose_figure_would_land_among_a_persons_photos(where, refused, people, embedder,
                                                                                 monkeypatch):
    """-o people/collins/g.onnx wrote g.similarity.png into collins' folder: the next enrolment read
    it as one of his photos (no face: skipped, counted) and wrote over it. Refused before any work;
    PEOPLE_DIR itself is fine (a loose photo there is ignored)."""
    out = people / where
    made = not out.parent.exists()
    out.parent.mkdir(exist_ok=True)
    monkeypatch.setattr(enroll, "scan_people", lambda folder: (_ for _ in ()).throw(RuntimeError("scanned")))
    try:
        with pytest.raises(UsageError if refused else RuntimeError) as raised:
            enroll.enroll(people, embedder[1], out, ARCFACE)
    finally:
        if made:
            out.parent.rmdir()  # the folder is the module's people fixture
    if refused:
        assert f"inside the person folder {people.resolve() / 'collins'}" in str(raised.value)
        assert "g.similarity.png" in str(raised.value)
    assert not out.exists()
