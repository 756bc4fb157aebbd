"""A trust sweep of `camface export` over the architectures users bring: small inline PyTorch
models (random weights, fixed seed, 32x32) in the shapes of VGG, ResNet, ResNeXt, DenseNet,
MobileNetV2/V3, EfficientNet, Inception, SqueezeNet, ShuffleNet, RepVGG, GhostNet, ConvNeXt,
ViT, MLP-Mixer, PoolFormer, and heads ending in log_softmax or a cosine classifier. Each is
saved by torch.onnx's legacy (TorchScript) exporter at opset 17 and by torch.export (.pt2),
and exported at its default target and at 2-3 named modules (an early one, a post-ReLU one
followed by max pooling where there is one) with `ExportOptions(preset="unit")`.

Per case: ok (and the heatmaps) or the failure (ModelError: a clear refusal; any other
exception: a crash, printed with its traceback under --traceback). An ok case is also checked
against torch: the graph's activations against the module's output (a forward hook; NCHW, NHWC
or tokens on the recorded grid), and its Grad-CAM against the method's numpy reference on
torch autograd's gradient of the chosen logit there ("agrees": max |difference| over the map's
maximum).

    .venv/bin/python benchmarks/export_zoo.py [--only vgg resnet] [--kinds legacy pt2]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
# timm's multi-head self-attention, LayerNorm2d and ConvNeXt block (no drop path: eval mode)
from test_onnx_export_models import Attention, ConvNeXtBlock, LayerNorm2d  # noqa: E402

SIZE = 32
CLASSES = 5


# --------------------------------------------------------------------------- architectures

def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act() if act else nn.Identity())


class VGG(nn.Module):
    """torchvision's VGG: conv-ReLU-max pool stacks, AdaptiveAvgPool2d to 2x2 (7x7 there),
    flatten, an MLP with dropout."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(32, CLASSES))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module used twice."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (1x1, 3x3 with `groups`: ResNeXt, 1x1 x4)."""

    def __init__(self, cin, width, stride=1, groups=1, expansion=4):
        super().__init__()
        cout = width * expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout: conv1, bn1, relu, maxpool, layer1..layer3, avgpool, fc."""

    def __init__(self, block):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        if block == "basic":
            self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
            self.layer2 = nn.Sequential(BasicBlock(8, 16, 2))
            self.layer3 = nn.Sequential(BasicBlock(16, 16, 2))
            width = 16
        else:
            groups = 4 if block == "resnext" else 1
            base = 8 if block == "resnext" else 4
            self.layer1 = nn.Sequential(Bottleneck(8, base, groups=groups, expansion=2 if groups > 1 else 4))
            cin = base * (2 if groups > 1 else 4)
            self.layer2 = nn.Sequential(Bottleneck(cin, base * 2, 2, groups, 2 if groups > 1 else 4))
            cin = base * 2 * (2 if groups > 1 else 4)
            self.layer3 = nn.Sequential(Bottleneck(cin, base * 2, 1, groups, 2 if groups > 1 else 4))
            width = cin
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(width, CLASSES)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1) if isinstance(features, list) else features
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    """torchvision's _DenseBlock: each layer reads the concat of all before."""

    def __init__(self, layers, cin, growth):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """torchvision's DenseNet: features (conv0, norm0, relu0, pool0, blocks, transition, norm5),
    then F.relu, adaptive average pooling, flatten, classifier."""

    def __init__(self):
        super().__init__()
        growth = 4
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 8, 3, 1, 1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(8))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        self.features.add_module("denseblock1", DenseBlock(2, 8, growth))
        self.features.add_module("transition1", nn.Sequential(
            nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Conv2d(16, 8, 1, bias=False), nn.AvgPool2d(2, 2)))
        self.features.add_module("denseblock2", DenseBlock(2, 8, growth))
        self.features.add_module("norm5", nn.BatchNorm2d(16))
        self.classifier = nn.Linear(16, CLASSES)

    def forward(self, x):
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), (1, 1))
        return self.classifier(torch.flatten(out, 1))


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: expand 1x1, depthwise 3x3, project 1x1 (ReLU6)."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, hidden, nn.ReLU6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, 3, 2, act=nn.ReLU6), InvertedResidual(8, 8, 1, 1),
                                      InvertedResidual(8, 12, 2, 4), InvertedResidual(12, 12, 1, 4),
                                      conv_bn(12, 32, 1, act=nn.ReLU6))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, CLASSES))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool, fc1, activation, fc2, scale activation."""

    def __init__(self, channels, squeeze, act=nn.ReLU, scale=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = act(), scale()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class MobileNetV3Block(nn.Module):
    def __init__(self, cin, hidden, cout, stride, se, act):
        super().__init__()
        layers = [conv_bn(cin, hidden, 1, act=act), conv_bn(hidden, hidden, 3, stride, hidden, act)]
        if se:
            layers.append(SqueezeExcitation(hidden, max(hidden // 4, 4), nn.ReLU, nn.Hardsigmoid))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV3(nn.Module):
    """MobileNetV3-Small's shape: HardSwish, SE with Hardsigmoid, classifier Linear-HardSwish-
    Dropout-Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, 3, 2, act=nn.Hardswish),
                                      MobileNetV3Block(8, 16, 8, 1, True, nn.ReLU),
                                      MobileNetV3Block(8, 24, 12, 2, False, nn.ReLU),
                                      MobileNetV3Block(12, 32, 12, 1, True, nn.Hardswish),
                                      conv_bn(12, 32, 1, act=nn.Hardswish))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(32, 24), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(24, CLASSES))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def drop_path(x, prob: float, training: bool):
    """timm's drop_path: the identity in eval mode."""
    if prob == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - prob)
    return x * keep / (1 - prob)


