#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes a safetensors file with json and numpy alone (F32, F64, F16, BF16, I64 and metadata) for
interop_tool to check: value i of tensor t is (i - 3) / 4 + t. The header lists the tensors out of
data order, as other writers may."""
import json
import struct
import sys

import numpy as np


def values(n, t):
    return (np.arange(n, dtype=np.float64) - 3) / 4 + t


def main():
    f32 = values(12, 0).astype("<f4").reshape(3, 4)
    f64 = values(5, 2).astype("<f8")
    f16 = values(4, 3).astype(np.float32).astype("<f2").reshape(2, 2)
    bf16 = (values(6, 4).astype(np.float32).view(np.uint32) >> 16).astype("<u2")  # exact values here
    i64 = np.array(7, dtype="<i8")
    parts = [("bf16", "BF16", bf16), ("f32", "F32", f32), ("i64", "I64", i64), ("f64", "F64", f64), ("f16", "F16", f16)]
    header, body = {}, b""
    for name, dtype, array in parts:
        raw = array.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape) if name != "bf16" else [6],
                        "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    header["n_averaged"] = header.pop("i64")
    header["__metadata__"] = {"written_by": "numpy"}
    text = json.dumps(dict(reversed(list(header.items())))).encode()
    with open(sys.argv[1], "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text + body)


if __name__ == "__main__":
    main()
