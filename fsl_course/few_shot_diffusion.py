r"""Few-shot diffusion: new images of a class never seen in training, from K shots (lesson 08).

A DDPM pre-trained on the training alphabets knows how glyphs are drawn; a new character
comes with ``K = 1..5`` images (the *support set* ``S``). Three ways to make it draw that
character (:func:`adapt`):

* **full fine-tuning** (``"finetune"``): keep training every weight of the pre-trained
  :class:`~fsl_course.diffusion.DDPM` on ``S`` with the same noise-prediction loss,

      min_theta  E_{x_0 in S, t, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2;

  with ``K`` images the model can only move towards (and eventually memorise) the shots;
* **LoRA** (``"lora"``, Hu et al. 2021, arXiv:2106.09685): the same loss, but only a low-rank
  update ``W + (alpha / r) B A`` of each layer is trained
  (:func:`fsl_course.diffusion.attach_lora`): a small fraction of the parameters, the
  pre-trained weights untouched, merged afterwards (:func:`fsl_course.diffusion.merge_lora`);
* **conditioning** (``"condition"``): no training at all. A :class:`SetConditionalDDPM` was
  trained on the training alphabets to denoise an image *given other images of its class*,
  through a permutation-invariant set embedding (Deep Sets, Zaheer et al. 2017,
  arXiv:1703.06114; the neural statistician's context, Edwards & Storkey 2017, arXiv:1606.02185)

      c(S) = (1 / K) sum_{x in S} f_phi(x),      m(S) = (1 / K) sum_{x in S} x,      eps_theta(x_t, t, c(S), m(S)),

  with ``c(S)`` entering every block by FiLM (as a class label) and the shots' mean image ``m(S)``,
  a prototype in pixel space, concatenated to ``x_t`` as a second input channel (spatial
  conditioning, which a 64-number vector alone gives only weakly); a new class costs one
  forward pass of the encoder.

Classifier-free guidance works for the set-conditioned model as for class labels
(Ho & Salimans 2022): during training the condition is replaced by the null condition (a learned
null embedding and an all-zero image) with probability ``p_uncond``, and sampling can use (same
convention as :func:`fsl_course.diffusion.guided_eps`)

    eps_guided = (1 + w) eps_theta(x_t, t, S) - w eps_theta(x_t, t, null).

Command line: ``fsl-course adapt CKPT --support DIR_OR_CLASS --method lora|finetune|condition``
draws a grid of the adapted model's samples, and with ``--episodes E`` instead scores the
method with :func:`fsl_course.metrics.few_shot_generation_scores` on unseen test classes.

Shapes: support sets ``(K, 1, 28, 28)`` in [0, 1]; batches of sets ``(B, K, 1, 28, 28)`` with a
``(B, K)`` boolean mask of the images that are present.
"""

from __future__ import annotations

import copy
import json
import shlex
import time
from dataclasses import dataclass, field

import torch
from einops import rearrange, reduce
from torch import nn

from fsl_course.diffusion import (
    DDPM,
    NoiseSchedule,
    UNet,
    _DiffusionModel,
    _group_norm,
    _real,
    adam_steps,
    attach_lora,
    combine_guidance,
    merge_lora,
    noise_prediction_loss,
)
from fsl_course.gan import to_tanh_range
from fsl_course.generative import IMAGE_SHAPE, check_count, check_tensor, dense_images, register_model

METHODS = ("finetune", "lora", "condition")

#: per-method defaults of :func:`adapt` (steps, learning rate); measured in lesson 08
ADAPT_DEFAULTS = {"finetune": {"steps": 100, "lr": 2e-4}, "lora": {"steps": 100, "lr": 2e-3}, "condition": {"steps": 0, "lr": 0.0}}


