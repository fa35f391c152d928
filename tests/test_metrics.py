"""Generative-quality metrics: the Fréchet distance (against scipy and closed forms), the cached
feature net, class-conditional accuracy and the few-shot fidelity / diversity / novelty scores.

The feature net is the real one, trained once and cached in FSL_COURSE_CACHE like the glyphs
(the first run of this file trains it, about 30-40 s on a 2-core CPU); tests that train use
a few steps only.
"""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from einops import rearrange

from fsl_course import data, metrics
from fsl_course.augment import augment_shots
from fsl_course.metrics import (
    REAL,
    conditional_accuracy,
    copy_shots,
    feature_extractor,
    feature_statistics,
    few_shot_generation_scores,
    frechet_distance,
    generative_report,
    image_frechet_distance,
    real_accuracy,
)


def random_spd(d, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) * scale
    return a @ a.T / d + 0.05 * np.eye(d)


def scipy_frechet(mu1, s1, mu2, s2):
    """The reference formula of the FID code: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("d, seed", [(2, 0), (8, 1), (64, 2)])
def test_frechet_distance_matches_scipy_sqrtm(d, seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(d, seed + 10), random_spd(d, seed + 20, scale=2.0)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-6)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric
    # tensors are accepted too, and give the same float64 result
    assert frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))) == pytest.approx(ours, rel=1e-12)


def test_frechet_distance_of_a_distribution_to_itself_is_zero():
    s = random_spd(16, 3)
    mu = np.arange(16.0)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-9)
    singular = np.outer(np.ones(16), np.ones(16))  # rank 1: eigenvalues 16 and (numerically) +-0
    assert frechet_distance(mu, singular, mu, singular) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("m1, s1, m2, s2", [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.5), (3.0, 0.1, 3.0, 4.0)])
def test_frechet_distance_in_one_dimension(m1, s1, m2, s2):
    """FD(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2."""
    fd = frechet_distance([m1], [[s1**2]], [m2], [[s2**2]])
    assert fd == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12, abs=1e-12)


def test_frechet_distance_of_commuting_covariances():
    """Diagonal covariances: FD = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    fd = frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b))
    assert fd == pytest.approx(3 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-12)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\(3, 3\) matrices"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


def test_feature_statistics_are_mean_and_unbiased_covariance():
    f = np.random.default_rng(0).normal(size=(50, 5))
    mu, sigma = feature_statistics(torch.from_numpy(f).float())
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(f.T), rtol=1e-5, atol=1e-6)
    assert mu.dtype == sigma.dtype == np.float64
    with pytest.raises(ValueError, match="n >= 2"):
        feature_statistics(np.zeros((1, 5)))


# --------------------------------------------------------------------------- the feature net


@pytest.fixture(scope="module")
def net():
    return feature_extractor(device="cpu")


@pytest.fixture(scope="module")
def glyph_train():
    return data.load("glyphs", "train")


@pytest.fixture(scope="module")
def glyph_test():
    return data.load("glyphs", "test")


def heldout(dataset, classes=None):
    """The held-out instances of the glyph training classes and their labels."""
    images = dataset.images[:, metrics.RECIPE.train_instances :]
    classes = torch.arange(len(images)) if classes is None else classes
    return rearrange(images[classes], "c n ch h w -> (c n) ch h w"), classes.repeat_interleave(images.shape[1])


def test_feature_net_shapes(net, glyph_train):
    x = glyph_train.images[:5, 0]
    f, y = net.features(x), net.classify(x)
    assert f.shape == (5, 64) and f.dtype == torch.float32 and not f.requires_grad
    assert y.shape == (5,) and y.dtype == torch.int64
    assert net.n_classes == glyph_train.n_classes == 1118
    assert 0 <= y.min() and y.max() < net.n_classes
    # eval-mode batch norm: an image's features do not depend on the rest of the batch
    torch.testing.assert_close(net.features(x[:1]), f[:1])
    assert not net.training


