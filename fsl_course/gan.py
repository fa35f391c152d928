r"""Generative adversarial networks from the minimax game.

A generator ``G`` maps noise ``z ~ p(z) = N(0, I)`` to samples ``G(z) ~ p_model``; a
discriminator ``D(x) in (0, 1)`` says how likely ``x`` is real. They play (Goodfellow et al.
2014, *Generative Adversarial Nets*, arXiv:1406.2661)

    min_G max_D V(D, G),   V(D, G) = E_{x ~ p_data}[log D(x)] + E_{z ~ p(z)}[log(1 - D(G(z)))].

For a fixed ``G``, ``V = integral [p_data(x) log D(x) + p_model(x) log(1 - D(x))] dx`` is maximised
pointwise: ``a log d + b log(1 - d)`` has its maximum over ``d in [0, 1]`` at ``d = a / (a + b)``,
so the optimal discriminator is (:func:`optimal_discriminator`)

    D*(x) = p_data(x) / (p_data(x) + p_model(x)),

and with ``m = (p_data + p_model) / 2``,

    V(D*, G) = KL(p_data || m) + KL(p_model || m) - log 4 = -log 4 + 2 JSD(p_data || p_model),

so the generator minimises the Jensen-Shannon divergence, reaching ``-log 4`` at ``p_model =
p_data`` (checked on 1-D grids with :func:`value_on_grid` and :func:`js_divergence`).

Discriminators here return *logits* ``l`` with ``D = sigmoid(l)``, and every loss is written
with ``log sigmoid(l) = -softplus(-l)`` and ``log(1 - sigmoid(l)) = -softplus(l)``, which stay
finite for any ``l``:

* :func:`discriminator_loss` ``= -V`` (binary cross-entropy: real = 1, fake = 0);
* :func:`generator_loss_saturating` ``= E log(1 - D(G(z)))``, the minimax loss, whose gradient
  vanishes when ``D`` confidently rejects the fakes (early in training);
* :func:`generator_loss_nonsaturating` ``= -E log D(G(z))``, the same fixed point with strong
  gradients there (Goodfellow et al. 2014, section 3).

WGAN-GP (Arjovsky et al. 2017, arXiv:1701.07875; Gulrajani et al. 2017, *Improved Training of
Wasserstein GANs*, arXiv:1704.00028) replaces ``D`` by a *critic* ``f`` with real-valued scores
and estimates the Wasserstein-1 distance ``sup_{||f||_L <= 1} E f(x) - E f(G(z))``: see
:func:`critic_loss`, :func:`wgan_generator_loss` and :func:`gradient_penalty`. Spectral
normalisation (Miyato et al. 2018, arXiv:1802.05957) is the other way to bound the
discriminator's Lipschitz constant (``DCGANDiscriminator(spectral_norm=True)``).

Models (registered with :mod:`fsl_course.generative`):

* :class:`GAN` (``"dcgan"``): a DCGAN (Radford et al. 2016, arXiv:1511.06434) for 28x28 images;
* :class:`ConditionalGAN` (``"cgan"``): class-conditional (Mirza & Osindero 2014,
  arXiv:1411.1784), with a projection discriminator (Miyato & Koyama 2018, arXiv:1802.05637).

Images are in ``[0, 1]`` (ink = 1) at the package boundary; the networks work in ``[-1, 1]``
(:func:`to_tanh_range`, :func:`from_tanh_range`), so ``sample`` returns ``[0, 1]``.
Shapes: ``B`` batch, images ``(B, 1, 28, 28)``, logits and scores ``(B,)``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm
from tqdm.auto import tqdm

from fsl_course.generative import (
    IMAGE_SHAPE,
    GenerativeModel,
    check_count,
    check_labels,
    check_same_shape,
    check_tensor,
    dense_images,
    register_model,
    standard_normal,
)

LOSSES = ("nonsaturating", "wgan-gp")


# --------------------------------------------------------------------------- checks and ranges


def _check_scores(name: str, value) -> None:
    """A non-empty floating tensor of logits or scores, any shape (every element is one sample)."""
    check_tensor(name, value)
    if value.numel() == 0:
        raise ValueError(f"{name} must hold at least one logit/score, got an empty tensor of shape {tuple(value.shape)}")


def _check_gan_images(x, name: str = "x") -> None:
    check_tensor(name, x)
    if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"{name} must be images of shape (B, 1, 28, 28) in [-1, 1], got {tuple(x.shape)}")


def _densities(**values) -> tuple[list[torch.Tensor], bool]:
    """Density values as tensors of one shape, finite and ``>= 0``, and whether they came as numpy
    arrays (converted to float64, to be converted back by the caller)."""
    kinds = {isinstance(v, np.ndarray) for v in values.values()}
    for name, value in values.items():
        if not isinstance(value, (torch.Tensor, np.ndarray)):
            raise TypeError(f"{name} must be a torch.Tensor or a numpy array of density values, got {type(value).__name__}")
    if len(kinds) > 1:
        raise TypeError(f"{', '.join(values)} must be all torch tensors or all numpy arrays, not a mix")
    numpy = kinds == {True}
    tensors = {n: torch.from_numpy(np.asarray(v, dtype=np.float64)) if numpy else v for n, v in values.items()}
    for name, value in tensors.items():
        check_tensor(name, value, min_ndim=0)
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ValueError(f"{name} must hold finite, nonnegative values, got values in "
                             f"[{value.min().item():g}, {value.max().item():g}]")
    shapes = {n: tuple(v.shape) for n, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("density arrays must have the same shape: " + ", ".join(f"{n} {s}" for n, s in shapes.items()))
    return list(tensors.values()), numpy


def _check_dx(dx) -> float:
    if isinstance(dx, bool) or not isinstance(dx, (int, float)) or not dx > 0 or not math.isfinite(dx):
        raise ValueError(f"dx must be the positive grid spacing (a float), got {dx!r}")
    return float(dx)


def to_tanh_range(x: torch.Tensor) -> torch.Tensor:
    """Images in ``[0, 1]`` -> ``[-1, 1]``: ``2 x - 1`` (the range of a ``tanh`` generator)."""
    return 2 * x - 1


def from_tanh_range(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` -> images in ``[0, 1]``: ``(x + 1) / 2``."""
    return (x + 1) / 2


