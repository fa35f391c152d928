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
    parser.add_argument("checkpoint", metavar="PATH",
                        help="a checkpoint written by `fsl-course train`: a few-shot learner or a generative model")
    parser.add_argument("--dataset", default="glyphs", help="glyphs, digits or omniglot (default: glyphs)")
    parser.add_argument("--split", default="test", help="train, val or test (default: test)")
    parser.add_argument("--root", default=None, help="dataset folder (omniglot)")
    parser.add_argument("--way", type=int, default=5, help="N: classes per episode (default 5)")
    parser.add_argument("--shot", type=int, default=None,
                        help="K: support examples per class (default 1; generative models: both 1 and 5)")
    parser.add_argument("--query", type=int, default=15, help="Q: queries per class (default 15)")
    parser.add_argument("--episodes", type=int, default=None,
                        help="number of episodes (default 600; generative models: 100)")
    parser.add_argument("--seed", type=int, default=0, help="episode seed (default 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: fsl_course.device())")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    generative = parser.add_argument_group("generative models (see fsl_course.metrics)")
    generative.add_argument("--samples", type=int, default=2000,
                            help="samples for the Fréchet distance and the class-conditional accuracy (default 2000)")
    generative.add_argument("--gen-samples", type=int, default=20,
                            help="images generated per class in a few-shot episode (default 20)")
    generative.add_argument("--baselines", action="store_true",
                            help="few-shot models: also score classic augmentation of the shots and the model's "
                                 "unconditional samples on the same episodes")
    diffusion = parser.add_argument_group("diffusion models (ddpm, cond-ddpm, set-ddpm)")
    diffusion.add_argument("--sampler", choices=("ancestral", "ddim"), default=None,
                           help="default: the model's (ancestral for ddpm and cond-ddpm: all T steps, slow on a CPU; ddim for set-ddpm)")
    diffusion.add_argument("--steps", type=int, default=None, metavar="N", help="DDIM steps (default 50)")
    diffusion.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1] (default 0)")
    diffusion.add_argument("--guidance", type=float, default=None, metavar="W",
                           help="classifier-free guidance weight w: eps = (1 + w) eps(x, y) - w eps(x, null) (default none)")
    generative.add_argument("--nll-k", type=int, default=0, metavar="K",
                            help="VAEs: also estimate the test NLL with the IWAE bound with K samples (e.g. 5000; default off)")
    generative.add_argument("--nll-images", type=int, default=500, metavar="M",
                            help="test images for the NLL, a fixed seeded binarisation (default 500)")


def run(args) -> int:
    from fsl_course.checkpoint import load_checkpoint
    from fsl_course.data import load
    from fsl_course.runtime import device as default_device

    device = torch.device(args.device) if args.device else default_device()
    if "model" in load_checkpoint(args.checkpoint)[1]:
        return run_generative(args, device)
    from fsl_course.meta import load_learner

    dataset = load(args.dataset, args.split, root=args.root)
    learner = load_learner(args.checkpoint, device=device)
    shot = 1 if args.shot is None else args.shot
    episodes = 600 if args.episodes is None else args.episodes
    result = evaluate(learner, dataset, args.way, shot, args.query, episodes, args.seed, device=device, progress=not args.json)
    if args.json:
        print(json.dumps({**result.to_dict(), "checkpoint": str(args.checkpoint)}))
    else:
        print(result)
    return 0


