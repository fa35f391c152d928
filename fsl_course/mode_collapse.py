r"""Mode collapse, shown: GANs on a 2-D ring of Gaussians.

The benchmark of Metz et al. 2017 (*Unrolled Generative Adversarial Networks*,
arXiv:1611.02163): the data distribution is a mixture of ``M = 8`` Gaussians with equal
weights, centred on a circle of radius ``r = 2``, each with standard deviation ``sigma = 0.02``,

    p_data(x) = (1 / M) sum_k N(x; c_k, sigma^2 I_2),   c_k = r (cos(2 pi k / M), sin(2 pi k / M)),

(:func:`ring_centres`, :func:`ring_of_gaussians`). The modes are far apart (neighbours
``2 r sin(pi / M) = 1.53`` apart, 77 sigma) and tiny, so a generator that puts its mass on a few
of them, *mode collapse*, is easy to see and to count.

The metric (:func:`mode_coverage`) is the one of Srivastava et al. 2017 (*VEEGAN*,
arXiv:1705.07761, section 5.1): a generated sample is **high quality** if it lies within
3 standard deviations of its nearest centre, ``min_k ||x - c_k|| <= 3 sigma``; a mode is
**covered** if it is the nearest centre of at least ``min_count`` high-quality samples
(``min_count = 1`` in VEEGAN; Lin et al. 2018, *PacGAN*, arXiv:1712.04086, use a stricter
count, a fifth of the number of samples a mode would get from ``p_data``). Even real data is
not 100% high quality in 2-D: ``||x - c_k|| / sigma`` is Rayleigh-distributed, so
``P(||x - c_k|| <= 3 sigma) = 1 - exp(-9 / 2) = 0.989``.

:func:`train_2d_gan` trains a small MLP generator and discriminator (:class:`PointGAN`) on
fresh batches from the ring with the losses of :mod:`fsl_course.gan`:

* ``"nonsaturating"``: :func:`~fsl_course.gan.discriminator_loss` and
  :func:`~fsl_course.gan.generator_loss_nonsaturating` (the "vanilla" GAN of Goodfellow et al.
  2014, arXiv:1406.2661, with the non-saturating generator loss);
* ``"saturating"``: the same discriminator, :func:`~fsl_course.gan.generator_loss_saturating`;
* ``"wgan-gp"``: :func:`~fsl_course.gan.critic_loss` ``+`` :func:`~fsl_course.gan.gradient_penalty`
  and :func:`~fsl_course.gan.wgan_generator_loss` (Gulrajani et al. 2017, arXiv:1704.00028).

Shapes: ``B`` batch, points ``(B, 2)``, noise ``(B, noise_dim)``, logits/scores ``(B,)``.
Everything runs on the CPU (the networks are tiny; a GPU would not be faster) and is seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from fsl_course.gan import (
    critic_loss,
    discriminator_loss,
    generator_loss_nonsaturating,
    generator_loss_saturating,
    gradient_penalty,
    wgan_generator_loss,
)
from fsl_course.generative import check_count, check_tensor, standard_normal

#: the losses :func:`train_2d_gan` knows
LOSSES_2D = ("nonsaturating", "saturating", "wgan-gp")

#: the benchmark of Metz et al. 2017: 8 modes on a circle of radius 2, standard deviation 0.02
RING = {"modes": 8, "radius": 2.0, "std": 0.02}


# --------------------------------------------------------------------------- checks


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive float, got {value!r}")
    return float(value)


def _check_cpu_generator(generator) -> None:
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        raise TypeError(f"generator must be a CPU torch.Generator or None, got {generator!r}")


def _check_points(name: str, value, dim: int | None = None) -> torch.Tensor:
    check_tensor(name, value)
    if value.ndim != 2 or value.shape[0] == 0 or (dim is not None and value.shape[1] != dim):
        want = "(n, d)" if dim is None else f"(n, {dim})"
        raise ValueError(f"{name} must be a non-empty floating tensor of points, shape {want}, got {tuple(value.shape)}")
    return value


# --------------------------------------------------------------------------- the data


def ring_centres(modes: int = 8, radius: float = 2.0) -> torch.Tensor:
    """The centres ``c_k = r (cos(2 pi k / M), sin(2 pi k / M))``, ``k = 0..M-1``: (modes, 2) float32."""
    modes, radius = check_count("modes", modes), _check_positive("radius", radius)
    angles = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
    return (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


def ring_of_gaussians(n: int, *, modes: int = 8, radius: float = 2.0, std: float = 0.02,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` samples of the ring, ``x = c_k + sigma * eps``, ``k ~ U{0..M-1}``, ``eps ~ N(0, I_2)``:

    (n, 2) float32 on the CPU, drawn from ``generator`` (a CPU ``torch.Generator``; the global
    generator if None). Mean 0 (the centres are symmetric); each coordinate has variance
    ``r^2 / 2 + sigma^2`` (for ``M >= 3``).
    """
    n, std = check_count("n", n), _check_positive("std", std)
    _check_cpu_generator(generator)
    centres = ring_centres(modes, radius)
    k = torch.randint(len(centres), (n,), generator=generator)
    eps = torch.randn(n, 2, generator=generator)
    return centres[k] + std * eps


