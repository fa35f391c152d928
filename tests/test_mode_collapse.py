"""The 2-D mode-collapse benchmark: the ring of Gaussians against its closed-form moments, the
VEEGAN coverage metric on hand-built samples, clear errors, and short seeded training runs."""

import math

import pytest
import torch

import fsl_course.mode_collapse as mc
from fsl_course.mode_collapse import (
    LOSSES_2D,
    ModeCoverage,
    PointDiscriminator,
    PointGAN,
    PointGenerator,
    mode_coverage,
    ring_centres,
    ring_of_gaussians,
    train_2d_gan,
)

STD = 0.02


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def at_modes(modes, n_each, std=STD, seed=0):
    """n_each points around each centre in ``modes`` (indices of the 8-mode ring), within 1 std."""
    centres = ring_centres()
    jitter = 0.5 * std * (2 * torch.rand(len(modes) * n_each, 2, generator=gen(seed)) - 1)   # |offset| < 0.71 std
    return centres[torch.tensor(modes).repeat_interleave(n_each)] + jitter


# --------------------------------------------------------------------------- the ring


def test_ring_centres_lie_evenly_on_the_circle():
    centres = ring_centres(8, 2.0)
    assert centres.shape == (8, 2) and centres.dtype == torch.float32
    torch.testing.assert_close(centres.norm(dim=1), torch.full((8,), 2.0))
    torch.testing.assert_close(centres[0], torch.tensor([2.0, 0.0]))
    angles = torch.atan2(centres[:, 1].double(), centres[:, 0].double()) % (2 * math.pi)
    torch.testing.assert_close(angles, torch.arange(8, dtype=torch.float64) * math.pi / 4, atol=1e-6, rtol=0)
    assert ring_centres(3, 0.5).shape == (3, 2)


def test_ring_samples_have_the_mixture_moments():
    n, radius = 200_000, 2.0
    x = ring_of_gaussians(n, radius=radius, std=STD, generator=gen())
    assert x.shape == (n, 2) and x.dtype == torch.float32 and x.device.type == "cpu"
    x = x.double()
    var = radius**2 / 2 + STD**2                                   # per coordinate, for M >= 3 equal-weight modes
    assert (x.mean(0).abs() < 4 * math.sqrt(var / n)).all()        # mean 0 within 4 standard errors
    torch.testing.assert_close(x.var(0), torch.full((2,), var, dtype=torch.float64), rtol=0.01, atol=0)
    centres = ring_centres().double()
    nearest = torch.cdist(x, centres).argmin(1)
    counts = torch.bincount(nearest, minlength=8).double()
    assert ((counts / n - 1 / 8).abs() < 4 * math.sqrt((1 / 8) * (7 / 8) / n)).all()   # equal weights
    offsets = x - centres[nearest]
    torch.testing.assert_close(offsets.std(0), torch.full((2,), STD, dtype=torch.float64), rtol=0.01, atol=0)
    assert offsets.norm(dim=1).max() < 0.5                          # every sample is near its own mode


def test_ring_samples_are_seeded():
    a, b = ring_of_gaussians(100, generator=gen(3)), ring_of_gaussians(100, generator=gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, ring_of_gaussians(100, generator=gen(4)))
    torch.manual_seed(5)
    c = ring_of_gaussians(10)
    torch.manual_seed(5)
    assert torch.equal(c, ring_of_gaussians(10))                    # the global generator when none is given


# --------------------------------------------------------------------------- the metric


def test_samples_on_one_mode_cover_one_mode():
    cov = mode_coverage(at_modes([3], 100), ring_centres(), STD)
    assert isinstance(cov, ModeCoverage)
    assert cov.modes_covered == 1 and cov.high_quality == 1.0 and cov.n_samples == 100 and cov.modes == 8
    assert cov.per_mode == (0, 0, 0, 100, 0, 0, 0, 0)
    assert "1/8 modes covered" in str(cov)


def test_samples_on_every_mode_cover_all_modes():
    cov = mode_coverage(at_modes(list(range(8)), 10), ring_centres(), STD)
    assert cov.modes_covered == 8 and cov.high_quality == 1.0 and cov.per_mode == (10,) * 8


