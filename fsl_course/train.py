"""``fsl-course train METHOD --dataset NAME --budget PRESET --out PATH [--seed 0]``.

Trains a few-shot learner on the training split of a dataset and saves it with
:func:`fsl_course.meta.save_learner`; ``fsl-course eval PATH ...`` evaluates it on new
classes. Each METHOD is one entry of :data:`METHODS`: a function
``train(dataset, budget, device, seed, progress) -> (learner, info)``, where ``info``
(JSON-able) records the training hyperparameters in the checkpoint.
"""

from __future__ import annotations

import argparse
import shlex
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

import fsl_course
from fsl_course import data
from fsl_course.budgets import PRESETS, Budget
from fsl_course.meta import FewShotLearner, PixelNearestNeighbour, PixelPrototype, PretrainFinetune, pretrain, save_learner

# train(dataset, budget, device, seed, progress) -> (learner, JSON-able info)
TrainFn = Callable[[Any, Budget, torch.device, int, bool], tuple[FewShotLearner, dict[str, Any]]]


@dataclass(frozen=True)
class Method:
    help: str
    train: TrainFn


def nothing_to_train(learner_class: type[FewShotLearner]) -> TrainFn:
    """A METHOD whose learner has no parameters (it only looks at each episode's support set)."""

    def train(dataset, budget, device, seed, progress):
        return learner_class(), {}

    return train


def baseline_hyperparameters(budget: Budget) -> dict[str, Any]:
    """Pre-training size of the ``baseline`` METHOD per budget (lesson 01 uses the same):
    smoke: seconds; standard: about 1-2 minutes on a 2-core CPU; full: a GPU."""
    steps, batch_size = budget.pick(smoke=(8, 16), standard=(800, 64), full=(20_000, 128))
    return {"steps": steps, "batch_size": batch_size, "lr": 2e-3}


def train_baseline(dataset, budget: Budget, device: torch.device, seed: int, progress: bool):
    """Pre-train Conv-4 with cross-entropy on every training class (Chen et al. 2019)."""
    hyperparameters = baseline_hyperparameters(budget)
    learner = PretrainFinetune()
    losses = pretrain(learner.backbone, dataset, **hyperparameters, device=device, progress=progress, seed=seed)
    tail = losses[-min(100, len(losses)) :]
    return learner, {**hyperparameters, "final_loss": sum(tail) / len(tail)}


#: METHOD name (as typed on the command line, and the learner's registry name) -> how to train it
METHODS: dict[str, Method] = {
    "pixel-nn": Method("1-nearest neighbour on raw pixels (nothing to train)", nothing_to_train(PixelNearestNeighbour)),
    "pixel-prototype": Method("nearest class mean on raw pixels (nothing to train)", nothing_to_train(PixelPrototype)),
    "baseline": Method(
        "pretrain Conv-4 with cross-entropy, fine-tune a linear head per episode (Chen et al. 2019)", train_baseline
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    methods = "; ".join(f"{name}: {method.help}" for name, method in METHODS.items())
    parser.add_argument("method", choices=sorted(METHODS), metavar="METHOD", help=f"what to train. {methods}")
    parser.add_argument("--dataset", default="glyphs", metavar="NAME", help="glyphs (default), digits, or omniglot (needs --root)")
    parser.add_argument("--root", default=None, metavar="DIR", help="dataset folder (omniglot)")
    parser.add_argument("--budget", choices=PRESETS, default=None, help="compute preset (default: $FSL_COURSE_BUDGET, else standard)")
    parser.add_argument("--out", required=True, metavar="PATH", help="checkpoint file to write")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the batches (default 0)")
    parser.add_argument(
        "--no-rotations",
        dest="rotations",
        action="store_false",
        help="do not add the 90/180/270-degree rotations of each training class as extra classes",
    )


def command_line(args: argparse.Namespace, budget: Budget) -> str:
    """The command, spelt out with every default, so the checkpoint says how to redo it."""
    words = ["fsl-course", "train", args.method, "--dataset", args.dataset]
    if args.root is not None:
        words += ["--root", str(args.root)]
    words += ["--budget", budget.name, "--out", str(args.out), "--seed", str(args.seed)]
    if not args.rotations:
        words.append("--no-rotations")
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    budget = fsl_course.budget(args.budget)
    device = fsl_course.device()
    command = command_line(args, budget)
    start = time.perf_counter()
    dataset = data.load(args.dataset, "train", args.root, rotations=args.rotations)
    print(
        f"training {args.method} on {args.dataset}/train ({dataset.n_classes} classes"
        f"{' incl. rotations' if args.rotations else ''}, {dataset.n_per_class} images each), "
        f"budget {budget}, device {device}, seed {args.seed}",
        flush=True,
    )
    fsl_course.seed_everything(args.seed)
    learner, info = METHODS[args.method].train(dataset, budget, device, args.seed, True)
    wall_time = time.perf_counter() - start
    path = save_learner(
        learner,
        args.out,
        command=command,
        seed=args.seed,
        budget=budget.name,
        dataset=args.dataset,
        split="train",
        rotations=args.rotations,
        device=str(device),
        wall_time_s=round(wall_time, 1),
        fsl_course_version=fsl_course.__version__,
        training=info,
    )
    print(f"saved {path}")
    print(f"wall time {wall_time:.1f} s")
    root = [] if args.root is None else ["--root", str(args.root)]
    evaluate = ["fsl-course", "eval", str(path), "--dataset", args.dataset, *root, "--way", "5", "--shot", "1", "--episodes", "600"]
    print(f"evaluate it with: {shlex.join(evaluate)}")
    return 0
