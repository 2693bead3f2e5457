#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""PyTorch doing polyak's benchmarked updates on the same shapes, and the table of the two.

  /usr/bin/python3 benchmarks/compare_pytorch.py POLYAK_UPDATE.json POLYAK_MPI.json [--max-size 1e8]
      [--torch-json BENCH_TORCH.json]
  /usr/bin/python3 benchmarks/compare_pytorch.py - --torch-json BENCH_TORCH.json   (that table alone)

Reads Google Benchmark's JSON from bench_update and bench_mpi (benchmarks/run.sh makes both), times
Debian's python3-torch (PyTorch 1.13) on the same layouts (benchmarks/layouts.json, scaled the same
way) and thread counts, and prints a Markdown table of medians:
- torch.optim.swa_utils.AveragedModel with an EMA avg_fn (what PyTorch 1.13 offers),
- a per-tensor lerp_ loop (the fastest single-tensor EMA),
- torch._foreach_mul_ + torch._foreach_add_ (the fused multi-tensor form),
- for averaging across processes: torch.distributed with gloo on 2 processes, as PyTorch's
  model_averaging.utils.average_parameters does it (cat, divide, all_reduce, copy back),
- for the device average (bench_torch): PyTorch's AveragedModel on the same device, next to torch's
  own loops and copy_ bandwidth from the C++ run.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.optim.swa_utils import AveragedModel

HERE = os.path.dirname(os.path.abspath(__file__))
DECAY = 0.999


def scaled_layout(layout, target):
    with open(os.path.join(HERE, "layouts.json")) as f:
        base = json.load(f)[layout]
    total = sum(base)
    return [max(1, int(round(s * target / total))) for s in base]  # as layouts.hpp rounds