class MBConv(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(conv_bn(cin, hidden, 1, act=nn.SiLU),
                                   conv_bn(hidden, hidden, 3, stride, hidden, nn.SiLU),
                                   SqueezeExcitation(hidden, max(cin // 4, 2), nn.SiLU, nn.Sigmoid),
                                   conv_bn(hidden, cout, 1, act=None))
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + drop_path(y, 0.2, self.training) if self.use_res else y


class EfficientNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, 3, 2, act=nn.SiLU), MBConv(8, 8, 1, 1),
                                      MBConv(8, 12, 2, 4), MBConv(12, 12, 1, 4),
                                      conv_bn(12, 32, 1, act=nn.SiLU))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, CLASSES))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class InceptionBlock(nn.Module):
    """GoogLeNet's Inception: 1x1, 1x1-3x3, 1x1-3x3-3x3, max pool 3x3 s1 - 1x1, concatenated."""

    def __init__(self, cin, c):
        super().__init__()
        self.branch1 = conv_bn(cin, c, 1)
        self.branch2 = nn.Sequential(conv_bn(cin, c, 1), conv_bn(c, c, 3))
        self.branch3 = nn.Sequential(conv_bn(cin, c, 1), conv_bn(c, c, 3), conv_bn(c, c, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), conv_bn(cin, c, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn(3, 8, 3, 1)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = InceptionBlock(8, 4)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = InceptionBlock(16, 6)
        self.avgpool, self.dropout = nn.AdaptiveAvgPool2d((1, 1)), nn.Dropout(0.2)
        self.fc = nn.Linear(24, CLASSES)

    def forward(self, x):
        x = self.inception4a(self.maxpool2(self.inception3a(self.maxpool1(self.conv1(x)))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze, self.squeeze_activation = nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_activation = nn.Conv2d(squeeze, expand, 1), nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """torchvision's SqueezeNet 1.1: fire modules between ceil-mode max pools; the classifier
    a 1x1 conv to the classes, ReLU, global average pooling (all convolutional)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True), Fire(16, 4, 8), Fire(16, 4, 8),
            nn.MaxPool2d(3, 2, ceil_mode=True), Fire(16, 6, 12))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(24, CLASSES, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def channel_shuffle(x, groups: int):
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNetV2 InvertedResidual: split (chunk) or two branches, concat,
    channel shuffle."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, cin, None), conv_bn(cin, half, 1))
        source = cin if stride > 1 else half
        self.branch2 = nn.Sequential(conv_bn(source, half, 1), conv_bn(half, half, 3, stride, half, None),
                                     conv_bn(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.maxpool = conv_bn(3, 8, 3, 1), nn.MaxPool2d(3, 2, 1)
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1))
        self.stage3 = nn.Sequential(ShuffleUnit(16, 24, 2), ShuffleUnit(24, 24, 1))
        self.conv5 = conv_bn(24, 32, 1)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x):
        x = self.conv5(self.stage3(self.stage2(self.maxpool(self.conv1(x)))))
        return self.fc(x.mean([2, 3]))


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: 3x3 conv-BN + 1x1 conv-BN + identity BN, summed, ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.rbr_dense = conv_bn(cin, cout, 3, stride, act=None)
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.nonlinearity = nn.ReLU()

    def forward(self, x):
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + identity)


class RepVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage0 = RepVGGBlock(3, 8, 2)
        self.stage1 = nn.Sequential(RepVGGBlock(8, 12, 2), RepVGGBlock(12, 12, 1))
        self.stage2 = nn.Sequential(RepVGGBlock(12, 16, 2), RepVGGBlock(16, 16, 1))
        self.gap, self.linear = nn.AdaptiveAvgPool2d(1), nn.Linear(16, CLASSES)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stage0(x)))
        return self.linear(self.gap(x).view(x.size(0), -1))


class GhostModule(nn.Module):
    """GhostNet's Ghost module: a primary conv and a cheap depthwise conv of its output,
    concatenated and sliced to the output channels."""

    def __init__(self, cin, cout, relu=True):
        super().__init__()
        self.oup = cout
        init = (cout + 1) // 2
        self.primary_conv = conv_bn(cin, init, 1, act=nn.ReLU if relu else None)
        self.cheap_operation = conv_bn(init, init, 3, 1, init, nn.ReLU if relu else None)

    def forward(self, x):
        x1 = self.primary_conv(x)
        out = torch.cat([x1, self.cheap_operation(x1)], dim=1)
        return out[:, :self.oup, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride):
        super().__init__()
        self.ghost1 = GhostModule(cin, mid)
        self.conv_dw = conv_bn(mid, mid, 3, stride, mid, None) if stride > 1 else None
        self.ghost2 = GhostModule(mid, cout, relu=False)
        self.shortcut = (nn.Sequential() if cin == cout and stride == 1 else
                         nn.Sequential(conv_bn(cin, cin, 3, stride, cin, None), conv_bn(cin, cout, 1, act=None)))

    def forward(self, x):
        y = self.ghost1(x)
        if self.conv_dw is not None:
            y = self.conv_dw(y)
        return self.ghost2(y) + self.shortcut(x)


class GhostNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_stem, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.blocks = nn.Sequential(GhostBottleneck(8, 12, 8, 1), GhostBottleneck(8, 20, 13, 2),
                                    conv_bn(13, 24, 1))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head, self.act2 = nn.Conv2d(24, 32, 1), nn.ReLU()
        self.classifier = nn.Linear(32, CLASSES)

    def forward(self, x):
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(self.global_pool(x)))
        return self.classifier(x.flatten(1))


class ConvNeXt(nn.Module):
    """timm's ConvNeXt layout: patchify stem + LayerNorm2d, stages, head (pool, norm, fc)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, 4), LayerNorm2d(8, eps=1e-6))
        self.stages = nn.Sequential(nn.Sequential(ConvNeXtBlock(8)),
                                    nn.Sequential(LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 16, 2, 2),
                                                  ConvNeXtBlock(16)))
        self.norm, self.fc = LayerNorm2d(16, eps=1e-6), nn.Linear(16, CLASSES)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(self.norm(x.mean((2, 3), keepdim=True)).flatten(1))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 2 * dim)

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), 0.1, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), 0.1, self.training)


