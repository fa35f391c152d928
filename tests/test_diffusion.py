"""Diffusion (DDPM / DDIM) against independent oracles: the schedules re-derived in numpy float64,
q(x_t | x_0) against a simulated forward chain, the posterior against Bayes' rule (a Gaussian
product and a 1-D grid), DDIM eta = 1 against the ancestral beta-tilde step, both samplers against
the exact noise predictor of Gaussian data; then the U-Net, classifier-free guidance, LoRA, the
registered models, training and the error messages."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fsl_course.diffusion import (  # importing fsl_course.diffusion registers "ddpm" and "cond-ddpm"
    ConditionalDDPM,
    DDPM,
    LoRAConv2d,
    LoRALinear,
    NoiseSchedule,
    UNet,
    ancestral_sample,
    ancestral_step,
    attach_lora,
    count_parameters,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    guided_eps,
    lora_parameters,
    merge_lora,
    noise_prediction_loss,
    sinusoidal_embedding,
    train_diffusion,
)
from fsl_course.generative import GENERATORS, load_model, model_kind, save_model

f64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def steps_tensor(k, n):
    return torch.full((n,), k, dtype=torch.long)


# --------------------------------------------------------------------------- independent schedules (numpy float64)


def np_linear_betas(T):
    return np.linspace(1e-4, 0.02, T, dtype=np.float64)


def np_cosine_betas(T, s=0.008):
    """Nichol & Dhariwal 2021, eq. 17, one step at a time as in their code."""

    def abar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])


def np_derived(betas):
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return alphas, abar, abar_prev, post_var


def np_schedule(T, kind):
    betas = np_linear_betas(T) if kind == "linear" else np_cosine_betas(T)
    return (betas, *np_derived(betas))


def as_np(t):
    return t.detach().double().cpu().numpy()


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 50, 2])
def test_schedule_matches_independent_formulas(kind, T):
    s = NoiseSchedule(T, kind)
    betas, alphas, abar, abar_prev, post_var = np_schedule(T, kind)
    for name, expected in [("betas", betas), ("alphas", alphas), ("alphas_cumprod", abar),
                           ("alphas_cumprod_prev", abar_prev), ("posterior_variance", post_var)]:
        value = getattr(s, name)
        assert value.dtype == torch.float32 and value.shape == (T,), name
        np.testing.assert_allclose(as_np(value), expected, rtol=2e-6, atol=1e-9, err_msg=name)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert s.posterior_variance[0].item() == 0.0  # k = 0: x_0 given x_1 and x_0 is x_0
    np.testing.assert_allclose(as_np(s.posterior_log_variance_clipped[1:]), np.log(post_var[1:]), rtol=1e-6)
    np.testing.assert_allclose(s.posterior_log_variance_clipped[0].item(), np.log(post_var[1]), rtol=1e-6)
    assert len(s) == T and s.num_steps == T


def test_linear_schedule_endpoints_for_any_T():
    for T in (1, 10, 4000):
        s = NoiseSchedule(T, "linear")
        assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
        if T > 1:
            assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    one = NoiseSchedule(1, "linear")  # T = 1: the clipped log-variance falls back to beta_0
    assert one.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(1e-4), rel=1e-6)


def test_cosine_schedule_caps_beta_and_keeps_abar_consistent():
    T = 1000
    s = NoiseSchedule(T, "cosine")
    betas = as_np(s.betas)
    # f(T) = cos(pi / 2)^2 = 0, so the last step would be beta = 1 without the cap
    assert betas.max() == pytest.approx(0.999, rel=1e-7)
    assert betas[-1] == pytest.approx(0.999, rel=1e-7)
    assert (betas <= 0.999 + 1e-7).all() and (betas > 0).all()
    # alphas_cumprod is the product of the (clipped) alphas (float32 betas: 1 - 0.999 loses digits) ...
    np.testing.assert_allclose(as_np(s.alphas_cumprod), np.cumprod(1 - np.float64(betas)), rtol=1e-4)
    # ... which is f(t) / f(0) wherever the cap did not bite
    t = np.arange(1, T + 1)
    f = np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
    f0 = np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    unclipped = np.nonzero(np.cumsum(np_cosine_betas(T) >= 0.999) == 0)[0]
    assert len(unclipped) >= T - 2
    np.testing.assert_allclose(as_np(s.alphas_cumprod)[unclipped], (f / f0)[unclipped], rtol=1e-4)
    assert s.alphas_cumprod[-1].item() > 0  # the clipped version stays invertible


@pytest.mark.parametrize("kind, name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_schedule_matches_diffusers(kind, name):
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
    s = NoiseSchedule(1000, kind)
    betas = np.asarray(reference.betas, dtype=np.float64)  # a tensor (or, in old versions, a numpy array)
    np.testing.assert_allclose(as_np(s.betas), betas, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(as_np(s.alphas_cumprod), np.asarray(reference.alphas_cumprod, dtype=np.float64), rtol=1e-4, atol=1e-8)


def test_schedule_buffers_move_but_are_not_saved():
    s = NoiseSchedule(10, "cosine")
    assert s.state_dict() == {}  # rebuilt from (num_steps, kind)
    names = {n for n, _ in s.named_buffers()}
    assert {"betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"} <= names
    assert s.to("cpu").betas.device.type == "cpu"


# --------------------------------------------------------------------------- forward process


def test_q_sample_matches_formula():
    T = 1000
    s = NoiseSchedule(T, "linear")
    _, _, abar, _, _ = np_schedule(T, "linear")
    x0 = torch.rand(6, 1, 28, 28, generator=gen(1), dtype=f64) * 2 - 1
    noise = torch.randn(6, 1, 28, 28, generator=gen(2), dtype=f64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    xt = s.q_sample(x0, t, noise)
    a = torch.tensor(np.sqrt(abar[t.numpy()])).reshape(-1, 1, 1, 1)
    b = torch.tensor(np.sqrt(1 - abar[t.numpy()])).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a * x0 + b * noise, rtol=1e-12, atol=1e-12)
    assert xt.shape == x0.shape and xt.dtype == f64


@pytest.mark.parametrize("kind, T", [("linear", 1000), ("cosine", 200)])
def test_closed_form_marginal_matches_simulated_chain(kind, T):
    """x_k = sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) eps, run from x_0, against q(x_k | x_0)."""
    n = 100_000
    s = NoiseSchedule(T, kind)
    betas = torch.tensor(np_schedule(T, kind)[0])
    g = gen(3)
    x0 = torch.where(torch.arange(n) % 2 == 0, 0.8, -0.5).to(f64)
    x = x0.clone()
    checkpoints = {0, 9, T // 10, T // 2, T - 1}
    for k in range(T):
        x = torch.sqrt(1 - betas[k]) * x + torch.sqrt(betas[k]) * torch.randn(n, generator=g, dtype=f64)
        if k in checkpoints:
            t = steps_tensor(k, n)
            mean = s.q_sample(x0, t, torch.zeros_like(x0))  # E[x_k | x_0]
            std = s.q_sample(torch.zeros_like(x0), t, torch.ones_like(x0))  # sqrt(Var[x_k | x_0])
            for sign in (0, 1):
                part = slice(sign, None, 2)
                m, sd = mean[part][0].item(), std[part][0].item()
                emp = x[part]
                se = sd / math.sqrt(len(emp))
                assert abs(emp.mean().item() - m) < 5 * se, (k, emp.mean().item(), m)
                assert emp.var().item() / sd**2 == pytest.approx(1, abs=5 * math.sqrt(2 / len(emp))), k


# --------------------------------------------------------------------------- the posterior


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_matches_gaussian_product(kind):
    """q(x_{k-1} | x_k, x_0) prop. to N(x_{k-1}; sqrt(abar_{k-1}) x0, 1 - abar_{k-1}) N(x_k; sqrt(alpha_k) x_{k-1}, beta_k)."""
    T = 1000
    s = NoiseSchedule(T, kind)
    betas, alphas, abar, abar_prev, _ = np_schedule(T, kind)
    ks = np.array([1, 2, 10, 100, 500, 900, 998, 999])
    x0 = torch.rand(len(ks), 3, generator=gen(4), dtype=f64) * 2 - 1
    xt = torch.randn(len(ks), 3, generator=gen(5), dtype=f64)
    prec = 1 / (1 - abar_prev[ks]) + alphas[ks] / betas[ks]
    mean = (np.sqrt(abar_prev[ks])[:, None] / (1 - abar_prev[ks])[:, None] * x0.numpy()
            + np.sqrt(alphas[ks])[:, None] / betas[ks][:, None] * xt.numpy()) / prec[:, None]
    got_mean, got_var, got_logvar = s.posterior_mean_variance(x0, xt, torch.from_numpy(ks))
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got_var.numpy(), np.broadcast_to((1 / prec)[:, None], (len(ks), 3)), rtol=1e-9)
    np.testing.assert_allclose(got_logvar.numpy(), np.log(np.broadcast_to((1 / prec)[:, None], (len(ks), 3))), rtol=1e-9)
    # float32 inputs use the float32 buffers
    m32, v32, _ = s.posterior_mean_variance(x0.float(), xt.float(), torch.from_numpy(ks))
    np.testing.assert_allclose(m32.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v32.double().numpy(), np.broadcast_to((1 / prec)[:, None], (len(ks), 3)), rtol=1e-5)
    assert got_var.shape == x0.shape


def test_posterior_matches_bayes_rule_on_a_grid():
    T, k = 1000, 300
    s = NoiseSchedule(T, "linear")
    betas, alphas, abar, abar_prev, _ = np_schedule(T, "linear")
    x0, xt = 0.6, -0.3
    grid = np.linspace(-4, 4, 400_001)
    log_prior = -0.5 * (grid - math.sqrt(abar_prev[k]) * x0) ** 2 / (1 - abar_prev[k])
    log_lik = -0.5 * (xt - math.sqrt(alphas[k]) * grid) ** 2 / betas[k]
    w = np.exp(log_prior + log_lik - (log_prior + log_lik).max())
    w /= w.sum()
    mean = (w * grid).sum()
    var = (w * (grid - mean) ** 2).sum()
    got_mean, got_var, _ = s.posterior_mean_variance(torch.tensor([x0], dtype=f64), torch.tensor([xt], dtype=f64), torch.tensor([k]))
    assert got_mean.item() == pytest.approx(mean, rel=1e-6, abs=1e-8)
    assert got_var.item() == pytest.approx(var, rel=1e-5)


def test_posterior_at_k0_is_x0():
    s = NoiseSchedule(100, "cosine")
    x0 = torch.rand(4, 5, generator=gen(6), dtype=f64)
    xt = torch.randn(4, 5, generator=gen(7), dtype=f64)
    mean, var, logvar = s.posterior_mean_variance(x0, xt, steps_tensor(0, 4))
    torch.testing.assert_close(mean, x0, rtol=1e-6, atol=1e-6)
    assert (var == 0).all() and torch.isfinite(logvar).all()


def test_predict_x0_and_eps_invert_q_sample():
    s = NoiseSchedule(1000, "linear")
    x0 = torch.rand(8, 1, 28, 28, generator=gen(8), dtype=f64) * 2 - 1
    noise = torch.randn(8, 1, 28, 28, generator=gen(9), dtype=f64)
    t = torch.tensor([0, 1, 5, 50, 400, 800, 998, 999])
    xt = s.q_sample(x0, t, noise)
    torch.testing.assert_close(s.predict_x0(xt, t, noise), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(s.predict_eps(xt, t, x0), noise, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- sampler steps


def test_ancestral_step_variances_and_mean():
    T = 1000
    s = NoiseSchedule(T, "linear")
    betas, alphas, abar, _, post_var = np_schedule(T, "linear")
    n = 6
    t = torch.tensor([1, 2, 50, 300, 700, 999])
    xt = torch.randn(n, 4, generator=gen(10), dtype=f64)
    eps = torch.randn(n, 4, generator=gen(11), dtype=f64)
    zero, one = torch.zeros_like(xt), torch.ones_like(xt)
    k = t.numpy()[:, None]
    # without clipping: Ho et al.'s Algorithm 2 mean (x_t - beta/sqrt(1 - abar) eps) / sqrt(alpha)
    expected_mean = (xt.numpy() - betas[k] / np.sqrt(1 - abar[k]) * eps.numpy()) / np.sqrt(alphas[k])
    for variance, var in [("beta", betas), ("beta_tilde", post_var)]:
        mean = ancestral_step(eps, xt, t, s, zero, variance=variance, clip_x0=False)
        np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-10, atol=1e-10)
        sigma = ancestral_step(eps, xt, t, s, one, variance=variance, clip_x0=False) - mean
        np.testing.assert_allclose(sigma.numpy() ** 2, np.broadcast_to(var[k], (n, 4)), rtol=1e-8)


def test_ancestral_step_adds_no_noise_at_k0():
    s = NoiseSchedule(50, "cosine")
    xt = torch.randn(3, 4, generator=gen(12))
    eps = torch.randn(3, 4, generator=gen(13))
    t = torch.tensor([0, 5, 0])
    a = ancestral_step(eps, xt, t, s, torch.randn(3, 4, generator=gen(14)))
    b = ancestral_step(eps, xt, t, s, torch.randn(3, 4, generator=gen(15)))
    assert torch.equal(a[[0, 2]], b[[0, 2]]) and not torch.allclose(a[1], b[1])
    # at k = 0 the step returns x0_hat (clipped to [-1, 1])
    x0_hat = s.predict_x0(xt, t, eps).clamp(-1, 1)
    torch.testing.assert_close(a[[0, 2]], x0_hat[[0, 2]], rtol=1e-5, atol=1e-6)
    assert torch.equal(ancestral_step(eps, xt, torch.zeros(3, dtype=torch.long), s, None),
                       ancestral_step(eps, xt, torch.zeros(3, dtype=torch.long), s, torch.randn(3, 4)))


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_eta1_step_has_the_ancestral_beta_tilde_distribution(kind, clip_x0, dtype):
    """Both steps are Gaussian given x_t: equal means (noise 0) and equal variances (noise 1 - noise 0)."""
    T = 1000
    s = NoiseSchedule(T, kind)
    post_var = np_schedule(T, kind)[4]
    t = torch.tensor([1, 3, 20, 250, 600, 999])
    n = len(t)
    xt = torch.randn(n, 1, 28, 28, generator=gen(16), dtype=dtype) * 1.5
    eps = torch.randn(n, 1, 28, 28, generator=gen(17), dtype=dtype)
    zero, one = torch.zeros_like(xt), torch.ones_like(xt)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    ddim_mean = ddim_step(xt, eps, t, t - 1, s, 1.0, zero, clip_x0=clip_x0)
    anc_mean = ancestral_step(eps, xt, t, s, zero, variance="beta_tilde", clip_x0=clip_x0)
    torch.testing.assert_close(ddim_mean, anc_mean, **tol)
    ddim_sigma = ddim_step(xt, eps, t, t - 1, s, 1.0, one, clip_x0=clip_x0) - ddim_mean
    anc_sigma = ancestral_step(eps, xt, t, s, one, variance="beta_tilde", clip_x0=clip_x0) - anc_mean
    expected = np.broadcast_to(post_var[t.numpy()][:, None, None, None], xt.shape)
    rtol = 1e-3 if dtype == torch.float32 else 1e-8  # float32: sigma^2 ~ 1e-4 from a difference of O(1) numbers
    np.testing.assert_allclose(ddim_sigma.double().numpy() ** 2, expected, rtol=rtol)
    np.testing.assert_allclose(anc_sigma.double().numpy() ** 2, expected, rtol=rtol)


def test_ddim_step_matches_equation_12_with_skips():
    T = 1000
    s = NoiseSchedule(T, "linear")
    abar = np_schedule(T, "linear")[2]
    t, t_prev = torch.tensor([999, 600, 80, 5]), torch.tensor([799, 300, -1, 2])
    xt = torch.randn(4, 3, generator=gen(18), dtype=f64)
    eps = torch.randn(4, 3, generator=gen(19), dtype=f64)
    z = torch.randn(4, 3, generator=gen(20), dtype=f64)
    for eta in (0.0, 0.5, 1.0):
        a_t = abar[t.numpy()][:, None]
        a_p = np.where(t_prev.numpy() >= 0, abar[t_prev.numpy().clip(0)], 1.0)[:, None]
        x0 = (xt.numpy() - np.sqrt(1 - a_t) * eps.numpy()) / np.sqrt(a_t)
        sigma = eta * np.sqrt((1 - a_p) / (1 - a_t)) * np.sqrt(1 - a_t / a_p)
        expected = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sigma**2) * eps.numpy() + sigma * z.numpy()
        got = ddim_step(xt, eps, t, t_prev, s, eta, z, clip_x0=False)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)
        got32 = ddim_step(xt.float(), eps.float(), t, t_prev, s, eta, z.float(), clip_x0=False)
        np.testing.assert_allclose(got32.double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_ddim_eta0_is_deterministic():
    s = NoiseSchedule(100, "cosine")
    xt = torch.randn(5, 1, 28, 28, generator=gen(21))
    eps = torch.randn(5, 1, 28, 28, generator=gen(22))
    t, t_prev = steps_tensor(60, 5), steps_tensor(30, 5)
    a = ddim_step(xt, eps, t, t_prev, s, 0.0, None)
    b = ddim_step(xt, eps, t, t_prev, s, 0.0, torch.randn(5, 1, 28, 28, generator=gen(23)))
    assert torch.equal(a, b)


def test_ddim_timesteps_are_evenly_spaced_descending_and_unique():
    T = 1000
    assert ddim_timesteps(T, T).tolist() == list(range(T - 1, -1, -1))
    assert ddim_timesteps(T, 1).tolist() == [T - 1]
    for steps in (2, 7, 50, 333, 999):
        ts = ddim_timesteps(T, steps)
        expected = np.round(np.linspace(T - 1, 0, steps)).astype(int)
        assert ts.tolist() == expected.tolist() and len(set(ts.tolist())) == steps
        assert ts[0] == T - 1 and ts[-1] == 0 and (ts[:-1] > ts[1:]).all()
        gaps = -np.diff(ts.numpy())
        assert gaps.max() - gaps.min() <= 1  # evenly spaced up to rounding
    with pytest.raises(ValueError, match="at most"):
        ddim_timesteps(10, 11)


# --------------------------------------------------------------------------- samplers end to end


def gaussian_eps(T, kind, mean, std):
    """The exact noise predictor E[eps | x_t] when every coordinate of x_0 is N(mean, std^2):
    x_t = a x_0 + b eps is jointly Gaussian with eps, so E[eps | x_t] = b (x_t - a mean) / (a^2 std^2 + b^2)."""
    abar = torch.tensor(np_schedule(T, kind)[2])
    a_all, b_all = abar.sqrt(), (1 - abar).sqrt()

    def eps(x, t):
        a, b = a_all[t].to(x.dtype), b_all[t].to(x.dtype)
        return b * (x - a * mean) / (a * a * std * std + b * b)

    return eps


@pytest.mark.parametrize("sampler", ["ancestral-beta", "ancestral-beta_tilde", "ddim-eta0"])
def test_samplers_with_the_exact_noise_predictor_recover_gaussian_data(sampler):
    T, n, mean, std = 1000, 20_000, 0.3, 0.4
    s = NoiseSchedule(T, "linear")
    eps = gaussian_eps(T, "linear", mean, std)
    if sampler.startswith("ancestral"):
        x = ancestral_sample(eps, (n,), s, gen(24), variance=sampler.split("-")[1], clip_x0=False)
    else:
        x = ddim_sample(eps, (n,), s, 500, eta=0.0, generator=gen(24), clip_x0=False)
    assert abs(x.mean().item() - mean) < 5 * std / math.sqrt(n)
    assert x.std().item() == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize("clip_x0", [False, True])
def test_ddim_eta1_all_steps_equals_ancestral_beta_tilde(clip_x0):
    """Same seed, same draws (x_T, then one z per step with k > 0): the same samples."""
    T = 40
    s = NoiseSchedule(T, "cosine")

    def eps(x, t):  # some nonlinear noise predictor
        return torch.tanh(1.5 * x) * (0.5 + t.to(x.dtype).reshape(-1, 1, 1, 1) / T)

    shape = (4, 1, 28, 28)
    a = ancestral_sample(eps, shape, s, gen(25), variance="beta_tilde", clip_x0=clip_x0)
    b = ddim_sample(eps, shape, s, T, eta=1.0, generator=gen(25), clip_x0=clip_x0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    c = ancestral_sample(eps, shape, s, gen(25), variance="beta", clip_x0=clip_x0)
    assert not torch.allclose(a, c, atol=1e-3)


def tiny_unet(**kwargs):
    """A small UNet whose zero-initialised convolutions are re-drawn, as after training, so that
    its prediction is not 0 and depends on t and the condition."""
    torch.manual_seed(0)
    net = UNet((8, 16), **kwargs)
    for name, module in net.named_modules():
        if name.endswith("conv2"):
            module.reset_parameters()
    nn.init.normal_(net.conv_out.weight, std=0.05)
    return net


def test_samplers_are_deterministic_given_a_generator_and_return_trajectories():
    T = 10
    s = NoiseSchedule(T, "cosine")
    net = tiny_unet()
    shape = (3, 1, 28, 28)
    a, path = ancestral_sample(net, shape, s, gen(26), trajectory=True)
    b = ancestral_sample(net, shape, s, gen(26))
    c = ancestral_sample(net, shape, s, gen(27))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(path) == T and all(x.shape == shape and x0.shape == shape for x, x0 in path)
    assert a.min() >= -1 and a.max() <= 1  # the last step returns the clipped x0_hat
    torch.testing.assert_close(path[-1][1], a)
    d, ddim_path = ddim_sample(net, shape, s, 4, eta=0.5, generator=gen(26), trajectory=True)
    e = ddim_sample(net, shape, s, 4, eta=0.5, generator=gen(26))
    assert torch.equal(d, e) and len(ddim_path) == 4
    f, f_path = ddim_sample(net, shape, s, 4, eta=0.0, generator=gen(26), trajectory=True)
    # x_T is the generator's first draw in both samplers
    assert torch.equal(path[0][0], f_path[0][0]) and torch.equal(path[0][0], ddim_path[0][0])
    assert net.training  # sampled in eval mode, then the mode is restored


# --------------------------------------------------------------------------- the network


def test_unet_shapes_conditioning_and_parameter_count():
    net = UNet()
    n_params = count_parameters(net)
    print(f"default UNet{net.channels}: {n_params} parameters")
    assert 50_000 < n_params < 1_500_000
    x = torch.randn(2, 1, 28, 28, generator=gen(28))
    t = torch.tensor([0, 999])
    out = net(x, t)
    assert out.shape == (2, 1, 28, 28) and torch.equal(out, torch.zeros_like(out))  # zero-initialised output
    cond_net = tiny_unet(n_classes=5, cond_dim=3)
    labels, cond = torch.tensor([1, 5]), torch.randn(2, 3, generator=gen(29))  # 5 = the null label
    y = cond_net(x, t, labels=labels, cond=cond)
    assert y.shape == (2, 1, 28, 28)
    assert not torch.allclose(y, cond_net(x, t, labels=torch.tensor([2, 5]), cond=cond))
    assert not torch.allclose(y, cond_net(x, t, labels=labels, cond=cond + 1))
    assert not torch.allclose(y, cond_net(x, torch.tensor([1, 500]), labels=labels, cond=cond))
    for channels in [(8,), (8, 16), (8, 16, 32)]:
        assert UNet(channels)(x, t).shape == (2, 1, 28, 28)


def test_unet_errors():
    net = tiny_unet(n_classes=4)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 4])
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        net(x, t)
    with pytest.raises(ValueError, match="labels must be class labels in 0..4"):
        net(x, t, labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="no conditioning vector"):
        net(x, t, labels=torch.tensor([0, 1]), cond=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="not class-conditional"):
        tiny_unet()(x, t, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"cond of shape \(B, cond_dim\) = \(2, 3\)"):
        tiny_unet(cond_dim=3)(x, t, cond=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"cond of shape"):
        tiny_unet(cond_dim=3)(x, t)
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        net(torch.randn(2, 1, 32, 32), t, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer tensor of 0-based timesteps"):
        net(x, t.float(), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="channels"):
        UNet((8, 16, 32, 64))


def test_sinusoidal_embedding_formula():
    t = torch.tensor([0, 3, 999])
    e = sinusoidal_embedding(t, 8)
    freqs = 10_000.0 ** (-np.arange(4) / 4)
    expected = np.concatenate([np.sin(t.numpy()[:, None] * freqs), np.cos(t.numpy()[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(e.numpy(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(t, 7)


# --------------------------------------------------------------------------- the loss and training


def test_noise_prediction_loss_targets_the_noise_that_made_x_t():
    s = NoiseSchedule(100, "cosine")
    x0 = torch.rand(256, 1, 28, 28, generator=gen(30)) * 2 - 1
    seen = []

    def oracle(xt, t):  # recovers eps exactly from the known x_0: the loss must be ~0
        seen.append(t.clone())
        a = s.alphas_cumprod[t].reshape(-1, 1, 1, 1).double()
        return ((xt.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()

    assert noise_prediction_loss(oracle, x0, s, gen(31)).item() < 1e-8
    t = seen[0]
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 99 and len(set(t.tolist())) > 50
    zero = noise_prediction_loss(lambda xt, t: torch.zeros_like(xt), x0, s, gen(32)).item()
    assert zero == pytest.approx(1.0, abs=5 * math.sqrt(2 / x0.numel()))  # E eps^2 = 1
    a = noise_prediction_loss(lambda xt, t: torch.tanh(xt), x0, s, gen(33))
    b = noise_prediction_loss(lambda xt, t: torch.tanh(xt), x0, s, gen(33))
    assert a.item() == b.item()


def tiny_images(n=8):
    images = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        images[i, 0, 4 + i : 10 + i, 4:24] = 1
        images[i, 0, 4:24, 10 + i : 14 + i] = 1
    return images


def test_noise_prediction_loss_decreases_with_adam():
    s = NoiseSchedule(100, "cosine")
    x0 = tiny_images() * 2 - 1
    net = UNet((8, 16))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def held_out():
        with torch.no_grad():
            return noise_prediction_loss(net, x0.repeat(8, 1, 1, 1), s, gen(123)).item()

    before = held_out()
    g = gen(34)
    for _ in range(30):
        loss = noise_prediction_loss(net, x0[torch.randint(8, (16,), generator=g)], s, g)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    assert before == pytest.approx(1.0, abs=0.1) and after < 0.6 * before


def test_train_diffusion_with_label_dropout():
    images = torch.stack([tiny_images(4), 1 - tiny_images(4)])  # (2 classes, 4, 1, 28, 28)
    model = ConditionalDDPM(n_classes=2, num_steps=20, schedule="cosine", channels=[8, 16])
    seen = []
    model.unet.label_embedding.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].clone()))
    history = train_diffusion(model, images, steps=3, batch_size=8, lr=1e-3, device="cpu", progress=False, p_uncond=0.0)
    assert len(history["loss"]) == 3 and all(math.isfinite(v) for v in history["loss"])
    assert all(((y == 0) | (y == 1)).all() for y in seen)
    seen.clear()
    train_diffusion(model, images, steps=2, batch_size=8, lr=1e-3, device="cpu", progress=False, p_uncond=1.0)
    assert all((y == 2).all() for y in seen)  # all replaced by the null label
    assert not model.training
    with pytest.raises(ValueError, match="2 classes but the dataset 3"):
        train_diffusion(model, torch.zeros(3, 2, 1, 28, 28), steps=1, batch_size=2, lr=1e-3, device="cpu", progress=False)
    with pytest.raises(TypeError, match="DDPM"):
        train_diffusion(nn.Linear(2, 2), images, steps=1, batch_size=2, lr=1e-3, device="cpu")


# --------------------------------------------------------------------------- classifier-free guidance


def test_guided_eps_combines_conditional_and_unconditional():
    net = tiny_unet(n_classes=3)
    nn.init.normal_(net.label_embedding.weight, std=1.0)
    x = torch.randn(4, 1, 28, 28, generator=gen(35))
    t = torch.tensor([0, 3, 50, 99])
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond = net(x, t, labels=labels)
        uncond = net(x, t, labels=torch.full((4,), 3))
        assert not torch.allclose(cond, uncond, atol=1e-4)
        torch.testing.assert_close(guided_eps(net, x, t, labels, 0.0), cond, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(guided_eps(net, x, t, labels, 3.0), 4 * cond - 3 * uncond, rtol=1e-4, atol=1e-5)


def test_sampling_with_guidance_uses_the_guided_prediction():
    s = NoiseSchedule(6, "cosine")
    net = tiny_unet(n_classes=3)
    nn.init.normal_(net.label_embedding.weight, std=1.0)
    labels, w = torch.tensor([0, 2]), 2.0

    def by_hand(x, t):
        return (1 + w) * net(x, t, labels=labels) - w * net(x, t, labels=torch.full_like(labels, 3))

    shape = (2, 1, 28, 28)
    a = ancestral_sample(net, shape, s, gen(36), labels=labels, guidance=w)
    b = ancestral_sample(by_hand, shape, s, gen(36))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    c = ddim_sample(net, shape, s, 3, generator=gen(36), labels=labels, guidance=w)
    d = ddim_sample(by_hand, shape, s, 3, generator=gen(36))
    torch.testing.assert_close(c, d, rtol=1e-4, atol=1e-4)


def test_guidance_needs_a_conditional_model():
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="class-conditional"):
        guided_eps(tiny_unet(), x, t, torch.tensor([0, 1]), 1.0)
    with pytest.raises(ValueError, match="class-conditional"):
        guided_eps(lambda x, t: x, x, t, torch.tensor([0, 1]), 1.0)
    with pytest.raises(ValueError, match="guidance needs a class-conditional model"):
        DDPM(num_steps=5, channels=[8]).sample(2, guidance=1.0)
    with pytest.raises(ValueError, match="needs labels"):
        ancestral_sample(tiny_unet(n_classes=2), (2, 1, 28, 28), NoiseSchedule(3), gen(), guidance=1.0)


# --------------------------------------------------------------------------- LoRA


def test_lora_linear_starts_at_the_base_layer_and_scales_by_alpha_over_rank():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    x = torch.randn(5, 10)
    lora = LoRALinear(base, rank=2, alpha=8.0)
    assert torch.equal(lora(x), base(x))
    assert count_parameters(lora) == 2 * (10 + 6) and count_parameters(lora, trainable_only=False) == 2 * 16 + 66
    with torch.no_grad():
        lora.lora_A.weight.copy_(torch.randn(2, 10))
        lora.lora_B.weight.copy_(torch.randn(6, 2))
    A, B = lora.lora_A.weight.detach(), lora.lora_B.weight.detach()
    expected = x @ base.weight.detach().T + base.bias.detach() + (8.0 / 2) * (x @ A.T) @ B.T
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.merged()(x), expected, rtol=1e-5, atol=1e-5)
    assert LoRALinear(nn.Linear(3, 3), rank=4).scaling == 1.0  # alpha defaults to the rank


def test_lora_conv_is_a_low_rank_weight_update():
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    x = torch.randn(2, 4, 9, 9)
    lora = LoRAConv2d(base, rank=2, alpha=3.0)
    assert torch.equal(lora(x), base(x))
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    A = lora.lora_A.weight.detach().reshape(2, -1)  # (r, in k k)
    B = lora.lora_B.weight.detach().reshape(6, 2)  # (out, r)
    w = base.weight.detach() + 1.5 * (B @ A).reshape(6, 4, 3, 3)
    expected = torch.nn.functional.conv2d(x, w, base.bias.detach(), stride=2, padding=1)
    torch.testing.assert_close(lora(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lora.merged()(x), expected, rtol=1e-4, atol=1e-5)
    assert torch.linalg.matrix_rank(lora.delta_weight().reshape(6, -1)).item() <= 2


def test_attach_lora_freezes_the_base_and_trains_only_the_adapters():
    net = tiny_unet(n_classes=3)
    x = torch.randn(4, 1, 28, 28, generator=gen(37))
    t, labels = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        before = net(x, t, labels=labels)
    frozen = {name: p.detach().clone() for name, p in net.named_parameters()}
    params = attach_lora(net, rank=2, alpha=4.0, targets=["*.conv1", "*.conv2", "time_embedding.*"])
    wrapped = [m for m in net.modules() if isinstance(m, (LoRALinear, LoRAConv2d))]
    assert len(wrapped) == 2 * 4 + 2 and len(params) == 2 * len(wrapped)
    with torch.no_grad():
        assert torch.equal(net(x, t, labels=labels), before)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params} == {id(p) for p in lora_parameters(net)}
    assert count_parameters(net) == sum(p.numel() for p in params)
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(2):
        loss = noise_prediction_loss(lambda xt, tt: net(xt, tt, labels=labels), x, NoiseSchedule(10), gen(38))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {name.replace(".base.", "."): p for name, p in net.named_parameters() if "lora_" not in name}
    assert set(after) == set(frozen)
    assert all(torch.equal(after[name], frozen[name]) for name in frozen)
    with torch.no_grad():
        adapted = net(x, t, labels=labels)
        assert not torch.allclose(adapted, before)
        merge_lora(net)
        assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in net.modules())
        torch.testing.assert_close(net(x, t, labels=labels), adapted, rtol=1e-4, atol=1e-5)


def test_attach_lora_errors():
    with pytest.raises(ValueError, match="no nn.Linear / nn.Conv2d layer matches"):
        attach_lora(tiny_unet(), rank=2, targets=["nothing.*"])
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(2, 2), rank=0)


# --------------------------------------------------------------------------- registered models


def test_ddpm_samples_images_and_survives_a_checkpoint(tmp_path):
    assert GENERATORS["ddpm"] is DDPM and GENERATORS["cond-ddpm"] is ConditionalDDPM
    model = DDPM(num_steps=8, schedule="cosine", channels=[8, 16])
    nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    assert model_kind(model) == "unconditional"
    x = model.sample(3, generator=gen(39))
    assert x.shape == (3, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, model.sample(3, generator=gen(39)))
    y = model.sample(3, generator=gen(39), sampler="ddim", steps=4, eta=0.0)
    assert y.shape == (3, 1, 28, 28) and not torch.equal(x, y)
    path = save_model(model, tmp_path / "ddpm.pt")
    loaded = load_model(path, device="cpu")
    assert isinstance(loaded, DDPM) and loaded.schedule.kind == "cosine" and loaded.schedule.num_steps == 8
    assert torch.equal(loaded.sample(3, generator=gen(39)), x)
    with pytest.raises(ValueError, match="sampler must be one of"):
        model.sample(2, sampler="euler")
    with pytest.raises(ValueError, match="use sampler='ddim'"):
        model.sample(2, steps=4)


def test_conditional_ddpm_samples_per_label(tmp_path):
    model = ConditionalDDPM(n_classes=3, num_steps=5, channels=[8])
    assert model_kind(model) == "conditional"
    labels = torch.tensor([0, 2])
    x = model.sample(labels, generator=gen(40), guidance=2.0)
    assert x.shape == (2, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    loaded = load_model(save_model(model, tmp_path / "c.pt"), device="cpu")
    assert torch.equal(loaded.sample(labels, generator=gen(40), guidance=2.0), x)
    with pytest.raises(ValueError, match="labels must be class labels in 0..2"):
        model.sample(torch.tensor([3]))


# --------------------------------------------------------------------------- clear errors


def test_timestep_errors_say_0_based_and_the_range():
    s = NoiseSchedule(10)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"0-based.*0\.\.9.*t = k \+ 1"):
        s.q_sample(x, torch.tensor([0, 10]), x)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        s.predict_x0(x, torch.tensor([-1, 0]), x)
    with pytest.raises(TypeError, match="integer"):
        s.q_sample(x, torch.tensor([0.0, 1.0]), x)
    with pytest.raises(TypeError, match="int64 tensor"):
        s.q_sample(x, 3, x)
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\)"):
        s.q_sample(x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        s.q_sample(x, torch.tensor([[1], [2]]), x)


def test_shape_and_argument_errors():
    s = NoiseSchedule(10)
    x, t = torch.zeros(2, 3), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="shapes must match"):
        s.q_sample(x, t, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="shapes must match"):
        s.posterior_mean_variance(x, torch.zeros(3, 3), t)
    with pytest.raises(ValueError, match="kind must be one of"):
        NoiseSchedule(10, "quadratic")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            NoiseSchedule(bad)
    with pytest.raises(ValueError, match="variance must be one of"):
        ancestral_step(x, x, t, s, x, variance="learned")
    with pytest.raises(ValueError, match="variance must be one of"):
        ancestral_sample(lambda x, t: x, (2, 3), s, gen(), variance="sigma")
    with pytest.raises(ValueError, match="noise"):
        ancestral_step(x, x, t, s, None)
    with pytest.raises(ValueError, match="t_prev must be earlier"):
        ddim_step(x, x, t, t, s, 0.0, None)
    with pytest.raises(ValueError, match=r"t_prev.*-1\.\.8"):
        ddim_step(x, x, t, torch.tensor([-2, 0]), s, 0.0, None)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(x, x, t, t - 1, s, 1.5, x)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x, x, t, t - 1, s, 0.5, None)
    with pytest.raises(ValueError, match="shape must be"):
        ddim_sample(lambda x, t: x, (0, 3), s, 2)
    with pytest.raises(ValueError, match="noise prediction of x's shape"):
        ancestral_sample(lambda x, t: x[:, :1], (2, 3), s, gen())