@contextmanager
def _eval_mode(module: nn.Module):
    """Run ``module`` in eval mode (batch-norm running statistics, no updates), then restore its mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


# --------------------------------------------------------------------------- the minimax game on densities


def optimal_discriminator(p_data, p_model):
    """The discriminator that maximises ``V(D, G)`` for fixed densities, elementwise:

        D*(x) = p_data(x) / (p_data(x) + p_model(x)).

    Where both densities are 0 any ``d`` gives the same value (both terms of ``V`` are
    weighted by 0); by convention this returns ``0.5`` there, the value of a discriminator
    that cannot tell.

    ``p_data``, ``p_model``: density values of one shape, both torch tensors (floating) or both
    numpy arrays, finite and ``>= 0``. Returns the same shape and kind (numpy as float64).
    """
    (p, q), numpy = _densities(p_data=p_data, p_model=p_model)
    total = p + q
    positive = total > 0
    d = torch.where(positive, p / torch.where(positive, total, torch.ones_like(total)), torch.full_like(total, 0.5))
    return d.numpy() if numpy else d


def value_on_grid(d, p_data, p_model, dx: float):
    """``V(D, G)`` for densities on a uniform 1-D grid of spacing ``dx`` (a Riemann sum):

        V = sum_i dx * [p_data(x_i) log d_i + p_model(x_i) log(1 - d_i)],

    with ``0 log 0 = 0`` (``xlogy``). ``d`` values in ``[0, 1]``; all three of one shape, all
    tensors or all numpy arrays. Returns a 0-d tensor (a float for numpy input).

    With ``d = D*`` (:func:`optimal_discriminator`) and densities that sum to 1 on the grid
    (``sum_i dx p_i = 1``), ``V = -log 4 + 2 JSD(p_data || p_model)`` (:func:`js_divergence`).

    Floating point: ``d`` is first clamped to ``[tiny, 1 - eps / 2]`` of its dtype (the smallest
    normal number and the largest number below 1). ``D* = p / (p + q)`` rounds to exactly 1
    wherever ``q < 1e-16 p`` (float64), e.g. in the tails of two Gaussians, and ``q log(1 - 1)``
    would make ``V = -inf``; clamped, such a point is off by at most
    ``q |log(q / (p + q))| < 4e-15 (p + q)`` (and the same for ``d = 0`` with ``tiny``). So an
    exact ``d = 0`` or ``1`` where the other density is not small gives a large negative but
    finite value, not ``-inf``.
    """
    (d, p, q), numpy = _densities(d=d, p_data=p_data, p_model=p_model)
    if (d > 1).any():
        raise ValueError(f"d must be discriminator outputs in [0, 1], got a maximum of {d.max().item():g}")
    finfo = torch.finfo(d.dtype)
    d = d.clamp(finfo.tiny, 1 - finfo.eps / 2)
    value = _check_dx(dx) * (torch.xlogy(p, d) + torch.xlogy(q, 1 - d)).sum()
    return value.item() if numpy else value


def js_divergence(p, q, dx: float):
    """Jensen-Shannon divergence (nats) of two densities on a uniform 1-D grid of spacing ``dx``:

        JSD(p || q) = 0.5 KL(p || m) + 0.5 KL(q || m),   m = (p + q) / 2,
        KL(p || m) = sum_i dx * p_i log(p_i / m_i),

    with ``0 log 0 = 0``. It lies in ``[0, log 2]`` for normalised densities: 0 iff ``p = q``,
    ``log 2`` for disjoint supports. ``p``, ``q`` of one shape, both tensors or both numpy
    arrays; returns a 0-d tensor (a float for numpy input).
    """
    (p, q), numpy = _densities(p=p, q=q)
    m = (p + q) / 2
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum()
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum()
    value = _check_dx(dx) * 0.5 * (kl_pm + kl_qm)
    return value.item() if numpy else value


# --------------------------------------------------------------------------- losses from logits


def value_function(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Monte Carlo estimate of the minimax value from discriminator logits ``D = sigmoid(l)``:

        V(D, G) = E_data[log D(x)] + E_z[log(1 - D(G(z)))]
                = mean(log sigmoid(l_real)) + mean(log sigmoid(-l_fake)),

    using ``1 - sigmoid(l) = sigmoid(-l)``. ``real_logits`` ``(B_real, ...)``, ``fake_logits``
    ``(B_fake, ...)`` (batch sizes may differ) -> a scalar ``<= 0``.
    """
    _check_scores("real_logits", real_logits)
    _check_scores("fake_logits", fake_logits)
    return F.logsigmoid(real_logits).mean() + F.logsigmoid(-fake_logits).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss, ``-V(D, G)``, i.e. binary cross-entropy with real = 1, fake = 0:

        L_D = -E[log D(x)] - E[log(1 - D(G(z)))] = mean(softplus(-l_real)) + mean(softplus(l_fake)).

    ``log 4`` at ``l = 0`` (a discriminator that cannot tell). Logits of any shapes -> a scalar.
    """
    _check_scores("real_logits", real_logits)
    _check_scores("fake_logits", fake_logits)
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss_saturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """The minimax generator loss (minimised by ``G``):

        L_G = E[log(1 - D(G(z)))] = -mean(softplus(l_fake)),   dL_G/dl = -sigmoid(l) / B,

    whose gradient *saturates* (tends to 0) when ``D(G(z)) -> 0``, i.e. exactly when the
    discriminator rejects the fakes and the generator most needs a signal. Scalar.
    """
    _check_scores("fake_logits", fake_logits)
    return -F.softplus(fake_logits).mean()


def generator_loss_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss (Goodfellow et al. 2014):

        L_G = -E[log D(G(z))] = mean(softplus(-l_fake)),   dL_G/dl = -(1 - sigmoid(l)) / B,

    with the same fixed point as the minimax loss but a gradient of about ``-1 / B`` per logit
    when ``D(G(z)) -> 0``. Scalar.
    """
    _check_scores("fake_logits", fake_logits)
    return F.softplus(-fake_logits).mean()


def critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The WGAN critic's loss (to minimise), without the gradient penalty:

        L_f = E[f(G(z))] - E[f(x)],

    the negative of the Kantorovich-Rubinstein estimate ``E f(x) - E f(G(z))`` of the
    Wasserstein-1 distance (valid when ``f`` is 1-Lipschitz). A critic that scores real
    samples higher has ``L_f < 0``. Scores of any shapes -> a scalar.
    """
    _check_scores("real_scores", real_scores)
    _check_scores("fake_scores", fake_scores)
    return fake_scores.mean() - real_scores.mean()


def wgan_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """The WGAN generator's loss: ``L_G = -E[f(G(z))]`` (raise the critic's scores of the fakes). Scalar."""
    _check_scores("fake_scores", fake_scores)
    return -fake_scores.mean()


def gradient_penalty(
    critic,
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None = None,
    weight: float = 10.0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The WGAN-GP penalty (Gulrajani et al. 2017, arXiv:1704.00028, their eq. 3):

        x_hat = eps * x + (1 - eps) * G(z),   eps ~ U(0, 1), one per sample,
        GP = weight * E[(||grad_{x_hat} f(x_hat)||_2 - 1)^2],

    a soft version of ``||grad f|| <= 1`` (1-Lipschitz) on the lines between real and fake
    samples, where the optimal critic has gradient norm 1. The gradient is taken with
    ``create_graph=True``, so the penalty is differentiable in the critic's parameters; the
    interpolates are detached from ``real`` and ``fake`` (no gradient reaches the generator).
    The critic must treat samples independently (no batch norm): ``grad`` of ``sum_b f(x_hat_b)``
    is then the per-sample gradient.

    Args:
        critic: ``f(x) -> (B,)`` (or ``(B, 1)``) scores; called as ``critic(x, labels)`` when
            ``labels`` is given (a conditional critic).
        real, fake: ``(B, ...)`` of one shape.
        generator: CPU generator for ``eps`` (drawn on the CPU, moved to ``real``'s device).
        weight: ``lambda`` (10 in the paper).
        labels: passed through to the critic (e.g. ``(B,)`` int64 class labels).

    Returns:
        a scalar.
    """
    check_same_shape(real=real, fake=fake)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"weight must be a nonnegative float, got {weight!r}")
    batch = real.shape[0]
    eps = torch.rand((batch,) + (1,) * (real.ndim - 1), generator=generator, dtype=real.dtype,
                     device=real.device if generator is None else generator.device).to(real.device)
    with torch.enable_grad():  # also under torch.no_grad(), e.g. when only monitoring the penalty
        x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
        scores = critic(x_hat) if labels is None else critic(x_hat, labels)
        if not isinstance(scores, torch.Tensor) or scores.numel() != batch:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"critic must return one score per sample, (B,) = ({batch},) or (B, 1), got {shape}")
        if not scores.requires_grad:
            raise ValueError("the critic's scores do not depend on its input x, so there is no gradient to penalise")
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True, allow_unused=True)
        if grad is None:
            raise ValueError("the critic's scores do not depend on its input x, so there is no gradient to penalise")
        norm = torch.linalg.vector_norm(rearrange(grad, "b ... -> b (...)"), dim=1)
        return weight * (norm - 1).pow(2).mean()


