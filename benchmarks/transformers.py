"""Transformers and modern backbones: camface's Grad-CAM against pytorch-grad-cam 1.5.7 on the
same timm model (ViT-Small/16 and ConvNeXt-Tiny at 224, random weights), and the in-graph
gradient's cost over the forward-only graph, at camface's default targets (ViT: blocks[-1].norm1
with pytorch-grad-cam's documented reshape_transform; ConvNeXt: the last stage; the maps of a
Swin-Tiny too, at layers[-1].blocks[-1].norm2, not timed). One thread,
batch 1 and 8; medians per image of interleaved runs (camface graph, forward-only graph,
pytorch-grad-cam, in turn). Also checks that the maps agree: camface's raw Grad-CAM, put through
pytorch-grad-cam's own post-processing (ReLU, min-max per image, resized to 224x224, min-max
again), against its GradCAM output for the predicted class.

Two virtualenvs (timm needs a torchvision that does not import beside the project's torch):
the timm models are made and pytorch-grad-cam runs in a peer venv (torch 2.14.1, torchvision
0.29.1, grad-cam 1.5.7, timm 1.0.31, onnx, onnxruntime; see benchmarks/RESULTS-transformers.md);
`camface export` and camface's graphs run in the project's venv.

    PEER=/work/peers/.venv/bin/python DIR=/tmp/camface-transformers
    $PEER benchmarks/transformers.py export --dir $DIR        # timm -> ONNX (legacy, opset 17)
    for m in vit_small_patch16_224 convnext_tiny swin_tiny_patch4_window7_224; do
      .venv/bin/camface export $DIR/$m.onnx -o $DIR/$m.cam.onnx --preset torch --heads gradcam --no-rank
    done
    .venv/bin/python benchmarks/transformers.py time --dir $DIR --peer $PEER --repeats 10

`time` runs camface's graphs here and asks a worker in the peer venv (`worker`, over a pipe) to
time pytorch-grad-cam, one call at a time, so that the three alternate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("vit_small_patch16_224", "convnext_tiny")  # timed
AGREEMENT_ONLY = ("swin_tiny_patch4_window7_224",)  # maps compared, not timed
SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # --preset torch


def export(folder: Path) -> None:
    """Peer venv: each timm model (seed 0) -> folder/NAME.onnx (torch.onnx's TorchScript
    exporter, opset 17, dynamic batch) and its weights -> folder/NAME.pt."""
    import warnings

    import timm
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for name in MODELS + AGREEMENT_ONLY:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        torch.save(model.state_dict(), folder / f"{name}.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(folder / f"{name}.onnx"),
                              dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["logits"],
                              dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
        print(f"wrote {folder / name}.onnx", flush=True)


def worker(folder: Path, name: str) -> None:
    """Peer venv: pytorch-grad-cam's GradCAM on the model, at pytorch-grad-cam's documented
    target; reads JSON requests on stdin, answers one JSON line each."""
    import numpy as np
    import timm
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image

    torch.set_num_threads(1)
    model = timm.create_model(name, pretrained=False).eval()
    model.load_state_dict(torch.load(folder / f"{name}.pt"))
    if name.startswith("vit"):
        side = SIZE // 16

        def reshape_transform(tensor):  # pytorch-grad-cam's ViT example
            result = tensor[:, 1:, :].reshape(tensor.size(0), side, side, tensor.size(2))
            return result.transpose(2, 3).transpose(1, 2)

        cam = GradCAM(model, [model.blocks[-1].norm1], reshape_transform=reshape_transform)
    elif name.startswith("swin"):
        side = SIZE // 32

        def swin_reshape(tensor):  # pytorch-grad-cam's Swin example: tokens [N, 49, C] -> NCHW
            result = tensor.reshape(tensor.size(0), side, side, tensor.size(-1))
            return result.transpose(2, 3).transpose(1, 2)

        cam = GradCAM(model, [model.layers[-1].blocks[-1].norm2], reshape_transform=swin_reshape)
    else:
        cam = GradCAM(model, [model.stages[-1]])
    mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)
    for line in sys.stdin:
        request = json.loads(line)
        images = np.load(request["images"])  # uint8 [N, H, W, 3] RGB
        x = torch.tensor(((images / 255.0 - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
        if request["do"] == "time":
            started, cpu = time.perf_counter(), time.process_time()
            cam(input_tensor=x, targets=None)
            answer = {"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu}
        else:  # "compare": camface's raw maps against pytorch-grad-cam's
            theirs = cam(input_tensor=x, targets=None)
            with torch.no_grad():
                predicted = model(x).argmax(1).tolist()
            # pytorch-grad-cam's own post-processing (BaseCAM.compute_cam_per_layer, then
            # aggregate_multi_layers): ReLU, min-max per image, resize, min-max again
            scaled = scale_cam_image(np.maximum(np.load(request["maps"]), 0), (SIZE, SIZE))
            ours = cam.aggregate_multi_layers([scaled[:, None]])
            answer = {"max_abs": float(np.abs(ours - theirs).max()), "predicted": predicted,
                      "shape": list(theirs.shape)}
        print(json.dumps(answer), flush=True)


def run_time(folder: Path, peer: str, repeats: int, batches: tuple[int, ...]) -> int:
    """Project venv: the interleaved timing and the agreement check."""
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    scratch = Path(tempfile.mkdtemp())
    for name in MODELS + AGREEMENT_ONLY:
        graph = onnx.load(str(folder / f"{name}.cam.onnx"))
        meta = {p.key: p.value for p in graph.metadata_props}
        forward = onnx.utils.Extractor(graph).extract_model(["image", "class_index"],
                                                            ["probs", "activations"])
        sessions = {kind: ort.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
                    for kind, model in (("camface", graph), ("forward", forward))}
        process = subprocess.Popen([peer, __file__, "worker", "--dir", str(folder), "--model", name],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def ask(**request):
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
            return json.loads(process.stdout.readline())

        print(f"{name}: target {meta['target_layer']} ({meta.get('target_reason', '')}), "
              f"grid {meta.get('token_grid', '-')}, feature map {meta['feature_size']}")
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
        np.save(scratch / "images.npy", images)
        feeds = {"image": images, "class_index": np.full(4, -1, np.int64)}
        probs, _, maps = sessions["camface"].run(["probs", "activations", "gradcam"], feeds)
        np.save(scratch / "maps.npy", maps)
        agreement = ask(do="compare", images=str(scratch / "images.npy"),
                        maps=str(scratch / "maps.npy"))
        same_class = agreement["predicted"] == probs.argmax(1).tolist()
        print(f"  agreement (4 crops, predicted class): max |camface - pytorch-grad-cam| = "
              f"{agreement['max_abs']:.2e} on [0, 1] maps {agreement['shape']}, same classes: "
              f"{same_class}")
        for batch in batches if name in MODELS else ():
            images = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
            np.save(scratch / "images.npy", images)
            feeds = {"image": images, "class_index": np.full(batch, -1, np.int64)}
            wall: dict[str, list[float]] = {k: [] for k in ("camface", "forward", "pytorch-grad-cam")}
            cpu: dict[str, list[float]] = {k: [] for k in wall}
            for rep in range(repeats + 1):  # the first round warms up
                for kind, session in sessions.items():
                    started, cpu_started = time.perf_counter(), time.process_time()
                    session.run(None, feeds)
                    if rep:
                        wall[kind].append(time.perf_counter() - started)
                        cpu[kind].append(time.process_time() - cpu_started)
                answer = ask(do="time", images=str(scratch / "images.npy"))
                if rep:
                    wall["pytorch-grad-cam"].append(answer["wall"])
                    cpu["pytorch-grad-cam"].append(answer["cpu"])
            per_image = {k: {"wall": 1e3 * statistics.median(wall[k]) / batch,
                             "cpu": 1e3 * statistics.median(cpu[k]) / batch} for k in wall}
            ours, theirs, fwd = (per_image[k] for k in ("camface", "pytorch-grad-cam", "forward"))
            print(f"  batch {batch}: ms per image (median of {repeats}; wall / CPU): camface "
                  f"{ours['wall']:.1f} / {ours['cpu']:.1f}, pytorch-grad-cam "
                  f"{theirs['wall']:.1f} / {theirs['cpu']:.1f}, forward-only "
                  f"{fwd['wall']:.1f} / {fwd['cpu']:.1f}; camface "
                  f"{theirs['wall'] / ours['wall']:.2f}x / {theirs['cpu'] / ours['cpu']:.2f}x faster; "
                  f"gradient {100 * (ours['wall'] / fwd['wall'] - 1):+.1f}% / "
                  f"{100 * (ours['cpu'] / fwd['cpu'] - 1):+.1f}% over forward-only", flush=True)
        process.stdin.close()
        process.wait()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=("export", "time", "worker"))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/camface-transformers"),
                        help="where the models and graphs are (outside the repository)")
    parser.add_argument("--peer", default="/work/peers/.venv/bin/python",
                        help="the peer venv's python (time)")
    parser.add_argument("--model", choices=MODELS + AGREEMENT_ONLY, help="worker: the model")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    if args.job == "export":
        export(args.dir)
        return 0
    if args.job == "worker":
        worker(args.dir, args.model)
        return 0
    return run_time(args.dir, args.peer, args.repeats, tuple(args.batches))


if __name__ == "__main__":
    sys.exit(main())
