r"""DAGAN-style feature-space augmentation for few-shot classification.

DAGAN (Antoniou, Storkey & Edwards 2017, *Data Augmentation Generative Adversarial Networks*,
arXiv:1711.04340) learns, on the training classes, a generator ``x' = G(x, z)`` that turns one
image ``x`` into *another instance of the same class*. Its key idea is the discriminator: it
never sees single samples but *pairs*,

    real pair  (x, x_other),   x_other another instance of x's class,
    fake pair  (x, G(x, z)),   z ~ N(0, I),

so a generator that produces a plausible image of *some* class, or a copy of ``x``, is caught;
only "another instance of x's class" fools it. At test time ``G`` augments the few shots of a
new class, and a classifier is trained on real plus generated examples.

**This module is the feature-space variant** (the original works on images): the encoder
``E`` is the frozen, pretrained Conv-4 of :class:`~fsl_course.meta.PretrainFinetune`, and
everything adversarial happens on features ``h = E(x)`` in ``R^D`` (``D = 64``):

* :class:`FeatureGenerator` ``G(h, z) = relu(h + s * MLP([(h - m) / s, z]))`` (a residual: the
  network learns the *within-class displacement*, starting near ``h``; the ReLU keeps it where
  Conv-4 features live), with ``m``, ``s`` the per-dimension mean and standard deviation of the
  training features;
* :class:`PairDiscriminator` scores a pair ``[u, u']`` (concatenated, ``(B, 2D)``) in standard
  units ``u = (h - m) / s``;
* :func:`train_feature_gan` plays the game on the training classes' features, precomputed once
  (:func:`extract_features`), with the losses of :mod:`fsl_course.gan`: WGAN-GP (the default:
  :func:`~fsl_course.gan.critic_loss` + :func:`~fsl_course.gan.gradient_penalty` and
  :func:`~fsl_course.gan.wgan_generator_loss`) or the non-saturating GAN.
* :class:`DAGANLearner` (registered as ``"dagan"``) is :class:`~fsl_course.meta.PretrainFinetune`
  whose per-episode linear head is fitted on the support features *plus* ``n_generated``
  generated features per support image; with ``augment=False`` (or ``n_generated=0``) it *is*
  PretrainFinetune (identical logits), so "with vs without augmentation" is measured with the
  same backbone on the same episodes.

Feature hallucination for few-shot learning in the same spirit: Hariharan & Girshick 2017,
*Low-shot Visual Recognition by Shrinking and Hallucinating Features* (arXiv:1606.02819), and
Wang et al. 2018, *Low-Shot Learning from Imaginary Data* (arXiv:1801.05401), who train the
hallucinator end-to-end with the classifier (here ``G`` only plays the GAN game).

:func:`train_dagan` is the ``fsl-course train dagan`` METHOD:
``train(dataset, budget, device, seed, progress) -> (learner, info)``.

Measured (``train_dagan`` at the standard budget, seed 0, 74 s on a 2-core CPU; glyph test split,
5-way, 15 queries, the same 600 episodes with and without augmentation; mean +- 95% CI, and the
paired per-episode difference): augmentation does **not** help here.

    1-shot: none 71.10 +- 0.88 %, DAGAN (n_generated=10) 68.50 +- 0.93 %, difference -2.60 +- 0.67 points
    5-shot: none 86.08 +- 0.57 %, DAGAN (n_generated=10) 85.78 +- 0.61 %, difference -0.30 +- 0.40 points

("none" is this learner with ``augment=False``; it scores exactly what ``fsl-course train baseline``
with the same seed scores.) :func:`generation_statistics` says why: on test classes a generated
feature is as far from its source as a real instance of the class (5.44 vs 5.47) but only 13% of
them are nearest to their own class mean (real instances: 44%), and ``G``'s average displacement
is 2.8, half that distance: ``G`` learned *how far* instances of a class lie apart,
not *in which directions*, so it moves the class means that the linear head relies on. Lesson 05
trains ``G`` for only 300 steps and finds a small 1-shot gain (+0.8 +- 0.5 points over 200
episodes) that jitter of the same size does not give: the sign depends on how far ``G`` learned to move features.

Noise is drawn from CPU generators and moved, so results match across devices; each episode's
noise comes from a generator seeded by the episode itself (:func:`episode_generator`), so a
learner's predictions are reproducible and do not depend on which episodes came before.
Shapes: ``B`` batch, ``D`` feature size, ``k`` noise size, ``S`` support images.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from einops import repeat
from torch import nn
from tqdm.auto import tqdm

from fsl_course.gan import (
    LOSSES,
    critic_loss,
    discriminator_loss,
    generator_loss_nonsaturating,
    gradient_penalty,
    wgan_generator_loss,
)
from fsl_course.generative import check_count, check_labels, check_tensor, standard_normal
from fsl_course.meta.baselines import PretrainFinetune, pretrain
from fsl_course.meta.base import register_learner

# --------------------------------------------------------------------------- checks


def _check_features(name: str, h, dim: int) -> None:
    check_tensor(name, h)
    if h.ndim != 2 or h.shape[1] != dim:
        raise ValueError(f"{name} must be features of shape (B, D) = (B, {dim}), got {tuple(h.shape)}")


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a CPU torch.Generator (noise is drawn on the CPU and moved), got {generator!r}")


def _check_dense_features(features) -> None:
    check_tensor("features", features)
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(
            "features must be dense per-class features (C, n, D) with n >= 2 instances per class "
            f"(a real pair needs two instances of one class), got {tuple(features.shape)}"
        )


class FeatureGenerator(nn.Module):
    """``G(h, z)``: a feature ``h`` ``(B, D)`` and noise ``z`` ``(B, k)`` -> a new feature ``(B, D)``
    meant to be another instance of ``h``'s class. With ``u = (h - m) / s`` the feature in
    standard units (``m``, ``s``: per-dimension mean and standard deviation of the training
    features, buffers set by :meth:`set_feature_stats`, saved with the module):

        G(h, z) = relu(h + s * MLP([u, z])),
        MLP: Linear(D + k, H) -> LeakyReLU(0.2) -> Linear(H, H) -> LeakyReLU(0.2) -> Linear(H, D).

    * The residual form makes the network model the within-class *displacement*, in units of
      each dimension's spread; it starts (random weights) close to ``h``.
    * The output ReLU puts ``G``'s features where the encoder's are: Conv-4 ends in ReLU and
      max-pool, so real features are ``>= 0`` and sparse (on the glyphs, more than half of
      the coordinates are exactly 0). Without it, about 30% of generated coordinates came out
      negative, an easy tell for the discriminator that the game was slow to remove.
    * The GAN game is played in standard units (:meth:`forward_standard`), so the gradient
      penalty does not depend on the features' scale.
    """

    def __init__(self, feature_dim: int = 64, noise_dim: int = 16, hidden: int = 128):
        super().__init__()
        self.feature_dim, self.noise_dim = check_count("feature_dim", feature_dim), check_count("noise_dim", noise_dim)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(feature_dim))
        self.net = nn.Sequential(
            nn.Linear(feature_dim + noise_dim, check_count("hidden", hidden)),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, feature_dim),
        )

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor, min_scale: float = 0.01) -> None:
        """Set ``m``, ``s`` to the per-dimension mean and standard deviation of ``features``
        ``(N, D)`` or ``(C, n, D)``. ``s`` is floored at ``min_scale`` times its mean over the
        dimensions (a ReLU feature can be always 0; standardising it would blow up rounding noise)."""
        check_tensor("features", features)
        flat = features.detach().reshape(-1, features.shape[-1])
        if features.shape[-1] != self.feature_dim or len(flat) < 2:
            raise ValueError(f"need at least 2 feature vectors of size {self.feature_dim}, got shape {tuple(features.shape)}")
        std = flat.std(0)
        self.feature_mean.copy_(flat.mean(0))
        self.feature_scale.copy_(std.clamp_min(min_scale * std.mean().item()) if std.mean() > 0 else torch.ones_like(std))

    def standardise(self, h: torch.Tensor) -> torch.Tensor:
        """``u = (h - m) / s``: ``(..., D)`` -> ``(..., D)``."""
        return (h - self.feature_mean) / self.feature_scale

    def unstandardise(self, u: torch.Tensor) -> torch.Tensor:
        """``h = m + s u``: ``(..., D)`` -> ``(..., D)``."""
        return self.feature_mean + self.feature_scale * u

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z ~ N(0, I)``, ``(n, k)``, on the generator's device (drawn on a CPU ``generator``'s CPU and moved)."""
        return standard_normal((check_count("n", n), self.noise_dim), like=self.feature_mean, generator=generator)

    def _check(self, h, z) -> None:
        _check_features("h", h, self.feature_dim)
        check_tensor("z", z)
        if z.shape != (len(h), self.noise_dim):
            raise ValueError(f"z must have shape (B, noise_dim) = ({len(h)}, {self.noise_dim}) to match h, got {tuple(z.shape)}")

    def forward_standard(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``G`` in standard units, ``(G(m + s u, z) - m) / s``: ``(B, D)``, ``(B, k)`` -> ``(B, D)``."""
        self._check(u, z)
        return self.standardise(torch.relu(self.unstandardise(u + self.net(torch.cat([u, z], dim=1)))))

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``G(h, z) = relu(h + s * MLP([(h - m) / s, z]))``: ``(B, D)``, ``(B, k)`` -> ``(B, D)``."""
        self._check(h, z)
        return torch.relu(h + self.feature_scale * self.net(torch.cat([self.standardise(h), z], dim=1)))


class PairDiscriminator(nn.Module):
    """The DAGAN discriminator on feature pairs, in standard units: ``[u, u']`` ``(B, 2D)`` -> one
    logit or critic score per pair, ``(B,)``:

        f([u, u']) = MLP([u, u']),   MLP: Linear(2D, H) -> LeakyReLU(0.2) -> Linear(H, H) -> LeakyReLU(0.2) -> Linear(H, 1).

    Real pairs are two instances of one class, fake pairs ``[u, G_u(u, z)]`` (:func:`real_pairs`,
    :func:`fake_pairs`). The input is one concatenated tensor so that
    :func:`~fsl_course.gan.gradient_penalty` can interpolate whole pairs; no batch norm, so pairs
    are scored independently (as the penalty needs).
    """

    def __init__(self, feature_dim: int = 64, hidden: int = 128):
        super().__init__()
        self.feature_dim = check_count("feature_dim", feature_dim)
        self.net = nn.Sequential(
            nn.Linear(2 * feature_dim, check_count("hidden", hidden)),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        _check_features("pairs", pairs, 2 * self.feature_dim)
        return self.net(pairs).squeeze(1)


# --------------------------------------------------------------------------- pairs


def pair(h: torch.Tensor, h_other: torch.Tensor) -> torch.Tensor:
    """The discriminator's input ``[h, h_other]``: ``(B, D)``, ``(B, D)`` -> ``(B, 2D)``."""
    if h.shape != h_other.shape or h.ndim != 2:
        raise ValueError(f"a pair needs two (B, D) feature tensors of one shape, got {tuple(h.shape)} and {tuple(h_other.shape)}")
    return torch.cat([h, h_other], dim=1)


def real_pairs(features: torch.Tensor, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch_size`` real pairs from dense features ``(C, n, D)``: a class ``c`` and two *distinct*
    instances ``i != j`` of it, uniformly.

    Returns ``h = features[c, i]``, ``h_other = features[c, j]`` (both ``(B, D)``) and ``c`` ``(B,)``.
    Indices are drawn from the CPU ``generator`` and moved to the features' device.
    """
    _check_dense_features(features)
    _check_generator(generator)
    n_classes, n_per_class = features.shape[:2]
    batch_size = check_count("batch_size", batch_size)
    c = torch.randint(n_classes, (batch_size,), generator=generator)
    i = torch.randint(n_per_class, (batch_size,), generator=generator)
    j = (i + torch.randint(1, n_per_class, (batch_size,), generator=generator)) % n_per_class  # j != i
    c, i, j = (t.to(features.device) for t in (c, i, j))
    return features[c, i], features[c, j], c


def fake_pairs(generator_net: FeatureGenerator, u: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fake pairs ``[u, G_u(u, z)]`` in standard units, ``z ~ N(0, I)`` from ``generator``:
    ``(B, D)`` -> ``(B, 2D)`` (differentiable in ``G``'s parameters)."""
    return pair(u, generator_net.forward_standard(u, generator_net.noise(len(u), generator)))


# --------------------------------------------------------------------------- training the feature GAN


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, device: torch.device | str, batch_size: int = 1000) -> torch.Tensor:
    """``E(x)`` for a dense image tensor ``(C, n, 1, H, W)`` -> ``(C, n, D)`` on ``device``, with the
    backbone in eval mode (batch norm uses its running statistics; its mode is restored)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 5:
        raise ValueError(f"images must be a dense (C, n, 1, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    n_classes, n_per_class = images.shape[:2]
    was_training = backbone.training
    backbone.eval()
    try:
        flat = images.reshape(n_classes * n_per_class, *images.shape[2:])
        features = torch.cat([backbone(chunk.to(device)) for chunk in flat.split(batch_size)])
    finally:
        backbone.train(was_training)
    return features.reshape(n_classes, n_per_class, -1)


def _adam(module: nn.Module, lr: float, loss: str) -> torch.optim.Adam:
    betas = (0.5, 0.999) if loss == "nonsaturating" else (0.0, 0.9)  # Radford et al. 2016; Gulrajani et al. 2017
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas)


def train_feature_gan(
    generator_net: FeatureGenerator,
    discriminator: PairDiscriminator,
    features: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    loss: str = "wgan-gp",
    critic_steps: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Play the DAGAN game on dense training features ``(C, n, D)``; one step = one generator update.

    The generator first takes the features' per-dimension mean and scale
    (:meth:`FeatureGenerator.set_feature_stats`); the game is then played in standard units
    ``u = (h - m) / s`` (the discriminator never sees raw features):

    * ``loss="wgan-gp"`` (the default; Gulrajani et al. 2017, Algorithm 1; Adam betas
      ``(0, 0.9)``): ``critic_steps`` critic updates, each on fresh real pairs ``[u, u_other]``
      and fakes ``[u, G_u(u, z)]`` with the same ``u``, minimising
      ``critic_loss(f(real), f(fake)) + gradient_penalty(f, real, fake)``; then one generator
      update on ``wgan_generator_loss(f([u, G_u(u, z)]))`` for fresh ``u``.
    * ``loss="nonsaturating"`` (Adam betas ``(0.5, 0.999)``): one discriminator update on
      ``discriminator_loss`` then one generator update on ``generator_loss_nonsaturating``,
      with the same fakes.

    The networks train on the features' device; ``seed`` seeds the pairs, the noise and the
    penalty's interpolation (the initialisation is the networks' own). Both are left in eval mode.

    Returns ``{"d_loss": [...], "g_loss": [...]}``, one value per step (for ``"wgan-gp"`` the mean
    over the step's critic updates, penalty included).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    _check_dense_features(features)
    for name, net in (("generator_net", generator_net), ("discriminator", discriminator)):
        if net.feature_dim != features.shape[2]:
            raise ValueError(f"{name} works on {net.feature_dim}-dim features but the features have {features.shape[2]}")
    steps, batch_size = check_count("steps", steps), check_count("batch_size", batch_size)
    critic_steps = check_count("critic_steps", critic_steps)
    generator = torch.Generator().manual_seed(seed)
    generator_net.to(features.device).set_feature_stats(features)
    discriminator.to(features.device)
    units = generator_net.standardise(features.detach())  # (C, n, D) in standard units
    generator_net.train()
    discriminator.train()
    opt_g, opt_d = _adam(generator_net, lr, loss), _adam(discriminator, lr, loss)

    def update(optimizer: torch.optim.Optimizer, value: torch.Tensor) -> float:
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        return value.item()

    history: dict[str, list[float]] = {"d_loss": [], "g_loss": []}
    bar = tqdm(range(steps), desc="train feature DAGAN", disable=not progress, leave=False)
    for _ in bar:
        if loss == "wgan-gp":
            d_losses = []
            for _ in range(critic_steps):
                u, u_other, _ = real_pairs(units, batch_size, generator)
                real = pair(u, u_other)
                with torch.no_grad():
                    fake = fake_pairs(generator_net, u, generator)
                d_value = critic_loss(discriminator(real), discriminator(fake)) + gradient_penalty(discriminator, real, fake, generator)
                d_losses.append(update(opt_d, d_value))
            d_loss = sum(d_losses) / len(d_losses)
            u, _, _ = real_pairs(units, batch_size, generator)
            g_loss = update(opt_g, wgan_generator_loss(discriminator(fake_pairs(generator_net, u, generator))))
        else:
            u, u_other, _ = real_pairs(units, batch_size, generator)
            fake = fake_pairs(generator_net, u, generator)
            d_loss = update(opt_d, discriminator_loss(discriminator(pair(u, u_other)), discriminator(fake.detach())))
            g_loss = update(opt_g, generator_loss_nonsaturating(discriminator(fake)))
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)  # the generator update left gradients in the critic
        history["d_loss"].append(d_loss)
        history["g_loss"].append(g_loss)
        bar.set_postfix(d=f"{d_loss:.3f}", g=f"{g_loss:.3f}", refresh=False)
    generator_net.eval()
    discriminator.eval()
    return history


@torch.no_grad()
def generation_statistics(generator_net: FeatureGenerator, features: torch.Tensor, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """How generated features sit relative to real ones, on dense features ``(C, n_per_class, D)``
    (e.g. of *test* classes, which ``G`` never saw). For ``n`` random sources ``h`` of class ``c``:

    * ``generated_to_source``: mean ``||G(h, z) - h||`` (how far ``G`` moves a feature);
    * ``same_class``: mean ``||h_other - h||`` over another real instance of class ``c``;
    * ``other_class``: mean ``||h' - h||`` over a real instance ``h'`` of another class;
    * ``generated_to_generated``: mean ``||G(h, z1) - G(h, z2)||`` (does ``G`` use its noise?);
    * ``mean_generated_to_source``: mean ``||(1/16) sum_j G(h, z_j) - h||`` over 16 noises, the
      generator's average displacement (its *bias*: what survives when many samples are averaged);
    * ``nearest_class_generated``: fraction of generated features whose nearest class mean (the
      mean of all real instances of each of the ``C`` classes, the source's included) is class
      ``c``; ``nearest_class_real``: the same for ``h_other``;
    * ``negative_fraction``: fraction of generated coordinates below 0 (real features are ``>= 0``).

    Distances are Euclidean in feature space. Deterministic given ``seed``.
    """
    _check_dense_features(features)
    n_classes = features.shape[0]
    if n_classes < 2:
        raise ValueError("generation_statistics needs at least 2 classes")
    generator = torch.Generator().manual_seed(seed)
    h, h_other, c = real_pairs(features, check_count("n", n), generator)
    shift = torch.randint(1, n_classes, (n,), generator=generator).to(c.device)
    other = features[(c + shift) % n_classes, torch.randint(features.shape[1], (n,), generator=generator).to(c.device)]
    g1 = generator_net(h, generator_net.noise(n, generator))
    g2 = generator_net(h, generator_net.noise(n, generator))
    many = generator_net(repeat(h, "b d -> (b j) d", j=16), generator_net.noise(16 * n, generator))
    average = many.reshape(n, 16, -1).mean(1)
    means = features.mean(1)  # (C, D)

    def nearest_is_c(x):
        return (torch.cdist(x, means).argmin(1) == c).float().mean().item()

    def distance(a, b):
        return (a - b).norm(dim=1).mean().item()

    return {
        "generated_to_source": distance(g1, h),
        "same_class": distance(h_other, h),
        "other_class": distance(other, h),
        "generated_to_generated": distance(g1, g2),
        "mean_generated_to_source": distance(average, h),
        "nearest_class_generated": nearest_is_c(g1),
        "nearest_class_real": nearest_is_c(h_other),
        "negative_fraction": (g1 < 0).float().mean().item(),
    }


# --------------------------------------------------------------------------- the few-shot learner


def episode_generator(support_x: torch.Tensor, support_y: torch.Tensor, seed: int = 0) -> torch.Generator:
    """A CPU generator seeded by the episode: a 64-bit BLAKE2b hash of ``seed`` and the support
    images' and labels' bytes. The same episode gets the same noise on any device and in any
    order of evaluation; different episodes get unrelated noise."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(int(seed).to_bytes(8, "little", signed=True))
    for t in (support_x, support_y):
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little"))


@register_learner("dagan")
class DAGANLearner(PretrainFinetune):
    """Pretrain-then-fine-tune with DAGAN-style feature augmentation.

    Per episode: the frozen Conv-4 ``E`` (eval mode: non-transductive) embeds the support and
    query images, exactly as :class:`~fsl_course.meta.PretrainFinetune`; then each support
    feature ``h_i`` of label ``y_i`` gets ``n_generated`` companions ``G(h_i, z_ij)`` with the
    same label, and the linear head (zero start, ``finetune_steps`` full-batch Adam steps) is
    fitted on the ``S (1 + n_generated)`` real plus generated features:

        L(W, b) = -1 / (S (1 + n_gen)) sum_i [log softmax(W h_i + b)_{y_i} + sum_j log softmax(W G(h_i, z_ij) + b)_{y_i}].

    The noise ``z`` comes from :func:`episode_generator` (seeded by the episode and
    ``noise_seed``), so predictions are deterministic. ``augment=False`` or ``n_generated=0``
    switches augmentation off: the learner is then PretrainFinetune, to the bit. Both are
    plain attributes too, so one trained learner can be evaluated both ways.

    Args:
        hidden, norm, finetune_steps, finetune_lr: as :class:`~fsl_course.meta.PretrainFinetune`.
        noise_dim, generator_hidden: :class:`FeatureGenerator`'s ``k`` and ``H`` (features: ``D = hidden``, 28x28 images).
        n_generated: generated features per support image.
        augment: use the generator at all.
        noise_seed: mixed into every episode's noise seed.
    """

    def __init__(
        self,
        hidden: int = 64,
        norm: str = "batch",
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        noise_dim: int = 16,
        generator_hidden: int = 128,
        n_generated: int = 10,
        augment: bool = True,
        noise_seed: int = 0,
    ):
        super().__init__(hidden=hidden, norm=norm, finetune_steps=finetune_steps, finetune_lr=finetune_lr)
        # PretrainFinetune stored its own arguments as the config; record ours (JSON-able) instead
        self._kwargs = dict(hidden=hidden, norm=norm, finetune_steps=finetune_steps, finetune_lr=finetune_lr, noise_dim=noise_dim,
                            generator_hidden=generator_hidden, n_generated=n_generated, augment=augment, noise_seed=noise_seed)
        if isinstance(n_generated, bool) or not isinstance(n_generated, int) or n_generated < 0:
            raise ValueError(f"n_generated must be an int >= 0, got {n_generated!r}")
        if not isinstance(augment, bool):
            raise TypeError(f"augment must be True or False, got {augment!r}")
        self.generator = FeatureGenerator(self.backbone.feature_dim(), noise_dim, generator_hidden)
        self.n_generated, self.augment, self.noise_seed = n_generated, augment, int(noise_seed)
        self._episode_noise: torch.Generator | None = None

    @property
    def config(self) -> dict[str, Any]:
        """As :attr:`Rebuildable.config`, with the *current* ``n_generated``, ``augment`` and
        ``noise_seed`` (plain attributes that may have changed since construction)."""
        self._kwargs.update(n_generated=self.n_generated, augment=self.augment, noise_seed=self.noise_seed)
        return super().config

    @property
    def augmenting(self) -> bool:
        """Whether the head is fitted on generated features too (``augment`` and ``n_generated > 0``)."""
        return self.augment and self.n_generated > 0

    @torch.no_grad()
    def generate_features(
        self, features: torch.Tensor, labels: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` generated features per input feature, with its label: ``(S, D)``, ``(S,)`` ->
        ``(S n, D)``, ``(S n,)``, grouped by source (rows ``i n .. i n + n - 1`` come from ``features[i]``)."""
        _check_features("features", features, self.generator.feature_dim)
        check_labels(labels, int(labels.max().item()) + 1 if len(labels) else 1, len(features), name="labels")
        n = check_count("n", n)
        source = repeat(features, "s d -> (s n) d", n=n)
        fake = self.generator(source, self.generator.noise(len(source), generator))
        return fake, repeat(labels, "s -> (s n)", n=n)

    def episode_logits(self, support_x, support_y, query_x, n_way):
        """PretrainFinetune's episode; its head fitting (:meth:`finetune_head`) adds the generated features."""
        if not self.augmenting:
            return super().episode_logits(support_x, support_y, query_x, n_way)
        self._episode_noise = episode_generator(support_x, support_y, self.noise_seed)
        try:
            return super().episode_logits(support_x, support_y, query_x, n_way)
        finally:
            self._episode_noise = None

    def finetune_head(self, features, labels, n_way):
        """PretrainFinetune's head, fitted on ``features`` plus ``n_generated`` generated features per row
        (noise from the episode's generator inside :meth:`predict`, else from ``noise_seed``)."""
        if self.augmenting:
            noise = self._episode_noise if self._episode_noise is not None else torch.Generator().manual_seed(self.noise_seed)
            fake, fake_labels = self.generate_features(features, labels, self.n_generated, noise)
            features, labels = torch.cat([features, fake]), torch.cat([labels, fake_labels])
        return super().finetune_head(features, labels, n_way)


# --------------------------------------------------------------------------- the METHOD


def dagan_hyperparameters(budget) -> dict[str, Any]:
    """Training size of the ``dagan`` METHOD per budget.

    The backbone is pre-trained exactly as the ``baseline`` METHOD
    (:func:`fsl_course.train.baseline_hyperparameters`, under ``pretrain_``), so with the same
    seed ``augment=False`` reproduces the baseline. Then features of ``feature_classes`` random
    training classes (``None``: all) are extracted once and the feature GAN trains for
    ``gan_steps`` generator updates (WGAN-GP, 5 critic updates each). smoke: seconds; standard:
    about 1-1.5 minutes on a 2-core CPU (measured 74 s, seed 0); full: a GPU.
    """
    from fsl_course.train import baseline_hyperparameters  # train.py imports this module: import late

    pretrain_hp = baseline_hyperparameters(budget)
    feature_classes, gan_steps, gan_batch_size = budget.pick(smoke=(8, 4, 16), standard=(800, 1000, 128), full=(None, 20_000, 256))
    return {
        **{f"pretrain_{k}": v for k, v in pretrain_hp.items()},
        "feature_classes": feature_classes,
        "gan_steps": gan_steps,
        "gan_batch_size": gan_batch_size,
        "gan_lr": 2e-4,
        "loss": "wgan-gp",
        "critic_steps": 5,
        "noise_dim": 16,
        "generator_hidden": 128,
        "discriminator_hidden": 128,
        "n_generated": 10,
    }


def train_dagan(dataset, budget, device: torch.device | str, seed: int, progress: bool):
    """The ``dagan`` METHOD: pre-train ``E`` (as ``baseline``), extract training features once,
    train ``G`` against a pair discriminator (:func:`train_feature_gan`); the discriminator is
    then discarded. Deterministic given ``seed`` (the global RNG is seeded with it inside, then restored).

    Returns the :class:`DAGANLearner` (augmentation on) and the hyperparameters with the final losses.
    """
    hp = dagan_hyperparameters(budget)
    images = getattr(dataset, "images", dataset)
    if not isinstance(images, torch.Tensor) or images.ndim != 5:
        raise ValueError("dataset must be a FewShotDataset or a dense (C, n, 1, H, W) image tensor")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the backbone's initialisation is then PretrainFinetune()'s after seed_everything(seed)
        learner = DAGANLearner(noise_dim=hp["noise_dim"], generator_hidden=hp["generator_hidden"], n_generated=hp["n_generated"])
        discriminator = PairDiscriminator(learner.backbone.feature_dim(), hp["discriminator_hidden"])
    losses = pretrain(learner.backbone, dataset, steps=hp["pretrain_steps"], batch_size=hp["pretrain_batch_size"],
                      lr=hp["pretrain_lr"], device=device, progress=progress, seed=seed)
    n_classes = images.shape[0]
    chosen = torch.arange(n_classes)
    if hp["feature_classes"] is not None and hp["feature_classes"] < n_classes:
        chosen = torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed))[: hp["feature_classes"]].sort().values
    features = extract_features(learner.backbone, images[chosen], device)
    history = train_feature_gan(learner.generator, discriminator, features, steps=hp["gan_steps"], batch_size=hp["gan_batch_size"],
                                lr=hp["gan_lr"], loss=hp["loss"], critic_steps=hp["critic_steps"], seed=seed, progress=progress)
    learner.to(device).eval()

    def tail_mean(values: list[float]) -> float:
        tail = values[-min(100, len(values)):]
        return sum(tail) / len(tail)

    return learner, {**hp, "final_pretrain_loss": tail_mean(losses), "final_d_loss": tail_mean(history["d_loss"]),
                     "final_g_loss": tail_mean(history["g_loss"])}


__all__ = [
    "DAGANLearner",
    "FeatureGenerator",
    "PairDiscriminator",
    "dagan_hyperparameters",
    "episode_generator",
    "extract_features",
    "fake_pairs",
    "generation_statistics",
    "pair",
    "real_pairs",
    "train_dagan",
    "train_feature_gan",
]