def test_feature_net_is_cached_in_memory_and_on_disk(net):
    assert feature_extractor(device="cpu") is net  # the same object
    assert metrics.cache_path().is_file()
    metrics.clear_memory_cache()
    try:
        reloaded = feature_extractor(device="cpu")  # read back from the cache file
        assert reloaded is not net
        state, again = net.state_dict(), reloaded.state_dict()
        assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
        assert reloaded.info == net.info
    finally:
        metrics._EXTRACTORS[(str(metrics.cache_path()), "cpu")] = net  # keep one object for the other tests


def test_missing_or_damaged_cache_is_trained_saved_and_reloaded(monkeypatch, tmp_path):
    """The whole life cycle, with a 3-step recipe and its own cache file."""
    monkeypatch.setattr(metrics, "RECIPE", replace(metrics.RECIPE, steps=3))
    monkeypatch.setattr(metrics, "cache_path", lambda recipe=None: tmp_path / "net.pt")
    trained = feature_extractor(device="cpu", progress=False)
    assert (tmp_path / "net.pt").is_file() and trained.info["recipe"]["steps"] == 3
    assert 0 <= trained.info["heldout_accuracy"] < 0.1  # 3 steps learn next to nothing
    assert feature_extractor(device="cpu") is trained
    del metrics._EXTRACTORS[(str(tmp_path / "net.pt"), "cpu")]
    reloaded = feature_extractor(device="cpu")
    assert reloaded is not trained and reloaded.info == trained.info
    assert _state_hash(reloaded) == _state_hash(trained)
    del metrics._EXTRACTORS[(str(tmp_path / "net.pt"), "cpu")]
    (tmp_path / "net.pt").write_bytes(b"not a checkpoint")
    retrained = feature_extractor(device="cpu", progress=False)  # damaged: trained again, same weights
    assert _state_hash(retrained) == _state_hash(trained)
    del metrics._EXTRACTORS[(str(tmp_path / "net.pt"), "cpu")]


def test_cache_key_tracks_version_recipe_and_data(monkeypatch):
    key, path = metrics.cache_key(), metrics.cache_path()
    assert key in path.name
    monkeypatch.setattr(metrics, "METRICS_VERSION", metrics.METRICS_VERSION + 1)
    assert metrics.cache_key() != key and metrics.cache_path() != path
    monkeypatch.undo()
    assert metrics.cache_key(replace(metrics.RECIPE, steps=10)) != key
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert metrics.cache_key() != key
    monkeypatch.undo()
    from fsl_course.data import glyphs

    monkeypatch.setattr(glyphs, "GLYPHS_VERSION", glyphs.GLYPHS_VERSION + 1)
    assert metrics.cache_key() != key


def _state_hash(net) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


SHORT = replace(metrics.RECIPE, steps=3)