# --------------------------------------------------------------------------- networks


class DCGANGenerator(nn.Module):
    """``z`` (B, latent_dim) -> images (B, 1, 28, 28) in ``[-1, 1]`` (Radford et al. 2016):

        linear -> (2 hidden, 7, 7) -> BN, ReLU -> ConvTranspose 4x4/2 -> (hidden, 14, 14) -> BN, ReLU
        -> ConvTranspose 4x4/2 -> (1, 28, 28) -> tanh.

    With ``n_classes``, a learned label embedding (size ``hidden``) is concatenated to ``z``
    (Mirza & Osindero 2014) and ``forward(z, labels)`` needs ``labels`` (B,) int64.
    """

    def __init__(self, latent_dim: int = 64, hidden: int = 32, n_classes: int | None = None):
        super().__init__()
        self.latent_dim, self.hidden = check_count("latent_dim", latent_dim), check_count("hidden", hidden)
        self.n_classes = None if n_classes is None else check_count("n_classes", n_classes)
        self.embedding = None if n_classes is None else nn.Embedding(n_classes, hidden)
        in_dim = latent_dim + (0 if n_classes is None else hidden)
        self.linear = nn.Linear(in_dim, 2 * hidden * 7 * 7)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * hidden),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * hidden, hidden, 4, stride=2, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden, 1, 4, stride=2, padding=1),
            nn.Tanh(),
        ).to(memory_format=torch.channels_last)  # NHWC: same result, faster on CPUs

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("z", z)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (B, latent_dim) = (B, {self.latent_dim}), got {tuple(z.shape)}")
        if self.embedding is None:
            _no_labels(self, labels)
        else:
            z = torch.cat([z, self.embedding(_labels_for(self, labels, len(z)))], dim=1)
        maps = rearrange(self.linear(z), "b (c h w) -> b c h w", h=7, w=7)
        return self.net(maps.contiguous(memory_format=torch.channels_last)).contiguous()