def check_support(support_x, name: str = "support_x") -> torch.Tensor:
    """A support set ``(K, 1, 28, 28)`` of floats in [0, 1], K >= 1, or a clear error."""
    check_tensor(name, support_x)
    if support_x.ndim != 4 or tuple(support_x.shape[1:]) != IMAGE_SHAPE or len(support_x) == 0:
        raise ValueError(f"{name} must be K >= 1 images of shape (K, 1, 28, 28) in [0, 1], got {tuple(support_x.shape)}")
    return support_x


# --------------------------------------------------------------------------- the set-conditioned model


class SetEncoder(nn.Module):
    """``c(S) = (1 / |S|) sum_{x in S} f_phi(x)``: a small conv net ``f_phi`` on each image, then the
    mean over the images present (Deep Sets), so the embedding ignores their order and accepts
    any set size. ``x`` (B, K, 1, 28, 28) in model space [-1, 1], ``mask`` (B, K) bool (None:
    all present) -> (B, dim)."""

    def __init__(self, dim: int = 64, width: int = 32):
        super().__init__()
        self.dim = check_count("dim", dim)
        w = check_count("width", width)
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, stride=2, padding=1), _group_norm(w), nn.SiLU(),            # (w, 14, 14)
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), _group_norm(2 * w), nn.SiLU(),    # (2w, 7, 7)
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), _group_norm(2 * w), nn.SiLU(),  # (2w, 4, 4)
        )
        self.out = nn.Linear(2 * w, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, k = x.shape[:2]
        h = self.features(rearrange(x, "b k c h w -> (b k) c h w"))
        return masked_mean(rearrange(self.out(reduce(h, "bk c h w -> bk c", "mean")), "(b k) d -> b k d", b=b, k=k), mask)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over dim 1 (the set) of the entries present: ``x`` (B, K, ...), ``mask`` (B, K) bool
    (None: all present) -> (B, ...). A set with no entry present gives 0."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).reshape(*mask.shape, *([1] * (x.ndim - 2)))
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


def prototype_image(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``m(S)``: the mean of the images present in each set, ``x`` (B, K, 1, 28, 28), ``mask`` (B, K) bool
    (None: all) -> (B, 1, 28, 28)."""
    return masked_mean(x, mask)


class _Guided(nn.Module):
    """``eps(x, t)`` of a set-conditioned U-Net for fixed conditions, the embeddings ``cond`` (1 or B, D) and
    mean images ``image`` (1 or B, 1, 28, 28), optionally with classifier-free guidance against the null
    condition (``null`` (1, D) and a zero image); what the samplers call."""

    def __init__(self, unet: UNet, cond: torch.Tensor, image: torch.Tensor, null: torch.Tensor, guidance: float | None):
        super().__init__()
        self.unet, self.cond, self.image, self.null = unet, cond, image, null
        self.guidance = None if guidance is None else _real("guidance weight w", guidance)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, image = self.cond.expand(len(x), -1), self.image.expand(len(x), -1, -1, -1)
        if self.guidance is None:
            return self.unet(x, t, cond=cond, cond_image=image)
        both = self.unet(torch.cat([x, x]), torch.cat([t, t]), cond=torch.cat([cond, self.null.expand(len(x), -1)]),
                         cond_image=torch.cat([image, torch.zeros_like(image)]))
        return combine_guidance(*both.chunk(2), self.guidance)


@register_model("set-ddpm")
class SetConditionalDDPM(_DiffusionModel):
    """A DDPM conditioned on a support set: ``eps_theta(x_t, t, c(S), m(S))`` with ``c(S)`` from a
    :class:`SetEncoder` ``encoder`` fed to the :class:`~fsl_course.diffusion.UNet` ``unet`` as its
    ``cond`` (added to the time embedding, applied by FiLM in every block) and the shots' mean image
    ``m(S)`` (:func:`prototype_image`, model space) as its ``cond_image`` (a second input channel);
    a learned ``null`` embedding (D,) and a zero image stand for "no support set" (classifier-free
    guidance, :meth:`sample`). Trained by :func:`train_set_diffusion`; few-shot generation by
    :meth:`generate` and :meth:`generate_sets`. Samples with DDIM unless told otherwise."""

    default_sampler = "ddim"

    def __init__(self, num_steps: int = 1000, schedule: str = "linear", channels=(16, 32, 64), cond_dim: int = 64,
                 max_set_size: int = 5):
        channels = list(channels) if isinstance(channels, (tuple, list)) else channels
        super().__init__(num_steps=num_steps, schedule=schedule, channels=channels, cond_dim=cond_dim, max_set_size=max_set_size)
        self.n_classes = None
        self.max_set_size = check_count("max_set_size", max_set_size)
        self.schedule = NoiseSchedule(num_steps, schedule)
        self.encoder = SetEncoder(cond_dim)
        self.null = nn.Parameter(torch.zeros(cond_dim))
        self.unet = UNet(channels, cond_dim=cond_dim, cond_channels=1)

    def embed_sets(self, support_sets: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition of each set: ``(c(S), m(S))``, (B, cond_dim) and (B, 1, 28, 28), for support sets
        (B, K, 1, 28, 28) in [0, 1] with ``mask`` (B, K) (None: all present)."""
        x = to_tanh_range(support_sets.to(self.device))
        mask = None if mask is None else mask.to(self.device)
        return self.encoder(x, mask), prototype_image(x, mask)

    def embed_support(self, support_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition ``(c(S), m(S))`` of one support set ``(K, 1, 28, 28)`` in [0, 1]: (1, cond_dim), (1, 1, 28, 28)."""
        check_support(support_x)
        return self.embed_sets(support_x[None])

    def _draw(self, cond, n: int, generator, steps, sampler, eta, guidance, variance) -> torch.Tensor:
        vector, image = cond
        return self._sample_with(_Guided(self.unet, vector, image, self.null[None], guidance), n, generator, steps, sampler,
                                 eta, variance)

    @torch.no_grad()
    def generate(self, support_x: torch.Tensor, n: int, *, generator: torch.Generator | None = None, steps: int | None = None,
                 sampler: str | None = None, eta: float = 0.0, guidance: float | None = None, variance: str = "beta") -> torch.Tensor:
        """``n`` new images (n, 1, 28, 28) in [0, 1] of the class shown by ``support_x`` (K, 1, 28, 28),
        any K >= 1: sample with ``cond = c(S)``. Defaults: DDIM, ``steps=None`` meaning ``min(50, T)``,
        ``eta = 0``; ``guidance=w`` as in the module docstring (None: no guidance)."""
        n = check_count("n", n)
        return self._draw(self.embed_support(support_x), n, generator, steps, sampler, eta, guidance, variance)

    @torch.no_grad()
    def generate_sets(self, support_sets: torch.Tensor, mask: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
                      steps: int | None = None, sampler: str | None = None, eta: float = 0.0, guidance: float | None = None,
                      variance: str = "beta") -> torch.Tensor:
        """One new image per support set, all in one batch: ``support_sets`` (B, K, 1, 28, 28) in [0, 1]
        (``mask`` (B, K) bool: the shots present; None: all) -> (B, 1, 28, 28) in [0, 1]. Used to
        measure class-conditional accuracy (sets of training images of each class)."""
        check_tensor("support_sets", support_sets)
        if support_sets.ndim != 5 or tuple(support_sets.shape[2:]) != IMAGE_SHAPE or 0 in support_sets.shape[:2]:
            raise ValueError(f"support_sets must have shape (B, K, 1, 28, 28) with B, K >= 1, got {tuple(support_sets.shape)}")
        if mask is not None:
            check_tensor("mask", mask, floating=False)
            if mask.dtype != torch.bool or mask.shape != support_sets.shape[:2] or not bool(mask.any(dim=1).all()):
                raise ValueError(f"mask must be a bool tensor of shape {tuple(support_sets.shape[:2])} with at least one shot per set")
        return self._draw(self.embed_sets(support_sets, mask), len(support_sets), generator, steps, sampler, eta, guidance, variance)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, steps: int | None = None, sampler: str | None = None,
               eta: float = 0.0, guidance: float | None = None, variance: str = "beta") -> torch.Tensor:
        """``n`` unconditional images: the null embedding, no support set. (n, 1, 28, 28) in [0, 1]."""
        n = check_count("n", n)
        if guidance is not None:
            raise ValueError("guidance needs a support set: use generate(support_x, n, guidance=w)")
        return self._draw((self.null[None], torch.zeros(1, *IMAGE_SHAPE, device=self.device)), n, generator, steps, sampler, eta,
                          None, variance)


def support_batches(images: torch.Tensor, batch_size: int, max_set_size: int, generator: torch.Generator):
    """One training batch of :func:`train_set_diffusion`, drawn on the CPU from the dense
    ``images`` (C, n, 1, 28, 28): targets ``x0`` (B, 1, 28, 28), support sets (B, M, 1, 28, 28) with
    ``M = max_set_size`` slots and a mask (B, M) of the ``K_b ~ U{1..M}`` slots in use. The support
    set holds other instances of the target's class (never the target itself)."""
    n_classes, n_per_class = images.shape[:2]
    if n_per_class < 2:
        raise ValueError("set-conditioned training needs at least 2 images per class (a target and a shot)")
    m = min(max_set_size, n_per_class - 1)
    classes = torch.randint(n_classes, (batch_size,), generator=generator)
    order = torch.rand(batch_size, n_per_class, generator=generator).argsort(dim=1)  # a random order per row
    target = images[classes, order[:, 0]]
    support = images[classes[:, None], order[:, 1 : 1 + m]]
    sizes = torch.randint(1, m + 1, (batch_size,), generator=generator)
    mask = torch.arange(m)[None, :] < sizes[:, None]
    return target, support, mask


def train_set_diffusion(
    model: SetConditionalDDPM,
    dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    device: torch.device | str,
    seed: int = 0,
    progress: bool = True,
    p_uncond: float = 0.1,
    grad_clip: float | None = 1.0,
) -> dict[str, list[float]]:
    """Train a :class:`SetConditionalDDPM` (U-Net, set encoder and null embedding together) with Adam
    on the noise-prediction loss of a target image given a support set of its class
    (:func:`support_batches`): ``|| eps - eps_theta(x_t, t, c(S), m(S)) ||^2``, with the condition replaced
    by the null one (null embedding, zero image) with probability ``p_uncond`` (for guidance). As
    :func:`fsl_course.diffusion.train_diffusion` otherwise. Returns ``{"loss": [...]}``."""
    if not isinstance(model, SetConditionalDDPM):
        raise TypeError(f"train_set_diffusion trains a SetConditionalDDPM, got {type(model).__name__}")
    images = dense_images(dataset, model)
    steps, batch_size = check_count("steps", steps), check_count("batch_size", batch_size)
    p_uncond = _real("p_uncond", p_uncond, low=0.0, high=1.0)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()

    def batch_loss() -> torch.Tensor:
        target, support, mask = support_batches(images, batch_size, model.max_set_size, generator)
        drop = (torch.rand(batch_size, generator=generator) < p_uncond).to(device)
        cond, image = model.embed_sets(support, mask)
        cond = torch.where(drop[:, None], model.null[None].expand_as(cond), cond)
        image = torch.where(drop[:, None, None, None], torch.zeros_like(image), image)
        return noise_prediction_loss(lambda x, t: model.unet(x, t, cond=cond, cond_image=image),
                                     to_tanh_range(target).to(device), model.schedule, generator)

    history = adam_steps(list(model.parameters()), batch_loss, steps=steps, lr=lr, grad_clip=grad_clip,
                         desc="train set-ddpm", progress=progress)
    model.eval()
    return history


# --------------------------------------------------------------------------- adaptation


@dataclass
class Adapted:
    """The result of :func:`adapt`: ``model`` (a fine-tuned copy of the DDPM, LoRA merged, or the
    set-conditioned model itself), the ``support`` set (K, 1, 28, 28), how many parameters were
    trained, the adaptation seconds and the per-step losses."""

    method: str
    model: _DiffusionModel
    support: torch.Tensor
    trainable_parameters: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, steps: int | None = None, sampler: str = "ddim",
               eta: float = 0.0, guidance: float | None = None) -> torch.Tensor:
        """``n`` images (n, 1, 28, 28) in [0, 1] of the support set's class (DDIM by default)."""
        if self.method == "condition":
            return self.model.generate(self.support, n, generator=generator, steps=steps, sampler=sampler, eta=eta, guidance=guidance)
        return self.model.sample(n, generator=generator, steps=steps, sampler=sampler, eta=eta, guidance=guidance)


def adapt(
    model: _DiffusionModel,
    support_x: torch.Tensor,
    method: str,
    *,
    steps: int | None = None,
    lr: float | None = None,
    rank: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> Adapted:
    """Adapt a pre-trained diffusion model to the class shown by ``support_x`` (K, 1, 28, 28) in [0, 1].

    * ``"finetune"``: a copy of the :class:`~fsl_course.diffusion.DDPM`, every U-Net weight
      trained with Adam for ``steps`` steps on :func:`~fsl_course.diffusion.noise_prediction_loss`,
      each step a batch of ``batch_size`` shots drawn with replacement (fresh ``t`` and noise);
    * ``"lora"``: the same on a copy with rank-``rank`` LoRA on every linear and convolution
      layer of the U-Net (:func:`~fsl_course.diffusion.attach_lora`), merged at the end;
    * ``"condition"``: ``model`` must be a :class:`SetConditionalDDPM`; nothing is trained.

    ``steps``, ``lr``: None for the defaults in :data:`ADAPT_DEFAULTS`. The pre-trained ``model`` is
    never changed. The LoRA initialisation, batches, timesteps and noise are seeded by ``seed``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    support_x = check_support(support_x)
    if method == "condition":
        if not isinstance(model, SetConditionalDDPM):
            raise ValueError(f"method 'condition' needs a set-conditioned model (set-ddpm), got {model.name or type(model).__name__!r}; "
                             "fine-tune or use LoRA on a plain ddpm")
        return Adapted(method, model, support_x, 0, 0.0)
    if type(model) is not DDPM:
        raise ValueError(f"method {method!r} adapts an unconditional DDPM (ddpm), got {model.name or type(model).__name__!r}")
    steps = check_count("steps", ADAPT_DEFAULTS[method]["steps"] if steps is None else steps)
    lr = _real("lr", ADAPT_DEFAULTS[method]["lr"] if lr is None else lr, low=0.0)
    batch_size = check_count("batch_size", batch_size)
    start = time.perf_counter()
    adapted = copy.deepcopy(model).train()
    if method == "lora":
        with torch.random.fork_rng(devices=[]):  # the adapters' random A from the seed, not the global RNG
            torch.manual_seed(seed)
            parameters = attach_lora(adapted.unet, rank)
    else:
        parameters = list(adapted.unet.parameters())
    trainable = sum(p.numel() for p in parameters)
    generator = torch.Generator().manual_seed(seed)
    x0_all = to_tanh_range(support_x.detach().cpu())

    def batch_loss() -> torch.Tensor:
        x0 = x0_all[torch.randint(len(x0_all), (batch_size,), generator=generator)].to(adapted.device)
        return noise_prediction_loss(adapted.unet, x0, adapted.schedule, generator)

    losses = adam_steps(parameters, batch_loss, steps=steps, lr=lr, grad_clip=None, desc=f"adapt ({method})", progress=progress)["loss"]
    if method == "lora":
        merge_lora(adapted.unet)
    adapted.eval()
    return Adapted(method, adapted, support_x, trainable, time.perf_counter() - start, losses)


# --------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="a ddpm checkpoint (finetune, lora) or a set-ddpm checkpoint (condition)")
    parser.add_argument("--method", choices=METHODS, required=True, help="full fine-tuning, LoRA, or support-set conditioning")
    parser.add_argument("--support", default=None, metavar="DIR_OR_CLASS",
                        help="the support set: a folder or image file(s) of one new character, or a class of --dataset/--split "
                             "given by index or name (then --shot images of it)")
    parser.add_argument("--dataset", default="glyphs", help="where a class or the scored episodes come from (default glyphs)")
    parser.add_argument("--root", default=None, metavar="DIR", help="dataset folder (omniglot)")
    parser.add_argument("--split", default="test", help="dataset split (default test: classes never seen in training)")
    parser.add_argument("--shot", type=int, default=5, metavar="K", help="support images taken from a dataset class (default 5)")
    parser.add_argument("--adapt-steps", type=int, default=None, metavar="N", help="fine-tuning / LoRA steps (default 100)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: finetune 2e-4, lora 2e-3)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--steps", type=int, default=50, metavar="N", help="DDIM sampling steps (default 50)")
    parser.add_argument("--guidance", type=float, default=None, metavar="W", help="condition: guidance weight w (default none)")
    parser.add_argument("--n", type=int, default=16, help="samples in the grid (default 16)")
    parser.add_argument("--grid", default=None, metavar="PNG", help="write the support set and the samples as a PNG grid")
    parser.add_argument("--out", default=None, metavar="PATH", help="finetune, lora: save the adapted model as a ddpm checkpoint")
    parser.add_argument("--episodes", type=int, default=None, metavar="E",
                        help="instead of one support set: score the method on E --way-way --shot-shot episodes of "
                             "--dataset/--split (fidelity, diversity, novelty with 95%% CIs)")
    parser.add_argument("--way", type=int, default=5, help="classes per scored episode (default 5)")
    parser.add_argument("--gen-samples", type=int, default=20, help="images generated per class in a scored episode (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the adaptation, the samples and the episodes (default 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: fsl_course.device())")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _support_from(args) -> tuple[torch.Tensor, str]:
    """``--support``: files or a folder, else a class of ``--dataset/--split`` by index or name."""
    from pathlib import Path

    from fsl_course.data import load
    from fsl_course.sample import load_support_images

    if Path(args.support).exists():
        support = load_support_images([args.support])
        return support, f"{len(support)} image(s) from {args.support}"
    dataset = load(args.dataset, args.split, root=args.root)
    names = list(dataset.class_names)
    if args.support.lstrip("-").isdigit():
        index = int(args.support)
        if not 0 <= index < dataset.n_classes:
            raise ValueError(f"--support {args.support}: class index must be in 0..{dataset.n_classes - 1} for {args.dataset}/{args.split}")
    elif args.support in names:
        index = names.index(args.support)
    else:
        raise ValueError(f"--support {args.support!r} is neither a file or folder nor a class of {args.dataset}/{args.split} "
                         f"(an index 0..{dataset.n_classes - 1} or a name like {names[0]!r})")
    if not 1 <= args.shot <= dataset.n_per_class:
        raise ValueError(f"--shot must be in 1..{dataset.n_per_class}, got {args.shot}")
    return dataset.images[index, : args.shot], f"{args.shot} image(s) of {args.dataset}/{args.split} class {index} ({names[index]})"


def run(args) -> int:
    from fsl_course.cache import atomic_write
    from fsl_course.generative import load_model, save_model
    from fsl_course.sample import grid_image

    if (args.support is None) == (args.episodes is None):
        raise ValueError("give either --support DIR_OR_CLASS (adapt once and draw samples) or --episodes E (score the method)")
    if args.out is not None and args.method == "condition":
        raise ValueError("--out: conditioning trains nothing, so there is no adapted model to save (the set-ddpm checkpoint is it)")
    model = load_model(args.checkpoint, device=args.device)
    options = {"steps": args.adapt_steps, "lr": args.lr, "rank": args.rank}
    sampling = {"steps": args.steps, "guidance": args.guidance}
    if args.guidance is not None and args.method != "condition":
        raise ValueError("--guidance applies to --method condition (a fine-tuned DDPM is unconditional)")
    if args.episodes is not None:
        return _score(model, args, options, sampling)
    support, described = _support_from(args)
    adapted = adapt(model, support.to(model.device), args.method, seed=args.seed, progress=not args.json, **options)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    samples = adapted.sample(args.n, generator=generator, **sampling)
    sample_seconds = time.perf_counter() - start
    report = {"checkpoint": str(args.checkpoint), "method": args.method, "support": described,
              "trainable_parameters": adapted.trainable_parameters, "adapt_seconds": round(adapted.seconds, 2),
              "sample_seconds": round(sample_seconds, 2), "n": args.n, "ddim_steps": args.steps}
    if args.grid is not None:
        with atomic_write(args.grid) as tmp:
            grid_image([(support, 8), (samples, 8)]).save(tmp, format="PNG")
        report["grid"] = args.grid
    if args.out is not None:
        command = shlex.join(["fsl-course", "adapt", str(args.checkpoint), "--method", args.method, "--support", args.support,
                              "--shot", str(args.shot), "--seed", str(args.seed), "--out", str(args.out)])
        save_model(adapted.model, args.out, command=command, seed=args.seed, adapted_from=str(args.checkpoint),
                   adaptation={k: v for k, v in report.items() if k != "grid"}, training=model.training_info.get("training", {}))
        report["out"] = args.out
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.method} on {described}: {adapted.trainable_parameters:,} trainable parameters, "
              f"adapted in {adapted.seconds:.1f} s; {args.n} DDIM-{args.steps} samples in {sample_seconds:.1f} s")
        for key in ("grid", "out"):
            if key in report:
                print(f"wrote {report[key]}")
    return 0


def _score(model, args, options: dict, sampling: dict) -> int:
    """``--episodes E``: :func:`fsl_course.metrics.few_shot_generation_scores` of adapt-then-sample."""
    from fsl_course import metrics
    from fsl_course.data import load

    dataset = load(args.dataset, args.split, root=args.root)
    seconds, trainable = [], []

    def generate(support_x, n, generator):
        adapted = adapt(model, support_x, args.method, seed=int(torch.randint(2**31, (1,), generator=generator)), **options)
        seconds.append(adapted.seconds)
        trainable.append(adapted.trainable_parameters)
        return adapted.sample(n, generator=generator, **sampling)

    generate.__name__ = f"{args.method} ({model.name})"
    start = time.perf_counter()
    scores = metrics.few_shot_generation_scores(generate, dataset, way=args.way, shot=args.shot, n_samples=args.gen_samples,
                                                episodes=args.episodes, seed=args.seed, progress=not args.json)
    report = {"checkpoint": str(args.checkpoint), "method": args.method, **scores.to_dict(),
              "trainable_parameters": trainable[0], "adapt_seconds_mean": round(sum(seconds) / len(seconds), 2),
              "ddim_steps": args.steps, "guidance": args.guidance, "seconds": round(time.perf_counter() - start, 1),
              **{f"adapt_{k}": v for k, v in options.items() if v is not None}}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.method}: {scores}")
        print(f"  {trainable[0]:,} trainable parameters, {report['adapt_seconds_mean']:.1f} s adaptation per class, "
              f"DDIM-{args.steps} sampling; {report['seconds']:.0f} s in all")
    return 0


__all__ = ["ADAPT_DEFAULTS", "METHODS", "Adapted", "SetConditionalDDPM", "SetEncoder", "adapt", "check_support", "masked_mean", "prototype_image",
           "support_batches", "train_set_diffusion"]