# --------------------------------------------------------------------------- the metric


@dataclass(frozen=True)
class ModeCoverage:
    """The VEEGAN metric of a set of samples (see :func:`mode_coverage`).

    Attributes:
        high_quality: share of samples within ``n_std`` standard deviations of their nearest centre.
        modes_covered: number of modes that are the nearest centre of ``>= min_count`` high-quality samples.
        per_mode: high-quality samples per mode (a tuple of ``M`` ints; sums to ``high_quality * n_samples``).
        n_samples, modes, n_std, min_count: what was measured, and with which rule.
    """

    high_quality: float
    modes_covered: int
    per_mode: tuple[int, ...]
    n_samples: int
    modes: int
    n_std: float = 3.0
    min_count: int = 1

    def __str__(self) -> str:
        return (f"{self.modes_covered}/{self.modes} modes covered, {self.high_quality:.1%} high-quality samples "
                f"(of {self.n_samples}; per mode {list(self.per_mode)})")


def mode_coverage(samples: torch.Tensor, centres: torch.Tensor, std: float, *, n_std: float = 3.0,
                  min_count: int = 1) -> ModeCoverage:
    """Mode coverage and sample quality of generated points (Srivastava et al. 2017, section 5.1):

        nearest(x) = argmin_k ||x - c_k||_2,      high quality  <=>  min_k ||x - c_k||_2 <= n_std * sigma,
        per_mode[k] = #{high-quality x with nearest(x) = k},   modes_covered = #{k : per_mode[k] >= min_count}.

    The rule: a mode counts as covered only through samples that land *on* it (within
    ``n_std * sigma`` of its centre); samples between modes count for no mode and lower the
    high-quality share. ``min_count = 1`` is VEEGAN's rule (at least one high-quality sample);
    raise it (e.g. to a fifth of ``n / M``, as PacGAN does) so that a few stray samples do not
    count as covering a mode. Non-finite samples (a diverged generator) are never high quality.

    Args:
        samples: ``(n, d)`` floating points (``d = 2`` for the ring), any device.
        centres: ``(M, d)`` floating mode centres, e.g. :func:`ring_centres`.
        std: ``sigma``, the standard deviation of each mode.
        n_std: the radius of "high quality" in standard deviations (3 in VEEGAN).
        min_count: high-quality samples a mode needs to count as covered.

    Returns:
        a :class:`ModeCoverage`.
    """
    _check_points("centres", centres)
    _check_points("samples", samples, dim=centres.shape[1])
    std, n_std = _check_positive("std", std), _check_positive("n_std", n_std)
    min_count = check_count("min_count", min_count)
    x = samples.detach().to("cpu", torch.float64)
    c = centres.detach().to("cpu", torch.float64)
    finite = torch.isfinite(x).all(dim=1)
    x = torch.where(finite[:, None], x, torch.zeros_like(x))
    squared = (rearrange(x, "n d -> n 1 d") - rearrange(c, "m d -> 1 m d")).pow(2).sum(-1)   # (n, M)
    distance, nearest = squared.min(dim=1)
    good = finite & (distance.sqrt() <= n_std * std)
    per_mode = torch.bincount(nearest[good], minlength=len(c))
    return ModeCoverage(
        high_quality=good.double().mean().item(),
        modes_covered=int((per_mode >= min_count).sum()),
        per_mode=tuple(int(v) for v in per_mode),
        n_samples=len(x),
        modes=len(c),
        n_std=n_std,
        min_count=min_count,
    )