def median_seconds(fn, repetitions=5, min_time=0.2):
    """The median over repetitions of the mean time of fn over enough calls to last min_time."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(min_time / once))
    samples = []
    for _ in range(repetitions):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def pytorch_updates(layout, size, threads):
    torch.set_num_threads(threads)
    sizes = scaled_layout(layout, size)
    module = torch.nn.Module()
    module.params = torch.nn.ParameterList([torch.nn.Parameter(torch.full((n,), 0.25)) for n in sizes])
    averaged_model = AveragedModel(module, avg_fn=lambda avg, cur, n: DECAY * avg + (1 - DECAY) * cur)
    averaged_model.update_parameters(module)
    current = [p.detach() for p in module.parameters()]
    averages = [torch.full((n,), 0.5) for n in sizes]
    with torch.no_grad():
        def lerp():
            for a, c in zip(averages, current):
                a.lerp_(c, 1 - DECAY)

        def foreach():
            torch._foreach_mul_(averages, DECAY)
            torch._foreach_add_(averages, current, alpha=1 - DECAY)

        return {
            "AveragedModel": median_seconds(lambda: averaged_model.update_parameters(module)),
            "lerp_": median_seconds(lerp),
            "foreach": median_seconds(foreach),
        }


def pytorch_averaged_model_seconds(layout, size, device):
    """PyTorch's AveragedModel doing an EMA step on `device`: get_ema_multi_avg_fn where this PyTorch
    has it (2.1 and later), else an EMA avg_fn (1.13)."""
    sizes = scaled_layout(layout, size)
    module = torch.nn.Module()
    module.params = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.full((n,), 0.25, device=device)) for n in sizes])
    from torch.optim import swa_utils
    if hasattr(swa_utils, "get_ema_multi_avg_fn"):
        averaged_model = AveragedModel(module, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(DECAY))
    else:
        averaged_model = AveragedModel(module, avg_fn=lambda avg, cur, n: DECAY * avg + (1 - DECAY) * cur)
    averaged_model.update_parameters(module)

    def step():
        averaged_model.update_parameters(module)
        if device == "cuda":
            torch.cuda.synchronize()

    return median_seconds(step)


def device_table(torch_json):
    """The device average (bench_torch) against torch's loops and PyTorch's AveragedModel."""
    runs = polyak_medians(torch_json)
    print("\n### The device average (libtorch), EMA, one step (medians; GB/s count 12 bytes a float scalar, "
          "10 a bf16 one; copy_ 8)\n")
    print("| device | model | scalars | polyak ms | polyak GB/s | copy_ GB/s | polyak / copy_ bandwidth "
          "| lerp_ ms | foreach mul+add ms | foreach_lerp ms | PyTorch AveragedModel ms "
          "| polyak speed-up vs AveragedModel | vs best torch loop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, seconds in runs.items():
        parts = name.split("/")  # torch/<what>/<device>/<dtype>/<layout>/<size>
        if parts[1] not in ("polyak", "polyak_host"):
            continue
        device, dtype, layout, exponent = parts[2], parts[3], parts[4], parts[5]
        size = float(exponent)
        scalars = sum(scaled_layout(layout, size))
        copy = runs[f"torch/copy_/{device}/float/one/{exponent}"]
        width = 12 if dtype == "float" else 10
        loops = {what: runs.get(f"torch/{what}/{device}/float/{layout}/{exponent}")
                 for what in ("lerp_", "foreach_mul_add", "foreach_lerp")}
        best = min(v for v in loops.values() if v is not None)
        reference = pytorch_averaged_model_seconds(layout, size, device) if dtype == "float" else None
        label = dtype + (" (host)" if parts[1] == "polyak_host" else "")
        fmt = lambda v: "-" if v is None else f"{v * 1e3:.3f}"
        print(f"| {device} | {label} | {exponent} | {seconds * 1e3:.3f} | {gbps(scalars, width, seconds):.1f} "
              f"| {gbps(size, 8, copy):.1f} | {gbps(scalars, width, seconds) / gbps(size, 8, copy):.2f} "
              f"| {fmt(loops['lerp_'])} | {fmt(loops['foreach_mul_add'])} | {fmt(loops['foreach_lerp'])} "
              f"| {fmt(reference)} | {'-' if reference is None else f'{reference / seconds:.1f}x'} "
              f"| {best / seconds:.2f}x |", flush=True)


def gloo_worker(rank, path, sizes, result):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    params = [torch.full((n,), float(rank)) for n in sizes]

    def average():  # torch.distributed.algorithms.model_averaging.utils.average_parameters
        flat = torch.cat([p.reshape(-1) for p in params])
        flat /= 2
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    seconds = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(10):
            average()
        seconds.append((time.perf_counter() - start) / 10)
    if rank == 0:
        result.put(statistics.median(seconds))
    dist.destroy_process_group()


def pytorch_gloo_average(layout, size):
    with tempfile.TemporaryDirectory() as folder:
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(gloo_worker, args=(os.path.join(folder, "rendezvous"), scaled_layout(layout, size), queue), nprocs=2)
        return queue.get()


def polyak_medians(path):
    """name -> median seconds a call (real time), from Google Benchmark's JSON."""
    with open(path) as f:
        runs = json.load(f)["benchmarks"]
    out = {}
    for run in runs:
        if run.get("aggregate_name") == "median" or (run.get("run_type") == "iteration" and run["run_name"] not in out):
            scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[run["time_unit"]]
            out[run["run_name"].replace("/real_time", "").replace("/iterations:30", "")] = run["real_time"] * scale
    return out


def gbps(scalars, bytes_per_scalar, seconds):
    return scalars * bytes_per_scalar / seconds / 1e9