class ViT(nn.Module):
    """timm's VisionTransformer layout: patch_embed.proj (8x8), cls token, pos embed, blocks,
    norm, head on the class token."""

    def __init__(self, dim=16):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.Sequential(ViTBlock(dim, 2), ViTBlock(dim, 2))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, CLASSES)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class MixerBlock(nn.Module):
    def __init__(self, tokens, dim):
        super().__init__()
        self.norm1, self.mlp_tokens = nn.LayerNorm(dim), Mlp(tokens, 2 * tokens)
        self.norm2, self.mlp_channels = nn.LayerNorm(dim), Mlp(dim, 2 * dim)

    def forward(self, x):
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class MLPMixer(nn.Module):
    """timm's MlpMixer layout: stem.proj (4x4 patches -> 64 tokens), blocks, norm, mean over
    the tokens, head."""

    def __init__(self, dim=16):
        super().__init__()
        self.stem = nn.Module()
        self.stem.proj = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(MixerBlock(64, dim), MixerBlock(64, dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, CLASSES)

    def forward(self, x):
        x = self.stem.proj(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


class Pooling(nn.Module):
    """PoolFormer's token mixer: AvgPool(3, 1, 1, count_include_pad=False)(x) - x."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        return self.pool(x) - x


class PoolFormerBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.token_mixer = nn.GroupNorm(1, dim), Pooling()
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.GELU(), nn.Conv2d(2 * dim, dim, 1))
        self.layer_scale_1 = nn.Parameter(torch.full((dim, 1, 1), 0.5))
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x):
        x = x + self.layer_scale_1 * self.token_mixer(self.norm1(x))
        return x + self.layer_scale_2 * self.mlp(self.norm2(x))


class PoolFormer(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 4, 4)
        self.network = nn.Sequential(PoolFormerBlock(8), nn.Conv2d(8, 16, 3, 2, 1), PoolFormerBlock(16))
        self.norm, self.head = nn.GroupNorm(1, 16), nn.Linear(16, CLASSES)

    def forward(self, x):
        x = self.norm(self.network(self.patch_embed(x)))
        return self.head(x.mean([-2, -1]))


class LogSoftmaxNet(nn.Module):
    """A small CNN ending in log_softmax (NLLLoss training): camface reads the logits before it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), nn.MaxPool2d(2), conv_bn(8, 16), nn.MaxPool2d(2),
                                      conv_bn(16, 16))
        self.fc = nn.Linear(16, CLASSES)

    def scores(self, x):
        return self.fc(self.features(x).mean((2, 3)))

    def forward(self, x):
        return F.log_softmax(self.scores(x), dim=1)


