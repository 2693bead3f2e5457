#!/usr/bin/env python3
"""What HierarchicalModelAverager saves over flat averaging, from an analytic model of allreduce
(not a measurement). Prints docs/distributed.md's scaling table:  python3 benchmarks/scaling_model.py

Allreduce of n bytes over p ranks, alpha the latency of one message, beta seconds a byte of a link:
  ring: 2 (p - 1) alpha + 2 (p - 1) / p * n beta     (reduce-scatter, then all-gather)
  tree: 2 log2(p) alpha + 2 n beta                   (pipelined double binary tree, as NCCL's)
Each average takes the faster of the two. Schedules compared, per 16 steps:
  flat:          PeriodicModelAverager(period 4) over the world: 4 world averages
  hierarchical:  HierarchicalModelAverager({{4, 8}, {16, world}}): 3 averages within a node of
                 8 ranks, 1 over the world
Assumptions: 8 ranks a node; between nodes alpha 5 us and 25 GB/s a rank (a 200 Gb/s link each);
within a node alpha 1 us and 150 GB/s; fp32 on the wire (4 bytes a parameter); no overlap with
compute; the reduction's arithmetic is free.
"""
import math

RANKS_PER_NODE = 8
INTER = (5e-6, 1 / 25e9)   # alpha (s), beta (s/byte)
INTRA = (1e-6, 1 / 150e9)


def ring(n, p, link):
    alpha, beta = link
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta


def tree(n, p, link):
    alpha, beta = link
    return 2 * math.log2(p) * alpha + 2 * n * beta


def allreduce(n, p, link):
    return min(ring(n, p, link), tree(n, p, link))


def fmt(seconds):
    return f"{seconds * 1e3:,.1f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def main():
    print("| parameters | ranks | world average: ring / tree | node average | "
          "flat, per 16 steps | hierarchical, per 16 steps | flat / hierarchical |")
    print("|---|---|---|---|---|---|---|")
    for params in (1e8, 7e9):
        n = 4 * params
        for p in (64, 512, 4096):
            world = allreduce(n, p, INTER)
            node = allreduce(n, RANKS_PER_NODE, INTRA)
            flat = 4 * world
            hierarchical = 3 * node + world
            print(f"| {params:.0e} | {p} | {fmt(ring(n, p, INTER))} / {fmt(tree(n, p, INTER))} | {fmt(node)} "
                  f"| {fmt(flat)} | {fmt(hierarchical)} | {flat / hierarchical:.2f}x |")


if __name__ == "__main__":
    main()
