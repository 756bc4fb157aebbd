"""Programs saved on a GPU: `camface export MODEL.pt2` of torch.export programs made on CUDA, and
the in-graph Grad-CAM of real timm models exported that way against pytorch-grad-cam 1.5.7.

A device check (the lent GPU machine: PyTorch with CUDA, timm, torchvision, onnx, onnxscript and
the CPU onnxruntime; pytorch-grad-cam and ttach travel as wheels). Three jobs, run in order:

    python3 benchmarks/pt2_devices.py make --dir /tmp/pt2     # models on cuda -> .pt2 (+ weights)
    python3 benchmarks/pt2_devices.py convert --dir /tmp/pt2  # camface export of each, timed
    python3 benchmarks/pt2_devices.py agree --dir /tmp/pt2    # camface vs pytorch-grad-cam

`make` saves two small inline models (a CNN with BatchNorm and a tensor made on the input's
device; a ViT on F.scaled_dot_product_attention), each at a fixed batch of 1 and with a dynamic
batch, and four timm models with random weights (seed 0, dynamic batch: ViT-Tiny, DeiT-Tiny
distilled (two prefix tokens), ConvNeXt-Atto, Swin-Tiny), every one exported with its weights
and input on CUDA. `agree` runs camface's graph on the CPU (ONNX Runtime) and pytorch-grad-cam
on the CUDA model, 4 random crops, the predicted class, and compares camface's raw map put
through pytorch-grad-cam's own post-processing with its output (as benchmarks/transformers.py).
Results: benchmarks/RESULTS-transformers.md ("Programs saved on a GPU").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

TIMM = ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "convnext_atto",
        "swin_tiny_patch4_window7_224")
SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # --preset torch


def inline_models():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                          nn.ReLU())
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            scale = torch.arange(1, 17, device=x.device, dtype=x.dtype) / 16  # made on x's device
            f = self.features(x) * scale.view(1, -1, 1, 1)
            return self.fc(f.mean((2, 3)))

    class Block(nn.Module):
        def __init__(self, dim=32, heads=2):
            super().__init__()
            self.heads, self.norm1, self.norm2 = heads, nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            n, t, c = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c)
            x = x + self.proj(a)
            return x + self.mlp(self.norm2(x))

    class TinyViT(nn.Module):
        def __init__(self, dim=32):
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 16, 16)
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
            self.blocks = nn.Sequential(Block(dim), Block(dim))
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 4)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
            return self.head(self.norm(self.blocks(t))[:, 0])

    return {"cnn": (SmallCNN, 32), "vit": (TinyViT, 64)}


def make(folder: Path, device: str) -> None:
    import timm
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=32)
    for name, (cls, size) in inline_models().items():
        torch.manual_seed(0)
        model = cls().eval().to(device)
        x = torch.randn(2, 3, size, size, device=device)
        for kind, example, dynamic in (("fixed", x[:1], None), ("dynamic", x, ({0: batch},))):
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
            torch.export.save(program, folder / f"{name}_{device}_{kind}.pt2")
        torch.save(model.state_dict(), folder / f"{name}.pt")
    for name in TIMM:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval().to(device)
        torch.save(model.state_dict(), folder / f"{name}.pt")
        started = time.perf_counter()
        program = torch.export.export(model, (torch.randn(2, 3, SIZE, SIZE, device=device),),
                                      dynamic_shapes=({0: batch},))
        ops = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"
                      and any(k in str(n.target) for k in ("flash", "efficient", "cudnn", "attention"))})
        torch.export.save(program, folder / f"{name}_{device}_dynamic.pt2")
        print(f"made {name} on {device} in {time.perf_counter() - started:.1f} s; attention ops: {ops}",
              flush=True)


def convert(folder: Path, pattern: str = "*.pt2") -> int:
    failures = 0
    for pt2 in sorted(folder.glob(pattern)):
        out = pt2.with_suffix(".cam.onnx")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "camface", "export", str(pt2), "-o", str(out),
                               "--preset", "torch", "--heads", "gradcam", "--no-rank"],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - started
        last = (done.stderr.strip().splitlines() or [""])[-1][:400]
        print(f"{pt2.name}: exit {done.returncode} in {seconds:.1f} s; {last}", flush=True)
        failures += done.returncode != 0
    return failures


def agree(folder: Path) -> int:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import timm
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image

    device = "cuda" if torch.cuda.is_available() else "cpu"
    worst = 0.0
    for name in TIMM:
        graph_path = next(folder.glob(f"{name}_*.cam.onnx"), None)
        if graph_path is None:
            print(f"{name}: no graph")
            worst = float("inf")
            continue
        meta = {p.key: p.value for p in onnx.load(str(graph_path), load_external_data=False).metadata_props}
        model = timm.create_model(name, pretrained=False).eval()
        model.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu"))
        model.to(device)
        if name.startswith("swin"):
            side = SIZE // 32

            def reshape(t, side=side):  # pytorch-grad-cam's Swin example: [N, 49, C] -> NCHW
                return t.reshape(t.size(0), side, side, t.size(-1)).permute(0, 3, 1, 2)

            cam = GradCAM(model, [model.layers[-1].blocks[-1].norm2], reshape_transform=reshape)
        elif name.startswith(("vit", "deit")):
            side, prefix = SIZE // 16, model.num_prefix_tokens

            def reshape(t, side=side, prefix=prefix):  # pytorch-grad-cam's ViT example
                return t[:, prefix:, :].reshape(t.size(0), side, side, t.size(2)).permute(0, 3, 1, 2)

            cam = GradCAM(model, [model.blocks[-1].norm1], reshape_transform=reshape)
        else:
            cam = GradCAM(model, [model.stages[-1]])
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
        session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
        probs, maps = session.run(["probs", "gradcam"], {"image": images, "class_index": np.full(4, -1, np.int64)})
        x = torch.tensor(((images / 255.0 - np.array(MEAN)) / np.array(STD)).astype(np.float32)).permute(0, 3, 1, 2)
        scaled = scale_cam_image(np.maximum(maps, 0), (SIZE, SIZE))
        ours = cam.aggregate_multi_layers([scaled[:, None]])
        found = []
        # pytorch-grad-cam where it runs: on the GPU as PyTorch does by default (cuDNN's
        # convolutions in TF32), on the GPU in full float32, and on the CPU
        for where, tf32 in ((device, True), (device, False), ("cpu", False)) if device != "cpu" else (("cpu", False),):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
            model.to(where)
            cam.device = torch.device(where)  # BaseCAM moves the input to the model's first device
            theirs = cam(input_tensor=x.to(where), targets=None)
            with torch.no_grad():
                predicted = model(x.to(where)).argmax(1).tolist()
            diff = float(np.abs(ours - theirs).max())
            found.append(f"{where}{' (TF32)' if tf32 else ''} {diff:.2e}"
                         f"{'' if predicted == probs.argmax(1).tolist() else ' OTHER CLASSES'}")
            if not tf32:
                worst = max(worst, diff)
        print(f"{name}: target {meta.get('target_layer')} (grid {meta.get('token_grid', '-')}); "
              f"max |camface - pytorch-grad-cam| on [0, 1] maps {list(theirs.shape)}, pytorch-grad-cam on "
              + ", ".join(found), flush=True)
    return 0 if worst < 1e-4 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=("make", "convert", "agree"))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/camface-pt2"))
    parser.add_argument("--device", default="cuda", help="make: where the models are exported")
    parser.add_argument("--only", default="*.pt2", help="convert: the programs to export (a glob)")
    args = parser.parse_args(argv)
    if args.job == "make":
        make(args.dir, args.device)
        return 0
    return convert(args.dir, args.only) if args.job == "convert" else agree(args.dir)


if __name__ == "__main__":
    sys.exit(main())