def mpi_table(path, with_pytorch):
    """The table of bench_mpi's JSON: polyak, the bare collective and the limit, paired."""
    with open(path) as f:
        paired = [run for run in json.load(f)["benchmarks"] if run["name"].startswith("mpi/paired/")]
    print("\n### average_parameters against the bare MPI_Allreduce of the same bytes, 2 processes, "
          "resnet50 layout (timed in turn in each round; medians)\n")
    print("The limit is the bare collective plus the passes PyTorch's semantics add, timed apart in the same "
          "round: the division by the group size (bf16: also the conversions to float and back). The "
          "passes' bandwidth is this machine's, both processes running.\n")
    print("| scalar | scalars | rounds | polyak ms | bare ms | passes ms | passes GB/s | limit / bare "
          "| polyak / bare | polyak / limit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in paired:
        parts = run["name"].split("/")
        print(f"| {parts[2]} | {parts[4]} | {run['iterations']} | {run['polyak_ms']:.3f} | {run['bare_ms']:.3f} "
              f"| {run['passes_ms']:.3f} | {run['passes_GBps']:.1f} | {run['limit']:.3f} "
              f"| {run['median_ratio']:.3f} | {run['limit_ratio']:.3f} |")
    mine = [run["polyak_ms"] / 1e3 for run in paired if run["name"].startswith("mpi/paired/float/resnet50/1e7/")]
    if mine and with_pytorch:
        gloo = pytorch_gloo_average("resnet50", 1e7)
        print(f"\nPyTorch average_parameters over gloo, 1e7 float scalars: {gloo * 1e3:.2f} ms; "
              f"PyTorch with gloo / polyak: {gloo / mine[0]:.1f}x")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("update_json")
    parser.add_argument("mpi_json", nargs="?")
    parser.add_argument("--max-size", type=float, default=1e8)
    parser.add_argument("--no-pytorch", action="store_true", help="only the tables of polyak's own runs")
    parser.add_argument("--torch-json", help="bench_torch's JSON: the device average's table")
    args = parser.parse_args()
    if args.update_json == "-":  # another benchmark's table alone
        if args.mpi_json:
            mpi_table(args.mpi_json, with_pytorch=False)
        if args.torch_json:
            device_table(args.torch_json)
        return 0
    polyak = polyak_medians(args.update_json)

    print("### Every update against the fused loop (medians, one step; 12 bytes a float scalar, 10 a bf16 one)\n")
    print("| function | scalar | layout | scalars | threads | ms | GB/s | / fused loop |")
    print("|---|---|---|---|---|---|---|---|")
    for name, seconds in polyak.items():
        parts = name.split("/")
        if parts[0] != "update" or float(parts[4]) < 1e7:
            continue
        fused = polyak[f"limit/fused_loop/EMA/{parts[2]}/one/{parts[4]}/{parts[5]}"]
        scalars = sum(scaled_layout(parts[3], float(parts[4])))
        size = float(parts[4])
        width = 12 if parts[2] == "float" else 10
        print(f"| {parts[1]} | {parts[2]} | {parts[3]} | {parts[4]} | {parts[5].split(':')[1]} | {seconds * 1e3:.2f} "
              f"| {gbps(scalars, width, seconds):.1f} | {fused * scalars / size / seconds:.2f} |")
    print()
    if args.no_pytorch:
        return 0

    print("### Update: EMA, float, one step (medians; GB/s count 12 bytes a scalar)\n")
    print("| layout | scalars | threads | polyak ms | polyak GB/s | fused loop GB/s | polyak / fused loop "
          "| PyTorch AveragedModel ms | lerp_ ms | foreach ms | polyak speed-up vs AveragedModel "
          "| vs best of lerp_ and foreach |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in (1e5, 1e6, 1e7, 1e8):
        if size > args.max_size:
            continue
        exponent = f"1e{round(__import__('math').log10(size))}"
        for threads in (1, 2):
            fused = polyak.get(f"limit/fused_loop/EMA/float/one/{exponent}/threads:{threads}")
            for layout in ("resnet50", "transformer", "large4"):
                mine = polyak.get(f"update/EMA/float/{layout}/{exponent}/threads:{threads}")
                if mine is None:
                    continue
                scalars = sum(scaled_layout(layout, size))
                torch_times = pytorch_updates(layout, size, threads)
                best = min(torch_times["lerp_"], torch_times["foreach"])
                print(f"| {layout} | {exponent} | {threads} | {mine * 1e3:.3f} | {gbps(scalars, 12, mine):.1f} "
                      f"| {gbps(size, 12, fused):.1f} | {fused * scalars / size / mine:.2f} "
                      f"| {torch_times['AveragedModel'] * 1e3:.3f} | {torch_times['lerp_'] * 1e3:.3f} "
                      f"| {torch_times['foreach'] * 1e3:.3f} | {torch_times['AveragedModel'] / mine:.1f}x "
                      f"| {best / mine:.1f}x |", flush=True)

    print("\n### The machine's limit, same run\n")
    print("| kernel | scalars | threads | GB/s |")
    print("|---|---|---|---|")
    for name, seconds in sorted(polyak.items()):
        if name.startswith("limit/"):
            parts = name.split("/")
            size = float(parts[5])
            print(f"| {parts[1]} {parts[3]} | {parts[5]} | {parts[6].split(':')[1]} "
                  f"| {gbps(size, 12 if parts[3] == 'float' else 10, seconds):.1f} |")

    if args.mpi_json:
        mpi_table(args.mpi_json, with_pytorch=True)
    if args.torch_json:
        device_table(args.torch_json)


if __name__ == "__main__":
    sys.exit(main())
