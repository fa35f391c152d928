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
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import torch

import fsl_course
from fsl_course import data
from fsl_course.budgets import PRESETS, Budget
from fsl_course.dagan import train_dagan
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
    ``steps_override``: the train function accepts ``steps=N`` to replace the budget's number of
    training steps (``--steps``; the shipped pretrained diffusion models are made this way).
    ``resumable``: the train function accepts ``resume=PATH`` (``OUT.partial``), where it keeps its state
    while training; run the same command again after an interruption to continue.
    """

    help: str
    train: TrainFn
    produces: str = "learner"
    rotations: bool | None = None
    steps_override: bool = False  # its train function takes ``steps=N`` (``--steps``)
    resumable: bool = False  # its train function takes ``resume=PATH`` and continues an interrupted run from it

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
            architecture = {k: hyperparameters.pop(k) for k in ("latent_dim", "hidden", "aux_weight") if k in hyperparameters}
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


def gan_hyperparameters(budget: Budget, conditional: bool = False) -> dict[str, Any]:
    """Training size of the ``dcgan`` (and, with ``conditional=True``, ``cgan``) METHOD per budget:
    non-saturating loss, Adam ``(0.5, 0.999)``, one discriminator and one generator update per
    step at batch 64 (see :func:`fsl_course.gan.train_gan`). The ``cgan`` adds the AC-GAN
    auxiliary classifier with weight 1 (``aux_weight``).

    * smoke: seconds.
    * standard: ``dcgan`` about 1-1.5 minutes, ``cgan`` about 3 minutes on an otherwise idle
      2-core CPU. Measured on a shared 2-core CPU (load average about 4) with one thread:
      ``dcgan`` 1,200 steps in 137 s (about 80 ms of CPU per step), Fréchet distance 20.0
      (held-out real images: 1.2). The learning rate is 1e-3, not the paper's 2e-4: for this
      short run it gave FD 20.0 against 23.7 at 5e-4 and 37.5 at 2e-4 (``dcgan``, 1,200 steps,
      seed 0). The ``cgan`` needs more steps: its auxiliary classifier must first learn 1,118
      classes before it can teach the generator their labels. Measured (2 threads, seed 0,
      2,000 samples): 800 steps gave conditional accuracy 0.75% (FD 32.6); the standard 2,000 steps
      gave 19.9% (FD 11.75, real held-out images 60.5%, floor 1.18; 5 min 14 s wall on a shared
      CPU); without the auxiliary classifier 800 steps gave 0.15% (chance: 0.09%).
    * full: a GPU, 30,000 steps at batch 128 with the DCGAN paper's 2e-4 (Radford et al. 2016).
    """
    standard = 2000 if conditional else 1200
    steps, batch_size, lr = budget.pick(smoke=(3, 16, 2e-4), standard=(standard, 64, 1e-3), full=(30_000, 128, 2e-4))
    architecture = {"latent_dim": 64, "hidden": 32, **({"aux_weight": 1.0} if conditional else {})}
    return {"steps": steps, "batch_size": batch_size, "lr": lr, **architecture}


def wgan_gp_hyperparameters(budget: Budget) -> dict[str, Any]:
    """Training size of the ``wgan-gp`` METHOD per budget: critic loss + gradient penalty (weight
    10), Adam ``(0, 0.9)``; one step = ``critic_steps`` critic updates, each on a fresh batch of 64
    with a double backward for the penalty, then one generator update (see
    :func:`fsl_course.gan.train_gan`).

    * smoke: seconds.
    * standard: about 1-1.5 minutes on an otherwise idle 2-core CPU: 400 steps with 2 critic
      updates each (measured on a shared 2-core CPU, load average about 4, one thread: 131 s,
      about 230 ms of CPU per step; FD 27.7). At equal time the paper's 5 critic updates leave
      too few generator steps: 150 steps x 5 gave FD 157, 380 x 2 gave 32.2 and 650 x 1 gave
      32.0 (lr 2e-4, seed 0); lr 5e-4 then improved 2 critic updates to 27.7.
    * full: a GPU, 20,000 steps with the paper's 5 critic updates and lr 1e-4 (Gulrajani et al.
      2017, Algorithm 1).
    """
    steps, batch_size, critic_steps, lr = budget.pick(smoke=(2, 16, 2, 1e-4), standard=(400, 64, 2, 5e-4),
                                                      full=(20_000, 64, 5, 1e-4))
    return {"steps": steps, "batch_size": batch_size, "critic_steps": critic_steps, "lr": lr, "latent_dim": 64, "hidden": 32}


def train_adversarial(method_name: str) -> TrainFn:
    """A GAN METHOD: ``"dcgan"`` (:class:`~fsl_course.gan.GAN`, non-saturating loss), ``"wgan-gp"``
    (the same :class:`~fsl_course.gan.GAN` networks with ``loss="wgan-gp"``; its registry name is
    ``"dcgan"``, and the checkpoint's kwargs say the loss) or ``"cgan"``
    (:class:`~fsl_course.gan.ConditionalGAN` over the dataset's classes), fitted with
    :func:`fsl_course.gan.train_gan`. ``info`` records the hyperparameters and the mean
    discriminator (critic) and generator losses of the last 100 steps.
    The ``cgan`` has the AC-GAN auxiliary classifier (``aux_weight`` in its kwargs): with the
    projection discriminator alone its samples ignored their labels (conditional accuracy 0.15 to
    0.3 %, chance 1/1118 = 0.09 %), because with 1,118 classes of 20 images a label-embedding row
    gets a gradient in few of the steps."""
    if method_name not in ("dcgan", "wgan-gp", "cgan"):
        raise ValueError(f"unknown GAN method {method_name!r}")

    def train(dataset, budget, device, seed, progress):
        from fsl_course.gan import GAN, ConditionalGAN, train_gan

        loss = "wgan-gp" if method_name == "wgan-gp" else "nonsaturating"
        if loss == "wgan-gp":
            hyperparameters = wgan_gp_hyperparameters(budget)
        else:
            hyperparameters = gan_hyperparameters(budget, conditional=method_name == "cgan")
        architecture = {k: hyperparameters.pop(k) for k in ("latent_dim", "hidden", "aux_weight") if k in hyperparameters}
        if method_name == "cgan":
            model = ConditionalGAN(dataset.n_classes, **architecture, loss=loss)
        else:
            model = GAN(**architecture, loss=loss)
        history = train_gan(model, dataset, **hyperparameters, device=device, seed=seed, progress=progress)
        tail = min(100, len(history["d_loss"]))
        info = {
            **hyperparameters,
            "loss": loss,
            "final_d_loss": sum(history["d_loss"][-tail:]) / tail,
            "final_g_loss": sum(history["g_loss"][-tail:]) / tail,
        }
        if method_name == "cgan" and getattr(dataset, "class_names", None) is not None:
            info["class_names"] = list(dataset.class_names)  # label y is class_names[y]
        return model, info

    return train


def diffusion_hyperparameters(budget: Budget, conditional: bool = False) -> dict[str, Any]:
    """Training size of the ``ddpm`` (and, with ``conditional=True``, ``cond-ddpm``) METHOD per
    budget: :func:`fsl_course.diffusion.train_diffusion`, Adam, gradient norm clipped to 1, a
    1,000-step cosine schedule, the default :class:`~fsl_course.diffusion.UNet`; the ``cond-ddpm``
    drops the label with probability 0.1 (classifier-free guidance).

    * smoke: seconds.
    * standard: about 3-4 minutes on a 2-core CPU (about 0.25 s per step of 64 images).
    * full: a GPU, 50,000 steps at batch 128 (still far fewer images than Ho et al. 2020).
    """
    steps, batch_size, lr = budget.pick(smoke=(3, 16, 2e-3), standard=(800, 64, 2e-3), full=(50_000, 128, 2e-4))
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "num_steps": 1000, "schedule": "cosine",
            **({"p_uncond": 0.1} if conditional else {})}


def train_denoising(method_name: str) -> TrainFn:
    """A diffusion METHOD: ``"ddpm"`` (:class:`~fsl_course.diffusion.DDPM`), ``"cond-ddpm"``
    (:class:`~fsl_course.diffusion.ConditionalDDPM` over the dataset's classes) or ``"set-ddpm"``
    (:class:`~fsl_course.few_shot_diffusion.SetConditionalDDPM`, conditioned on support sets),
    fitted with :func:`fsl_course.diffusion.train_diffusion` or
    :func:`fsl_course.few_shot_diffusion.train_set_diffusion`. ``steps`` replaces the budget's
    number of steps. ``info`` records the hyperparameters and the mean noise-prediction loss of
    the last 100 steps (``final_mse``)."""
    if method_name not in ("ddpm", "cond-ddpm", "set-ddpm"):
        raise ValueError(f"unknown diffusion method {method_name!r}")

    def train(dataset, budget, device, seed, progress, steps=None):
        from fsl_course.diffusion import DDPM, ConditionalDDPM, train_diffusion

        hyperparameters = diffusion_hyperparameters(budget, conditional=method_name != "ddpm")
        if steps is not None:
            hyperparameters["steps"] = steps
        architecture = {k: hyperparameters.pop(k) for k in ("num_steps", "schedule")}
        if method_name == "set-ddpm":
            from fsl_course.few_shot_diffusion import SetConditionalDDPM, train_set_diffusion

            model, fit = SetConditionalDDPM(**architecture), train_set_diffusion
        elif method_name == "cond-ddpm":
            model, fit = ConditionalDDPM(dataset.n_classes, **architecture), train_diffusion
        else:
            model, fit = DDPM(**architecture), train_diffusion
        history = fit(model, dataset, **hyperparameters, device=device, seed=seed, progress=progress)
        tail = min(100, len(history["loss"]))
        info = {**hyperparameters, **architecture, "final_mse": sum(history["loss"][-tail:]) / tail}
        if method_name == "cond-ddpm" and getattr(dataset, "class_names", None) is not None:
            info["class_names"] = list(dataset.class_names)  # label y is class_names[y]
        return model, info

    return train


#: Episodic training of each meta-learner per budget: the episodes it trains on (``way``, ``shot``,
#: ``query`` per class, ``meta_batch`` episodes per step), ``steps`` and peak ``lr`` (cosine decay), and the
#: learner's own arguments (``kwargs``). Standard: at most 5 minutes on a 2-core CPU (measured times in
#: lessons 09-11); full: a GPU, about 10x the episodes.
META_SETTINGS: dict[str, dict[str, Any]] = {
    "protonet": {"way": 60, "shot": 1, "query": 1, "meta_batch": 1, "steps": (10, 2000, 25_000), "lr": 3e-3, "kwargs": {}},
    "matching": {"way": 60, "shot": 1, "query": 1, "meta_batch": 1, "steps": (10, 2000, 25_000), "lr": 3e-3, "kwargs": {}},
    "relation": {"way": 5, "shot": 1, "query": 10, "meta_batch": 1, "steps": (10, 2000, 30_000), "lr": 1e-3, "kwargs": {}},
    "maml": {"way": 5, "shot": 1, "query": 5, "meta_batch": 4, "steps": (3, 800, 10_000), "lr": 1e-3, "kwargs": {}},
    "fomaml": {"way": 5, "shot": 1, "query": 5, "meta_batch": 4, "steps": (3, 1300, 15_000), "lr": 1e-3, "kwargs": {}},
    "reptile": {"way": 5, "shot": 1, "query": 4, "meta_batch": 4, "steps": (3, 420, 10_000), "lr": 1.0, "kwargs": {}},
    "mann": {"way": 5, "shot": 1, "query": 5, "meta_batch": 1, "steps": (10, 5000, 60_000), "lr": 1e-3, "kwargs": {}},
    "hypernet": {"way": 60, "shot": 1, "query": 1, "meta_batch": 1, "steps": (10, 2000, 25_000), "lr": 3e-3, "kwargs": {}},
}


def meta_hyperparameters(name: str, budget: Budget) -> dict[str, Any]:
    """The episodic training settings of meta-learner ``name`` at ``budget`` (see :data:`META_SETTINGS`);
    the smoke budget trains on 5-way episodes with 2 queries per class (any dataset of >= 5 classes of >= 3 images)."""
    setting = dict(META_SETTINGS[name])
    smoke, standard, full = setting.pop("steps")
    if budget.name == "smoke":
        setting.update(way=5, query=2)
    return {**setting, "steps": budget.pick(smoke=smoke, standard=standard, full=full)}


def train_meta(name: str) -> TrainFn:
    """A meta-learning METHOD: build the registered learner ``name`` and train it episodically with
    :func:`fsl_course.meta.train_episodic` (resumable: ``resume`` is where it keeps its state)."""
    if name not in META_SETTINGS:
        raise ValueError(f"unknown meta-learner {name!r}; choose one of {', '.join(META_SETTINGS)}")

    def train(dataset, budget, device, seed, progress, steps=None, resume=None):
        from fsl_course.meta import LEARNERS, train_episodic

        hyperparameters = meta_hyperparameters(name, budget)
        if steps is not None:
            hyperparameters["steps"] = steps
        kwargs = hyperparameters.pop("kwargs")
        learner = LEARNERS[name](**kwargs)
        history = train_episodic(learner, dataset, **hyperparameters, device=device, seed=seed, progress=progress, resume=resume)
        tail = history["loss"][-min(100, len(history["loss"])):]
        return learner, {**hyperparameters, "final_loss": sum(tail) / len(tail), "training_seconds": round(history["seconds"], 1)}

    return train


#: learner METHOD name (as typed on the command line, and the learner's registry name) -> how to train it
METHODS: dict[str, Method] = {
    "pixel-nn": Method("1-nearest neighbour on raw pixels (nothing to train)", nothing_to_train(PixelNearestNeighbour)),
    "pixel-prototype": Method("nearest class mean on raw pixels (nothing to train)", nothing_to_train(PixelPrototype)),
    "baseline": Method(
        "pretrain Conv-4 with cross-entropy, fine-tune a linear head per episode (Chen et al. 2019)", train_baseline
    ),
    "dagan": Method(
        "the baseline plus a DAGAN-style generator of same-class features that augments each episode's support set "
        "(feature-space variant of Antoniou et al. 2017)",
        train_dagan,
    ),
    "protonet": Method("Prototypical Networks: nearest prototype in a learned embedding (Snell et al. 2017)",
                       train_meta("protonet"), steps_override=True, resumable=True),
    "matching": Method("Matching Networks: attention over the support set by cosine similarity (Vinyals et al. 2016)",
                       train_meta("matching"), steps_override=True, resumable=True),
    "relation": Method("Relation Networks: a learned similarity module (Sung et al. 2018)",
                       train_meta("relation"), steps_override=True, resumable=True),
    "maml": Method("second-order MAML with a GroupNorm Conv-4 (Finn et al. 2017)", train_meta("maml"),
                   steps_override=True, resumable=True),
    "fomaml": Method("first-order MAML (Finn et al. 2017)", train_meta("fomaml"), steps_override=True, resumable=True),
    "reptile": Method("Reptile (Nichol et al. 2018)", train_meta("reptile"), steps_override=True, resumable=True),
    "mann": Method("a black-box LSTM learner fed the support labels one step late (after Santoro et al. 2016)",
                   train_meta("mann"), steps_override=True, resumable=True),
    "hypernet": Method("a hypernetwork that generates each episode's linear classifier from the support set",
                       train_meta("hypernet"), steps_override=True, resumable=True),
}

#: generative METHOD name -> how to train it. The name is the model's registry name, except
#: ``wgan-gp``, which saves a ``"dcgan"`` model with ``loss="wgan-gp"`` in its kwargs.
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
    "dcgan": Method("DCGAN, non-saturating loss (Goodfellow et al. 2014; Radford et al. 2016)", train_adversarial("dcgan"), "generative"),
    "wgan-gp": Method(
        "the DCGAN's networks as a Wasserstein GAN with gradient penalty (Gulrajani et al. 2017); saved as model 'dcgan'",
        train_adversarial("wgan-gp"),
        "generative",
    ),
    "cgan": Method(
        "class-conditional DCGAN with a projection discriminator and an auxiliary classifier, on the plain training classes, never rotations "
        "(Mirza & Osindero 2014; Miyato & Koyama 2018; Odena et al. 2017)",
        train_adversarial("cgan"),
        "generative",
        rotations=False,
    ),
    "ddpm": Method("denoising diffusion model, noise-prediction loss, cosine schedule (Ho et al. 2020; Nichol & Dhariwal 2021)",
                   train_denoising("ddpm"), "generative", steps_override=True),
    "cond-ddpm": Method(
        "class-conditional DDPM with label dropout for classifier-free guidance, on the plain training classes, never rotations "
        "(Ho & Salimans 2022)",
        train_denoising("cond-ddpm"),
        "generative",
        rotations=False,
        steps_override=True,
    ),
    "set-ddpm": Method(
        "DDPM conditioned on a support set (1-5 shots of the target's class: their embedding by FiLM and their mean image as an "
        "input channel) with set dropout for guidance: "
        "new images of an unseen class from K shots without fine-tuning",
        train_denoising("set-ddpm"),
        "generative",
        steps_override=True,
    ),
}

#: every METHOD that ``fsl-course train`` accepts
ALL_METHODS: dict[str, Method] = {**METHODS, **GENERATIVE_METHODS}


def steps_methods() -> str:
    """The METHODs that take ``--steps``, comma-separated (for help and error messages)."""
    return ", ".join(name for name, method in ALL_METHODS.items() if method.steps_override)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    methods = "; ".join(f"{name}: {method.help}" for name, method in ALL_METHODS.items())
    parser.add_argument("method", choices=sorted(ALL_METHODS), metavar="METHOD", help=f"what to train. {methods}")
    parser.add_argument("--dataset", default="glyphs", metavar="NAME", help="glyphs (default), digits, or omniglot (needs --root)")
    parser.add_argument("--root", default=None, metavar="DIR", help="dataset folder (omniglot)")
    parser.add_argument("--budget", choices=PRESETS, default=None, help="compute preset (default: $FSL_COURSE_BUDGET, else standard)")
    parser.add_argument("--out", required=True, metavar="PATH", help="checkpoint file to write")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the batches (default 0)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help=f"replace the budget's number of training steps ({steps_methods()} only; recorded in the checkpoint)")
    parser.add_argument("--restart", action="store_true",
                        help="meta-learners: discard the state of an interrupted run (OUT.partial) instead of resuming it")
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
    if args.steps is not None:
        words += ["--steps", str(args.steps)]
    if not args.rotations:
        words.append("--no-rotations")
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    budget = fsl_course.budget(args.budget)
    device = fsl_course.device()
    command = command_line(args, budget)
    method = ALL_METHODS[args.method]
    overrides = {}
    if args.steps is not None:
        if not method.steps_override:
            raise ValueError(f"--steps is not supported by {args.method}: it applies to {steps_methods()}")
        if args.steps < 1:
            raise ValueError(f"--steps must be a positive number of training steps, got {args.steps}")
        overrides["steps"] = args.steps
    if method.resumable:
        overrides["resume"] = resume = Path(f"{args.out}.partial")
        if resume.exists():
            if args.restart:
                resume.unlink()
                print(f"--restart: removed the interrupted run's state {resume}")
            else:
                print(f"found the state of an interrupted run in {resume}: continuing it (--restart starts afresh)")
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
    trained, info = method.train(dataset, budget, device, args.seed, True, **overrides)
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
        last = f"mean of the last {min(100, info['steps'])} steps"
        if "final_loss" in info:
            print(f"final loss {info['final_loss']:.2f} nats per image ({last})")
        elif "final_mse" in info:
            print(f"final noise-prediction loss {info['final_mse']:.4f} ({last})")
        else:
            d_name = "critic" if info.get("loss") == "wgan-gp" else "discriminator"
            print(f"final losses: {d_name} {info['final_d_loss']:.3f}, generator {info['final_g_loss']:.3f} ({last})")
        support = root if hasattr(trained, "generate") else []  # a few-shot model draws its support set from the dataset
        print(f"sample from it with: {shlex.join(['fsl-course', 'sample', str(path), '--n', '64', '--out', 'grid.png', *support])}")
    return 0