class CosineNet(nn.Module):
    """An embedding network (F.normalize of a projected pooled map) with a cosine classifier
    (normalised class weights, scale 16), as face-recognition and few-shot heads are."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, 3, 2), conv_bn(8, 16), conv_bn(16, 16, 3, 2))
        self.embedding = nn.Linear(16, 12)
        self.weight = nn.Parameter(torch.randn(CLASSES, 12))

    def forward(self, x):
        e = F.normalize(self.embedding(self.features(x).mean((2, 3))), dim=1)
        return 16.0 * e @ F.normalize(self.weight, dim=1).t()


# name -> (factory, [target modules besides the default]); the first named target is an early
# one, and a post-ReLU one followed by max pooling is there where the model has one
ZOO = {
    "vgg": (VGG, ["features.1", "features.4", "features.8"]),
    "resnet-basic": (lambda: ResNet("basic"), ["relu", "layer1", "layer1.0.relu"]),
    "resnet-bottleneck": (lambda: ResNet("bottleneck"), ["relu", "layer1.0.bn3", "layer2"]),
    "resnext": (lambda: ResNet("resnext"), ["relu", "layer1.0.conv2", "layer2"]),
    "densenet": (DenseNet, ["features.relu0", "features.denseblock1", "features.transition1"]),
    "mobilenetv2": (MobileNetV2, ["features.0", "features.2.conv.1", "features.3"]),
    "mobilenetv3": (MobileNetV3, ["features.0", "features.1.block.2", "features.3"]),
    "efficientnet": (EfficientNet, ["features.0", "features.2", "features.3.block.2"]),
    "inception": (Inception, ["conv1", "inception3a", "inception3a.branch4"]),
    "squeezenet": (SqueezeNet, ["features.1", "features.3", "features"]),
    "shufflenet": (ShuffleNet, ["conv1", "stage2", "stage3.1.branch2"]),
    "repvgg": (RepVGG, ["stage0", "stage1.1", "stage2"]),
    "ghostnet": (GhostNet, ["act1", "blocks.0.ghost1", "blocks.1"]),
    "convnext": (ConvNeXt, ["stem", "stages.0", "stages.1.2.norm"]),
    "vit": (ViT, ["patch_embed.proj", "blocks.0.norm1", "blocks.1"]),
    "mlp-mixer": (MLPMixer, ["stem.proj", "blocks.0", "blocks.1.norm2"]),
    "poolformer": (PoolFormer, ["patch_embed", "network.0", "network.1"]),
    "log-softmax": (LogSoftmaxNet, ["features.0", "features.1", "features.2"]),
    "cosine": (CosineNet, ["features.0", "features.1", "features"]),
}


def make(name):
    torch.manual_seed(0)
    model = ZOO[name][0]()
    for module in model.modules():  # non-trivial BN statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


# --------------------------------------------------------------------------- the sweep

def legacy_onnx(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return path


def save_program(model, path):
    example = (torch.zeros(2, 3, SIZE, SIZE),)
    shapes = ({0: torch.export.Dim("batch", min=1, max=32)},)
    torch.export.save(torch.export.export(model, example, dynamic_shapes=shapes), str(path))
    return path


def torch_reference(model, module_name, images, classes, info):
    """(activations NHWC, gradient NHWC) of torch at `module_name`'s output, laid out as the
    graph's `activations` (NCHW transposed, NHWC as is, or tokens on the recorded grid)."""
    seen = {}

    def keep(_module, _args, out):
        out.retain_grad()
        seen["a"] = out

    model = copy.deepcopy(model)
    for each in model.modules():  # an in-place ReLU would overwrite the output kept
        if hasattr(each, "inplace"):
            each.inplace = False
    module = model.get_submodule(module_name)
    hook = module.register_forward_hook(keep)
    x = torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    logits = getattr(model, "scores", model)(x)
    hook.remove()
    chosen = np.where(classes < 0, logits.detach().numpy().argmax(1), classes)
    logits[torch.arange(len(chosen)), torch.tensor(chosen)].sum().backward()
    a, g = seen["a"].detach().numpy(), seen["a"].grad.numpy()
    h, w = info.feature_size
    if info.token_grid:
        start = info.token_grid["prefix"]
        return [tuple(t[:, start:start + h * w].reshape(len(t), h, w, -1) for t in (a, g))]
    layouts = []
    if a.ndim == 4 and a.shape[2:] == (h, w):
        layouts.append(tuple(t.transpose(0, 2, 3, 1) for t in (a, g)))
    if a.ndim == 4 and a.shape[1:3] == (h, w):
        layouts.append((a, g))
    return layouts


