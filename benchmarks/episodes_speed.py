"""Episode sampling speed: 5-way 5-shot 15-query episodes per second from glyphs/test.

    python benchmarks/episodes_speed.py [--episodes 5000]

Also times the glyph dataset: a cached load, and (with --build) a fresh build in an empty
cache directory. The target is at least 2,000 episodes/s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from fsl_course.data import load
from fsl_course.episodes import EpisodeSampler

BUILD = "import time, fsl_course.data as d; t = time.perf_counter(); d.load('glyphs', 'train'); print(time.perf_counter() - t)"


def episodes_per_second(images: torch.Tensor, n: int, threads: int) -> float:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sampler = EpisodeSampler(images, way=5, shot=5, query=15, seed=0)
        sampler.sample()  # warm-up
        start = time.perf_counter()
        for _ in sampler.episodes(n):
            pass
        return n / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=5000)
    parser.add_argument("--build", action="store_true", help="also time a fresh build of the glyphs")
    args = parser.parse_args()

    start = time.perf_counter()
    test = load("glyphs", "test")
    print(f"cached load of glyphs/test: {time.perf_counter() - start:.2f} s ({test})")
    if args.build:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "FSL_COURSE_CACHE": cache}
            out = subprocess.run([sys.executable, "-c", BUILD], env=env, capture_output=True, text=True, check=True)
            print(f"fresh build of glyphs (all splits) in an empty cache: {float(out.stdout):.1f} s")
    rates = {t: episodes_per_second(test.images, args.episodes, t) for t in sorted({1, torch.get_num_threads()})}
    for threads, rate in rates.items():
        print(f"5-way 5-shot 15-query: {rate:8.0f} episodes/s with {threads} torch thread(s)")
    print(f"target 2,000 episodes/s: {'met' if min(rates.values()) >= 2000 else 'NOT met'}")


if __name__ == "__main__":
    main()
