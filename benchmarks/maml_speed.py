"""MAML meta-gradient speed: a per-task Python loop against ``torch.func.vmap`` over the tasks,
second order against first order, measured side by side in one run.

    python benchmarks/maml_speed.py [--tasks 16] [--repeats 5] [--device cpu]

Setting: a meta-batch of ``--tasks`` 5-way 1-shot tasks with 15 queries per class from the glyph
training split, the Conv-4 backbone with GroupNorm (valid per image, so batching tasks changes
nothing) and a linear head, one inner step of size 0.4 (Finn et al.'s Omniglot setting). For each
of the four ways it prints tasks per second, the peak memory (each way runs in its own child
process: on a CPU the peak resident set above the process's size before the first meta-gradient, on a
GPU ``torch.cuda.max_memory_allocated``) and the
ratios to the loop with second order; and the largest relative difference between the loop's
and vmap's meta-gradients for each order (they compute the same thing).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import psutil
import torch
from torch import nn
from torch.func import vmap

from fsl_course.data import load
from fsl_course.episodes import EpisodeSampler
from fsl_course.meta.backbones import Conv4
from fsl_course.meta.maml import maml_loss, parameters_of

WAYS = ("loop", "vmap")
ORDERS = ("second", "first")


def setting(tasks: int, device: torch.device, seed: int = 0):
    """The model (Conv-4 + linear head) and a meta-batch: support (N, 5, 1, 28, 28), labels (N, 5),
    query (N, 75, 1, 28, 28), labels (N, 75)."""
    torch.manual_seed(seed)
    # NCHW weights: torch.func.vmap has no batching rules for channels-last tensors (Conv4 stores its weights NHWC)
    model = nn.Sequential(Conv4(norm="group"), nn.Linear(64, 5)).to(device, memory_format=torch.contiguous_format)
    sampler = EpisodeSampler(load("glyphs", "train").images, way=5, shot=1, query=15, seed=seed)
    episodes = list(sampler.episodes(tasks))
    stack = lambda key: torch.stack([getattr(e, key) for e in episodes]).to(device)  # noqa: E731
    return model, stack("support_x"), stack("support_y"), stack("query_x"), stack("query_y")


def meta_gradient(model, batch, way: str, order: str) -> list[torch.Tensor]:
    """The mean over tasks of the MAML meta-gradient, by a Python loop or by ``vmap`` over tasks."""
    params = parameters_of(model)
    first_order = order == "first"
    if way == "loop":
        losses = torch.stack([maml_loss(model, params, *task, first_order=first_order) for task in zip(*batch)])
    else:
        losses = vmap(lambda sx, sy, qx, qy: maml_loss(model, params, sx, sy, qx, qy, first_order=first_order))(*batch)
    return list(torch.autograd.grad(losses.mean(), list(params.values())))


def child(args) -> None:
    device = torch.device(args.device)
    model, *batch = setting(args.tasks, device)
    baseline = psutil.Process().memory_info().rss / 2**20  # data, libraries, the model: before any meta-gradient
    meta_gradient(model, batch, args.way, args.order)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.repeats):
        meta_gradient(model, batch, args.way, args.order)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline  # KiB on Linux -> MiB, above the baseline
    seconds = time.perf_counter() - start
    print(json.dumps({"tasks_per_s": args.tasks * args.repeats / seconds, "peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--order", choices=ORDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way is not None:
        return child(args)
    device = torch.device(args.device)
    print(f"{args.tasks} tasks of 5-way 1-shot, 15 queries per class; Conv-4 (GroupNorm) + linear head; one inner step; "
          f"{device}, {torch.get_num_threads()} CPU threads")
    results = {}
    for order in ORDERS:
        for way in WAYS:
            out = subprocess.run([sys.executable, __file__, "--tasks", str(args.tasks), "--repeats", str(args.repeats),
                                  "--device", args.device, "--way", way, "--order", order],
                                 capture_output=True, text=True, check=True).stdout
            results[way, order] = json.loads(out.strip().splitlines()[-1])
    base = results["loop", "second"]
    print(f"{'way':6} {'order':7} {'tasks/s':>8} {'x loop-2nd':>10} {'peak MiB':>9} {'x loop-2nd':>10}   (peak: above the process's size)")
    for (way, order), r in results.items():
        print(f"{way:6} {order:7} {r['tasks_per_s']:8.1f} {r['tasks_per_s'] / base['tasks_per_s']:9.2f}x "
              f"{r['peak_mib']:9.0f} {r['peak_mib'] / base['peak_mib']:9.2f}x")
    model, *batch = setting(args.tasks, device)
    for order in ORDERS:
        loop, batched = meta_gradient(model, batch, "loop", order), meta_gradient(model, batch, "vmap", order)
        diff = max(((a - b).norm() / a.norm()).item() for a, b in zip(loop, batched))
        print(f"{order} order: largest relative difference between the loop's and vmap's meta-gradients {diff:.1e}")


if __name__ == "__main__":
    main()
