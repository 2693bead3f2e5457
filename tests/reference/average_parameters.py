#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes tests/reference/average_parameters.txt: the bits of PyTorch's average_parameters.

Run with Debian's python3-torch (PyTorch 1.13):  /usr/bin/python3 tests/reference/average_parameters.py

torch.distributed.algorithms.model_averaging.utils.average_parameters concatenates the parameters,
divides them by the group size (`flat_params /= world_size`) and sums them over the group
(`dist.all_reduce`). Here torch divides each member's concatenated float32 parameters itself, and
the sum runs in rank order from member 0's value, as polyak::ThreadCommunicator adds (a process
group would add in its own order; a sum from zero would turn -0 into +0). Members hold scalars from a formula that the C++ test repeats:

  h = (i * 2654435761 + r * 40503 + 12345) mod 2^32;  h ^= h >> 15;  h = h * 2246822519 mod 2^32;
  h ^= h >> 13;  x = (h >> 8) * 2^-21 - 4            (exact in float32)

for member r of n, index i. With `extremes`, indices i where i % 9973 is 0 hold instead the float32
whose bits are EXTREMES[(i // 9973 + r) % len(EXTREMES)] (another on each member), and where it is
1, EXTREMES[(i // 9973) % len(EXTREMES)] (the same on every member): subnormals, values just below
and above 2^k times the smallest normal, values near the largest float, zeros of both signs, an
infinity.

Format, one record a line:
  case <n> <scalars> <extremes 0|1> <FNV-1a 64 of the result's 32-bit words, hex> <scalars where
       x * (1 / n) summed differs from PyTorch's bits> <scalars where x summed, then times 1 / n,
       differs>
  value <index> <the result there, as an exact hexadecimal float>     (the first extreme indices)
"""
import os

import numpy as np
import torch

EXTREMES = [
    0x00000001, 0x80000003, 0x007FFFFF, 0x00800000, 0x80800001, 0x01000000, 0x01000001, 0x81800000,
    0x01800000, 0x02000001, 0x7F7FFFFF, 0xFF7FFFFF, 0x7E800000, 0x7E000001, 0x7D800000, 0x00000000,
    0x80000000, 0x7F800000, 0x3F800000,
]


def member(r, scalars, extremes):
    i = np.arange(scalars, dtype=np.uint64)
    h = (i * np.uint64(2654435761) + np.uint64(r * 40503 + 12345)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(2246822519)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(13)
    x = ((h >> np.uint64(8)).astype(np.float64) * 2.0**-21 - 4.0).astype(np.float32)
    if extremes:
        for offset, shift in ((0, r), (1, 0)):
            at = np.nonzero(i % np.uint64(9973) == np.uint64(offset))[0]
            bits = np.array([EXTREMES[(int(j) // 9973 + shift) % len(EXTREMES)] for j in at], dtype=np.uint32)
            x[at] = bits.view(np.float32)
    return torch.from_numpy(x)



def fnv1a_words(array):
    """FNV-1a over the result's 32-bit words (one step a word): what the test computes."""
    h = np.uint64(0xCBF29CE484222325)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for word in array.view(np.uint32).tolist():
            h = (h ^ np.uint64(word)) * prime
    return int(h)


def main():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "average_parameters.txt")
    lines = ["# Written by average_parameters.py with torch " + torch.__version__ + "; see it for the format."]
    for n in (2, 3, 4, 8):
        for scalars, extremes in ((300001, 0), (300001, 1), (4500000, 0), (4500000, 1)):
            reciprocal = torch.tensor(1.0, dtype=torch.float32) / n
            for r in range(n):
                x = member(r, scalars, extremes)
                flat = x.clone()
                flat /= n  # PyTorch's average_parameters
                if r == 0:  # (the sums start at member 0's values, not at zero: -0 stays -0)
                    total, multiplied, summed = flat, x * reciprocal, x.clone()
                else:
                    total += flat
                    multiplied += x * reciprocal
                    summed += x
            result = total.numpy()
            bits = result.view(np.uint32)
            differs = int(np.count_nonzero(bits != multiplied.numpy().view(np.uint32)))
            scaled_after = int(np.count_nonzero(bits != (summed * reciprocal).numpy().view(np.uint32)))
            lines.append(f"case {n} {scalars} {extremes} {fnv1a_words(result):016x} {differs} {scaled_after}")
            if extremes:
                for j in range(0, min(scalars, 9973 * 2 * len(EXTREMES)), 9973):
                    for at in (j, j + 1):
                        lines.append(f"value {at} {float(result[at]).hex()}")
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