class DCGANDiscriminator(nn.Module):
    """Images (B, 1, 28, 28) in ``[-1, 1]`` -> one logit (or critic score) per image, (B,):

        h = phi(x): Conv 4x4/2 -> (hidden, 14, 14) -> LeakyReLU(0.2) -> Conv 4x4/2 -> (2 hidden, 7, 7)
                    -> LeakyReLU(0.2) -> flatten, (B, F) with F = 2 hidden * 49;
        score = psi(h) = w^T h + b                       (unconditional)
        score = psi(h) + <embed(y), h>                   (n_classes given: projection discriminator)
        class logits = c(h), (B, n_classes)               (auxiliary=True: AC-GAN head, :meth:`class_logits`)

    The projection form (Miyato & Koyama 2018, arXiv:1802.05637) follows from writing the
    logit of ``p_data(y | x) p_data(x) / (p_model(y | x) p_model(x))`` with log-linear class
    posteriors: the label enters through an inner product with the features, not by
    concatenation to the input. No batch norm, so samples are scored independently (as the
    gradient penalty needs). ``spectral_norm=True`` wraps every convolution and linear layer,
    and the label embedding as in the paper, with
    ``torch.nn.utils.parametrizations.spectral_norm`` (Miyato et al. 2018, arXiv:1802.05957):
    ``W / sigma_max(W)``, one power iteration per training-mode forward.

    ``auxiliary=True`` (needs ``n_classes``) adds an auxiliary classifier ``c`` (Odena et al.
    2017, AC-GAN, arXiv:1610.09585): a two-layer head ``F -> 256 -> n_classes`` on the same
    features, trained to classify real images; the generator is then also trained to make
    ``c(phi(G(z, y)))`` say ``y`` (:func:`train_gan`).
    """

    def __init__(self, hidden: int = 32, spectral_norm: bool = False, n_classes: int | None = None, auxiliary: bool = False):
        super().__init__()
        if not isinstance(spectral_norm, bool):
            raise TypeError(f"spectral_norm must be True or False, got {spectral_norm!r}")
        self.hidden = check_count("hidden", hidden)
        self.n_classes = None if n_classes is None else check_count("n_classes", n_classes)
        sn = _spectral_norm if spectral_norm else (lambda module: module)
        self.features_dim = 2 * hidden * 7 * 7
        self.features = nn.Sequential(
            sn(nn.Conv2d(1, hidden, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(hidden, 2 * hidden, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
        ).to(memory_format=torch.channels_last)
        self.head = sn(nn.Linear(self.features_dim, 1))
        self.embedding = None
        if n_classes is not None:
            embedding = nn.Embedding(n_classes, self.features_dim)
            nn.init.normal_(embedding.weight, std=self.features_dim**-0.5)  # rows of norm about 1
            self.embedding = sn(embedding)
        if not isinstance(auxiliary, bool):
            raise TypeError(f"auxiliary must be True or False, got {auxiliary!r}")
        if auxiliary and n_classes is None:
            raise ValueError("an auxiliary classifier needs n_classes")
        self.classifier = None
        if auxiliary:
            self.classifier = nn.Sequential(sn(nn.Linear(self.features_dim, 256)), nn.LeakyReLU(0.2), sn(nn.Linear(256, n_classes)))

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``h``: (B, 1, 28, 28) -> (B, F), ``F = 2 * hidden * 49``."""
        _check_gan_images(x)
        return rearrange(self.features(x.contiguous(memory_format=torch.channels_last)), "b c h w -> b (c h w)")

    def score(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The logit (or critic score) from features: ``h`` (B, F) -> (B,)."""
        score = rearrange(self.head(h), "b 1 -> b")
        if self.embedding is None:
            _no_labels(self, labels)
            return score
        return score + (self.embedding(_labels_for(self, labels, len(h))) * h).sum(dim=1)

    def class_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The auxiliary classifier's logits ``c(h)``: features (B, F) -> (B, n_classes)."""
        if self.classifier is None:
            raise ValueError("this discriminator has no auxiliary classifier (auxiliary=False)")
        return self.classifier(h)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(self.phi(x), labels)


def _labels_for(module: nn.Module, labels, batch: int) -> torch.Tensor:
    if labels is None:
        raise ValueError(f"this conditional {type(module).__name__} needs labels: (B,) int64 in 0..{module.n_classes - 1}")
    check_labels(labels, module.n_classes, batch, name="labels")
    return labels


def _no_labels(module: nn.Module, labels) -> None:
    if labels is not None:
        raise ValueError(f"this {type(module).__name__} is unconditional (n_classes=None): call it without labels")


# --------------------------------------------------------------------------- registered models


def _check_loss(loss) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


@register_model("dcgan")
class GAN(GenerativeModel):
    """A DCGAN for 28x28 images: :class:`DCGANGenerator` ``generator`` and
    :class:`DCGANDiscriminator` ``discriminator``, trained by :func:`train_gan` with

    * ``loss="nonsaturating"``: :func:`discriminator_loss` and :func:`generator_loss_nonsaturating`;
    * ``loss="wgan-gp"``: :func:`critic_loss` + :func:`gradient_penalty` and :func:`wgan_generator_loss`.

    :meth:`sample` returns images in ``[0, 1]``.
    """

    def __init__(self, latent_dim: int = 64, hidden: int = 32, spectral_norm: bool = False, loss: str = "nonsaturating"):
        super().__init__(latent_dim=latent_dim, hidden=hidden, spectral_norm=spectral_norm, loss=loss)
        self.latent_dim = check_count("latent_dim", latent_dim)
        self.loss_kind = _check_loss(loss)
        self.generator = DCGANGenerator(latent_dim, hidden)
        self.discriminator = DCGANDiscriminator(hidden, spectral_norm=spectral_norm)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z ~ N(0, I)``, (n, latent_dim), on the model's device (drawn on a CPU ``generator``'s CPU)."""
        return standard_normal((check_count("n", n), self.latent_dim), like=self.generator.linear.weight, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images ``(G(z) + 1) / 2``, ``z ~ N(0, I)``, the generator in eval mode: (n, 1, 28, 28) in [0, 1]."""
        z = self.noise(n, generator)
        with _eval_mode(self.generator):
            return from_tanh_range(self.generator(z))


@register_model("cgan")
class ConditionalGAN(GenerativeModel):
    """A class-conditional DCGAN: ``G(z, y)`` concatenates a label embedding to ``z``
    (:class:`DCGANGenerator` with ``n_classes``) and the discriminator is a projection
    discriminator, ``psi(h) + <embed(y), h>`` (:class:`DCGANDiscriminator` with ``n_classes``).
    Same ``loss`` choices as :class:`GAN`. :meth:`sample` draws ``x ~ p_model(x | y)`` in ``[0, 1]``.

    ``aux_weight > 0`` adds the AC-GAN auxiliary classifier (Odena et al. 2017) to the
    discriminator, and :func:`train_gan` adds ``aux_weight * CE(c(phi(x)), y)`` on real images to
    the discriminator's loss and ``aux_weight * CE(c(phi(G(z, y))), y)`` to the generator's.
    With many classes and few images each (glyphs: 1,118 x 20) the projection term alone is
    too weak a label signal: a row of either embedding gets a gradient in few of the steps, and
    samples ignore their label (measured in lesson 05).
    """

    def __init__(self, n_classes: int, latent_dim: int = 64, hidden: int = 32, spectral_norm: bool = False,
                 loss: str = "nonsaturating", aux_weight: float = 0.0):
        super().__init__(n_classes=n_classes, latent_dim=latent_dim, hidden=hidden, spectral_norm=spectral_norm, loss=loss,
                         aux_weight=aux_weight)
        if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float)) or not aux_weight >= 0:
            raise ValueError(f"aux_weight must be a nonnegative float, got {aux_weight!r}")
        self.n_classes = check_count("n_classes", n_classes)
        self.latent_dim = check_count("latent_dim", latent_dim)
        self.loss_kind = _check_loss(loss)
        self.aux_weight = float(aux_weight)
        self.generator = DCGANGenerator(latent_dim, hidden, n_classes=n_classes)
        self.discriminator = DCGANDiscriminator(hidden, spectral_norm=spectral_norm, n_classes=n_classes,
                                                auxiliary=aux_weight > 0)

    noise = GAN.noise

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One image per label, ``(G(z, y) + 1) / 2``, ``z ~ N(0, I)``: ``labels`` (n,) int64 -> (n, 1, 28, 28) in [0, 1]."""
        check_labels(labels, self.n_classes, name="labels")
        if len(labels) == 0:
            raise ValueError("labels must hold at least one class label")
        z = self.noise(len(labels), generator)
        with _eval_mode(self.generator):
            return from_tanh_range(self.generator(z, labels.to(z.device)))


# --------------------------------------------------------------------------- training


def _fakes(model, n: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` fakes ``G(z, y)`` in [-1, 1] and their labels: ``labels`` if given, else uniform over the
    classes (None for an unconditional model)."""
    z = model.noise(n, generator)
    if not isinstance(model, ConditionalGAN):
        return model.generator(z), None
    y = torch.randint(model.n_classes, (n,), generator=generator).to(z.device) if labels is None else labels
    return model.generator(z, y), y


