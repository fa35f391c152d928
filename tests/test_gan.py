"""The GAN's pieces against independent oracles: a grid search for the optimal discriminator,
scipy's Jensen-Shannon distance, finite differences for the gradient penalty, closed-form loss
gradients; then the models, their checkpoints and a few training steps."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fsl_course.gan import (  # importing fsl_course.gan registers "dcgan" and "cgan" for load_model
    ConditionalGAN,
    DCGANDiscriminator,
    DCGANGenerator,
    GAN,
    critic_loss,
    discriminator_loss,
    from_tanh_range,
    generator_loss_nonsaturating,
    generator_loss_saturating,
    gradient_penalty,
    js_divergence,
    optimal_discriminator,
    to_tanh_range,
    train_gan,
    value_function,
    value_on_grid,
    wgan_generator_loss,
)
from fsl_course.generative import GENERATORS, load_model, model_kind, save_model
import fsl_course.gan as gan_module

f64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def gaussian_mixture(x, components):
    """sum_k w_k N(x; m_k, s_k^2) on a numpy grid."""
    return sum(w * np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi)) for w, m, s in components)


def grid(n=20_001, lo=-12.0, hi=12.0):
    x = np.linspace(lo, hi, n)
    return x, x[1] - x[0]


def normalised(p, dx):
    return p / (p.sum() * dx)


# --------------------------------------------------------------------------- the optimal discriminator


@pytest.mark.parametrize("p, q", [(0.3, 0.7), (2.0, 0.5), (1e-3, 4.0), (1.0, 1.0), (0.0, 0.8), (0.6, 0.0)])
def test_optimal_discriminator_maximises_the_value_pointwise(p, q):
    """D* = p / (p + q) beats every d of a fine grid on p log d + q log(1 - d) (0 log 0 = 0)."""
    d = np.linspace(0.0, 1.0, 100_001)
    with np.errstate(divide="ignore", invalid="ignore"):
        objective = np.where(p > 0, p * np.log(d), 0.0) + np.where(q > 0, q * np.log1p(-d), 0.0)
    best_on_grid = d[np.argmax(objective)]
    d_star = optimal_discriminator(np.array([p]), np.array([q]))[0]
    assert abs(d_star - best_on_grid) <= 1e-5
    assert value_on_grid(np.array([d_star]), np.array([p]), np.array([q]), 1.0) >= objective.max() - 1e-12
    assert d_star == pytest.approx(p / (p + q), abs=1e-15)


def test_optimal_discriminator_keeps_the_input_kind_and_says_half_where_both_densities_vanish():
    p = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=f64)
    q = torch.tensor([[0.0, 1.0], [0.0, 3.0]], dtype=f64)
    d = optimal_discriminator(p, q)
    assert isinstance(d, torch.Tensor) and d.shape == (2, 2)
    torch.testing.assert_close(d, torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=f64), rtol=0, atol=0)
    d_np = optimal_discriminator(p.numpy(), q.numpy())
    assert isinstance(d_np, np.ndarray) and np.array_equal(d_np, d.numpy())


def test_optimal_discriminator_beats_perturbed_discriminators_on_a_grid():
    x, dx = grid(2001)
    p = normalised(gaussian_mixture(x, [(0.5, -2, 0.7), (0.5, 1, 1.0)]), dx)
    q = normalised(gaussian_mixture(x, [(1.0, 0.5, 1.5)]), dx)
    d_star = optimal_discriminator(p, q)
    best = value_on_grid(d_star, p, q, dx)
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = np.clip(d_star + 0.05 * rng.standard_normal(d_star.shape), 1e-6, 1 - 1e-6)
        assert value_on_grid(d, p, q, dx) < best


# --------------------------------------------------------------------------- V(D*, G) = -log 4 + 2 JSD


MIXTURES = {
    "overlapping": ([(0.3, -3, 0.8), (0.7, 2, 1.2)], [(0.5, -1, 1.0), (0.5, 3, 0.6)]),
    "equal": ([(0.4, -1, 0.5), (0.6, 2, 1.0)], [(0.4, -1, 0.5), (0.6, 2, 1.0)]),
    "almost disjoint": ([(1.0, -6, 0.4)], [(1.0, 6, 0.4)]),
}


@pytest.mark.parametrize("case", sorted(MIXTURES))
def test_value_at_the_optimal_discriminator_is_minus_log_4_plus_twice_the_jsd(case):
    scipy_distance = pytest.importorskip("scipy.spatial.distance")
    x, dx = grid()
    p, q = (normalised(gaussian_mixture(x, c), dx) for c in MIXTURES[case])
    v = value_on_grid(optimal_discriminator(p, q), p, q, dx)
    jsd = js_divergence(p, q, dx)
    assert v == pytest.approx(-math.log(4) + 2 * jsd, abs=1e-6)
    # independently: scipy's Jensen-Shannon *distance* (natural log) is sqrt(JSD) of the probabilities p_i dx
    assert jsd == pytest.approx(scipy_distance.jensenshannon(p * dx, q * dx) ** 2, abs=1e-6)
    expected = {"equal": 0.0, "almost disjoint": math.log(2)}.get(case)
    if expected is not None:  # the two ends: -log 4 at p = q, 0 for disjoint supports
        assert jsd == pytest.approx(expected, abs=1e-9)
    else:
        assert 0.05 < jsd < math.log(2) - 0.05


def test_grid_functions_accept_tensors_and_agree_with_numpy():
    x, dx = grid(501)
    p, q = (normalised(gaussian_mixture(x, c), dx) for c in MIXTURES["overlapping"])
    pt, qt = torch.from_numpy(p), torch.from_numpy(q)
    d = optimal_discriminator(pt, qt)
    v = value_on_grid(d, pt, qt, dx)
    assert isinstance(v, torch.Tensor) and v.ndim == 0
    assert v.item() == pytest.approx(value_on_grid(d.numpy(), p, q, dx), rel=1e-14)
    assert js_divergence(pt, qt, dx).item() == pytest.approx(js_divergence(p, q, dx), rel=1e-14)


# --------------------------------------------------------------------------- losses from logits


def test_value_function_and_discriminator_loss_from_logits():
    real = torch.tensor([0.3, -1.2, 2.5], dtype=f64)
    fake = torch.tensor([-0.7, 1.1], dtype=f64)
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    expected = torch.log(d_real).mean() + torch.log(1 - d_fake).mean()
    torch.testing.assert_close(value_function(real, fake), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(discriminator_loss(real, fake), -expected, rtol=1e-14, atol=1e-14)
    zeros = torch.zeros(4)
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(math.log(4), rel=1e-6)
    # stable where sigmoid saturates: log sigmoid(-200) = -200, not -inf
    extreme = discriminator_loss(torch.tensor([-200.0], dtype=f64), torch.tensor([300.0], dtype=f64))
    assert extreme.item() == pytest.approx(500.0, rel=1e-12)
    assert discriminator_loss(torch.tensor([50.0]), torch.tensor([-50.0])).item() < 1e-20


def logit_gradient(loss_fn, logit):
    l = torch.tensor([logit], dtype=f64, requires_grad=True)
    loss_fn(l).backward()
    return l.grad.item()


def test_the_saturating_loss_vanishes_where_the_non_saturating_one_does_not():
    """At D(G(z)) = sigmoid(-10) ~ 4.5e-5 (the discriminator wins): dL/dl = -sigmoid(l) vs -(1 - sigmoid(l))."""
    saturating = logit_gradient(generator_loss_saturating, -10.0)
    nonsaturating = logit_gradient(generator_loss_nonsaturating, -10.0)
    assert saturating == pytest.approx(-torch.sigmoid(torch.tensor(-10.0, dtype=f64)).item(), rel=1e-12)
    assert abs(saturating) < 1e-4 and nonsaturating < -0.9999
    # both push the fake logits up (the same direction), and the roles swap when D is fooled
    for logit in (-10.0, 0.0, 10.0):
        assert logit_gradient(generator_loss_saturating, logit) < 0 and logit_gradient(generator_loss_nonsaturating, logit) < 0
    assert abs(logit_gradient(generator_loss_nonsaturating, 10.0)) < 1e-4 and logit_gradient(generator_loss_saturating, 10.0) < -0.9999
    # values: E log(1 - D) and -E log D
    l = torch.tensor([-1.0, 2.0], dtype=f64)
    torch.testing.assert_close(generator_loss_saturating(l), torch.log(1 - torch.sigmoid(l)).mean())
    torch.testing.assert_close(generator_loss_nonsaturating(l), -torch.log(torch.sigmoid(l)).mean())


def test_wgan_loss_signs():
    real = torch.tensor([2.0, 4.0], requires_grad=True)
    fake = torch.tensor([-1.0, 0.0, 1.0], requires_grad=True)
    loss = critic_loss(real, fake)
    assert loss.item() == pytest.approx(0.0 - 3.0)  # E f(fake) - E f(real): negative for a critic that tells them apart
    loss.backward()
    torch.testing.assert_close(real.grad, torch.full((2,), -0.5))  # minimising raises the real scores
    torch.testing.assert_close(fake.grad, torch.full((3,), 1 / 3))  # ... and lowers the fake ones
    assert wgan_generator_loss(torch.tensor([1.0, 3.0])).item() == -2.0


# --------------------------------------------------------------------------- the gradient penalty


class Recording(nn.Module):
    """A small nonlinear critic on (B, 1, 4, 4), float64, that remembers its last input."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 1)).double()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x).squeeze(1)


