"""Helpers for the face-recognition tests: real faces that packages ship, augmented into several
photos per person, and small random-weight embedders defined inline (torch, Keras)."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np

SIZE = 48  # the embedders' input side


def faces_bgr() -> dict[str, np.ndarray]:
    """Name -> uint8 BGR photo with one face MediaPipe finds: scikit-image's astronaut (Eileen
    Collins) and camera (the cameraman), matplotlib's grace_hopper."""
    import matplotlib.image
    from matplotlib import cbook
    from skimage import data

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        grace = matplotlib.image.imread(f)[:, :, ::-1]
    return {"collins": np.ascontiguousarray(data.astronaut()[:, :, ::-1]),
            "cameraman": cv2.cvtColor(data.camera(), cv2.COLOR_GRAY2BGR),
            "hopper": np.ascontiguousarray(grace)}


def augment(image: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """`count` photos of `image` (uint8 BGR): the first as is, then flipped, shifted by up to 6%
    of the side, brightness x0.8..1.2 and Gaussian noise (sigma 4), seeded."""
    rng = np.random.default_rng(seed)
    out = [image]
    h, w = image.shape[:2]
    for i in range(1, count):
        x = image[:, ::-1] if i % 2 else image
        dx, dy = (rng.uniform(-0.06, 0.06, 2) * (w, h)).astype(int)
        x = cv2.warpAffine(np.ascontiguousarray(x), np.float32([[1, 0, dx], [0, 1, dy]]), (w, h),
                           borderMode=cv2.BORDER_REFLECT)
        x = x.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.normal(0, 4, x.shape)
        out.append(np.clip(x, 0, 255).astype(np.uint8))
    return out


def people_dir(root: Path, per_person: int = 4, names=("collins", "cameraman", "hopper")) -> Path:
    """root/<name>/<i>.png: `per_person` augmented photos of each named face."""
    faces = faces_bgr()
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i, photo in enumerate(augment(faces[name], per_person, seed=k)):
            cv2.imwrite(str(root / name / f"{i}.png"), photo)
    return root


def torch_embedder(dim: int = 16, seed: int = 0):
    """Random-weight CNN embedder: conv-relu-pool-conv-relu-conv, global average pooling, linear
    -> [N, dim]. The last conv has no ReLU, so the pooled features take both signs."""
    import torch
    from torch import nn

    class Embedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 12, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(12, 16, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(16, 24, 3, 1, 1))
            self.fc = nn.Linear(24, dim)
            self.register_buffer("centre", torch.zeros(dim))

        def forward(self, x):
            return self.fc(self.features(x).mean(dim=(2, 3))) - self.centre

    torch.manual_seed(seed)
    return Embedder().eval()


def centre_on(model, crops_rgb: np.ndarray):
    """Set the embedder's `centre` to its mean embedding of uint8 RGB crops [N, SIZE, SIZE, 3]
    (arcface normalisation): a random network's embeddings share one large component, which a
    trained one's do not; subtracting it spreads the cosine similarities as training would."""
    import torch

    x = torch.from_numpy(crops_rgb.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        model.centre.zero_()
        model.centre.copy_(model(x).mean(0))
    return model


def to_onnx(model, path: Path, size: int | tuple[int, int] = SIZE, output: str = "embedding") -> Path:
    """`model` -> ONNX (TorchScript exporter, opset 17, dynamic batch), input x [N, 3, size, size]
    (size: a side, or (height, width))."""
    import torch

    height, width = (size, size) if isinstance(size, int) else size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 3, height, width),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=[output],
                          dynamic_axes={"x": {0: "N"}, output: {0: "N"}})
    return path


def iresnet_like(seed: int = 0):
    """ArcFace's IResNet in miniature, random weights: 112x112 in, blocks BN-conv-BN-PReLU-conv-BN
    (+ a projected shortcut, stride 2) down to 7x7, then no global pooling: BN2d -> dropout ->
    flatten -> Linear -> BatchNorm1d (the embedding, [N, 128]), as insightface's models end."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(cout), nn.PReLU(cout),
                                      nn.Conv2d(cout, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return self.body(x) + self.down(x)

    class IResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.PReLU(16))
            self.layers = nn.Sequential(Block(16, 16), Block(16, 32), Block(32, 32), Block(32, 64))
            self.bn2 = nn.BatchNorm2d(64)
            self.dropout = nn.Dropout(0.0)
            self.fc = nn.Linear(64 * 7 * 7, 128)
            self.features = nn.BatchNorm1d(128)

        def forward(self, x):
            x = self.dropout(self.bn2(self.layers(self.stem(x))))
            return self.features(self.fc(x.flatten(1)))

    torch.manual_seed(seed)
    model = IResNet().eval()
    for module in model.modules():  # non-trivial statistics, as a trained model has
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model