def run_generative(args, device: torch.device) -> int:
    """``fsl-course eval`` for a generative model: every metric of :func:`fsl_course.metrics.generative_report`
    that its kind allows, and for a VAE the IWAE estimate of the test NLL (``--nll-k``).

    * unconditional: ``--samples`` samples -> Fréchet distance to the glyph training images;
    * conditional (``cvae``, ``cgan``): the same number of samples, labels cycling over the
      classes -> Fréchet distance and class-conditional accuracy. The accuracy needs the model's
      labels to be the feature net's classes, i.e. a model trained on the plain glyph training
      split (no rotations); for any other training set it is left out, with a note;
    * set-conditioned (``set-ddpm``, ``generate_sets``): also the class-conditional accuracy of one
      sample per glyph training class (cycling), each conditioned on the first 5 images of its class;
    * few-shot (``generate``), and VAEs through prototype-latent sampling: fidelity, diversity
      and novelty on ``--way``-way episodes of ``--dataset``/``--split`` for K = 1 and 5 (or ``--shot``).
    """
    import time

    from einops import rearrange

    from fsl_course import metrics, vae
    from fsl_course.data import load
    from fsl_course.generative import load_model, model_kind
    from fsl_course.sample import diffusion_options

    model = load_model(args.checkpoint, device=device)
    kind, generator = model_kind(model), torch.Generator().manual_seed(args.seed)
    diffusion = diffusion_options(args, model)  # None: not a diffusion model
    options = diffusion or {}
    sample_options = {k: v for k, v in options.items() if not (k == "guidance" and kind != "conditional")}
    start = time.perf_counter()
    samples = labels = generate = None
    if kind == "conditional":
        labels = torch.arange(args.samples) % model.n_classes
        samples = torch.cat([model.sample(chunk.to(device), generator=generator, **sample_options).cpu() for chunk in labels.split(500)])
    else:
        samples = torch.cat([model.sample(len(chunk), generator=generator, **sample_options).cpu()
                             for chunk in torch.arange(args.samples).split(500)])
    sample_seconds = time.perf_counter() - start
    set_conditional = callable(getattr(model, "generate_sets", None))
    real_images = None  # the glyph training images, loaded by generative_report unless loaded here
    if set_conditional:  # prototype conditioning: one sample per training class from 5 of its images
        train = load("glyphs", "train")
        real_images = rearrange(train.images, "c n ch h w -> (c n) ch h w")
        labels = torch.arange(args.samples) % train.n_classes
        conditioned = torch.cat([model.generate_sets(train.images[chunk, :5], generator=generator, **options).cpu()
                                 for chunk in labels.split(500)])
    if kind == "few-shot":
        def generate(support_x, n, generator):
            return model.generate(support_x, n, generator=generator, **options)
    elif hasattr(model, "encode") and hasattr(model, "decode") and kind == "unconditional":
        def generate(support_x, n, generator):  # prototype-latent sampling
            return vae.prototype_latent_generate(model, support_x, n, generator)
    generate_name = {"few-shot": "generate", "unconditional": "prototype-latent sampling"}.get(kind)
    dataset = load(args.dataset, args.split, root=args.root) if generate is not None else None
    note = None
    if kind == "conditional":
        info = getattr(model, "training_info", None) or {}
        trained_on = info.get("dataset", "glyphs"), bool(info.get("rotations", False))
        if trained_on != ("glyphs", False):
            labels, note = None, (f"no class-conditional accuracy: the model's labels are the classes of "
                                  f"{trained_on[0]}/train{' with rotations' if trained_on[1] else ''}, not the "
                                  "feature net's plain glyph training classes")
    report = metrics.generative_report(
        samples=samples, labels=None if set_conditional else labels, real_images=real_images, generate=generate, dataset=dataset, way=args.way,
        shots=(1, 5) if args.shot is None else (args.shot,), n_samples=args.gen_samples,
        episodes=100 if args.episodes is None else args.episodes, seed=args.seed, progress=not args.json)
    report = {"checkpoint": str(args.checkpoint), "model": model.name, "model_kwargs": model.config["kwargs"], "kind": kind,
              "few_shot_method": generate_name if generate is not None else None, **report,
              "sample_seconds": round(sample_seconds, 1), **({"sampling": diffusion} if diffusion is not None else {})}
    if note is not None:
        report["conditional_note"] = note
    if set_conditional:
        report["conditional"] = {"accuracy": metrics.conditional_accuracy(conditioned, labels),
                                 "real_accuracy": metrics.real_accuracy(), "n_samples": len(labels),
                                 "conditioned_on": "the first 5 images of each plain glyph training class"}
    if generate is not None and args.baselines:
        report["baselines"] = few_shot_baselines(model, dataset, args)
    if args.nll_k and hasattr(model, "log_likelihood"):
        report["nll"] = estimate_nll(model, load(args.dataset, args.split, root=args.root), args.nll_k,
                                 args.nll_images, args.seed, device)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report) if args.json else format_generative(report))
    return 0