def test_points_away_from_the_modes_are_not_high_quality():
    centres = ring_centres()
    far = torch.cat([torch.zeros(5, 2), 10 * torch.ones(5, 2)])           # the centre of the ring, far outside
    between = 2.0 * torch.stack([torch.cos(torch.tensor([math.pi / 8] * 5)), torch.sin(torch.tensor([math.pi / 8] * 5))], 1)
    just_outside = centres[:5] * (1 + 3.5 * STD / 2.0)                    # 3.5 std out along the radius
    for points in (far, between, just_outside):
        cov = mode_coverage(points, centres, STD)
        assert cov.high_quality == 0.0 and cov.modes_covered == 0 and sum(cov.per_mode) == 0
    just_inside = centres[:5] * (1 + 2.5 * STD / 2.0)
    assert mode_coverage(just_inside, centres, STD).high_quality == 1.0
    assert mode_coverage(just_outside, centres, STD, n_std=4.0).modes_covered == 5   # the radius is n_std * std


def test_high_quality_share_and_min_count_rule():
    samples = torch.cat([at_modes([0], 100), at_modes([5], 2, seed=1), torch.full((102, 2), 5.0)])
    cov = mode_coverage(samples, ring_centres(), STD)
    assert cov.high_quality == 0.5 and cov.modes_covered == 2 and cov.per_mode[0] == 100 and cov.per_mode[5] == 2
    strict = mode_coverage(samples, ring_centres(), STD, min_count=3)         # two stray samples do not cover mode 5
    assert strict.modes_covered == 1 and strict.min_count == 3 and strict.per_mode == cov.per_mode


def test_non_finite_samples_count_as_low_quality():
    samples = torch.cat([at_modes([2], 3), torch.tensor([[float("nan"), 0.0], [float("inf"), 1.0]])])
    cov = mode_coverage(samples, ring_centres(), STD)
    assert cov.high_quality == pytest.approx(3 / 5) and cov.modes_covered == 1 and cov.per_mode[2] == 3


