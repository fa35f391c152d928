"""Visible checks of exercise 03 (VAEs for few-shot): the conditional VAE loss, prototype-latent
sampling, and the set VAE's negative ELBO per image."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from fsl_course import vae
from fsl_course.checks import visible_check

N_PIXELS = 28 * 28
LOG_2 = math.log(2.0)


class ToyCVAE(nn.Module):
    """A stand-in for :class:`fsl_course.vae.ConditionalVAE` that is simple enough to do by hand.

    ``encode(x, y)`` returns the rows ``y`` of the parameters ``mu`` and ``logvar`` (C, D): the
    posterior depends on the label only. ``prior(y)`` returns the rows ``y`` of ``prior_mu`` and
    ``prior_logvar`` (default 0: ``p(z | y) = N(0, I)``). ``decode(z, y)`` returns the same logit
    for every pixel, ``scale * sum_j z_j``, so with ``scale = 0`` every pixel has probability 1/2
    and ``-log p(x | z, y) = 784 log 2`` whatever ``x`` is. It records the labels it was called with.
    """

    def __init__(self, mu, logvar, scale: float = 0.0, prior_mu=None, prior_logvar=None):
        super().__init__()
        self.mu = nn.Parameter(torch.as_tensor(mu, dtype=torch.float32).clone())
        self.logvar = nn.Parameter(torch.as_tensor(logvar, dtype=torch.float32).clone())
        zeros = torch.zeros_like(self.mu)
        self.prior_mu = nn.Parameter(zeros.clone() if prior_mu is None else torch.as_tensor(prior_mu, dtype=torch.float32).clone())
        self.prior_logvar = nn.Parameter(
            zeros.clone() if prior_logvar is None else torch.as_tensor(prior_logvar, dtype=torch.float32).clone()
        )
        self.scale = scale
        self.latent_dim = self.mu.shape[1]
        self.seen = {}

    def encode(self, x, y):
        self.seen["encode"] = y
        return self.mu[y], self.logvar[y]

    def prior(self, y):
        self.seen["prior"] = y
        return self.prior_mu[y], self.prior_logvar[y]

    def decode(self, z, y):
        self.seen["decode"] = y
        return (self.scale * z.sum(1))[:, None, None, None].expand(len(z), 1, 28, 28)


def _noise(shape, generator_seed: int, like: torch.Tensor) -> torch.Tensor:
    """The noise the exercises ask for: ``torch.randn(shape, generator=..., dtype=like.dtype)``."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(generator_seed), dtype=like.dtype).to(like.device)


def set_vae_pieces(model: vae.SetVAE, sets: torch.Tensor, generator: torch.Generator):
    """The per-image and per-set pieces of a :class:`~fsl_course.vae.SetVAE`'s negative ELBO, with the
    random draws of :meth:`~fsl_course.vae.SetVAE.loss_terms` (one ``c`` per set, then one ``z`` per image):

    ``log_px_z`` (B, K) ``= log p(x_i | z_i, c)``, ``kl_z`` (B, K) ``= KL(q(z_i | x_i, c) || p(z_i | c))``,
    ``kl_c`` (B,) ``= KL(q(c | D) || N(0, I))``. ``sets``: (B, K, 1, 28, 28) binarised.
    """
    b, k = sets.shape[:2]
    x = sets.flatten(0, 1)
    h = model.features(x)
    mu_c, logvar_c = model.encode_context(sets)
    c = vae.reparameterize(mu_c, logvar_c, generator).repeat_interleave(k, dim=0)
    mu_z, logvar_z = model.q_latent(torch.cat([h, c], dim=1)).chunk(2, dim=-1)
    z = vae.reparameterize(mu_z, logvar_z, generator)
    mu_p, logvar_p = model.latent_prior(c)
    log_px_z = vae.log_bernoulli(x, model.decode(z, c)).reshape(b, k)
    kl_z = vae.kl_normal(mu_z, logvar_z, mu_p, logvar_p).reshape(b, k)
    return log_px_z, kl_z, vae.kl_standard_normal(mu_c, logvar_c)


def _binary_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 28, 28, generator=g) < 0.3).float()


