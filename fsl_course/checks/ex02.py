"""Visible checks of exercise 02 (VAE from the ELBO): the Gaussian KL, the reparameterisation
trick, the Bernoulli ELBO and the importance-weighted bound."""

from __future__ import annotations

import math

import torch

from fsl_course.checks import visible_check

LOG_2 = math.log(2.0)


class QuadraticModel:
    """A toy latent-variable model with an exact answer, for checking ``iwae_bound``.

    Data ``x`` and latents ``z`` are both ``(B, D)``; the prior is ``N(0, I)`` and

        log p(x | z) = offset - ||z - x||^2 / 2,

    so that ``p(z | x) = N(x / 2, I / 2)`` and ``log p(x) = offset - (D / 2) log 2 - ||x||^2 / 4``
    (integrate the product of two Gaussians). ``encode`` returns the exact posterior
    (``exact=True``: then every importance weight equals ``p(x)``) or the prior (``exact=False``).
    A large negative ``offset`` makes every log-weight about ``offset`` nats.
    """

    def __init__(self, offset: float = 0.0, exact: bool = True):
        self.offset, self.exact = offset, exact

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.exact:
            return x / 2, torch.full_like(x, -LOG_2)
        return torch.zeros_like(x), torch.zeros_like(x)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.offset - 0.5 * (z - x).pow(2).sum(1)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        return self.offset - 0.5 * x.shape[1] * LOG_2 - 0.25 * x.pow(2).sum(1)

    def prior_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """The ELBO of ``q = p(z) = N(0, I)``: ``E[log p(x | z)] = offset - (D + ||x||^2) / 2``, KL = 0."""
        return self.offset - 0.5 * (x.shape[1] + x.pow(2).sum(1))


def _close(a, b, tol: float) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == torch.as_tensor(b).shape and bool(
        torch.allclose(a.detach().double(), torch.as_tensor(b).double(), rtol=tol, atol=tol))


@visible_check
def kl_standard_normal(kl_standard_normal, expect):
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    kl = kl_standard_normal(mu, logvar)
    expect(isinstance(kl, torch.Tensor) and tuple(kl.shape) == (1,),
           f"mu and logvar of shape (B, D) = (1, 2) give one KL per sample, shape (1,); got "
           f"{tuple(kl.shape) if isinstance(kl, torch.Tensor) else type(kl).__name__}. "
           "hint: sum over the latent dimension only, e.g. .sum(dim=1), never over the batch")
    expected = 0.5 * ((1 + 1 - 1 - 0) + (2 + 0 - 1 - math.log(2.0)))  # 0.6534
    typical = {  # what common mistakes give here -> their hint
        -expected: "a KL divergence is never negative: check the overall sign (+0.5)",
        expected / 2: "sum over the latent dimensions, do not average them",
        0.5 * ((1 + 1 - 1 + 0) + (2 + 0 - 1 + math.log(2.0))): "the last term is -log sigma^2 = -logvar (sign error)",
        0.5 * ((1 + 1 - 1 - 0) + (4 + 0 - 1 - math.log(2.0))): "sigma^2 = exp(logvar), not exp(2 * logvar)",
    }
    hint = next((h for v, h in typical.items() if _close(kl, [v], 1e-4)),
                "KL = 0.5 * sum_j (exp(logvar_j) + mu_j^2 - 1 - logvar_j), with the variance exp(logvar)")
    expect(_close(kl, [expected], 1e-5),
           f"for mu = [1, 0], logvar = [0, log 2] the KL is 0.5 * ((1 + 1 - 1 - 0) + (2 + 0 - 1 - log 2)) = "
           f"{expected:.4f}, got {kl.flatten().tolist()}. hint: {hint}")
    zero = kl_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4))
    expect(_close(zero, [0.0] * 3, 1e-6),
           f"KL(N(0, I) || N(0, I)) must be 0, got {zero.tolist()}. hint: at mu = 0, logvar = 0 each term is 1 + 0 - 1 - 0")
    g = torch.Generator().manual_seed(0)
    kl = kl_standard_normal(3 * torch.randn(50, 8, generator=g), 3 * torch.randn(50, 8, generator=g))
    expect(bool((kl >= 0).all()),
           "a KL divergence is never negative. hint: check the signs: + exp(logvar) + mu^2 - 1 - logvar, times +0.5")
    images = kl_standard_normal(torch.ones(2, 3, 4, 5), torch.zeros(2, 3, 4, 5))
    expect(_close(images, [30.0, 30.0], 1e-5),
           f"mu and logvar of shape (2, 3, 4, 5) give shape (2,), summed over all 60 coordinates (KL 30 each); got "
           f"{tuple(images.shape)}. hint: sum over every dimension but the first, e.g. .flatten(1).sum(1)")
    mu = torch.tensor([[0.5, -2.0]], requires_grad=True)
    logvar = torch.tensor([[0.3, -0.1]], requires_grad=True)
    kl_standard_normal(mu, logvar).sum().backward()
    expect(mu.grad is not None and torch.allclose(mu.grad, mu.detach(), atol=1e-5),
           "dKL/dmu must equal mu, so the loss can be trained. hint: compute with torch operations on mu and "
           "logvar, without .detach(), .item() or NumPy")


