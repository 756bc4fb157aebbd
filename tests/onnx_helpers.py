"""Helpers for the ONNX engine's tests: run a few nodes on ONNX Runtime, and inline PyTorch
models (torchvision does not import beside the pinned torch)."""

from __future__ import annotations

import numpy as np


def run_nodes(nodes, inputs: dict[str, np.ndarray], outputs: list[str], initializers=(),
              opset: int = 18) -> list[np.ndarray]:
    """Build a float32 graph of `nodes` reading `inputs`, run it on ONNX Runtime's CPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        list(nodes), "t",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, inputs)


def torch_models():
    """name -> an inline PyTorch classifier (eval mode, fixed seed): a small ResNet-like net with a
    linear head, the same with an MLP head; blocks with BN, SiLU, HardSwish, max pooling."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, act):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.act = act()
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                         else nn.Identity())

        def forward(self, x):
            y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
            return torch.relu(y + self.down(x))

    class ResNetish(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
            self.layer1 = Block(8, 8, 1, nn.ReLU)
            self.layer2 = Block(8, 12, 2, nn.SiLU)
            self.layer3 = Block(12, 16, 1, nn.Hardswish)
            self.layer4 = Block(16, 16, 1, nn.ReLU)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = head

        def forward(self, x):
            x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
            return self.fc(torch.flatten(self.pool(x), 1))

    torch.manual_seed(0)
    models = {"linear": ResNetish(nn.Linear(16, 5)),
              "mlp": ResNetish(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Dropout(0.2),
                                             nn.Linear(24, 5)))}
    for model in models.values():
        for module in model.modules():  # non-trivial BN statistics
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.data.uniform_(0.5, 1.5)
        model.eval()
    return models


def save_program(model, path, size: int = 32, dynamic: bool = True):
    """torch.export.save of `model` on [N, 3, size, size] (N dynamic 1..32 unless not)."""
    import torch

    example = (torch.zeros(2, 3, size, size),)
    shapes = ({0: torch.export.Dim("batch", min=1, max=32)},) if dynamic else None
    torch.export.save(torch.export.export(model, example, dynamic_shapes=shapes), str(path))
    return path


def torch_calls(model, module, images, activations, class_index):
    """camface.methods.ModelCalls around an eager torch model (the reference of the methods that
    run the model again): the head is the model with `module`'s output replaced by the rows (a
    forward hook, as pytorch-grad-cam's AblationLayer replaces the layer), the forward is the
    model on the rows. module: a submodule or its name; images: normalised NHWC float32
    [N, H, W, C]; activations: NHWC."""
    import torch

    from camface import methods

    layer = model.get_submodule(module) if isinstance(module, str) else module
    channels, height, width = images.shape[3], images.shape[1], images.shape[2]

    def head(rows):
        replaced = torch.from_numpy(np.ascontiguousarray(rows)).permute(0, 3, 1, 2)
        hook = layer.register_forward_hook(lambda _module, _inputs, _output: replaced)
        try:
            with torch.no_grad():
                return model(torch.zeros(len(rows), channels, height, width)).numpy()
        finally:
            hook.remove()

    def forward(rows):
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(rows)).permute(0, 3, 1, 2)).numpy()

    return methods.ModelCalls(head, forward, images, activations, class_index)


def ablation_cam_alone(model, module: str, images, classes, channels=lambda out: out[0],
                       zeroed=lambda out, k: out[..., k]):
    """Ablation-CAM (Desai & Ramaswamy 2020, eq. 3) of the torch `model` at `module`'s output,
    every ablated variant run alone: crop i's image with channel k of the module's output zeroed
    by a forward hook (every other tensor as the forward pass computes it), y_c^k its class
    logit; w_k = (y_c - y_c^k) / y_c, map = ReLU(sum_k w_k A_k). images: uint8 NHWC (preset
    unit); classes: -1 for the top class. channels(out): one crop's activations A [..., K] in the
    module's output; zeroed(out, k): the view of the output that channel k's ablation zeroes (by
    default all of channel k). Returns the maps [N, ...] (A's shape less K)."""
    import torch

    layer = model.get_submodule(module)
    x = torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    maps = []
    for i in range(len(images)):
        seen = {}
        hook = layer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("a", out))
        with torch.no_grad():
            logits = model(x[i:i + 1])[0]
        hook.remove()
        a = channels(seen["a"])
        chosen = int(logits.argmax()) if classes[i] < 0 else int(classes[i])
        weights = []
        for k in range(a.shape[-1]):
            def ablate(_m, _i, out, k=k):
                out = out.clone()
                zeroed(out, k).zero_()
                return out

            hook = layer.register_forward_hook(ablate)
            with torch.no_grad():
                weights.append((float(logits[chosen]) - float(model(x[i:i + 1])[0, chosen])) / float(logits[chosen]))
            hook.remove()
        maps.append(np.maximum((a.numpy() * np.array(weights, np.float32)).sum(-1), 0))
    return np.stack(maps)
