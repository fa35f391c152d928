"""Diffusion sampling cost: the shipped unconditional glyph DDPM (fsl_course.pretrained "ddpm"),
1,000 ancestral steps against DDIM with 100, 50, 20 and 10 steps, measured side by side in one run
on the same device, the same batch and the same seed.

    python benchmarks/diffusion_sampling.py [--n 100] [--device cpu]

Prints seconds per batch, images per second and the speed-up over ancestral sampling. The quality
side of the trade (the Fréchet distance at each setting) comes from the evaluation command,
``fsl-course eval fsl_course/pretrained/ddpm.pt --samples 500 --sampler ddim --steps N``.
"""

from __future__ import annotations

import argparse
import time

import torch

import fsl_course
from fsl_course import pretrained

SETTINGS = (("ancestral", 1000), ("ddim", 100), ("ddim", 50), ("ddim", 20), ("ddim", 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="images per batch (default 100)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: fsl_course.device())")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else fsl_course.device()
    model = pretrained.load("ddpm", device=device)
    print(f"{args.n} samples per batch on {device}, {torch.get_num_threads()} CPU threads")
    model.sample(4, sampler="ddim", steps=2)  # warm-up
    rows = []
    for sampler, steps in SETTINGS:
        options = {"sampler": sampler} if sampler == "ancestral" else {"sampler": sampler, "steps": steps}
        start = time.perf_counter()
        model.sample(args.n, generator=torch.Generator().manual_seed(0), **options)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append((f"{sampler} {steps}", time.perf_counter() - start))
    base = rows[0][1]
    print(f"{'sampler, steps':16} {'seconds':>8} {'images/s':>9} {'speed-up':>9}")
    for name, seconds in rows:
        print(f"{name:16} {seconds:8.1f} {args.n / seconds:9.1f} {base / seconds:8.1f}x")


if __name__ == "__main__":
    main()