def _scores(model, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's scores ``(B,)`` of ``x`` and its auxiliary loss ``aux_weight * CE(c(phi(x)), y)``
    (0 without an auxiliary classifier)."""
    aux = getattr(model, "aux_weight", 0.0)
    if aux == 0:
        scores = model.discriminator(x, y)
        return scores, scores.new_zeros(())
    h = model.discriminator.phi(x)
    return model.discriminator.score(h, y), aux * F.cross_entropy(model.discriminator.class_logits(h), y)


def _nonsaturating_step(model, real, real_y, generator, opt_d, opt_g) -> tuple[float, float]:
    """One discriminator update on ``-V`` (+ the auxiliary loss on real images) then one generator
    update on ``-E log D(G(z))`` (+ the auxiliary loss on the fakes), same fakes, with the real
    batch's labels."""
    fake, fake_y = _fakes(model, len(real), generator, real_y)
    real_scores, aux_real = _scores(model, real, real_y)
    d_loss = discriminator_loss(real_scores, model.discriminator(fake.detach(), fake_y)) + aux_real
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    fake_scores, aux_fake = _scores(model, fake, fake_y)
    g_loss = generator_loss_nonsaturating(fake_scores) + aux_fake
    opt_g.zero_grad()
    g_loss.backward()
    opt_g.step()
    return d_loss.item(), g_loss.item()


def _wgan_gp_step(model, real_batches, generator, opt_d, opt_g) -> tuple[float, float]:
    """One critic update per real batch on ``E f(G(z)) - E f(x) + GP`` (+ the auxiliary loss on real
    images; fakes with the real labels, so each interpolate has one label), then one generator
    update on ``-E f(G(z))`` (+ the auxiliary loss on the fakes), labels uniform."""
    d_losses = []
    for real, real_y in real_batches:
        with torch.no_grad():
            fake, fake_y = _fakes(model, len(real), generator, real_y)
        real_scores, aux_real = _scores(model, real, real_y)
        d_loss = critic_loss(real_scores, model.discriminator(fake, fake_y)) + aux_real + gradient_penalty(
            model.discriminator, real, fake, generator, labels=real_y
        )
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        d_losses.append(d_loss.item())
    fake, fake_y = _fakes(model, len(real), generator)
    fake_scores, aux_fake = _scores(model, fake, fake_y)
    g_loss = wgan_generator_loss(fake_scores) + aux_fake
    opt_g.zero_grad()
    g_loss.backward()
    opt_g.step()
    return sum(d_losses) / len(d_losses), g_loss.item()


def train_gan(
    model: GAN | ConditionalGAN,
    dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    device: torch.device | str,
    seed: int = 0,
    progress: bool = True,
    critic_steps: int = 5,
) -> dict[str, list[float]]:
    """Train a :class:`GAN` or :class:`ConditionalGAN` with Adam; one step = one generator update.

    Batches are ``batch_size`` images drawn uniformly from all ``C * n`` images (with
    replacement), mapped to ``[-1, 1]``; for a :class:`ConditionalGAN` the label is the class
    index (class ``c`` of the dense tensor has label ``c``), the fakes shown to the discriminator
    take the real batch's labels, and the WGAN generator update draws uniform labels.

    * ``loss="nonsaturating"`` (Radford et al. 2016): Adam betas ``(0.5, 0.999)``; per step one
      discriminator update on :func:`discriminator_loss`, then one generator update on
      :func:`generator_loss_nonsaturating` with the same fakes.
    * ``loss="wgan-gp"`` (Gulrajani et al. 2017, Algorithm 1): Adam betas ``(0.0, 0.9)``; per
      step ``critic_steps`` critic updates on :func:`critic_loss` ``+`` :func:`gradient_penalty`
      (weight 10), each on a fresh batch, then one generator update on :func:`wgan_generator_loss`.
    * A :class:`ConditionalGAN` with ``aux_weight > 0`` adds the AC-GAN terms: ``aux_weight *
      CE(c(phi(x)), y)`` on real images to every discriminator (critic) update and ``aux_weight *
      CE(c(phi(G(z, y))), y)`` to the generator update. The discriminator's classifier learns from
      real images only, so it is never taught the fakes' labels (Odena et al. 2017 also train it
      on fakes).

    Args:
        dataset: a :class:`~fsl_course.data.FewShotDataset` or a dense ``(C, n, 1, 28, 28)`` tensor in [0, 1].
        steps, batch_size, lr: generator updates, images per batch, learning rate (both networks).
        device: where to train (batches and noise are drawn on the CPU and moved).
        seed: seeds the batches, the noise and the penalty's ``eps`` (the initialisation is the model's own).
        progress: show a tqdm bar with the last losses.
        critic_steps: critic updates per generator update for ``"wgan-gp"`` (5 in the paper).

    Returns:
        ``{"d_loss": [...], "g_loss": [...]}``, one value per step (for ``"wgan-gp"``, ``d_loss``
        is the mean over the step's critic updates, penalty included; auxiliary terms included).
    """
    if not isinstance(model, (GAN, ConditionalGAN)):
        raise TypeError(f"train_gan trains a GAN or a ConditionalGAN, got {type(model).__name__}")
    images = dense_images(dataset, model)
    n_per_class = images.shape[1]
    steps, batch_size = check_count("steps", steps), check_count("batch_size", batch_size)
    critic_steps = check_count("critic_steps", critic_steps)
    flat = rearrange(images, "c n ch h w -> (c n) ch h w")
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    betas = (0.5, 0.999) if model.loss_kind == "nonsaturating" else (0.0, 0.9)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=betas)
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=lr, betas=betas)

    def real_batch() -> tuple[torch.Tensor, torch.Tensor | None]:
        index = torch.randint(len(flat), (batch_size,), generator=generator)
        labels = (index // n_per_class).to(device) if isinstance(model, ConditionalGAN) else None
        return to_tanh_range(flat[index]).to(device), labels

    history: dict[str, list[float]] = {"d_loss": [], "g_loss": []}
    bar = tqdm(range(steps), desc=f"train {model.name or type(model).__name__} ({model.loss_kind})", disable=not progress, leave=False)
    for _ in bar:
        if model.loss_kind == "nonsaturating":
            d_loss, g_loss = _nonsaturating_step(model, *real_batch(), generator, opt_d, opt_g)
        else:
            d_loss, g_loss = _wgan_gp_step(model, [real_batch() for _ in range(critic_steps)], generator, opt_d, opt_g)
        history["d_loss"].append(d_loss)
        history["g_loss"].append(g_loss)
        bar.set_postfix(d=f"{d_loss:.3f}", g=f"{g_loss:.3f}", refresh=False)
    model.eval()
    return history


__all__ = [
    "LOSSES",
    "ConditionalGAN",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "GAN",
    "critic_loss",
    "discriminator_loss",
    "from_tanh_range",
    "generator_loss_nonsaturating",
    "generator_loss_saturating",
    "gradient_penalty",
    "js_divergence",
    "optimal_discriminator",
    "to_tanh_range",
    "train_gan",
    "value_function",
    "value_on_grid",
    "wgan_generator_loss",
]
