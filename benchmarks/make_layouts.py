#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes benchmarks/layouts.json: the tensor sizes of real models, which the benchmarks scale.

  /usr/bin/python3 benchmarks/make_layouts.py

- resnet50: the parameters of torchvision's ResNet-50 (25.6 M scalars in 161 tensors), worked out
  from its architecture (bottleneck blocks [3, 4, 6, 3], widths 64..512,
  expansion 4, a 1000-way classifier).
- transformer: a small encoder (6 layers of torch.nn.TransformerEncoderLayer, d_model 512, 8 heads,
  feed-forward 2048) under a 32000 x 512 embedding, read off the torch modules themselves.
- large4: four large tensors of equal size.
The benchmarks scale each list to a model size: tensor i gets max(1, round(size_i * target / total))
scalars, so a layout keeps its count of tensors and their proportions.
"""
import json
import os

import torch


def resnet50():
    sizes = []

    def conv(cin, cout, k):
        sizes.append(cout * cin * k * k)

    def bn(c):
        sizes.extend([c, c])  # weight, bias

    conv(3, 64, 7)
    bn(64)
    cin = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for block in range(blocks):
            conv(cin, width, 1)
            bn(width)
            conv(width, width, 3)
            bn(width)
            conv(width, width * 4, 1)
            bn(width * 4)
            if block == 0:  # the projection shortcut
                conv(cin, width * 4, 1)
                bn(width * 4)
            cin = width * 4
    sizes.extend([1000 * 2048, 1000])
    return sizes


def transformer():
    layer = torch.nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048)
    model = torch.nn.Sequential(torch.nn.Embedding(32000, 512),
                                torch.nn.TransformerEncoder(layer, num_layers=6))
    return [p.numel() for p in model.parameters()]


def main():
    layouts = {"resnet50": resnet50(), "transformer": transformer(), "large4": [25_000_000] * 4}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "layouts.json")
    with open(path, "w") as out:
        json.dump(layouts, out)
        out.write("\n")
    for name, sizes in layouts.items():
        print(f"{name}: {len(sizes)} tensors, {sum(sizes) / 1e6:.2f} M scalars")


if __name__ == "__main__":
    main()