@visible_check
def reparameterize(reparameterize, expect):
    n = 20_000
    mu = torch.tensor([0.0, 3.0]).repeat(n, 1)
    logvar = torch.tensor([math.log(4.0), math.log(0.25)]).repeat(n, 1)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    expect(isinstance(z, torch.Tensor) and z.shape == mu.shape and z.dtype == mu.dtype,
           f"z must have mu's shape {tuple(mu.shape)} and dtype {mu.dtype}. hint: one eps per entry of mu, "
           "eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)")
    mean, std = z.mean(0), z.std(0)
    expect(torch.allclose(mean, torch.tensor([0.0, 3.0]), atol=0.1),
           f"the samples' mean should be mu = [0, 3], got {[round(v, 3) for v in mean.tolist()]}. "
           "hint: z = mu + sigma * eps with eps ~ N(0, I), which has mean 0 (torch.randn, not torch.rand)")
    expect(torch.allclose(std, torch.tensor([2.0, 0.5]), rtol=0.05),
           f"with logvar = [log 4, log 0.25] the standard deviations are [2, 0.5], got {[round(v, 3) for v in std.tolist()]}. "
           + ("hint: exp(logvar) is the variance; the standard deviation is exp(logvar / 2)"
              if torch.allclose(std, torch.tensor([4.0, 0.25]), rtol=0.05) else
              "hint: sigma = exp(0.5 * logvar), and eps ~ N(0, 1) (torch.randn, not torch.rand)"))
    torch.manual_seed(1)
    a = reparameterize(mu[:5], logvar[:5], torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    b = reparameterize(mu[:5], logvar[:5], torch.Generator().manual_seed(7))
    expect(torch.equal(a, b),
           "the same generator seed must give the same z, whatever the global seed. "
           "hint: draw eps from `generator`: torch.randn(mu.shape, generator=generator, dtype=mu.dtype)")
    mu = torch.zeros(3, 2, requires_grad=True)
    logvar = torch.zeros(3, 2, requires_grad=True)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    expect(z.requires_grad, "z must depend on mu and logvar through autograd. hint: no .detach(), torch.no_grad() or NumPy")
    z.sum().backward()
    expect(torch.allclose(mu.grad, torch.ones(3, 2)) and torch.allclose(logvar.grad, 0.5 * z.detach(), atol=1e-6),
           "dz/dmu must be 1 and dz/dlogvar = 0.5 * sigma * eps. hint: z = mu + torch.exp(0.5 * logvar) * eps, "
           "with eps drawn without gradient")
    free = reparameterize(torch.zeros(4, 3), torch.zeros(4, 3))
    expect(isinstance(free, torch.Tensor) and free.shape == (4, 3),
           "generator=None must work too (use the global random state). hint: torch.randn(..., generator=None) does that")


@visible_check
def elbo(elbo, expect):
    x = torch.tensor([[1.0, 0.0]])
    logits = torch.zeros(1, 2)
    mu, logvar = torch.zeros(1, 3), torch.zeros(1, 3)
    value = elbo(x, logits, mu, logvar)
    expect(isinstance(value, torch.Tensor) and tuple(value.shape) == (1,),
           f"one ELBO per sample: shape (B,) = (1,), got "
           f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}. hint: sum over pixels, not over the batch")
    expect(_close(value, [-2 * LOG_2], 1e-5),
           f"with logits 0 every pixel has probability 1/2, so log p(x | z) = 2 log(1/2) = -1.3863 and the KL is 0; "
           f"got {value.tolist()}. hint: log p(x | z) = sum_j [x_j log sigmoid(l_j) + (1 - x_j) log(1 - sigmoid(l_j))], "
           "summed (not averaged) over pixels")
    value = elbo(x, logits, torch.tensor([[1.0, 0.0, 0.0]]), logvar)
    expect(_close(value, [-2 * LOG_2 - 0.5], 1e-5),
           f"mu = [1, 0, 0] costs KL = 0.5, so the ELBO is -1.3863 - 0.5 = -1.8863; got {value.tolist()}. "
           + ("hint: the KL is subtracted: ELBO = log p(x | z) - KL" if _close(value, [-2 * LOG_2 + 0.5], 1e-5)
              else "hint: ELBO = log p(x | z) - kl_standard_normal(mu, logvar)"))
    images = (torch.arange(3 * 784).reshape(3, 1, 28, 28) % 3 == 0).float()
    value = elbo(images, torch.zeros(3, 1, 28, 28), torch.zeros(3, 16), torch.zeros(3, 16))
    expect(_close(value, [-784 * LOG_2] * 3, 1e-5),
           f"images (3, 1, 28, 28) with logits 0: each has log p(x | z) = 784 log(1/2) = -543.4, so the result is (3,) "
           f"filled with -543.4; got shape {tuple(value.shape)}, first {value.flatten()[0].item():.4g}. "
           "hint: sum over every non-batch dimension of x: .flatten(1).sum(1)")
    value = elbo(x, torch.tensor([[-100.0, 100.0]]), mu, logvar)
    expect(bool(torch.isfinite(value).all()) and _close(value, [-200.0], 1e-4),
           f"logits [-100, 100] for x = [1, 0] give log p(x | z) = -100 - 100 = -200, got {value.tolist()}. "
           "hint: log(sigmoid(l)) underflows to -inf for large |l|; use "
           "-F.binary_cross_entropy_with_logits(logits, x, reduction='none'), or x * l - softplus(l)")
    value = elbo(x, torch.tensor([[100.0, -100.0]]), mu, logvar)
    expect(_close(value, [0.0], 1e-4), f"logits [100, -100] for x = [1, 0] are (almost) certain and right: log p = 0, got {value.tolist()}")
    logits = torch.zeros(1, 2, requires_grad=True)
    mu = torch.ones(1, 3, requires_grad=True)
    elbo(x, logits, mu, torch.zeros(1, 3)).sum().backward()
    expect(logits.grad is not None and torch.allclose(logits.grad, torch.tensor([[0.5, -0.5]]), atol=1e-5)
           and mu.grad is not None and torch.allclose(mu.grad, -torch.ones(1, 3), atol=1e-5),
           "the gradient must flow: d ELBO / d logits = x - sigmoid(logits), d ELBO / d mu = -mu. "
           "hint: torch operations only, no .detach() or .item()")


@visible_check
def iwae_bound(iwae_bound, expect):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g)
    exact_model = QuadraticModel(exact=True)
    exact = exact_model.log_marginal(x)
    value = iwae_bound(exact_model, x, 5, generator=torch.Generator().manual_seed(1))
    expect(isinstance(value, torch.Tensor) and tuple(value.shape) == (4,),
           f"x of shape (B, D) = (4, 3) gives one bound per data point, shape (4,); got "
           f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}. "
           "hint: logsumexp over the k samples only (dim 0 of a (k, B) tensor of log-weights)")
    for k in (1, 7):
        value = iwae_bound(exact_model, x, k, generator=torch.Generator().manual_seed(k))
        if _close(value, exact + math.log(k), 1e-4) and k > 1:
            hint = "hint: L_k is the log of the *mean* of the weights: subtract log k after logsumexp"
        elif k > 1:
            hint = ("hint: L_1 is right but L_7 is not: check that each z_i is paired with its own x, e.g. "
                    "repeat(x, 'b ... -> (k b) ...', k=k) with rearrange(z, 'k b d -> (k b) d'), and that the "
                    "logsumexp runs over the k samples")
        else:
            hint = ("hint: log w_i = log p(x | z_i) + log N(z_i; 0, I) - log N(z_i; mu, diag exp(logvar)), each summed "
                    "over the latent dimension; log N(z; m, s2) = -0.5 * sum(log(2 pi) + log s2 + (z - m)^2 / s2)")
        expect(_close(value, exact, 1e-4),
               f"when q(z | x) is the exact posterior every weight equals p(x), so L_{k} = log p(x) = "
               f"{[round(v, 4) for v in exact.tolist()]}; got "
               f"{[round(v, 4) for v in value.tolist()] if isinstance(value, torch.Tensor) else value}. {hint}")
    deep = QuadraticModel(offset=-1000.0, exact=True)
    value = iwae_bound(deep, x, 10, generator=torch.Generator().manual_seed(2))
    expect(bool(torch.isfinite(value).all()) and _close(value, deep.log_marginal(x), 1e-4),
           f"with log-weights around -1000 the bound is about -1000 (here {deep.log_marginal(x)[0].item():.2f} for the first "
           f"point); got {value.tolist()}. hint: exp(-1000) underflows to 0: use torch.logsumexp(log_w, dim=0) - math.log(k)")
    prior_model = QuadraticModel(exact=False)
    one = x[:1].repeat(4000, 1)
    value = iwae_bound(prior_model, one, 1, generator=torch.Generator().manual_seed(3))
    target = prior_model.prior_elbo(x[:1]).item()
    expect(abs(value.mean().item() - target) < 4 * value.std().item() / math.sqrt(len(value)),
           f"with q = the prior, E[L_1] is the ELBO = {target:.3f}, but 4000 values of L_1 average "
           f"{value.mean().item():.3f}. hint: draw z = mu + exp(logvar / 2) * eps with a new eps for every sample "
           "and data point")
    a = iwae_bound(prior_model, x, 20, generator=torch.Generator().manual_seed(4))
    b = iwae_bound(prior_model, x, 20, generator=torch.Generator().manual_seed(4))
    expect(torch.equal(a, b), "the same generator seed must give the same bound. hint: draw all noise from `generator`")
    larger = iwae_bound(prior_model, one[:500], 50, generator=torch.Generator().manual_seed(5)).mean()
    expect(larger > value.mean(),
           "E[L_50] must be larger than E[L_1] (the bound tightens with k). hint: L_k = logsumexp(log_w, dim=0) - log k "
           "over the k samples of each data point; the plain mean of log_w is an ELBO estimate for every k")
