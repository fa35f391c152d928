"""The VAE's pieces against independent oracles: torch.distributions, an exactly tractable
linear-Gaussian model (log p(x) and p(z | x) in closed form), and Monte Carlo."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, MultivariateNormal, Normal, kl_divergence

from fsl_course.vae import (
    ConditionalVAE,
    ConvVAE,
    LinearGaussian,
    SetVAE,
    binarize,
    cvae_loss,
    elbo,
    iwae_bound,
    kl_normal,
    kl_standard_normal,
    log_bernoulli,
    log_normal,
    prototype_latent_generate,
    prototype_latent_sample,
    reparameterize,
)

f64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def extreme_gaussians(shape=(6, 5), seed=0):
    """Means and log-variances including the extremes +-50 and +-20, float64."""
    g = gen(seed)
    mu = 3 * torch.randn(shape, generator=g, dtype=f64)
    logvar = 4 * torch.randn(shape, generator=g, dtype=f64)
    mu[0, :4] = torch.tensor([50.0, -50.0, 0.0, 1e-8], dtype=f64)
    logvar[0, :4] = torch.tensor([20.0, -20.0, 20.0, -20.0], dtype=f64)
    logvar[1, :2] = torch.tensor([1e-9, -1e-9], dtype=f64)  # expm1 territory
    return mu, logvar


# --------------------------------------------------------------------------- densities and divergences


def test_kl_standard_normal_matches_torch_distributions_at_extremes():
    mu, logvar = extreme_gaussians()
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    actual = kl_standard_normal(mu, logvar)
    assert actual.shape == (6,)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    assert torch.all(actual >= 0)
    assert kl_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4)).eq(0).all()


def test_kl_standard_normal_sums_over_every_non_batch_dimension():
    mu, logvar = (t.reshape(6, 5, 1).expand(6, 5, 2).clone() for t in extreme_gaussians())
    torch.testing.assert_close(kl_standard_normal(mu, logvar), kl_standard_normal(mu.flatten(1), logvar.flatten(1)))


def test_kl_normal_matches_torch_distributions_and_reduces_to_the_standard_case():
    mu_q, logvar_q = extreme_gaussians(seed=1)
    mu_p, logvar_p = extreme_gaussians(seed=2)
    expected = kl_divergence(Normal(mu_q, torch.exp(0.5 * logvar_q)), Normal(mu_p, torch.exp(0.5 * logvar_p))).sum(1)
    torch.testing.assert_close(kl_normal(mu_q, logvar_q, mu_p, logvar_p), expected, rtol=1e-10, atol=1e-8)
    zeros = torch.zeros_like(mu_q)
    torch.testing.assert_close(kl_normal(mu_q, logvar_q, zeros, zeros), kl_standard_normal(mu_q, logvar_q))
    assert kl_normal(mu_q, logvar_q, mu_q, logvar_q).abs().max() == 0


def test_log_bernoulli_matches_torch_distributions_even_for_large_logits():
    g = gen(3)
    logits = 10 * torch.randn(5, 1, 4, 4, generator=g, dtype=f64)
    logits[0, 0, 0, :2] = torch.tensor([80.0, -80.0], dtype=f64)
    x = torch.bernoulli(torch.full_like(logits, 0.5), generator=g)
    expected = Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(log_bernoulli(x, logits), expected, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(log_bernoulli(x, logits)).all()


def test_log_normal_matches_torch_distributions_with_tensor_and_float_variances():
    g = gen(4)
    x, mean = torch.randn(2, 7, 3, generator=g, dtype=f64)
    logvar = torch.randn(7, 3, generator=g, dtype=f64)
    expected = Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum(1)
    torch.testing.assert_close(log_normal(x, mean, logvar), expected)
    expected_shared = Normal(mean, math.exp(0.5 * -1.3)).log_prob(x).sum(1)
    torch.testing.assert_close(log_normal(x, mean, -1.3), expected_shared)
    torch.testing.assert_close(log_normal(x, mean, torch.tensor(-1.3, dtype=f64)), expected_shared)


def test_binarize_is_a_seeded_bernoulli_draw():
    x = torch.rand(2000, 1, 4, 4, generator=gen(5))
    b = binarize(x, gen(6))
    assert b.dtype == x.dtype and set(b.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(b, binarize(x, gen(6))) and not torch.equal(b, binarize(x, gen(7)))
    assert abs(b.mean().item() - x.mean().item()) < 0.01  # E[b] = x
    assert torch.equal(binarize(torch.ones(3, 2)), torch.ones(3, 2)) and binarize(torch.zeros(3, 2)).eq(0).all()


# --------------------------------------------------------------------------- reparameterisation


def test_reparameterize_is_seeded_has_the_right_moments_and_passes_gradients():
    mu = torch.tensor([[1.0, -2.0, 0.5]], dtype=f64).repeat(20_000, 1).requires_grad_()
    logvar = torch.tensor([[0.0, 1.0, -2.0]], dtype=f64).repeat(20_000, 1).requires_grad_()
    z = reparameterize(mu, logvar, gen(0))
    assert torch.equal(z, reparameterize(mu, logvar, gen(0)))
    assert not torch.equal(z, reparameterize(mu, logvar, gen(1)))
    n = z.shape[0]
    torch.testing.assert_close(z.mean(0), mu[0], atol=4 * math.exp(0.5) / math.sqrt(n), rtol=0)
    torch.testing.assert_close(z.var(0), logvar[0].exp(), rtol=0.05, atol=0)
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones_like(mu))  # dz/dmu = 1
    eps = (z - mu) / torch.exp(0.5 * logvar)
    torch.testing.assert_close(logvar.grad, (0.5 * torch.exp(0.5 * logvar) * eps).detach())  # dz/dlogvar = sigma eps / 2


# --------------------------------------------------------------------------- the tractable model


@pytest.fixture
def lg():
    return LinearGaussian.random(data_dim=6, latent_dim=3, sigma=0.7, generator=gen(10))


@pytest.fixture
def x6(lg):
    return lg.sample(16, generator=gen(11))


def test_linear_gaussian_marginal_matches_multivariate_normal(lg, x6):
    with torch.no_grad():
        C = lg.W @ lg.W.T + lg.sigma2 * torch.eye(6, dtype=f64)
        expected = MultivariateNormal(lg.b, covariance_matrix=C).log_prob(x6)
        torch.testing.assert_close(lg.log_marginal(x6), expected, rtol=1e-12, atol=1e-12)


def test_linear_gaussian_posterior_is_bayes_rule(lg, x6):
    """log p(z | x) = log p(x | z) + log p(z) - log p(x) at arbitrary z."""
    with torch.no_grad():
        mean, cov = lg.posterior(x6)
        assert mean.shape == (16, 3) and cov.shape == (3, 3)
        z = torch.randn(16, 3, generator=gen(12), dtype=f64)
        bayes = lg.log_likelihood(x6, z) + log_normal(z, torch.zeros_like(z), 0.0) - lg.log_marginal(x6)
        torch.testing.assert_close(MultivariateNormal(mean, covariance_matrix=cov).log_prob(z), bayes, rtol=1e-10, atol=1e-10)
        assert (cov - torch.diag(torch.diagonal(cov))).abs().max() > 1e-3  # a generic W: the posterior is correlated


@pytest.mark.parametrize("encoder", ["marginal", "mean-field", "random"])
def test_log_marginal_is_elbo_plus_kl_to_the_posterior_exactly(lg, x6, encoder):
    with torch.no_grad():
        if encoder == "random":
            q_mu, q_logvar = torch.randn(2, 16, 3, generator=gen(13), dtype=f64)
        else:
            lg.encoder = encoder
            q_mu, q_logvar = lg.encode(x6)
        elbo_value = lg.elbo_closed_form(x6, q_mu, q_logvar)
        kl = lg.kl_to_posterior(x6, q_mu, q_logvar)
        torch.testing.assert_close(elbo_value + kl, lg.log_marginal(x6), rtol=1e-10, atol=1e-8)
        assert torch.all(kl > 0) and torch.all(elbo_value < lg.log_marginal(x6))


def test_mean_field_encoder_is_the_kl_best_diagonal_gaussian(lg, x6):
    with torch.no_grad():
        lg.encoder = "mean-field"
        q_mu, q_logvar = lg.encode(x6)
        best = lg.kl_to_posterior(x6, q_mu, q_logvar)
        for delta in (0.1, -0.1):
            assert torch.all(lg.kl_to_posterior(x6, q_mu, q_logvar + delta) > best)
            assert torch.all(lg.kl_to_posterior(x6, q_mu + delta, q_logvar) > best)


def test_monte_carlo_elbo_agrees_with_the_closed_form(lg, x6):
    with torch.no_grad():
        q_mu, q_logvar = lg.encode(x6)
        n = 4000
        x_rep, mu_rep, logvar_rep = (t.repeat(n, 1) for t in (x6, q_mu, q_logvar))
        z = reparameterize(mu_rep, logvar_rep, gen(14))
        samples = elbo(x_rep, z @ lg.W.T + lg.b, mu_rep, logvar_rep, likelihood="gaussian", recon_logvar=2 * lg.log_sigma)
        samples = samples.reshape(n, 16)
        standard_error = samples.std(0) / math.sqrt(n)
        assert torch.all((samples.mean(0) - lg.elbo_closed_form(x6, q_mu, q_logvar)).abs() < 4 * standard_error)


def test_elbo_is_tight_when_q_is_the_exact_posterior():
    """W with orthogonal columns: p(z | x) is diagonal, the encoder is exact, ELBO = log p(x)."""
    model = LinearGaussian.random(data_dim=5, latent_dim=2, sigma=0.5, orthogonal=True, generator=gen(15))
    with torch.no_grad():
        x = model.sample(10, generator=gen(16))
        mean, cov = model.posterior(x)
        torch.testing.assert_close(cov, torch.diag(torch.diagonal(cov)))
        q_mu, q_logvar = model.encode(x)
        torch.testing.assert_close(model.elbo_closed_form(x, q_mu, q_logvar), model.log_marginal(x), rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(model.kl_to_posterior(x, q_mu, q_logvar), torch.zeros(10, dtype=f64), rtol=0, atol=1e-10)
        # and then every importance weight equals p(x): the IWAE bound is exact for any k
        torch.testing.assert_close(iwae_bound(model, x, 3, generator=gen(17)), model.log_marginal(x))


# --------------------------------------------------------------------------- the IWAE bound


@pytest.fixture
def loose():
    """A linear-Gaussian model with a deliberately poor encoder, so the bounds have a gap."""
    model = LinearGaussian.random(data_dim=4, latent_dim=2, sigma=0.3, generator=gen(20))

    def encoder(x):
        mean, cov = model.posterior(x)
        return mean + 0.3, torch.log(4 * torch.diagonal(cov)).expand_as(mean)

    model.encoder = encoder
    return model, model.sample(64, generator=gen(21)).detach()


def test_iwae_with_one_sample_is_an_unbiased_elbo_estimate(loose):
    model, x = loose
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar, gen(0))
    single = model.log_likelihood(x, z) + log_normal(z, torch.zeros_like(z), 0.0) - log_normal(z, mu, logvar)
    torch.testing.assert_close(iwae_bound(model, x, 1, generator=gen(0)), single.detach())
    repeats = torch.stack([iwae_bound(model, x, 1, generator=gen(s)) for s in range(200)])
    se = repeats.std(0) / math.sqrt(200)
    assert torch.all((repeats.mean(0) - model.elbo_closed_form(x, mu, logvar).detach()).abs() < 4.5 * se)


def test_iwae_increases_with_k_and_converges_to_log_p_x(loose):
    model, x = loose
    log_px = model.log_marginal(x).detach()
    gaps = {}
    for k in (1, 10, 100, 1000):
        bounds = torch.stack([iwae_bound(model, x, k, generator=gen(seed)) for seed in range(4)])
        gaps[k] = (log_px - bounds).mean().item()
    assert gaps[1] > gaps[10] > gaps[100] > gaps[1000] > 0, gaps
    assert gaps[1] > 1.0 and gaps[1000] < 0.01 * gaps[1], gaps


def test_iwae_does_not_depend_on_the_chunk_size(loose):
    model, x = loose
    whole = iwae_bound(model, x, 50, chunk_size=50, generator=gen(3))
    for chunk_size in (1, 7, 64):
        torch.testing.assert_close(iwae_bound(model, x, 50, chunk_size=chunk_size, generator=gen(3)), whole, rtol=0, atol=1e-12)


def test_iwae_5000_samples_on_a_conv_vae_stays_chunked():
    torch.manual_seed(0)
    model = ConvVAE(latent_dim=4, hidden=4).eval()
    x = binarize(torch.rand(8, 1, 28, 28, generator=gen(1)), gen(2))
    biggest = []
    log_likelihood = model.log_likelihood

    def spy(x, z):
        biggest.append(len(z))
        return log_likelihood(x, z)

    model.log_likelihood = spy
    bound = iwae_bound(model, x, 5000, generator=gen(3))
    assert bound.shape == (8,) and torch.isfinite(bound).all()
    assert max(biggest) <= 2048 and sum(biggest) == 5000 * 8  # never all 40000 decoder passes at once


# --------------------------------------------------------------------------- few-shot sampling


def test_prototype_latent_sample_has_the_moment_matched_mean_and_variance():
    g = gen(30)
    mu, logvar = torch.randn(2, 5, 3, generator=g, dtype=f64)
    z = prototype_latent_sample(mu, logvar, 40_000, gen(31))
    assert z.shape == (40_000, 3)
    mean = mu.mean(0)
    variance = logvar.exp().mean(0) + ((mu - mean) ** 2).mean(0)
    torch.testing.assert_close(z.mean(0), mean, atol=4 * (variance / 40_000).sqrt().max().item(), rtol=0)
    torch.testing.assert_close(z.var(0), variance, rtol=0.04, atol=0)
    one = prototype_latent_sample(mu[:1], logvar[:1], 40_000, gen(32))  # K = 1: the shot's own posterior
    torch.testing.assert_close(one.var(0), logvar[0].exp(), rtol=0.04, atol=0)
    assert torch.equal(z, prototype_latent_sample(mu, logvar, 40_000, gen(31)))


# --------------------------------------------------------------------------- models


def test_cvae_loss_uses_the_conditional_prior():
    """-ELBO = -log p(x | z, y) + KL(q(z | x, y) || p(z | y)), the KL checked against torch.distributions;
    the prior table starts at N(0, I) and sample() draws z from p(z | y)."""
    torch.manual_seed(0)
    cvae = ConditionalVAE(n_classes=3, latent_dim=4, hidden=4).double()
    x = binarize(torch.rand(5, 1, 28, 28, generator=gen(1), dtype=torch.float64), gen(2))
    y = torch.tensor([0, 2, 1, 2, 0])
    m, s = cvae.prior(y)
    assert m.shape == s.shape == (5, 4) and not m.any() and not s.any()  # N(0, I) at initialisation
    with torch.no_grad():
        cvae.prior_embedding.weight.normal_(generator=gen(3))
    mu, logvar = cvae.encode(x, y)
    m, s = cvae.prior(y)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen(4), dtype=mu.dtype)
    q, p = Normal(mu, torch.exp(0.5 * logvar)), Normal(m, torch.exp(0.5 * s))
    expected = -(Bernoulli(logits=cvae.decode(z, y)).log_prob(x).sum((1, 2, 3)) - kl_divergence(q, p).sum(1)).mean()
    torch.testing.assert_close(cvae_loss(cvae, x, y, gen(4)), expected, rtol=1e-12, atol=1e-9)
    cvae_loss(cvae, x, y, gen(4)).backward()
    assert cvae.prior_embedding.weight.grad[[0, 1, 2]].abs().sum(1).gt(0).all()  # every class in the batch learns its prior

    seen = {}
    decode = cvae.decode

    def recording_decode(z, y):
        seen["z"] = z
        return decode(z, y)

    cvae.decode = recording_decode
    with torch.no_grad():
        cvae.prior_embedding.weight.zero_()
        cvae.prior_embedding.weight[1, :4] = 100.0  # m_1 = 100, s_1 = 0
    cvae.sample(torch.tensor([1, 0, 1]), generator=gen(5))
    assert (seen["z"][[0, 2]] - 100).abs().max() < 6 and seen["z"][1].abs().max() < 6


def test_models_have_the_documented_shapes_and_losses():
    torch.manual_seed(0)
    x = binarize(torch.rand(6, 1, 28, 28, generator=gen(1)), gen(2))
    vae = ConvVAE(latent_dim=5, hidden=4)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (6, 5) and vae.decode(mu).shape == (6, 1, 28, 28)
    loss = vae.loss(x, gen(3))
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())
    for images in (vae.sample(7, generator=gen(4)), vae.reconstruct(x), prototype_latent_generate(vae, x[:3], 7, gen(5))):
        assert images.shape[1:] == (1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(vae.sample(7, generator=gen(4)), vae.sample(7, generator=gen(4)))

    cvae = ConditionalVAE(n_classes=3, latent_dim=5, hidden=4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    assert cvae.encode(x, y)[0].shape == (6, 5) and cvae_loss(cvae, x, y, gen(6)).item() > 0
    assert cvae.sample(torch.tensor([2, 0]), generator=gen(7)).shape == (2, 1, 28, 28)

    set_vae = SetVAE(latent_dim=5, context_dim=3, hidden=4)
    sets = x.reshape(2, 3, 1, 28, 28)
    terms = set_vae.loss_terms(sets, gen(8))
    assert set(terms) == {"recon", "kl_z", "kl_c"} and all(t.item() >= 0 for t in terms.values())
    torch.testing.assert_close(set_vae.loss(sets, gen(8)), sum(terms.values()))
    for k in (1, 5):
        assert set_vae.generate(x[:k], 4, generator=gen(9)).shape == (4, 1, 28, 28)
    assert set_vae.sample(3, generator=gen(10)).shape == (3, 1, 28, 28)


def test_the_set_vae_generates_from_the_context_mean():
    """generate() uses c = mean of q(c | support): the same support and seed give the same images,
    and the images depend on the support."""
    torch.manual_seed(0)
    model = SetVAE(latent_dim=4, context_dim=3, hidden=4).eval()
    support = torch.rand(5, 1, 28, 28, generator=gen(1))
    a = model.generate(support, 3, generator=gen(2))
    assert torch.equal(a, model.generate(support, 3, generator=gen(2)))
    assert not torch.allclose(a, model.generate(1 - support, 3, generator=gen(2)))


# --------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: kl_standard_normal(torch.zeros(3, 2), torch.zeros(3, 4)), ValueError, r"shapes must match: mu \(3, 2\), logvar \(3, 4\)"),
        (lambda: kl_standard_normal(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2)), ValueError, "mu must be a floating-point"),
        (lambda: kl_standard_normal([0.0], torch.zeros(1)), TypeError, "mu must be a torch.Tensor"),
        (lambda: kl_normal(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(2, 2)), ValueError, "shapes must match"),
        (lambda: reparameterize(torch.zeros(2, 2), torch.zeros(2)), ValueError, "shapes must match"),
        (lambda: log_bernoulli(torch.zeros(2, 4), torch.zeros(2, 5)), ValueError, "shapes must match"),
        (lambda: log_normal(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3)), ValueError, "does not broadcast"),
        (lambda: binarize(torch.full((2, 2), 2.0)), ValueError, r"intensities in \[0, 1\]"),
        (lambda: binarize(torch.ones(2, 2, dtype=torch.uint8)), ValueError, "floating-point"),
        (lambda: elbo(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(2, 1), likelihood="gaussian"), ValueError, "needs recon_logvar"),
        (lambda: elbo(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(2, 1), likelihood="poisson"), ValueError, "unknown likelihood"),
        (lambda: elbo(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 1), torch.zeros(3, 1)), ValueError, "batch size 2 but mu/logvar have 3"),
        (lambda: ConvVAE(hidden=4).encode(torch.zeros(2, 1, 32, 32)), ValueError, r"shape \(B, 1, 28, 28\).*\(2, 1, 32, 32\)"),
        (lambda: ConvVAE(hidden=4).encode(torch.zeros(2, 28, 28)), ValueError, r"shape \(B, 1, 28, 28\)"),
        (lambda: ConvVAE(hidden=4).encode(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)), ValueError, "floating-point"),
        (lambda: ConvVAE(latent_dim=3, hidden=4).decode(torch.zeros(2, 4)), ValueError, r"z must have shape \(B, latent_dim\) = \(B, 3\)"),
        (lambda: ConvVAE(hidden=4).sample(0), ValueError, "n must be a positive int"),
        (lambda: ConditionalVAE(3, hidden=4).sample(torch.tensor([0, 3])), ValueError, r"labels in 0..2"),
        (lambda: ConditionalVAE(3, hidden=4).sample(torch.tensor([0.0])), ValueError, "int64"),
        (lambda: SetVAE(hidden=4).loss(torch.zeros(2, 1, 28, 28)), ValueError, r"sets must have shape \(B, K, 1, 28, 28\)"),
        (lambda: prototype_latent_sample(torch.zeros(0, 3), torch.zeros(0, 3), 2), ValueError, "K >= 1"),
        (lambda: iwae_bound(LinearGaussian.random(3, 2), torch.zeros(2, 3), 0), ValueError, "k must be a positive int"),
        (lambda: LinearGaussian.random(3, 2).log_marginal(torch.zeros(2, 4)), ValueError, r"x must have shape \(B, data_dim\) = \(B, 3\)"),
        (lambda: LinearGaussian.random(3, 2, encoder="exact"), ValueError, "encoder must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
