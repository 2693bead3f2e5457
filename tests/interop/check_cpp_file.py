#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Reads the safetensors file interop_tool wrote with nothing but json and numpy, and checks every
value against the formula both sides share: value i of tensor t is (i - 3) / 4 + t (row-major)."""
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64}


def read(path):
    data = open(path, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = body[begin:end]
        if entry["dtype"] == "BF16":  # the upper half of a float32
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<"))
        tensors[name] = (entry["dtype"], array.reshape(entry["shape"]))
    return tensors, metadata


def main():
    tensors, metadata = read(sys.argv[1])
    expected_dtype = {"f32": "F32", "f32_colmajor": "F32", "f64": "F64", "f16": "F16", "bf16": "BF16"}
    offsets = {"f32": 0, "f32_colmajor": 1, "f64": 2, "f16": 3, "bf16": 4}
    worst = 0.0
    for name, t in offsets.items():
        dtype, array = tensors[name]
        assert dtype == expected_dtype[name], (name, dtype)
        want = (np.arange(array.size, dtype=np.float64) - 3) / 4 + t
        if dtype in ("F32", "F16"):
            want = want.astype(np.float32).astype(DTYPES[dtype]).astype(np.float64)
        if dtype == "BF16":
            want = want.astype(np.float32)  # these values are exact in bfloat16
        got = array.reshape(-1).astype(np.float64)
        worst = max(worst, float(np.max(np.abs(got - want))))
        assert np.array_equal(got, want), (name, got, want)
    assert tensors["f32"][1].shape == (3, 4) and tensors["f32_colmajor"][1].shape == (2, 3, 4)
    assert tensors["n_averaged"][1].reshape(()) == 7
    assert metadata == {"written_by": "polyak"}, metadata
    print(f"interop: Python (json + numpy) read the C++-written file: {len(tensors)} tensors, "
          f"largest difference {worst}")


if __name__ == "__main__":
    main()