def agreement(model, module_name, result) -> str:
    """max |graph gradcam - reference on torch's gradient| / max |reference|, or why not
    compared."""
    import onnxruntime as ort

    from camface import methods

    try:
        model.get_submodule(module_name)
    except AttributeError:
        return "- (target no module)"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 1, 3], np.int64)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"image": images, "class_index": classes})))
    for a, g in torch_reference(model, module_name, images, classes, result.info):
        if a.shape != got["activations"].shape or \
                not np.allclose(a, got["activations"], rtol=1e-3, atol=1e-4 * max(1.0, np.abs(a).max())):
            continue
        if "gradcam" not in got:
            return "activations ok"
        reference = methods.get("gradcam").reference(a, g)
        scale = float(np.abs(reference).max())
        error = float(np.abs(got["gradcam"] - reference).max()) / (scale or 1.0)
        return f"{error:.1e}" + ("" if error < 1e-3 else " MISMATCH")
    return "ACTIVATIONS DIFFER"


def run_case(model, source, out, target, show_traceback):
    from camface.errors import CamfaceError
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    started = time.perf_counter()
    row = {"target": target or "(default)"}
    try:
        result = onnx_export.export(source, out, ExportOptions(preset="unit", target_layer=target))
    except CamfaceError as exc:
        row.update(status="refused", detail=str(exc))
    except Exception as exc:  # noqa: BLE001 - a crash is what the sweep looks for
        row.update(status="CRASH", detail=f"{type(exc).__name__}: {exc}")
        if show_traceback:
            traceback.print_exc()
    else:
        bad = [d.output for d in result.differences if not d.ok]
        info = result.info
        row.update(status="ok" if not bad else "CHECK", recorded=info.target_layer,
                   size="x".join(map(str, info.feature_size)), heatmaps=",".join(info.heatmaps),
                   detail=f"failed checks: {bad}" if bad else "")
        try:
            row["agrees"] = agreement(model, info.target_layer, result)
        except Exception as exc:  # noqa: BLE001
            row["agrees"] = f"reference failed: {type(exc).__name__}: {exc}"
    row["seconds"] = time.perf_counter() - started
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(ZOO), help="these models only")
    parser.add_argument("--kinds", nargs="+", choices=("legacy", "pt2"), default=["legacy", "pt2"])
    parser.add_argument("--traceback", action="store_true", help="print crashes' tracebacks")
    parser.add_argument("--dir", type=Path, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="camface-zoo-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.perf_counter()
    for name in args.only or ZOO:
        model = make(name)
        for kind in args.kinds:
            try:
                source = (legacy_onnx(copy.deepcopy(model), folder / f"{name}.onnx") if kind == "legacy"
                          else save_program(copy.deepcopy(model), folder / f"{name}.pt2"))
            except Exception as exc:  # noqa: BLE001 - torch's own failure, not camface's
                rows.append({"model": name, "kind": kind, "target": "-", "status": "no file",
                             "detail": f"{type(exc).__name__}: {exc}", "seconds": 0.0})
                continue
            for i, target in enumerate([None, *ZOO[name][1]]):
                row = run_case(model, source, folder / f"{name}.{kind}.{i}.cam.onnx", target, args.traceback)
                row.update(model=name, kind=kind)
                rows.append(row)
                detail = row.get("detail", "").splitlines()[0][:300] if row.get("detail") else ""
                print(f"{name:18} {kind:6} {row['target']:24} {row['status']:7} "
                      f"{row.get('recorded', ''):24} {row.get('size', ''):5} {row.get('agrees', ''):22} "
                      f"{row['seconds']:5.1f}s {row.get('heatmaps', '')} {detail}", flush=True)
    print()
    print("| model | kind | target | status | recorded as | map | gradcam vs torch | heatmaps / failure |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        detail = row.get("heatmaps") or (row.get("detail") or "").splitlines()[0][:200].replace("|", "/")
        print(f"| {row['model']} | {row['kind']} | {row['target']} | {row['status']} | "
              f"{row.get('recorded', '')} | {row.get('size', '')} | {row.get('agrees', '')} | {detail} |")
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    print(f"\n{len(rows)} cases in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
