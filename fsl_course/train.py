"""``fsl-course train METHOD --dataset NAME --budget PRESET --out PATH [--seed 0]``.

Trains a few-shot learner or a generative model on the training split of a dataset and
saves it: a learner with :func:`fsl_course.meta.save_learner` (then ``fsl-course eval PATH``
evaluates it on new classes), a generative model with :func:`fsl_course.generative.save_model`
(then ``fsl-course sample PATH`` draws from it). Each METHOD is one :class:`Method`: a function
``train(dataset, budget, device, seed, progress) -> (learner or model, info)``, where ``info``
(JSON-able) records the training hyperparameters in the checkpoint. :data:`METHODS` holds the
learner methods, :data:`GENERATIVE_METHODS` the generative ones, :data:`ALL_METHODS` both.
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
from fsl_course.generative import GenerativeModel, save_model
from fsl_course.meta import FewShotLearner, PixelNearestNeighbour, PixelPrototype, PretrainFinetune, pretrain, save_learner

# train(dataset, budget, device, seed, progress) -> (learner or generative model, JSON-able info)
TrainFn = Callable[[Any, Budget, torch.device, int, bool], tuple[FewShotLearner | GenerativeModel, dict[str, Any]]]


@dataclass(frozen=True)
class Method:
    """How to train one METHOD.

    ``produces``: ``"learner"`` (saved with ``save_learner``, evaluated with ``fsl-course eval``)
    or ``"generative"`` (saved with ``save_model``, sampled with ``fsl-course sample``).
    ``rotations``: ``None`` follows ``--no-rotations``; ``False`` always trains on the plain
    classes (a class-conditional model's labels must be the plain split's classes).
    """

    help: str
    train: TrainFn
    produces: str = "learner"
    rotations: bool | None = None

    def __post_init__(self):
        if self.produces not in ("learner", "generative"):
            raise ValueError(f"Method.produces must be 'learner' or 'generative', got {self.produces!r}")


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


def vae_hyperparameters(budget: Budget) -> dict[str, Any]:
    """Training size of the ``vae`` and ``cvae`` METHODs per budget (lessons 02-03 use the same):
    smoke: seconds; standard: about 1-1.5 minutes on an otherwise idle 2-core CPU (about 50 ms
    per step); full: a GPU, 33x the standard number of steps."""
    steps, batch_size = budget.pick(smoke=(4, 16), standard=(1500, 128), full=(50_000, 128))
    return {"steps": steps, "batch_size": batch_size, "lr": 2e-3, "latent_dim": 16, "hidden": 32}


def set_vae_hyperparameters(budget: Budget) -> dict[str, Any]:
    """Training size of the ``set-vae`` METHOD per budget: smoke: seconds; standard: about
    2 minutes on an otherwise idle 2-core CPU; full: a GPU, 30x the standard number of steps.
    Each step draws a set size ``K`` uniform in ``1..max_set_size`` and ``batch_size // K``
    sets of ``K`` images of one class (so generation works from 1 to 5 shots)."""
    steps, batch_size = budget.pick(smoke=(4, 16), standard=(2000, 128), full=(60_000, 128))
    return {"steps": steps, "batch_size": batch_size, "lr": 2e-3, "max_set_size": 5, "latent_dim": 16, "context_dim": 16, "hidden": 32}


def train_generative(model_name: str) -> TrainFn:
    """A generative METHOD: build the registered model ``model_name`` and fit it with
    :func:`fsl_course.vae.train_vae` on dynamically binarised training images."""

    def train(dataset, budget, device, seed, progress):
        from fsl_course.vae import ConditionalVAE, ConvVAE, SetVAE, train_vae

        if model_name == "set-vae":
            hyperparameters = set_vae_hyperparameters(budget)
            architecture = {k: hyperparameters.pop(k) for k in ("latent_dim", "context_dim", "hidden")}
            model = SetVAE(**architecture)
        else:
            hyperparameters = vae_hyperparameters(budget)
            architecture = {k: hyperparameters.pop(k) for k in ("latent_dim", "hidden")}
            if model_name == "cvae":
                model = ConditionalVAE(dataset.n_classes, **architecture)
                hyperparameters["embedding_lr_factor"] = 10.0  # label embeddings learn 10x faster (see train_vae)
            else:
                model = ConvVAE(**architecture)
        losses = train_vae(model, dataset, **hyperparameters, device=device, seed=seed, progress=progress)
        tail = losses[-min(100, len(losses)) :]
        info = {**hyperparameters, "binarization": "dynamic", "final_loss": sum(tail) / len(tail)}
        if model_name == "cvae" and getattr(dataset, "class_names", None) is not None:
            info["class_names"] = list(dataset.class_names)  # label y is class_names[y]
        return model, info

    return train


#: learner METHOD name (as typed on the command line, and the learner's registry name) -> how to train it
METHODS: dict[str, Method] = {
    "pixel-nn": Method("1-nearest neighbour on raw pixels (nothing to train)", nothing_to_train(PixelNearestNeighbour)),
    "pixel-prototype": Method("nearest class mean on raw pixels (nothing to train)", nothing_to_train(PixelPrototype)),
    "baseline": Method(
        "pretrain Conv-4 with cross-entropy, fine-tune a linear head per episode (Chen et al. 2019)", train_baseline
    ),
}

#: generative METHOD name (and the model's registry name) -> how to train it
GENERATIVE_METHODS: dict[str, Method] = {
    "vae": Method("convolutional VAE, Bernoulli decoder (Kingma & Welling 2014)", train_generative("vae"), "generative"),
    "cvae": Method(
        "class-conditional VAE on the plain training classes, never rotations (Sohn et al. 2015)",
        train_generative("cvae"),
        "generative",
        rotations=False,
    ),
    "set-vae": Method(
        "neural-statistician set VAE: new images of a class from K shots (Edwards & Storkey 2017)",
        train_generative("set-vae"),
        "generative",
    ),
}

#: every METHOD that ``fsl-course train`` accepts
ALL_METHODS: dict[str, Method] = {**METHODS, **GENERATIVE_METHODS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    methods = "; ".join(f"{name}: {method.help}" for name, method in ALL_METHODS.items())
    parser.add_argument("method", choices=sorted(ALL_METHODS), metavar="METHOD", help=f"what to train. {methods}")
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
    method = ALL_METHODS[args.method]
    rotations = args.rotations if method.rotations is None else method.rotations
    start = time.perf_counter()
    dataset = data.load(args.dataset, "train", args.root, rotations=rotations)
    print(
        f"training {args.method} on {args.dataset}/train ({dataset.n_classes} classes"
        f"{' incl. rotations' if rotations else ''}, {dataset.n_per_class} images each), "
        f"budget {budget}, device {device}, seed {args.seed}",
        flush=True,
    )
    fsl_course.seed_everything(args.seed)
    trained, info = method.train(dataset, budget, device, args.seed, True)
    wall_time = time.perf_counter() - start
    save = save_learner if method.produces == "learner" else save_model
    path = save(
        trained,
        args.out,
        command=command,
        seed=args.seed,
        budget=budget.name,
        dataset=args.dataset,
        split="train",
        rotations=rotations,
        device=str(device),
        wall_time_s=round(wall_time, 1),
        fsl_course_version=fsl_course.__version__,
        training=info,
    )
    print(f"saved {path}")
    print(f"wall time {wall_time:.1f} s")
    root = [] if args.root is None else ["--root", str(args.root)]
    if method.produces == "learner":
        evaluate = ["fsl-course", "eval", str(path), "--dataset", args.dataset, *root, "--way", "5", "--shot", "1", "--episodes", "600"]
        print(f"evaluate it with: {shlex.join(evaluate)}")
    else:
        print(f"final loss {info['final_loss']:.2f} nats per image (mean of the last {min(100, info['steps'])} steps)")
        support = root if hasattr(trained, "generate") else []  # a few-shot model draws its support set from the dataset
        print(f"sample from it with: {shlex.join(['fsl-course', 'sample', str(path), '--n', '64', '--out', 'grid.png', *support])}")
    return 0