@visible_check
def cvae_loss(cvae_loss, expect):
    x, y = _binary_images(3, 0), torch.tensor([0, 1, 0])
    flat = ToyCVAE(torch.zeros(2, 2), torch.zeros(2, 2))
    loss = cvae_loss(flat, x, y, torch.Generator().manual_seed(0))
    expect(isinstance(loss, torch.Tensor) and loss.ndim == 0,
           f"return a scalar tensor (0-dim), got {type(loss).__name__} of shape {tuple(getattr(loss, 'shape', ()))}. "
           "hint: sum over pixels and latent dimensions per image, then .mean() over the batch")
    expected = N_PIXELS * LOG_2
    expect(abs(loss.item() - expected) < 1e-2,
           f"a decoder with logits 0 (every pixel p = 1/2) and q = N(0, I) must give {expected:.2f} nats, got {loss.item():.2f}. "
           "hint: the loss is the *negative* ELBO; -log p(x | z, y) is F.binary_cross_entropy_with_logits(logits, x, "
           "reduction='none') summed over the 784 pixels (log 2 each here), and the KL is 0")
    shifted = ToyCVAE(torch.ones(2, 2), torch.zeros(2, 2))
    loss = cvae_loss(shifted, x, y, torch.Generator().manual_seed(0)).item()
    expect(abs(loss - (expected + 1.0)) < 1e-2,
           f"with mu = (1, 1) and logvar = 0 the KL is 0.5 * (1 + 1) = 1, so the loss is {expected + 1:.2f}; got {loss:.2f}. "
           "hint: KL = 0.5 * sum_j (sigma_j^2 + mu_j^2 - 1 - log sigma_j^2), summed over the latent dimensions")
    wide = ToyCVAE(torch.zeros(2, 2), torch.full((2, 2), LOG_2))
    loss = cvae_loss(wide, x, y, torch.Generator().manual_seed(0)).item()
    kl = 2 * 0.5 * (2 - 1 - LOG_2)
    expect(abs(loss - (expected + kl)) < 1e-2,
           f"with mu = 0 and logvar = log 2 the KL is 2 * 0.5 * (2 - 1 - log 2) = {kl:.4f}, so the loss is "
           f"{expected + kl:.4f}; got {loss:.4f}. hint: sigma^2 = exp(logvar), and log sigma^2 = logvar")
    moved_prior = ToyCVAE(torch.zeros(2, 2), torch.zeros(2, 2), prior_mu=torch.ones(2, 2))
    loss = cvae_loss(moved_prior, x, y, torch.Generator().manual_seed(0)).item()
    expect(abs(loss - (expected + 1.0)) < 1e-2,
           f"with q = N(0, I) and the prior p(z | y) = N((1, 1), I) the KL is 0.5 * (1 + 1) = 1, so the loss is "
           f"{expected + 1:.2f}; got {loss:.2f}. hint: the prior is (m, s) = model.prior(y), not N(0, I); "
           "KL = 0.5 * sum_d (s_d - logvar_d + (exp(logvar_d) + (mu_d - m_d)^2) / exp(s_d) - 1)")
    wide_prior = ToyCVAE(torch.zeros(2, 2), torch.zeros(2, 2), prior_logvar=torch.full((2, 2), LOG_2))
    loss = cvae_loss(wide_prior, x, y, torch.Generator().manual_seed(0)).item()
    kl = 2 * 0.5 * (LOG_2 + 0.5 - 1)
    expect(abs(loss - (expected + kl)) < 1e-2,
           f"with q = N(0, I) and a prior of variance 2 per dimension the KL is 2 * 0.5 * (log 2 + 1/2 - 1) = {kl:.4f}, "
           f"so the loss is {expected + kl:.4f}; got {loss:.4f}. hint: divide sigma_q^2 + (mu - m)^2 by the prior's "
           "variance exp(s), and add its log-variance s")
    one = cvae_loss(shifted, x[:1], y[:1], torch.Generator().manual_seed(0)).item()
    expect(abs(one - (expected + 1.0)) < 1e-2,
           f"one image must give the same loss as three identical-cost images ({expected + 1:.2f}), got {one:.2f}. "
           "hint: average over the batch, do not sum")
    expect(all(torch.equal(flat.seen.get(part, torch.tensor([])), y) for part in ("encode", "prior", "decode")),
           "call model.encode(x, y), model.prior(y) and model.decode(z, y) with the labels y: all three are conditioned on the class")
    mu, logvar = torch.tensor([[0.5, -1.0], [2.0, 0.0]]), torch.tensor([[0.3, -0.7], [0.0, 1.0]])
    prior = {"prior_mu": torch.tensor([[0.2, -0.4], [1.0, 0.5]]), "prior_logvar": torch.tensor([[0.1, 0.0], [-0.5, 0.3]])}
    moving = ToyCVAE(mu, logvar, scale=0.8, **prior)
    loss = cvae_loss(moving, x, y, torch.Generator().manual_seed(3))
    again = cvae_loss(moving, x, y, torch.Generator().manual_seed(3))
    expect(torch.allclose(loss.detach(), again.detach()),
           "the same generator seed must give the same loss. hint: draw eps from `generator`, not the global random state")
    by_hand_model = ToyCVAE(mu, logvar, scale=0.8, **prior)
    m, lv = by_hand_model.mu[y], by_hand_model.logvar[y]
    pm, plv = by_hand_model.prior_mu[y], by_hand_model.prior_logvar[y]
    z = m + torch.exp(0.5 * lv) * _noise((3, 2), 3, mu)
    logits = (0.8 * z.sum(1))[:, None, None, None].expand(3, 1, 28, 28)
    recon = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
    kl = kl_divergence(Normal(m, torch.exp(0.5 * lv)), Normal(pm, torch.exp(0.5 * plv))).sum(1)
    by_hand = (recon + kl).mean()
    expect(torch.allclose(loss.detach(), by_hand.detach(), rtol=1e-5, atol=1e-4),
           f"with a decoder that depends on z, expected {by_hand.item():.4f}, got {loss.item():.4f}. hint: one z per image, "
           "z = mu + exp(logvar / 2) * eps with eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)")
    loss.backward()
    by_hand.backward()
    expect(all(
               getattr(moving, name).grad is not None
               and torch.allclose(getattr(moving, name).grad, getattr(by_hand_model, name).grad, rtol=1e-4, atol=1e-4)
               for name in ("mu", "logvar", "prior_mu", "prior_logvar")
           ),
           "the gradient with respect to mu, logvar or the prior's (m, s) is wrong: it must flow through z into the "
           "reconstruction term as well as through the KL, and into the prior through the KL. hint: the reparameterisation z = mu + sigma * eps; do not detach z, "
           "do not sample with torch.normal")