def test_training_is_deterministic_in_this_and_a_fresh_process():
    before = torch.get_rng_state()
    a, b = metrics.train_feature_net(SHORT, progress=False), metrics.train_feature_net(SHORT, progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    assert _state_hash(a) == _state_hash(b)
    assert a.info["final_loss"] == b.info["final_loss"]
    code = (
        "from dataclasses import replace; import hashlib; from fsl_course import metrics\n"
        "net = metrics.train_feature_net(replace(metrics.RECIPE, steps=3), progress=False)\n"
        "h = hashlib.sha256()\n"
        "for k, v in sorted(net.state_dict().items()): h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ))
    assert fresh.stdout.strip() == _state_hash(a)


def test_feature_net_rejects_bad_images(net):
    good = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"\[-1, 1\] must convert"):
        net.features(good * 2 - 1)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        net.classify(good * 255)
    with pytest.raises(ValueError, match=r"\(n, 1, 28, 28\)"):
        net.features(good[:, 0])
    with pytest.raises(ValueError, match=r"\(n, 1, 28, 28\)"):
        net.features(torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError, match="float"):
        net.features((good * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        net.features(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(TypeError, match="torch.Tensor"):
        net.features(good.numpy())


def test_real_and_conditional_accuracy(net, glyph_train):
    acc = real_accuracy(net)
    print(f"feature net: held-out accuracy {acc:.3f} on 1118 classes, trained in {net.info['train_seconds']} s")
    assert 0.5 < acc <= 1.0
    classes = torch.arange(0, 1118, 7)
    x, y = heldout(glyph_train, classes)
    assert conditional_accuracy(x, y, net) == pytest.approx((net.classify(x) == y).float().mean().item())
    assert abs(conditional_accuracy(x, y, net) - acc) < 0.1  # a subset of the same held-out images
    wrong = (y + 1) % 1118
    assert conditional_accuracy(x, wrong, net) < 0.05
    with pytest.raises(ValueError, match="0..1117"):
        conditional_accuracy(x, y + 1118, net)
    with pytest.raises(ValueError, match="integer tensor"):
        conditional_accuracy(x, y.float(), net)
    with pytest.raises(ValueError, match="integer tensor"):
        conditional_accuracy(x, y[:-1], net)


def test_feature_net_sees_through_binarisation_and_blur(net):
    """Generated glyphs are blurred (VAE means) or speckled (Bernoulli samples): the net must still
    recognise real images degraded that way, or every metric only measures texture."""
    scores = metrics.robustness(net)
    print("feature net held-out accuracy:", {k: round(v, 3) for k, v in scores.items()})
    assert scores["clean"] == real_accuracy(net)
    assert scores["binarized"] > 0.8 * scores["clean"] and scores["blurred"] > 0.8 * scores["clean"]


def test_blur_and_degrade():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10, 10] = 1.0
    kernel = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    torch.testing.assert_close(metrics.blur(x)[0, 0, 9:12, 9:12], kernel)
    assert metrics.blur(x).sum().item() == pytest.approx(1.0)  # mass is kept away from the edges
    flat = torch.full((1, 1, 28, 28), 0.3)
    torch.testing.assert_close(metrics.blur(flat), flat)  # replicated edges: constants stay constant
    images = torch.rand(4000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    never = replace(metrics.RECIPE, blur_prob=0.0, binarize_prob=0.0)
    assert torch.equal(metrics.degrade(images, never, torch.Generator().manual_seed(1)), images)
    both = metrics.degrade(images, replace(metrics.RECIPE, blur_prob=1.0, binarize_prob=1.0), torch.Generator())
    assert set(both.unique().tolist()) == {0.0, 1.0}
    some = metrics.degrade(images, metrics.RECIPE, torch.Generator().manual_seed(2))
    binary = ((some == 0) | (some == 1)).flatten(1).all(1).float().mean().item()
    assert abs(binary - metrics.RECIPE.binarize_prob) < 0.03  # a fraction of the images, not of the pixels


def test_image_frechet_distance_separates_real_from_noise(net, glyph_test):
    flat = rearrange(glyph_test.images, "c n ch h w -> (c n) ch h w")
    order = torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))
    a, b = flat[order[:1000]], flat[order[1000:2000]]
    real_vs_real = image_frechet_distance(a, b, net)
    noise = torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert 0 <= real_vs_real < 0.2 * image_frechet_distance(a, noise, net)
    assert image_frechet_distance(a, a, net) == pytest.approx(0, abs=1e-6)


# --------------------------------------------------------------------------- few-shot generation

FAST = dict(way=5, n_samples=10, episodes=12, seed=0, progress=False)


def noise_images(support_x, n, generator):
    return torch.rand(n, 1, 28, 28, generator=generator)


def test_copy_shots_has_no_diversity_and_high_fidelity(net, glyph_test):
    scores = few_shot_generation_scores(copy_shots, glyph_test, shot=1, extractor=net, **FAST)
    print(scores)
    assert scores.diversity == 0 and scores.diversity_ci95 == 0
    assert scores.novelty == pytest.approx(0, abs=1e-6)
    assert scores.fidelity > 0.7
    assert scores.protocol["generate"] == "copy_shots"
    json.dumps(scores.to_dict())


def test_real_reference_has_diversity_about_one_and_high_fidelity(net, glyph_test):
    scores = few_shot_generation_scores(REAL, glyph_test, shot=1, extractor=net, **FAST)
    print(scores)
    assert 0.85 < scores.diversity < 1.15
    assert scores.fidelity > 0.7
    assert 0.5 < scores.novelty < 1.2  # distance to the one shot ~ the typical distance between instances
    assert scores.protocol["n_samples"] == 9  # 20 - 1 shot - 10 reference images, fewer than asked
    k5 = few_shot_generation_scores(REAL, glyph_test, shot=5, extractor=net, **FAST)
    assert k5.protocol["n_samples"] == 5 and k5.novelty < scores.novelty  # nearer to the nearest of 5 shots


def test_noise_is_at_chance_and_augmentation_in_between(net, glyph_test):
    noise = few_shot_generation_scores(noise_images, glyph_test, shot=1, extractor=net, **FAST)
    print(noise)
    assert abs(noise.fidelity - 1 / 5) < 0.12
    augmented = few_shot_generation_scores(augment_shots, glyph_test, shot=1, extractor=net, **FAST)
    print(augmented)
    assert augmented.fidelity > 0.5 and 0 < augmented.diversity < 1.5 and augmented.novelty > 0.1


def test_episodes_do_not_depend_on_the_generator(net, glyph_test):
    seen = {}

    def recorder(name, make):
        def generate(support_x, n, generator):
            seen.setdefault(name, []).append(support_x.clone())
            return make(support_x, n, generator)

        return generate

    kwargs = dict(FAST, episodes=3)
    few_shot_generation_scores(recorder("copy", copy_shots), glyph_test, shot=2, extractor=net, **kwargs)
    few_shot_generation_scores(recorder("noise", noise_images), glyph_test, shot=2, extractor=net, **kwargs)
    assert len(seen["copy"]) == len(seen["noise"]) == 15  # 3 episodes x 5 classes
    assert all(torch.equal(a, b) for a, b in zip(seen["copy"], seen["noise"]))
    assert seen["copy"][0].shape == (2, 1, 28, 28)
    # and the same seed gives the same scores
    a = few_shot_generation_scores(augment_shots, glyph_test, shot=1, extractor=net, **kwargs)
    b = few_shot_generation_scores(augment_shots, glyph_test, shot=1, extractor=net, **kwargs)
    assert a.to_dict() == b.to_dict()
    np.testing.assert_array_equal(a.per_episode["diversity"], b.per_episode["diversity"])


def test_few_shot_scores_reject_bad_generators_and_requests(net, glyph_test):
    kwargs = dict(FAST, episodes=2)
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(10, 1, 28, 28\)"):
        few_shot_generation_scores(lambda s, n, g: s, glyph_test, extractor=net, **kwargs)
    with pytest.raises(ValueError, match=r"\[-1, 1\] must convert"):
        few_shot_generation_scores(lambda s, n, g: torch.rand(n, 1, 28, 28) * 2 - 1, glyph_test, extractor=net, **kwargs)
    with pytest.raises(ValueError, match="not enough"):
        few_shot_generation_scores(REAL, glyph_test, shot=9, extractor=net, **kwargs)
    with pytest.raises(ValueError, match="'real'"):
        few_shot_generation_scores("fake", glyph_test, extractor=net, **kwargs)
    with pytest.raises(ValueError, match="episodes must be an int >= 2"):
        few_shot_generation_scores(copy_shots, glyph_test, extractor=net, **{**kwargs, "episodes": 1})


def test_generative_report_is_json(net, glyph_train, glyph_test):
    x, y = heldout(glyph_train, torch.arange(0, 1118, 20))
    real = rearrange(glyph_train.images[::10, :16], "c n ch h w -> (c n) ch h w")
    report = generative_report(
        samples=x, labels=y, real_images=real, generate=copy_shots, dataset=glyph_test, shots=(1,), n_samples=5, episodes=2,
        extractor=net, progress=False,
    )
    json.dumps(report)
    assert report["conditional"]["real_accuracy"] == real_accuracy(net)
    fd = report["frechet"]
    assert fd["n_samples"] == len(x) and fd["n_real"] == len(real) - len(x)
    assert np.isfinite(fd["fd"]) and np.isfinite(fd["fd_real"]) and min(fd["fd"], fd["fd_real"]) >= 0
    (entry,) = report["few_shot"]
    assert entry["shot"] == 1 and entry["method"]["generate"] == "copy_shots" and entry["real"]["generate"] == "real"
    with pytest.raises(ValueError, match="labels need samples"):
        generative_report(labels=y, extractor=net)