def few_shot_baselines(model, dataset, args) -> list[dict]:
    """Few-shot generation baselines on the same episodes as the model (``--baselines``):
    ``augment_shots``, the shots under classic augmentation (:func:`fsl_course.augment.augment_shots`),
    and ``random_samples``, the model's own unconditional samples, which ignore the shots."""
    from fsl_course import augment, metrics

    def random_samples(support_x, n, generator):
        return model.sample(n, generator=generator)

    kwargs = dict(way=args.way, n_samples=args.gen_samples, seed=args.seed, progress=not args.json,
                  episodes=100 if args.episodes is None else args.episodes)
    return [{"shot": k, **{fn.__name__: metrics.few_shot_generation_scores(fn, dataset, shot=k, **kwargs).to_dict()
                           for fn in (augment.augment_shots, random_samples)}}
            for k in ((1, 5) if args.shot is None else (args.shot,))]


def estimate_nll(model, dataset, k: int, n_images: int, seed: int, device) -> dict:
    """``-L_k`` (:func:`fsl_course.vae.iwae_bound`) in nats, mean and 95% CI over the first ``n_images``
    of a seeded random order of ``dataset``'s images, binarised once with the same seed."""
    from einops import rearrange

    from fsl_course import vae

    images = rearrange(dataset.images, "c n ch h w -> (c n) ch h w")
    generator = torch.Generator().manual_seed(seed)
    chosen = images[torch.randperm(len(images), generator=generator)[:n_images]]
    x = vae.binarize(chosen, generator).to(device)
    bounds = torch.cat([vae.iwae_bound(model, batch, k, generator=generator).cpu() for batch in x.split(50)])
    mean, ci = mean_ci95(-bounds.double().numpy())
    return {"nll": mean, "ci95": ci, "k": k, "images": len(x), "split": dataset.split, "binarisation_seed": seed}


def format_generative(report: dict) -> str:
    """The report of :func:`run_generative` as a few readable lines."""
    loss = report.get("model_kwargs", {}).get("loss")  # GANs: nonsaturating or wgan-gp
    lines = [f"{report['checkpoint']}: {report['model']} ({report['kind']}{f', loss {loss}' if loss else ''})"]
    if "frechet" in report:
        fd = report["frechet"]
        lines.append(f"  Fréchet distance {fd['fd']:.2f} ({fd['n_samples']} samples; real held-out images: "
                     f"{fd['fd_real']:.2f}) in the glyph feature net's space")
        if "sampling" in report:  # a diffusion model: the cost of sampling is part of the story
            sampling = ", ".join(f"{k} {v}" for k, v in report.get("sampling", {}).items())
            lines.append(f"  sampling{f' ({sampling})' if sampling else ''}: {report['sample_seconds']:.1f} s for {fd['n_samples']} samples")
    if "conditional" in report:
        c = report["conditional"]
        lines.append(f"  class-conditional accuracy {100 * c['accuracy']:.1f} % (real images: {100 * c['real_accuracy']:.1f} %)"
                     + (f", conditioned on {c['conditioned_on']}" if "conditioned_on" in c else ""))
    if "conditional_note" in report:
        lines.append(f"  {report['conditional_note']}")
    for entry in report.get("few_shot", []):
        for who in ("method", "real"):
            s = entry[who]
            name = report["few_shot_method"] if who == "method" else "real images"
            lines.append(f"  {s['way']}-way {entry['shot']}-shot, {name}: fidelity "
                         f"{100 * s['fidelity']:.1f} ± {100 * s['fidelity_ci95']:.1f} %, diversity "
                         f"{s['diversity']:.2f} ± {s['diversity_ci95']:.2f}, novelty {s['novelty']:.2f} ± {s['novelty_ci95']:.2f}")
    for entry in report.get("baselines", []):
        for name in ("augment_shots", "random_samples"):
            s = entry[name]
            lines.append(f"  {s['way']}-way {entry['shot']}-shot, {name}: fidelity {100 * s['fidelity']:.1f} ± "
                         f"{100 * s['fidelity_ci95']:.1f} %, diversity {s['diversity']:.2f} ± {s['diversity_ci95']:.2f}, "
                         f"novelty {s['novelty']:.2f} ± {s['novelty_ci95']:.2f}")
    if "nll" in report:
        n = report["nll"]
        lines.append(f"  test NLL (IWAE, k = {n['k']}) {n['nll']:.2f} ± {n['ci95']:.2f} nats on {n['images']} binarised images")
    lines.append(f"  ({report['seconds']:.0f} s)")
    return "\n".join(lines)
