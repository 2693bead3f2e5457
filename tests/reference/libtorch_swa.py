#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes tests/reference/libtorch_swa.safetensors: SWA, EMA, SWALR and update_bn of a small CNN
trained on the digits data with torch.optim.swa_utils, for the libtorch parity test
(tests/torch/test_torch_parity.cpp) to repeat in C++ with libtorch + polyak.

Run with Debian's python3-torch (PyTorch 1.13):  /usr/bin/python3 tests/reference/libtorch_swa.py

The run: Conv2d(1, 8, 3, padding 1) - BatchNorm2d - ReLU - MaxPool2d(2) - Flatten - Linear(128, 32)
- BatchNorm1d - ReLU - Linear(32, 10), initialised with torch.manual_seed(0); SGD (lr 0.05, momentum
0.9, weight decay 5e-4) on batches of 32 from a seeded permutation each epoch, for 6 epochs; an EMA
(decay 0.95, torch.lerp as polyak's EMA rounds) after every step; from epoch 4 on, an SWA snapshot
per epoch and SWALR (swa_lr 0.01, 2 anneal epochs, cos). Then update_bn over the training set in
batches of 64 for both averages.

The file holds, as float32 unless said: "initial.<name>" (the model's state_dict before training,
num_batches_tracked as I64), "order" (I64 [epochs, samples]: the permutation of each epoch),
"lr" (F64 [epochs]: the learning rate after each epoch's scheduler step), "final.<name>" (the
trained model), "swa.<name>" and "ema.<name>" (the averaged models' state_dicts after update_bn).
Written with json + numpy (the safetensors layout), so no extra package is needed.
"""
import json
import os
import struct

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "examples", "data", "digits.csv")
EPOCHS, SWA_START, BATCH, BN_BATCH = 6, 3, 32, 64
LR, MOMENTUM, WEIGHT_DECAY, SWA_LR, ANNEAL_EPOCHS, EMA_DECAY = 0.05, 0.9, 5e-4, 0.01, 2, 0.95


def load_training_set():
    """The flagship example's split: sample i is a test sample when i % 4 == 3; pixels / 16."""
    rows = np.loadtxt(DATA, delimiter=",", dtype=np.float32)
    train = rows[np.arange(len(rows)) % 4 != 3]
    images = torch.from_numpy(train[:, :64] / np.float32(16)).reshape(-1, 1, 8, 8)
    return images, torch.from_numpy(train[:, 64].astype(np.int64))


def make_model():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(128, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def write_safetensors(path, tensors):
    header, body = {}, b""
    for name, array in tensors.items():
        dtype = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("int64"): "I64"}[array.dtype]
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    header["__metadata__"] = {"written_by": "tests/reference/libtorch_swa.py", "torch": torch.__version__}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text + body)


def main():
    torch.manual_seed(0)
    images, labels = load_training_set()
    model = make_model()
    out = {"initial." + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    swa_model = AveragedModel(model)
    ema_model = AveragedModel(model, avg_fn=lambda averaged, current, n: torch.lerp(averaged, current, 1 - EMA_DECAY))
    swa_scheduler = SWALR(optimizer, swa_lr=SWA_LR, anneal_epochs=ANNEAL_EPOCHS, anneal_strategy="cos")
    generator = torch.Generator().manual_seed(1)
    orders, lrs = [], []
    for epoch in range(EPOCHS):
        order = torch.randperm(len(labels), generator=generator)
        orders.append(order.numpy())
        model.train()
        for start in range(0, len(order) - BATCH + 1, BATCH):
            batch = order[start:start + BATCH]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema_model.update_parameters(model)
        if epoch >= SWA_START:
            swa_model.update_parameters(model)
            swa_scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])

    # PyTorch 1.13's AveragedModel leaves buffers as they were at its construction (current
    # PyTorch copies them each update, as polyak does); update_bn recomputes them anyway.
    loader = [images[i:i + BN_BATCH] for i in range(0, len(labels), BN_BATCH)]
    update_bn(loader, swa_model)
    update_bn(loader, ema_model)

    out["order"] = np.stack(orders).astype(np.int64)
    out["lr"] = np.array(lrs, dtype=np.float64)
    for prefix, module in (("final.", model), ("swa.", swa_model.module), ("ema.", ema_model.module)):
        for k, v in module.state_dict().items():
            out[prefix + k] = v.detach().numpy().copy()
    write_safetensors(os.path.join(HERE, "libtorch_swa.safetensors"), out)


if __name__ == "__main__":
    main()