# --------------------------------------------------------------------------- the networks


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PointGenerator(nn.Module):
    """``G: z (B, noise_dim) -> x (B, 2)``, an MLP with ``depth`` hidden ReLU layers of ``hidden`` units
    and a linear output (points are unbounded)."""

    def __init__(self, noise_dim: int = 16, hidden: int = 128, depth: int = 2):
        super().__init__()
        self.noise_dim = check_count("noise_dim", noise_dim)
        self.net = _mlp([noise_dim] + [check_count("hidden", hidden)] * check_count("depth", depth) + [2])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        check_tensor("z", z)
        if z.ndim != 2 or z.shape[1] != self.noise_dim:
            raise ValueError(f"z must have shape (B, noise_dim) = (B, {self.noise_dim}), got {tuple(z.shape)}")
        return self.net(z)


class PointDiscriminator(nn.Module):
    """``D: x (B, 2) -> (B,)`` logits ``l`` (``D(x) = sigmoid(l)``) or critic scores ``f(x)``: an MLP with
    ``depth`` hidden ReLU layers of ``hidden`` units. No normalisation layers, so samples are scored
    independently (the gradient penalty needs that)."""

    def __init__(self, hidden: int = 128, depth: int = 2):
        super().__init__()
        self.net = _mlp([2] + [check_count("hidden", hidden)] * check_count("depth", depth) + [1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_points("x", x, dim=2)
        return rearrange(self.net(x), "b 1 -> b")


class PointGAN(nn.Module):
    """A generator and a discriminator (or critic) for 2-D points: :class:`PointGenerator`
    ``generator`` and :class:`PointDiscriminator` ``discriminator``."""

    def __init__(self, noise_dim: int = 16, hidden: int = 128, depth: int = 2):
        super().__init__()
        self.noise_dim = check_count("noise_dim", noise_dim)
        self.generator = PointGenerator(noise_dim, hidden, depth)
        self.discriminator = PointDiscriminator(hidden, depth)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z ~ N(0, I)``: (n, noise_dim), drawn on the CPU ``generator`` and moved to the model's device."""
        return standard_normal((check_count("n", n), self.noise_dim), like=self.generator.net[0].weight, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points ``G(z)``, ``z ~ N(0, I)``: (n, 2)."""
        return self.generator(self.noise(n, generator))


# --------------------------------------------------------------------------- training


@dataclass
class RingGANRun:
    """What :func:`train_2d_gan` returns.

    Attributes:
        model: the trained :class:`PointGAN` (on the CPU, eval mode).
        history: ``{"d_loss": [...], "g_loss": [...]}``, one float per step (``"wgan-gp"``: ``d_loss``
            is the mean over the step's critic updates, penalty included).
        snapshots: ``{step: (snapshot_size, 2) samples}`` after each of ``snapshot_steps`` generator
            updates (``0``: at initialisation), always from the same fixed noise.
        config: the arguments of the run.
    """

    model: PointGAN
    history: dict[str, list[float]]
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def coverage(self, n: int = 2500, *, seed: int = 0, min_count: int = 1) -> ModeCoverage:
        """:func:`mode_coverage` of ``n`` fresh samples (noise seeded with ``seed``) on this run's ring."""
        samples = self.model.sample(n, generator=torch.Generator().manual_seed(seed))
        ring = self.config
        return mode_coverage(samples, ring_centres(ring["modes"], ring["radius"]), ring["std"], min_count=min_count)


def train_2d_gan(
    loss: str = "nonsaturating",
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    d_lr: float | None = None,
    seed: int = 0,
    noise_dim: int = 16,
    hidden: int = 128,
    depth: int = 2,
    critic_steps: int = 5,
    gp_weight: float = 10.0,
    betas: tuple[float, float] | None = None,
    modes: int = 8,
    radius: float = 2.0,
    std: float = 0.02,
    snapshot_steps: tuple[int, ...] = (),
    snapshot_size: int = 512,
    progress: bool = False,
) -> RingGANRun:
    """Train a :class:`PointGAN` on the ring of Gaussians with Adam, on the CPU; one step = one generator update.

    Every batch is fresh: ``batch_size`` points of :func:`ring_of_gaussians` and as many noise
    vectors, all drawn from one CPU generator seeded with ``seed``; the networks are initialised
    from ``seed`` too (without touching the global random state), and the run uses one CPU thread
    (restored afterwards), so a run is a function of its arguments on a given machine.

    * ``"nonsaturating"`` / ``"saturating"`` (Adam betas ``(0.5, 0.999)`` unless given): per step one
      discriminator update on ``L_D = -E log D(x) - E log(1 - D(G(z)))``
      (:func:`~fsl_course.gan.discriminator_loss`), then one generator update on the same fakes with
      ``L_G = -E log D(G(z))`` (:func:`~fsl_course.gan.generator_loss_nonsaturating`) or
      ``L_G = E log(1 - D(G(z)))`` (:func:`~fsl_course.gan.generator_loss_saturating`).
    * ``"wgan-gp"`` (betas ``(0.5, 0.9)`` unless given; Gulrajani et al. use ``(0.5, 0.9)`` for their
      toy data sets): per step ``critic_steps`` critic updates on
      ``E f(G(z)) - E f(x) + lambda E (||grad f(x_hat)|| - 1)^2`` (:func:`~fsl_course.gan.critic_loss`
      ``+`` :func:`~fsl_course.gan.gradient_penalty`, ``lambda = gp_weight``), each with a fresh real
      batch, then one generator update on ``-E f(G(z))`` (:func:`~fsl_course.gan.wgan_generator_loss`).

    Args:
        loss: one of :data:`LOSSES_2D`.
        steps, batch_size: generator updates, points per batch.
        lr, d_lr: Adam's learning rates of the generator and of the discriminator (``d_lr = lr`` if None).
        seed: seeds the initialisation, the data, the noise and the penalty's interpolation weights.
        noise_dim, hidden, depth: the networks (:class:`PointGAN`).
        critic_steps, gp_weight: for ``"wgan-gp"``.
        betas: Adam's betas (default by loss, above).
        modes, radius, std: the ring (:func:`ring_of_gaussians`).
        snapshot_steps: after which generator updates to keep samples (``0`` = before training).
        snapshot_size: samples per snapshot (the same noise every time).
        progress: show a tqdm bar.

    Returns:
        a :class:`RingGANRun`.
    """
    if loss not in LOSSES_2D:
        raise ValueError(f"loss must be one of {LOSSES_2D}, got {loss!r}")
    steps, batch_size = check_count("steps", steps), check_count("batch_size", batch_size)
    critic_steps, snapshot_size = check_count("critic_steps", critic_steps), check_count("snapshot_size", snapshot_size)
    lr = _check_positive("lr", lr)
    d_lr = lr if d_lr is None else _check_positive("d_lr", d_lr)
    if isinstance(gp_weight, bool) or not isinstance(gp_weight, (int, float)) or gp_weight < 0:
        raise ValueError(f"gp_weight must be a nonnegative float, got {gp_weight!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    snapshot_steps = tuple(snapshot_steps)
    if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= steps for s in snapshot_steps):
        raise ValueError(f"snapshot_steps must be ints in 0..steps = 0..{steps}, got {snapshot_steps!r}")
    ring_centres(modes, radius)  # checks modes and radius
    std = _check_positive("std", std)
    if betas is None:
        betas = (0.5, 0.9) if loss == "wgan-gp" else (0.5, 0.999)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is faster, and the result cannot depend on the thread count
    try:
        with torch.random.fork_rng(devices=[]):  # seeded initialisation; the caller's global state is left alone
            torch.manual_seed(seed)
            model = PointGAN(noise_dim, hidden, depth)
        model.train()
        generator = torch.Generator().manual_seed(seed)
        fixed_noise = model.noise(snapshot_size, torch.Generator().manual_seed(seed + 1))
        opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=d_lr, betas=betas)
        opt_g = torch.optim.Adam(model.generator.parameters(), lr=lr, betas=betas)
        G, D = model.generator, model.discriminator

        def real_batch() -> torch.Tensor:
            return ring_of_gaussians(batch_size, modes=modes, radius=radius, std=std, generator=generator)

        def snapshot(step: int, snapshots: dict[int, torch.Tensor]) -> None:
            if step in snapshot_steps:
                with torch.no_grad():
                    snapshots[step] = G(fixed_noise).clone()

        history: dict[str, list[float]] = {"d_loss": [], "g_loss": []}
        snapshots: dict[int, torch.Tensor] = {}
        snapshot(0, snapshots)
        bar = tqdm(range(1, steps + 1), desc=f"2-D GAN ({loss})", disable=not progress, leave=False)
        for step in bar:
            if loss == "wgan-gp":
                d_losses = []
                for _ in range(critic_steps):
                    real = real_batch()
                    with torch.no_grad():
                        fake = G(model.noise(batch_size, generator))
                    real_scores, fake_scores = D(torch.cat([real, fake])).split(batch_size)   # one forward for both
                    d_loss = critic_loss(real_scores, fake_scores) + gradient_penalty(D, real, fake, generator, weight=gp_weight)
                    opt_d.zero_grad(set_to_none=True)
                    d_loss.backward()
                    opt_d.step()
                    d_losses.append(d_loss.item())
                d_value = sum(d_losses) / critic_steps
                fake = G(model.noise(batch_size, generator))
                g_loss = wgan_generator_loss(D(fake))
            else:
                real = real_batch()
                fake = G(model.noise(batch_size, generator))
                real_logits, fake_logits = D(torch.cat([real, fake.detach()])).split(batch_size)
                d_loss = discriminator_loss(real_logits, fake_logits)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                d_value = d_loss.item()
                fake_logits = D(fake)
                g_loss = generator_loss_nonsaturating(fake_logits) if loss == "nonsaturating" else generator_loss_saturating(fake_logits)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            history["d_loss"].append(d_value)
            history["g_loss"].append(g_loss.item())
            snapshot(step, snapshots)
            if progress and step % 50 == 0:
                bar.set_postfix(d=f"{d_value:.3f}", g=f"{g_loss.item():.3f}", refresh=False)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    config = {"loss": loss, "steps": steps, "batch_size": batch_size, "lr": lr, "d_lr": d_lr, "seed": seed, "noise_dim": noise_dim,
              "hidden": hidden, "depth": depth, "critic_steps": critic_steps, "gp_weight": gp_weight, "betas": tuple(betas),
              "modes": modes, "radius": radius, "std": std}
    return RingGANRun(model=model, history=history, snapshots=snapshots, config=config)


__all__ = [
    "LOSSES_2D",
    "RING",
    "ModeCoverage",
    "PointDiscriminator",
    "PointGAN",
    "PointGenerator",
    "RingGANRun",
    "mode_coverage",
    "ring_centres",
    "ring_of_gaussians",
    "train_2d_gan",
]
