"""Shared fixtures: real face images that packages ship, written to tmp_path when needed."""

import os

# TensorFlow reads this once, when it loads, and eager convolution gradients crash in oneDNN on
# this CPU (export/keras_baseline.py). Set here, before any test file is collected: a file that
# imports TensorFlow when collected (test_onnx_engines' importorskip) loaded it with oneDNN on
# before test_bench set the variable, when collected after it (`pytest tests/test_onnx_engines.py
# tests/test_bench.py`), and the Keras baseline's test was a segfault.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import signal  # noqa: E402

# The suite runs as from a terminal, whatever started it: a background job of a non-interactive
# shell (`make test &`, a CI runner) starts with SIGINT ignored, which the live loop keeps
# ignored on purpose (a `nohup` run is not stopped by it), so a test that raises SIGINT in this
# process to stop a run saw it run to the end. Subprocesses inherit the default as well.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def astronaut_bgr() -> np.ndarray:
    """scikit-image's public-domain astronaut photo (512x512), uint8 BGR.

    MediaPipe finds one face at about x=177, y=82, w=95, h=95 (pixels)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray for the whole session, shared by the batch test files: a two-node
    `ray.cluster_utils.Cluster` on this machine, the head with 2 CPUs and a second node with no
    CPU and one (advertised) GPU, so the graph actors that ask for a GPU land there; ONNX
    Runtime runs them on CPU (`--device cpu`)."""
    pytest.importorskip("ray")
    import logging

    import ray
    from ray.cluster_utils import Cluster

    MIB = 1024 * 1024

    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, object_store_memory=200 * MIB,
                                                                include_dashboard=False))
    gpu_node = cluster.add_node(num_cpus=0, num_gpus=1, object_store_memory=100 * MIB)
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
    head_id = next(n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU", 0) == 0)
    yield {"head": head_id, "gpu": gpu_node.node_id, "address": cluster.address}
    ray.shutdown()
    cluster.shutdown()

