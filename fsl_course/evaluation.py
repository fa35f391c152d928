"""Episodic evaluation: mean accuracy over a fixed, seeded set of episodes, with a 95%
confidence interval, the protocol of Vinyals et al. (2016) and Snell et al. (2017).

For per-episode accuracies a_1..a_n the interval is mean(a) +- 1.96 * s / sqrt(n), where s is
the sample standard deviation (ddof = 1): the normal approximation to the sampling
distribution of the mean, fine for the n = 600 episodes the literature uses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from fsl_course.data.dataset import FewShotDataset
from fsl_course.episodes import EpisodeSampler

Z95 = 1.959963984540054  # the 97.5% quantile of N(0, 1); the literature rounds it to 1.96


class Predictor(Protocol):
    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor: ...


def mean_ci95(accuracies) -> tuple[float, float]:
    """Mean and 95% confidence half-width of per-episode accuracies (n,):
    ci95 = 1.96 * std(ddof=1) / sqrt(n)."""
    a = np.asarray(accuracies, dtype=np.float64)
    if a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need a 1-D array of at least 2 per-episode accuracies, got shape {a.shape}")
    return float(a.mean()), float(Z95 * a.std(ddof=1) / math.sqrt(len(a)))


@dataclass
class EvalResult:
    """``accuracy`` and ``ci95`` are fractions in [0, 1]; ``protocol`` says how they were measured."""

    accuracy: float
    ci95: float
    accuracies: np.ndarray = field(repr=False)
    protocol: dict

    def __str__(self) -> str:
        p = self.protocol
        return (
            f"{100 * self.accuracy:.2f} +- {100 * self.ci95:.2f} % "
            f"({p['way']}-way {p['shot']}-shot, {p['episodes']} episodes, {p['dataset']}/{p['split']})"
        )

    def to_dict(self) -> dict:
        """``{"accuracy", "ci95", **protocol}``: what ``fsl-course eval --json`` prints."""
        return {"accuracy": self.accuracy, "ci95": self.ci95, **self.protocol}


@torch.no_grad()
def evaluate(
    learner: Predictor,
    dataset: FewShotDataset,
    way: int,
    shot: int,
    query: int = 15,
    episodes: int = 600,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Accuracy of ``learner.predict`` over ``episodes`` seeded episodes of ``dataset``.

    The same (dataset, split, way, shot, query, episodes, seed) gives the same episodes for
    every learner, so results are paired and comparable. ``learner.predict(support_x,
    support_y, query_x)`` must return logits (way * query, way).
    """
    from fsl_course.runtime import device as default_device

    device = torch.device(device) if device is not None else default_device()
    if hasattr(learner, "eval"):
        learner.eval()
    sampler = EpisodeSampler(dataset, way, shot, query, seed=seed)
    accuracies = np.empty(episodes)
    for i, episode in enumerate(tqdm(sampler.episodes(episodes), total=episodes, disable=not progress, desc="episodes", leave=False)):
        episode = episode.to(device)
        logits = learner.predict(episode.support_x, episode.support_y, episode.query_x)
        if logits.shape != (len(episode.query_y), way):
            raise ValueError(f"predict returned logits of shape {tuple(logits.shape)}, expected {(len(episode.query_y), way)}")
        accuracies[i] = (logits.argmax(dim=1) == episode.query_y).float().mean().item()
    mean, ci = mean_ci95(accuracies)
    protocol = {"dataset": dataset.name, "split": dataset.split, "way": way, "shot": shot, "query": query, "episodes": episodes, "seed": seed}
    return EvalResult(mean, ci, accuracies, protocol)


# --------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="PATH", help="a learner checkpoint written by `fsl-course train`")
    parser.add_argument("--dataset", default="glyphs", help="glyphs, digits or omniglot (default: glyphs)")
    parser.add_argument("--split", default="test", help="train, val or test (default: test)")
    parser.add_argument("--root", default=None, help="dataset folder (omniglot)")
    parser.add_argument("--way", type=int, default=5, help="N: classes per episode (default 5)")
    parser.add_argument("--shot", type=int, default=1, help="K: support examples per class (default 1)")
    parser.add_argument("--query", type=int, default=15, help="Q: queries per class (default 15)")
    parser.add_argument("--episodes", type=int, default=600, help="number of episodes (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="episode seed (default 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: fsl_course.device())")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from fsl_course.data import load
    from fsl_course.meta import load_learner

    from fsl_course.runtime import device as default_device

    device = torch.device(args.device) if args.device else default_device()
    dataset = load(args.dataset, args.split, root=args.root)
    learner = load_learner(args.checkpoint, device=device)
    result = evaluate(learner, dataset, args.way, args.shot, args.query, args.episodes, args.seed, device=device, progress=not args.json)
    if args.json:
        print(json.dumps({**result.to_dict(), "checkpoint": str(args.checkpoint)}))
    else:
        print(result)
    return 0
