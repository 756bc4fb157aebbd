"""`camface export` of one Keras model writes the same bytes in every process (`make models`
regenerates the bundled graph): tf2onnx's walks in a fixed order (export/tf2onnx_order.py)."""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _mini_xception(path):
    """The bundled emotion model's shape, small: a stem, then two residual blocks of separable
    convolutions, batch norms and a strided max pool beside a strided 1x1 convolution; a
    convolution to 3 classes, global average pooling, softmax. 16x16 gray in."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)

    def block(x, name):
        skip = layers.Conv2D(8, 1, strides=2, padding="same", use_bias=False, name=f"{name}_skip")(x)
        skip = layers.BatchNormalization(name=f"{name}_skip_bn")(skip)
        x = layers.SeparableConv2D(8, 3, padding="same", use_bias=False, name=f"{name}_sep_a")(x)
        x = layers.BatchNormalization(name=f"{name}_bn_a")(x)
        x = layers.Activation("relu", name=f"{name}_relu")(x)
        x = layers.SeparableConv2D(8, 3, padding="same", use_bias=False, name=f"{name}_sep_b")(x)
        x = layers.BatchNormalization(name=f"{name}_bn_b")(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"{name}_pool")(x)
        return layers.Add(name=f"{name}_add")([x, skip])

    inputs = keras.Input((16, 16, 1))
    x = layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    x = block(block(x, "block_a"), "block_b")
    x = layers.Conv2D(3, 3, padding="same", name="classes")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    keras.Model(inputs, layers.Activation("softmax", name="probs")(x)).save(path)
    return path


def test_an_export_is_the_same_bytes_whatever_the_hash_seed(tmp_path):
    """Two processes with other string hashes (PYTHONHASHSEED 1 and 2) wrote graphs that differed
    in tf2onnx's generated names (new_shape__1451 / __1450), in which of two equal constants was
    kept and in their node count (the bundled emotion graph: 985 or 987 nodes); the same now."""
    model = _mini_xception(tmp_path / "mini.keras")
    written = []
    for seed in ("1", "2"):
        output = tmp_path / f"seed{seed}.onnx"
        env = {**os.environ, "PYTHONHASHSEED": seed, "TF_CPP_MIN_LOG_LEVEL": "3"}
        run = subprocess.run([sys.executable, "-m", "camface", "export", str(model), "-o", str(output),
                              "--preset", "emotion", "--target-layer", "block_a_add", "--no-rank", "--no-verify"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        written.append(output.read_bytes())
    if written[0] != written[1]:
        import onnx

        graphs = [onnx.load_from_string(data) for data in written]
        names = [[node.name for node in graph.graph.node] for graph in graphs]
        first = next((i for i, (a, b) in enumerate(zip(*names)) if a != b), min(map(len, names)))
        raise AssertionError(f"the graphs differ: {len(names[0])} and {len(names[1])} nodes, node {first} "
                             f"{names[0][first:first + 1]} vs {names[1][first:first + 1]}")


def test_tf2onnx_is_as_it_was_after_the_conversion():
    from tf2onnx.graph import Graph

    from camface.export.tf2onnx_order import fixed_order

    before = Graph.find_output_consumers, Graph.extract_sub_graph_nodes
    with fixed_order():
        assert (Graph.find_output_consumers, Graph.extract_sub_graph_nodes) != before
    assert (Graph.find_output_consumers, Graph.extract_sub_graph_nodes) == before


def test_a_detector_conversion_is_the_same_bytes_whatever_the_hash_seed(tmp_path, monkeypatch):
    """`make detectors` ran tf2onnx's command line outside fixed_order: the short-range BlazeFace
    graph converted under PYTHONHASHSEED 1 and 2 named its folded constants const_fold_opt__323 or
    __320 (the same 95 nodes); the same bytes now. The hash seed reaches tf2onnx's own process."""
    from camface.export.detectors import convert

    written = []
    for seed in ("1", "2"):
        monkeypatch.setenv("PYTHONHASHSEED", seed)
        written.append(convert("short", tmp_path / f"seed{seed}").read_bytes())
    if written[0] != written[1]:
        import onnx

        names = [sorted(tensor.name for tensor in onnx.load_from_string(data).graph.initializer) for data in written]
        raise AssertionError(f"the graphs differ: constants only in the first {sorted(set(names[0]) - set(names[1]))[:3]}, "
                             f"only in the second {sorted(set(names[1]) - set(names[0]))[:3]}")