def finite_difference_gradient_norms(critic, x, h=1e-6):
    """||grad_x f(x_b)|| per sample by central differences over every pixel."""
    flat = x.reshape(len(x), -1)
    grads = torch.zeros_like(flat)
    with torch.no_grad():
        for j in range(flat.shape[1]):
            step = torch.zeros_like(flat)
            step[:, j] = h
            grads[:, j] = (critic.net((flat + step).view_as(x)) - critic.net((flat - step).view_as(x))).squeeze(1) / (2 * h)
    return grads.norm(dim=1)


def test_gradient_penalty_matches_finite_differences_on_the_interpolates():
    critic = Recording()
    real = torch.randn(5, 1, 4, 4, generator=gen(1), dtype=f64)
    fake = torch.randn(5, 1, 4, 4, generator=gen(2), dtype=f64)
    penalty = gradient_penalty(critic, real, fake, gen(3))
    (x_hat,) = critic.inputs
    # x_hat_b lies on the segment from fake_b to real_b, one eps_b per sample
    eps = ((x_hat - fake) / (real - fake)).reshape(5, -1)
    torch.testing.assert_close(eps, eps[:, :1].expand_as(eps))
    assert ((eps > 0) & (eps < 1)).all() and eps[:, 0].unique().numel() == 5
    norms = finite_difference_gradient_norms(critic, x_hat)
    expected = 10.0 * (norms - 1).pow(2).mean()  # the default weight is 10
    torch.testing.assert_close(penalty, expected, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(gradient_penalty(critic, real, fake, gen(3), weight=2.5), expected / 4, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(gradient_penalty(critic, real, fake, gen(3)), penalty, rtol=0, atol=0)  # seeded
    assert gradient_penalty(critic, real, fake, gen(4)).item() != penalty.item()


def test_gradient_penalty_is_differentiable_in_the_critic_parameters():
    """autograd through create_graph=True against central differences in single parameters."""
    critic = Recording(seed=1)
    real = torch.randn(4, 1, 4, 4, generator=gen(5), dtype=f64)
    fake = torch.randn(4, 1, 4, 4, generator=gen(6), dtype=f64)
    gradient_penalty(critic, real, fake, gen(7)).backward()
    h = 1e-6
    for parameter, index in [(critic.net[0].weight, (1, 0, 1, 2)), (critic.net[0].bias, (2,)), (critic.net[3].weight, (0, 17))]:
        assert parameter.grad is not None
        with torch.no_grad():
            original = parameter[index].item()
            parameter[index] = original + h
            up = gradient_penalty(critic, real, fake, gen(7)).item()
            parameter[index] = original - h
            down = gradient_penalty(critic, real, fake, gen(7)).item()
            parameter[index] = original
        assert parameter.grad[index].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)
    assert critic.net[3].bias.grad is None  # the output bias does not change grad_x f


@pytest.mark.parametrize("scale, expected", [(1.0, 0.0), (3.0, 40.0), (0.0, 10.0)])
def test_gradient_penalty_of_a_linear_critic_is_known_exactly(scale, expected):
    """f(x) = <w, x> has grad_x f = w everywhere: GP = 10 (||w|| - 1)^2, 0 for a unit-norm w."""
    w = torch.randn(1, 28, 28, generator=gen(8), dtype=f64)
    w = scale * w / w.norm()
    critic = lambda x: (x * w).sum(dim=(1, 2, 3))  # noqa: E731
    real, fake = torch.rand(2, 6, 1, 28, 28, generator=gen(9), dtype=f64)
    assert gradient_penalty(critic, real, fake, gen(10)).item() == pytest.approx(expected, abs=1e-20 if expected == 0 else 1e-12)


def test_gradient_penalty_passes_labels_to_a_conditional_critic_and_no_gradient_to_the_generator():
    seen = {}

    def critic(x, labels):
        seen["labels"] = labels
        return (x.flatten(1) * (1 + labels[:, None])).sum(1)

    labels = torch.tensor([0, 2, 1])
    fake = torch.rand(3, 1, 2, 2, requires_grad=True)
    penalty = gradient_penalty(critic, torch.rand(3, 1, 2, 2), fake, gen(0), labels=labels)
    assert seen["labels"] is labels
    # grad = (1 + y) * ones(4): norm 2 (1 + y)
    assert penalty.item() == pytest.approx(10 * np.mean([(2 * (1 + y) - 1) ** 2 for y in (0, 2, 1)]), rel=1e-6)
    assert not penalty.requires_grad or torch.autograd.grad(penalty, fake, allow_unused=True)[0] is None


# --------------------------------------------------------------------------- models


def small(name, **kwargs):
    torch.manual_seed(0)
    if name == "dcgan":
        return GAN(latent_dim=6, hidden=4, **kwargs)
    return ConditionalGAN(3, latent_dim=6, hidden=4, **kwargs)


def draw(model, seed=0):
    if model_kind(model) == "conditional":
        return model.sample(torch.tensor([0, 2, 1, 2]), generator=gen(seed))
    return model.sample(4, generator=gen(seed))


def test_networks_have_the_documented_shapes():
    torch.manual_seed(0)
    z = torch.randn(5, 6)
    images = DCGANGenerator(latent_dim=6, hidden=4)(z)
    assert images.shape == (5, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert DCGANGenerator(latent_dim=6, hidden=4, n_classes=3)(z, labels).shape == (5, 1, 28, 28)
    for sn in (False, True):
        assert DCGANDiscriminator(hidden=4, spectral_norm=sn)(images).shape == (5,)
        assert DCGANDiscriminator(hidden=4, spectral_norm=sn, n_classes=3)(images, labels).shape == (5,)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in DCGANDiscriminator(hidden=4).modules())


def test_the_projection_discriminator_is_psi_plus_an_inner_product_with_the_label_embedding():
    torch.manual_seed(0)
    d = DCGANDiscriminator(hidden=4, n_classes=3).double()
    x = torch.rand(4, 1, 28, 28, generator=gen(1), dtype=f64) * 2 - 1
    y = torch.tensor([0, 2, 1, 2])
    h = d.phi(x)
    assert h.shape == (4, 2 * 4 * 49)
    expected = d.head(h).squeeze(1) + (d.embedding.weight[y] * h).sum(1)
    torch.testing.assert_close(d(x, y), expected, rtol=1e-12, atol=1e-12)
    # changing the label changes the score by <e_y' - e_y, h> only
    torch.testing.assert_close(d(x, y.flip(0)) - d(x, y), ((d.embedding.weight[y.flip(0)] - d.embedding.weight[y]) * h).sum(1))


def test_spectral_norm_wraps_every_layer_and_bounds_its_largest_singular_value():
    torch.manual_seed(0)
    d = DCGANDiscriminator(hidden=4, spectral_norm=True, n_classes=3)
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(layers) == 4 and all(nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    with torch.no_grad():
        for m in layers:
            m.parametrizations.weight.original.mul_(5.0)  # whatever the scale of the raw weights
    x = torch.rand(8, 1, 28, 28, generator=gen(1)) * 2 - 1
    for _ in range(30):  # one power iteration per training-mode forward
        d(x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    for m in layers:  # power iteration under-estimates sigma_max, so W / sigma has a norm slightly >= 1
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
        original = torch.linalg.matrix_norm(m.parametrizations.weight.original.detach().flatten(1), ord=2).item()
        assert 1 - 1e-5 < sigma < 1.02 and original > 2, (m, sigma, original)
    plain = DCGANDiscriminator(hidden=4)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in plain.modules())


@pytest.mark.parametrize("name", ["dcgan", "cgan"])
def test_samples_are_seeded_images_in_the_unit_interval_and_leave_the_model_untouched(name):
    model = small(name)
    model.train()
    running_mean = model.generator.net[0].running_mean.clone()
    images = draw(model)
    assert images.shape == (4, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, draw(model)) and not torch.equal(images, draw(model, seed=1))
    assert model.training and model.generator.training  # sample() ran in eval mode and restored the mode
    assert torch.equal(model.generator.net[0].running_mean, running_mean)


def test_sample_maps_the_tanh_range_to_images():
    assert torch.equal(from_tanh_range(torch.tensor([-1.0, 0.0, 1.0])), torch.tensor([0.0, 0.5, 1.0]))
    x = torch.rand(10, generator=gen(0))
    torch.testing.assert_close(from_tanh_range(to_tanh_range(x)), x)


def test_conditional_samples_depend_on_the_label():
    model = small("cgan").eval()
    a = model.sample(torch.tensor([0, 0]), generator=gen(3))
    b = model.sample(torch.tensor([1, 1]), generator=gen(3))
    assert not torch.allclose(a, b)


def test_models_are_registered_with_their_kinds_and_config():
    assert GENERATORS["dcgan"] is GAN and GENERATORS["cgan"] is ConditionalGAN
    assert model_kind(small("dcgan")) == "unconditional" and model_kind(small("cgan")) == "conditional"
    assert small("cgan", loss="wgan-gp").config == {
        "model": "cgan",
        "kwargs": {"n_classes": 3, "latent_dim": 6, "hidden": 4, "spectral_norm": False, "loss": "wgan-gp", "aux_weight": 0.0},
    }
    assert GAN(hidden=4).config["kwargs"] == {"latent_dim": 64, "hidden": 4, "spectral_norm": False, "loss": "nonsaturating"}


@pytest.mark.parametrize(
    "name, kwargs", [("dcgan", {}), ("dcgan", {"spectral_norm": True, "loss": "wgan-gp"}), ("cgan", {"spectral_norm": True})]
)
def test_save_and_load_round_trip_gives_the_same_model(name, kwargs, tmp_path):
    model = small(name, **kwargs)
    train_gan(model, torch.rand(3, 2, 1, 28, 28, generator=gen(0)), steps=1, batch_size=4, lr=1e-3, device="cpu",
              progress=False, critic_steps=1)  # moves the batch-norm statistics and the spectral-norm vectors
    path = save_model(model, tmp_path / f"{name}.pt", seed=3)
    loaded = load_model(path, device="cpu")
    assert type(loaded) is type(model) and not loaded.training and loaded.training_info == {"seed": 3}
    assert loaded.config == model.config
    assert torch.equal(draw(loaded), draw(model))
    x = torch.rand(4, 1, 28, 28, generator=gen(1)) * 2 - 1
    y = torch.tensor([0, 1, 2, 0]) if name == "cgan" else None
    assert torch.equal(loaded.discriminator(x, y), model.discriminator(x, y))


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "name, loss",
    [("dcgan", "nonsaturating"), ("dcgan", "wgan-gp"), ("cgan", "nonsaturating"), ("cgan", "wgan-gp"), ("cgan-ac", "nonsaturating"),
     ("cgan-ac", "wgan-gp")],
)
def test_a_few_training_steps_change_both_networks(name, loss):
    model = small("cgan", loss=loss, aux_weight=1.0) if name == "cgan-ac" else small(name, loss=loss)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.rand(3, 3, 1, 28, 28, generator=gen(1))
    history = train_gan(model, data, steps=5, batch_size=8, lr=1e-3, device="cpu", progress=False, critic_steps=2)
    assert set(history) == {"d_loss", "g_loss"} and all(len(v) == 5 for v in history.values())
    assert all(math.isfinite(v) for values in history.values() for v in values)
    assert not model.training
    after = model.state_dict()
    # a critic's output bias cancels in E f(G(z)) - E f(x) and does not change grad_x f: no gradient, no update
    fixed = {"discriminator.head.bias"} if loss == "wgan-gp" else set()
    for key, _ in model.named_parameters():
        assert torch.equal(before[key], after[key]) == (key in fixed), key
    if loss == "nonsaturating":
        # about log 4 while D cannot tell yet (+ log 3 for an auxiliary classifier that cannot tell the 3 classes)
        start = math.log(4) + (math.log(3) if name == "cgan-ac" else 0.0)
        assert history["d_loss"][0] == pytest.approx(start, abs=0.3)


def test_the_auxiliary_classifier_adds_the_cross_entropy_of_the_labels():
    """AC-GAN: d_loss = -V + w CE(c(phi(x)), y) on real images, g_loss = -E log D(G(z)) + w CE(c(phi(G(z, y))), y)."""
    model = small("cgan", aux_weight=2.5)
    x, y = 2 * torch.rand(5, 1, 28, 28, generator=gen(2)) - 1, torch.tensor([0, 2, 1, 1, 0])
    logits = model.discriminator.class_logits(model.discriminator.phi(x))
    assert logits.shape == (5, 3)
    by_hand = -torch.log_softmax(logits, dim=1)[torch.arange(5), y].mean()
    scores, aux = gan_module._scores(model, x, y)
    assert torch.allclose(scores, model.discriminator(x, y)) and aux.item() == pytest.approx(2.5 * by_hand.item(), rel=1e-6)
    plain = small("cgan")
    assert plain.discriminator.classifier is None and gan_module._scores(plain, x, y)[1].item() == 0.0


def test_with_an_auxiliary_classifier_the_samples_follow_their_label():
    """Two classes, blank and all ink: after 150 steps a sample of class 1 has more ink than one of class 0."""
    torch.manual_seed(0)
    model = ConditionalGAN(2, latent_dim=6, hidden=4, aux_weight=1.0)
    data = torch.zeros(2, 4, 1, 28, 28)
    data[1] = 1.0
    train_gan(model, data, steps=150, batch_size=16, lr=2e-3, device="cpu", progress=False)
    ink = model.sample(torch.tensor([0] * 32 + [1] * 32), generator=gen(3)).mean(dim=(1, 2, 3))
    assert ink[32:].mean() > ink[:32].mean() + 0.3


def test_training_is_seeded_and_accepts_a_dataset_object():
    data = torch.rand(3, 3, 1, 28, 28, generator=gen(1))
    runs = []
    for dataset in (data, SimpleNamespace(images=data)):
        model = small("dcgan", loss="wgan-gp")
        runs.append((train_gan(model, dataset, steps=2, batch_size=4, lr=1e-3, device="cpu", progress=False, critic_steps=2), draw(model)))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    other = train_gan(small("dcgan", loss="wgan-gp"), data, steps=2, batch_size=4, lr=1e-3, device="cpu", progress=False,
                      critic_steps=2, seed=1)
    assert other != runs[0][0]


def test_training_shows_the_discriminator_images_in_the_tanh_range_with_the_class_labels():
    model = small("cgan")
    calls = []
    forward = model.discriminator.forward

    def spy(x, labels=None):
        calls.append((x.detach().clone(), labels))
        return forward(x, labels)

    model.discriminator.forward = spy
    data = torch.zeros(3, 2, 1, 28, 28)
    data[1] = 1.0  # class 1 is all ink
    train_gan(model, data, steps=1, batch_size=6, lr=1e-3, device="cpu", progress=False)
    real, labels = calls[0]
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    for image, label in zip(real, labels):
        assert image.eq(1.0 if label == 1 else -1.0).all()
    fake, fake_labels = calls[1]
    assert torch.equal(fake_labels, labels) and fake.min() >= -1 and fake.max() <= 1


# --------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: optimal_discriminator(np.ones(3), np.ones(4)), ValueError, r"same shape: p_data \(3,\), p_model \(4,\)"),
        (lambda: optimal_discriminator(np.array([0.5, -0.1]), np.ones(2)), ValueError, "p_data must hold finite, nonnegative"),
        (lambda: optimal_discriminator(torch.ones(2), np.ones(2)), TypeError, "all torch tensors or all numpy arrays"),
        (lambda: optimal_discriminator([0.5], [0.5]), TypeError, "p_data must be a torch.Tensor or a numpy array"),
        (lambda: value_on_grid(np.array([1.5]), np.ones(1), np.ones(1), 0.1), ValueError, r"d must be discriminator outputs in \[0, 1\]"),
        (lambda: js_divergence(np.ones(3), np.ones(3), 0.0), ValueError, "dx must be the positive grid spacing"),
        (lambda: discriminator_loss(torch.zeros(3), torch.zeros(0)), ValueError, "fake_logits must hold at least one"),
        (lambda: generator_loss_nonsaturating(torch.zeros(3, dtype=torch.long)), ValueError, "floating-point"),
        (lambda: critic_loss([1.0], torch.zeros(1)), TypeError, "real_scores must be a torch.Tensor"),
        (lambda: gradient_penalty(lambda x: x.sum((1, 2, 3)), torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4)), ValueError,
         r"shapes must match: real \(2, 1, 4, 4\), fake \(3, 1, 4, 4\)"),
        (lambda: gradient_penalty(lambda x: x.sum(), torch.zeros(2, 3), torch.zeros(2, 3)), ValueError, "one score per sample"),
        (lambda: gradient_penalty(lambda x: x.sum(1), torch.zeros(2, 3), torch.zeros(2, 3), weight=-1.0), ValueError, "nonnegative"),
        (lambda: DCGANDiscriminator(hidden=4)(torch.zeros(2, 1, 32, 32)), ValueError, r"shape \(B, 1, 28, 28\).*\(2, 1, 32, 32\)"),
        (lambda: DCGANDiscriminator(hidden=4)(torch.zeros(2, 28, 28)), ValueError, r"shape \(B, 1, 28, 28\)"),
        (lambda: DCGANDiscriminator(hidden=4)(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1])), ValueError, "unconditional"),
        (lambda: DCGANDiscriminator(hidden=4, n_classes=3)(torch.zeros(2, 1, 28, 28)), ValueError, r"needs labels: \(B,\) int64 in 0..2"),
        (lambda: DCGANDiscriminator(hidden=4, n_classes=3)(torch.zeros(2, 1, 28, 28), torch.tensor([0])), ValueError,
         "1 labels for 2 images"),
        (lambda: DCGANDiscriminator(hidden=4, spectral_norm="yes"), TypeError, "spectral_norm must be True or False"),
        (lambda: DCGANDiscriminator(hidden=4, auxiliary=True), ValueError, "an auxiliary classifier needs n_classes"),
        (lambda: DCGANDiscriminator(hidden=4, n_classes=3).class_logits(torch.zeros(2, 196)), ValueError, "no auxiliary classifier"),
        (lambda: ConditionalGAN(3, hidden=4, aux_weight=-1.0), ValueError, "aux_weight must be a nonnegative float"),
        (lambda: DCGANGenerator(latent_dim=6, hidden=4)(torch.zeros(2, 5)), ValueError, r"z must have shape \(B, latent_dim\) = \(B, 6\)"),
        (lambda: GAN(hidden=4, loss="hinge"), ValueError, r"loss must be one of \('nonsaturating', 'wgan-gp'\)"),
        (lambda: GAN(hidden=4).sample(0), ValueError, "n must be a positive int"),
        (lambda: ConditionalGAN(3, hidden=4).sample(torch.tensor([0, 3])), ValueError, r"labels in 0..2"),
        (lambda: ConditionalGAN(3, hidden=4).sample(torch.tensor([0.0])), ValueError, "int64"),
        (lambda: ConditionalGAN(3, hidden=4).sample(torch.tensor([[0, 1]])), ValueError, "1-D int64"),
        (lambda: train_gan(GAN(hidden=4), torch.rand(3, 1, 28, 28), steps=1, batch_size=2, lr=1e-3, device="cpu"), ValueError,
         r"dense \(C, n, 1, 28, 28\)"),
        (lambda: train_gan(ConditionalGAN(3, hidden=4), torch.rand(4, 2, 1, 28, 28), steps=1, batch_size=2, lr=1e-3, device="cpu"),
         ValueError, "3 classes but the dataset 4"),
        (lambda: train_gan(nn.Linear(2, 2), torch.rand(4, 2, 1, 28, 28), steps=1, batch_size=2, lr=1e-3, device="cpu"), TypeError,
         "trains a GAN or a ConditionalGAN"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