@visible_check
def prototype_latent_sample(prototype_latent_sample, expect):
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    z = prototype_latent_sample(mu, logvar, 7, torch.Generator().manual_seed(1))
    expect(isinstance(z, torch.Tensor) and tuple(z.shape) == (7, 4) and z.dtype == mu.dtype,
           f"z must be a float tensor of shape (n, D) = (7, 4), got {tuple(getattr(z, 'shape', ()))}. "
           "hint: n samples of one D-dimensional Gaussian")
    torch.manual_seed(0)
    a = prototype_latent_sample(mu, logvar, 6, torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    b = prototype_latent_sample(mu, logvar, 6, torch.Generator().manual_seed(5))
    expect(torch.equal(a, b), "the same generator seed must give the same samples. hint: draw eps from `generator`, "
           "not the global random state")
    # two shots, one latent dimension: mu = 0 and 2, sigma^2 = 1 each -> m = 1, v = 1 + 1 = 2
    two_mu, two_logvar = torch.tensor([[0.0], [2.0]]), torch.zeros(2, 1)
    z = prototype_latent_sample(two_mu, two_logvar, 5, torch.Generator().manual_seed(2))
    eps = _noise((5, 1), 2, two_mu)
    expect(torch.allclose(z, 1 + math.sqrt(2) * eps, atol=1e-5),
           f"for mu = 0 and 2 with sigma^2 = 1 each, m = 1 and v = 1 + 1 = 2, so z = 1 + sqrt(2) * eps; "
           f"got z / eps = {[round(v, 3) for v in ((z - 1) / eps).flatten().tolist()[:2]]} instead of 1.414. hint: "
           "v = mean of sigma_i^2 + mean of (mu_i - m)^2 (divide by K, not K - 1), and z = m + sqrt(v) * eps "
           "with eps = torch.randn((n, D), generator=generator, dtype=mu.dtype)")
    one = prototype_latent_sample(mu[:1], logvar[:1], 6, torch.Generator().manual_seed(3))
    expect(torch.allclose(one, mu[:1] + torch.exp(0.5 * logvar[:1]) * _noise((6, 4), 3, mu), atol=1e-5),
           "with K = 1 shot the samples must come from that shot's posterior N(mu_1, sigma_1^2). "
           "hint: the spread of the means is 0 for one shot")
    m = mu.mean(0)
    v = logvar.exp().mean(0) + ((mu - m) ** 2).mean(0)
    z = prototype_latent_sample(mu, logvar, 6, torch.Generator().manual_seed(4))
    expect(torch.allclose(z, m + v.sqrt() * _noise((6, 4), 4, mu), atol=1e-5),
           "3 shots in 4 dimensions: the samples do not match m + sqrt(v) * eps. hint: average over the shots "
           "(dimension 0), separately for every latent dimension")


@visible_check
def set_vae_loss(set_vae_loss, expect):
    log_px_z, kl_z, kl_c = torch.tensor([[-10.0, -20.0]]), torch.tensor([[1.0, 3.0]]), torch.tensor([4.0])
    loss = set_vae_loss(log_px_z, kl_z, kl_c)
    expect(isinstance(loss, torch.Tensor) and loss.ndim == 0,
           f"return a scalar tensor (0-dim), got {type(loss).__name__} of shape {tuple(getattr(loss, 'shape', ()))}")
    expect(abs(loss.item() - 19.0) < 1e-5,
           f"one set of K = 2 images: (10 + 20 + 1 + 3 + 4) / 2 = 19 nats per image, got {loss.item():g}. "
           "hint: -log p and KL_z are per image (average them over the K images), KL_c is per set (divide it by K)")
    two = set_vae_loss(torch.tensor([[-10.0, -20.0], [-4.0, -6.0]]), torch.tensor([[1.0, 3.0], [0.0, 2.0]]), torch.tensor([4.0, 0.0]))
    expect(abs(two.item() - (19.0 + 6.0) / 2) < 1e-5,
           f"two sets (19 and 6 nats per image) must give their mean, 12.5; got {two.item():g}. hint: average over the sets")
    k1 = set_vae_loss(torch.tensor([[-10.0]]), torch.tensor([[1.0]]), torch.tensor([4.0]))
    expect(abs(k1.item() - 15.0) < 1e-5,
           f"with K = 1 the context pays its whole KL: 10 + 1 + 4 = 15, got {k1.item():g}")
    k5 = set_vae_loss(torch.full((1, 5), -10.0), torch.ones(1, 5), torch.tensor([5.0]))
    expect(abs(k5.item() - 12.0) < 1e-5,
           f"K = 5 identical images: 10 + 1 + 5 / 5 = 12 nats per image, got {k5.item():g}. hint: K = log_px_z.shape[1]")
    with torch.no_grad():
        torch.manual_seed(0)
        model = vae.SetVAE(latent_dim=4, context_dim=4, hidden=4)
        sets = _binary_images(6, 1).reshape(2, 3, 1, 28, 28)
        ours = set_vae_loss(*set_vae_pieces(model, sets, torch.Generator().manual_seed(0)))
        package = model.loss(sets, torch.Generator().manual_seed(0))
    expect(torch.allclose(ours, package, rtol=1e-5),
           f"on the pieces of a real SetVAE (2 sets of K = 3) your loss is {ours.item():.3f} but SetVAE.loss is "
           f"{package.item():.3f}. hint: mean over sets of [sum_i (-log p_i + KL_z,i) + KL_c] / K")