def test_real_ring_samples_are_high_quality_with_the_rayleigh_probability():
    n = 100_000
    cov = mode_coverage(ring_of_gaussians(n, std=STD, generator=gen(1)), ring_centres(), STD)
    p = 1 - math.exp(-9 / 2)                      # P(|eps| <= 3) for eps ~ N(0, I_2): 0.989
    assert cov.modes_covered == 8 and abs(cov.high_quality - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert abs(min(cov.per_mode) / max(cov.per_mode) - 1) < 0.05


def test_the_metric_accepts_float64_and_other_dimensions():
    centres = torch.eye(3, dtype=torch.float64)                            # 3 modes in 3-D
    samples = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.01, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    cov = mode_coverage(samples, centres, 0.01)
    assert cov.per_mode == (1, 1, 0) and cov.modes_covered == 2 and cov.high_quality == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- networks and training


def test_networks_have_the_documented_shapes():
    model = PointGAN(noise_dim=3, hidden=8, depth=1)
    z = model.noise(5, gen())
    assert z.shape == (5, 3)
    assert model.generator(z).shape == (5, 2) and model.discriminator(model.generator(z)).shape == (5,)
    assert torch.equal(model.sample(4, generator=gen(1)), model.sample(4, generator=gen(1)))
    assert PointGenerator(noise_dim=2, hidden=4, depth=3)(torch.zeros(1, 2)).shape == (1, 2)
    assert sum(isinstance(m, torch.nn.Linear) for m in PointDiscriminator(hidden=4, depth=3).modules()) == 4


@pytest.mark.parametrize("loss", LOSSES_2D)
def test_a_short_training_run_returns_finite_histories_and_snapshots(loss):
    run = train_2d_gan(loss, steps=6, batch_size=32, hidden=16, critic_steps=2, snapshot_steps=(0, 3, 6), snapshot_size=10)
    assert set(run.history) == {"d_loss", "g_loss"} and all(len(v) == 6 for v in run.history.values())
    assert all(math.isfinite(v) for values in run.history.values() for v in values)
    assert sorted(run.snapshots) == [0, 3, 6] and all(s.shape == (10, 2) for s in run.snapshots.values())
    assert not torch.equal(run.snapshots[0], run.snapshots[6])              # the generator moved
    assert not run.model.training and run.config["loss"] == loss
    if loss != "wgan-gp":
        assert run.history["d_loss"][0] == pytest.approx(math.log(4), abs=0.3)   # about log 4 before D can tell
    cov = run.coverage(50)
    assert cov.n_samples == 50 and 0 <= cov.modes_covered <= 8


def test_training_is_seeded_and_leaves_the_global_random_state_alone():
    kwargs = dict(steps=4, batch_size=16, hidden=8, critic_steps=2, snapshot_steps=(4,), snapshot_size=5)
    state = torch.random.get_rng_state()
    a = train_2d_gan("wgan-gp", seed=1, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = train_2d_gan("wgan-gp", seed=1, **kwargs)
    assert a.history == b.history and torch.equal(a.snapshots[4], b.snapshots[4])
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
    c = train_2d_gan("wgan-gp", seed=2, **kwargs)
    assert c.history != a.history


def test_training_uses_the_package_losses(monkeypatch):
    calls = []
    for name in ("discriminator_loss", "generator_loss_nonsaturating", "critic_loss", "gradient_penalty", "wgan_generator_loss"):
        original = getattr(mc, name)
        monkeypatch.setattr(mc, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    train_2d_gan("nonsaturating", steps=2, batch_size=8, hidden=4)
    train_2d_gan("wgan-gp", steps=2, batch_size=8, hidden=4, critic_steps=3)
    assert calls.count("discriminator_loss") == 2 and calls.count("generator_loss_nonsaturating") == 2
    assert calls.count("critic_loss") == 6 and calls.count("gradient_penalty") == 6 and calls.count("wgan_generator_loss") == 2


# --------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: ring_of_gaussians(0), ValueError, "n must be a positive int"),
        (lambda: ring_of_gaussians(5, std=0.0), ValueError, "std must be a positive float"),
        (lambda: ring_of_gaussians(5, generator=0), TypeError, "CPU torch.Generator"),
        (lambda: ring_centres(0), ValueError, "modes must be a positive int"),
        (lambda: ring_centres(8, -1.0), ValueError, "radius must be a positive float"),
        (lambda: mode_coverage(torch.zeros(4, 3), ring_centres(), STD), ValueError, r"shape \(n, 2\), got \(4, 3\)"),
        (lambda: mode_coverage(torch.zeros(4), ring_centres(), STD), ValueError, r"samples must be .* shape \(n, 2\), got \(4,\)"),
        (lambda: mode_coverage(torch.zeros(0, 2), ring_centres(), STD), ValueError, "non-empty"),
        (lambda: mode_coverage(torch.zeros(4, 2, dtype=torch.long), ring_centres(), STD), ValueError, "floating-point"),
        (lambda: mode_coverage([[0.0, 0.0]], ring_centres(), STD), TypeError, "samples must be a torch.Tensor"),
        (lambda: mode_coverage(torch.zeros(4, 2), torch.zeros(8), STD), ValueError, r"centres must be .* \(n, d\), got \(8,\)"),
        (lambda: mode_coverage(torch.zeros(4, 2), ring_centres(), 0), ValueError, "std must be a positive float"),
        (lambda: mode_coverage(torch.zeros(4, 2), ring_centres(), STD, min_count=0), ValueError, "min_count must be a positive int"),
        (lambda: PointDiscriminator(4)(torch.zeros(3, 3)), ValueError, r"x must be .* \(n, 2\), got \(3, 3\)"),
        (lambda: PointGenerator(5, 4)(torch.zeros(3, 4)), ValueError, r"z must have shape \(B, noise_dim\) = \(B, 5\)"),
        (lambda: train_2d_gan("hinge", steps=1), ValueError, r"loss must be one of \('nonsaturating', 'saturating', 'wgan-gp'\)"),
        (lambda: train_2d_gan(steps=0), ValueError, "steps must be a positive int"),
        (lambda: train_2d_gan(steps=2, snapshot_steps=(3,)), ValueError, r"snapshot_steps must be ints in 0..steps = 0..2"),
        (lambda: train_2d_gan(steps=1, lr=-1.0), ValueError, "lr must be a positive float"),
        (lambda: train_2d_gan(steps=1, gp_weight=-1.0), ValueError, "gp_weight must be a nonnegative float"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
