"""DAGAN-style feature augmentation: the generator, the pair discriminator, the learner, the METHOD."""

import pytest
import torch

from fsl_course import gan
from fsl_course.budgets import Budget
from fsl_course.dagan import (
    DAGANLearner,
    FeatureGenerator,
    PairDiscriminator,
    dagan_hyperparameters,
    episode_generator,
    extract_features,
    fake_pairs,
    generation_statistics,
    pair,
    real_pairs,
    train_dagan,
    train_feature_gan,
)
from fsl_course.meta import LEARNERS, PretrainFinetune, load_learner, save_learner


def random_episode(way=5, shot=2, query=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    support_x = torch.rand(way * shot, 1, 28, 28, generator=g)
    support_y = torch.arange(way).repeat_interleave(shot)
    return support_x, support_y, torch.rand(way * query, 1, 28, 28, generator=g)


def small_learner(**kwargs):
    torch.manual_seed(0)
    learner = DAGANLearner(**{"hidden": 16, "norm": "group", "finetune_steps": 30, "generator_hidden": 32, "n_generated": 3, **kwargs})
    return learner.eval()


def labelled_features(n_classes=4, n_per_class=5, dim=3):
    """features[c, i] = (c, i, 0, 0, ...): each row says which class and instance it is."""
    f = torch.zeros(n_classes, n_per_class, dim)
    f[..., 0] = torch.arange(n_classes).float()[:, None]
    f[..., 1] = torch.arange(n_per_class).float()[None, :]
    return f


# --- networks ------------------------------------------------------------------------------


def test_generator_shapes_residual_form_and_clear_errors():
    torch.manual_seed(0)
    g = FeatureGenerator(feature_dim=8, noise_dim=4, hidden=16)
    h, z = torch.rand(5, 8), torch.randn(5, 4)
    assert g(h, z).shape == (5, 8) and g.noise(7).shape == (7, 4)
    assert (g(h - 10, z) == 0).all()  # the output ReLU: features are >= 0, like Conv-4's
    torch.nn.init.zeros_(g.net[-1].weight)
    torch.nn.init.zeros_(g.net[-1].bias)
    torch.testing.assert_close(g(h, z), h, rtol=0, atol=0)  # G(h, z) = relu(h + s * MLP(...)): zero MLP -> h
    with pytest.raises(ValueError, match=r"h must be features of shape \(B, D\) = \(B, 8\)"):
        g(torch.randn(5, 7), z)
    with pytest.raises(ValueError, match=r"z must have shape \(B, noise_dim\) = \(5, 4\)"):
        g(h, torch.randn(4, 4))
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        g(h.tolist(), z)
    with pytest.raises(ValueError, match="noise_dim must be a positive int"):
        FeatureGenerator(noise_dim=0)


def test_feature_stats_standard_units_and_the_floor():
    g = FeatureGenerator(feature_dim=3, noise_dim=2, hidden=8)
    f = torch.tensor([[0.0, 1.0, 5.0], [2.0, 3.0, 5.0], [4.0, 5.0, 5.0]])
    g.set_feature_stats(f)
    torch.testing.assert_close(g.feature_mean, torch.tensor([2.0, 3.0, 5.0]))
    # a constant (dead) feature gets 0.01 x the mean scale, not 0
    torch.testing.assert_close(g.feature_scale, torch.tensor([2.0, 2.0, 0.01 * 4 / 3]))
    u = g.standardise(f)
    torch.testing.assert_close(u, torch.tensor([[-1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    torch.testing.assert_close(g.unstandardise(u), f)
    # G in standard units and in feature units are one map
    h, z = torch.rand(4, 3) * 4, torch.randn(4, 2)
    torch.testing.assert_close(g.unstandardise(g.forward_standard(g.standardise(h), z)), g(h, z))
    with pytest.raises(ValueError, match="need at least 2 feature vectors of size 3"):
        g.set_feature_stats(torch.rand(5, 4))


def test_pair_discriminator_scores_each_pair_independently():
    torch.manual_seed(0)
    d = PairDiscriminator(feature_dim=6, hidden=16)
    pairs = torch.randn(4, 12)
    scores = d(pairs)
    assert scores.shape == (4,)
    torch.testing.assert_close(d(pairs[1:2]), scores[1:2])
    swapped = torch.cat([pairs[:, 6:], pairs[:, :6]], dim=1)
    assert not torch.allclose(d(swapped), scores)  # the order matters: (h, h') is not (h', h)
    with pytest.raises(ValueError, match=r"pairs must be features of shape \(B, D\) = \(B, 12\)"):
        d(torch.randn(4, 6))
    with pytest.raises(ValueError, match="a pair needs two"):
        pair(torch.randn(3, 6), torch.randn(2, 6))


# --- real and fake pairs -------------------------------------------------------------------


def test_real_pairs_are_two_distinct_instances_of_one_class():
    f = labelled_features(n_classes=4, n_per_class=3)
    h, h_other, c = real_pairs(f, 500, torch.Generator().manual_seed(0))
    assert h.shape == h_other.shape == (500, 3) and c.shape == (500,)
    assert torch.equal(h[:, 0], c.float()) and torch.equal(h_other[:, 0], c.float())  # same class, the one returned
    assert (h[:, 1] != h_other[:, 1]).all()  # never the same instance
    assert set(c.tolist()) == {0, 1, 2, 3}
    for i in range(3):  # every ordered pair of distinct instances occurs
        assert {int(j) for j in h_other[h[:, 1] == i, 1]} == set(range(3)) - {i}
    again = real_pairs(f, 500, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], h) and torch.equal(again[1], h_other)


def test_real_pairs_need_two_instances_per_class():
    with pytest.raises(ValueError, match="n >= 2 instances per class"):
        real_pairs(torch.zeros(3, 1, 4), 2, torch.Generator())
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        real_pairs(torch.zeros(3, 2, 4), 2, None)


def test_fake_pairs_hold_the_source_and_the_generator_output():
    torch.manual_seed(0)
    g = FeatureGenerator(feature_dim=3, noise_dim=2, hidden=8)
    g.set_feature_stats(torch.rand(10, 3) * 4)
    u = g.standardise(torch.rand(6, 3) * 4)
    fake = fake_pairs(g, u, torch.Generator().manual_seed(1))
    z = g.noise(6, torch.Generator().manual_seed(1))
    assert fake.shape == (6, 6)
    torch.testing.assert_close(fake[:, :3], u, rtol=0, atol=0)  # the source ...
    torch.testing.assert_close(fake[:, 3:], g.forward_standard(u, z), rtol=0, atol=0)  # ... and G's output, in standard units
    torch.testing.assert_close(g.unstandardise(fake[:, 3:]), g(g.unstandardise(u), z))
    assert (g.unstandardise(fake[:, 3:]) >= 0).all()
    assert fake.requires_grad  # the generator learns through the pair


# --- the feature GAN -----------------------------------------------------------------------


def cluster_features(n_classes=6, n_per_class=10, dim=4, seed=0):
    """Well separated classes, all coordinates > 0: centres 10 + 3 N(0, I), within-class std 0.5: (C, n, D)."""
    g = torch.Generator().manual_seed(seed)
    centres = 10 + 3 * torch.randn(n_classes, 1, dim, generator=g)
    return centres + 0.5 * torch.randn(n_classes, n_per_class, dim, generator=g)


@pytest.mark.parametrize("loss", ["wgan-gp", "nonsaturating"])
def test_train_feature_gan_is_finite_deterministic_and_uses_the_gan_losses(loss, monkeypatch):
    calls = []
    for name in ("critic_loss", "gradient_penalty", "discriminator_loss", "generator_loss_nonsaturating", "wgan_generator_loss"):
        original = getattr(gan, name)
        monkeypatch.setattr(f"fsl_course.dagan.{name}", lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        g, d = FeatureGenerator(4, 2, 16), PairDiscriminator(4, 16)
        history = train_feature_gan(g, d, cluster_features(), steps=3, batch_size=8, lr=1e-3, loss=loss, critic_steps=2, seed=1,
                                    progress=False)
        runs.append((history, g.state_dict()))
    history = runs[0][0]
    assert len(history["d_loss"]) == len(history["g_loss"]) == 3
    assert all(torch.isfinite(torch.tensor(v)).all() for v in history.values())
    assert runs[0][0] == runs[1][0] and all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    expected = {"critic_loss", "gradient_penalty", "wgan_generator_loss"} if loss == "wgan-gp" else {
        "discriminator_loss", "generator_loss_nonsaturating"}
    assert set(calls) == expected
    assert not g.training and not d.training


def test_train_feature_gan_rejects_bad_arguments():
    g, d = FeatureGenerator(4, 2, 8), PairDiscriminator(4, 8)
    with pytest.raises(ValueError, match="loss must be one of"):
        train_feature_gan(g, d, cluster_features(), steps=1, batch_size=2, lr=1e-3, loss="hinge", progress=False)
    with pytest.raises(ValueError, match="works on 4-dim features but the features have 3"):
        train_feature_gan(g, d, cluster_features(dim=3), steps=1, batch_size=2, lr=1e-3, progress=False)


def test_the_generator_learns_to_make_new_instances_of_the_source_class():
    torch.manual_seed(0)
    features = cluster_features(n_classes=8, n_per_class=10, dim=4)
    g, d = FeatureGenerator(4, 4, 32), PairDiscriminator(4, 32)
    with torch.no_grad():  # start far from the answer: G(h, z) = h + 5 s * noise-free offset
        g.net[-1].bias.fill_(5.0)
    g.set_feature_stats(features)
    before = generation_statistics(g, features, n=500)
    train_feature_gan(g, d, features, steps=300, batch_size=64, lr=3e-3, critic_steps=1, seed=0, progress=False)
    after = generation_statistics(g, features, n=500)
    assert before["nearest_class_generated"] < 0.5  # an offset of 5 s leaves the class
    assert after["nearest_class_generated"] > 0.9 and after["nearest_class_real"] > 0.9
    # as far from the source as a real instance of its class, and G uses its noise (no collapse to one point)
    assert 0.5 * after["same_class"] < after["generated_to_source"] < 2 * after["same_class"] < 0.5 * after["other_class"]
    assert after["generated_to_generated"] > 0.5 * after["same_class"]


def test_generation_statistics_on_identity_and_shift_generators():
    g = FeatureGenerator(4, 2, 8)
    torch.nn.init.zeros_(g.net[-1].weight)
    torch.nn.init.zeros_(g.net[-1].bias)
    features = cluster_features(dim=4)
    stats = generation_statistics(g, features, n=200)  # G(h, z) = h
    assert stats["generated_to_source"] == stats["generated_to_generated"] == 0
    assert stats["mean_generated_to_source"] == pytest.approx(0, abs=1e-5)  # the mean of 16 copies, rounded
    assert stats["negative_fraction"] == 0 and stats["nearest_class_generated"] > 0.9
    assert stats["nearest_class_real"] > 0.9 and stats["same_class"] < stats["other_class"]
    with torch.no_grad():  # G(h, z) = h + (3, 0, 4, 0) (s = 1): a fixed shift of length 5
        g.net[-1].bias.copy_(torch.tensor([3.0, 0.0, 4.0, 0.0]))
    stats = generation_statistics(g, features, n=200)
    assert stats["generated_to_source"] == pytest.approx(5) and stats["mean_generated_to_source"] == pytest.approx(5)
    assert stats["generated_to_generated"] == 0


def test_extract_features_is_dense_and_non_transductive():
    torch.manual_seed(0)
    backbone = PretrainFinetune(hidden=8).backbone.train()
    images = torch.rand(3, 4, 1, 28, 28)
    f = extract_features(backbone, images, "cpu", batch_size=5)
    assert f.shape == (3, 4, 8) and backbone.training  # mode restored
    backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(f[1, 2], backbone(images[1, 2:3])[0])


# --- the learner ---------------------------------------------------------------------------


def test_predict_returns_logits_and_is_deterministic():
    learner = small_learner()
    sx, sy, qx = random_episode()
    logits = learner.predict(sx, sy, qx)
    assert logits.shape == (15, 5) and torch.isfinite(logits).all()
    torch.testing.assert_close(learner.predict(sx, sy, qx), logits, rtol=0, atol=0)
    # each query on its own gets the same logits (the noise depends on the support set only)
    torch.testing.assert_close(learner.predict(sx, sy, qx[:2]), logits[:2])
    assert learner.name == "dagan" and LEARNERS["dagan"] is DAGANLearner


def test_without_augmentation_it_is_pretrain_finetune_to_the_bit():
    learner = small_learner()
    oracle = PretrainFinetune(hidden=16, norm="group", finetune_steps=30).eval()
    oracle.load_state_dict({k: v for k, v in learner.state_dict().items() if k.startswith("backbone.")})
    sx, sy, qx = random_episode(seed=3)
    expected = oracle.predict(sx, sy, qx)
    augmented = learner.predict(sx, sy, qx)
    assert not torch.allclose(augmented, expected, atol=1e-3)  # augmentation changes the head
    learner.augment = False
    torch.testing.assert_close(learner.predict(sx, sy, qx), expected, rtol=0, atol=0)
    learner.augment, learner.n_generated = True, 0
    torch.testing.assert_close(learner.predict(sx, sy, qx), expected, rtol=0, atol=0)
    torch.testing.assert_close(small_learner(augment=False).predict(sx, sy, qx), expected, rtol=0, atol=0)


def test_the_head_sees_the_generated_features(monkeypatch):
    learner = small_learner(n_generated=4)
    seen = []
    original = PretrainFinetune.finetune_head
    monkeypatch.setattr(PretrainFinetune, "finetune_head", lambda self, f, y, n: seen.append((f, y)) or original(self, f, y, n))
    sx, sy, qx = random_episode(way=3, shot=2)
    learner.predict(sx, sy, qx)
    (features, labels), = seen
    assert features.shape == (6 * 5, 16)  # 6 real + 6 x 4 generated
    with torch.no_grad():
        real = learner.backbone(sx)
    torch.testing.assert_close(features[:6], real)
    assert torch.equal(labels, torch.cat([sy, sy.repeat_interleave(4)]))
    fake, fake_y = learner.generate_features(real, sy, 4, episode_generator(sx, sy, learner.noise_seed))
    torch.testing.assert_close(features[6:], fake, rtol=0, atol=0)


def test_generated_features_have_the_right_shape_and_change_with_the_noise():
    learner = small_learner()
    h, y = torch.rand(3, 16), torch.tensor([0, 1, 1])
    fake, fake_y = learner.generate_features(h, y, 4, torch.Generator().manual_seed(0))
    assert fake.shape == (12, 16) and torch.equal(fake_y, torch.tensor([0] * 4 + [1] * 8))
    assert not fake.requires_grad
    assert (fake[0] - fake[1]).abs().max() > 1e-3  # two noises, one source: two features
    again, _ = learner.generate_features(h, y, 4, torch.Generator().manual_seed(0))
    other, _ = learner.generate_features(h, y, 4, torch.Generator().manual_seed(1))
    assert torch.equal(again, fake) and not torch.allclose(other, fake)
    with pytest.raises(ValueError, match=r"features must be features of shape \(B, D\) = \(B, 16\)"):
        learner.generate_features(torch.rand(3, 8), y, 2)
    with pytest.raises(ValueError, match="labels has 2 labels for 3 images"):
        learner.generate_features(h, y[:2], 2)


def test_episode_noise_depends_on_the_episode_and_the_seed():
    sx, sy, _ = random_episode()
    draw = lambda *args: torch.randn(3, generator=episode_generator(*args))  # noqa: E731
    assert torch.equal(draw(sx, sy, 0), draw(sx.clone(), sy.clone(), 0))
    assert not torch.equal(draw(sx, sy, 0), draw(sx, sy, 1))
    assert not torch.equal(draw(sx, sy, 0), draw(sx.flip(0), sy, 0))
    learner = small_learner()
    first = learner.predict(sx, sy, sx)
    learner.predict(*random_episode(seed=5))  # another episode in between changes nothing
    torch.testing.assert_close(learner.predict(sx, sy, sx), first, rtol=0, atol=0)
    learner.noise_seed = 1
    assert not torch.equal(learner.predict(sx, sy, sx), first)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_predict_works_inside_no_grad_and_inference_mode(context):
    learner = small_learner()
    sx, sy, qx = random_episode()
    expected = learner.predict(sx, sy, qx)
    with context():
        torch.testing.assert_close(learner.predict(sx, sy, qx), expected)
    assert all(p.grad is None for p in learner.parameters())


def test_learner_arguments_are_checked():
    with pytest.raises(ValueError, match="n_generated must be an int >= 0"):
        DAGANLearner(n_generated=-1)
    with pytest.raises(TypeError, match="augment must be True or False"):
        DAGANLearner(augment="yes")


def test_save_load_round_trip(tmp_path):
    learner = small_learner(n_generated=2, noise_seed=7)
    with torch.no_grad():
        learner.generator.feature_mean.fill_(0.3)  # buffers travel too
    path = save_learner(learner, tmp_path / "dagan.pt", seed=0)
    loaded = load_learner(path, device="cpu")
    assert isinstance(loaded, DAGANLearner) and loaded.training_info == {"seed": 0}
    assert (loaded.n_generated, loaded.noise_seed, loaded.augment, loaded.generator.noise_dim) == (2, 7, True, 16)
    assert loaded.config["kwargs"]["generator_hidden"] == 32
    sx, sy, qx = random_episode()
    torch.testing.assert_close(loaded.predict(sx, sy, qx), learner.predict(sx, sy, qx), rtol=0, atol=0)
    learner.augment, learner.n_generated = False, 4  # switched after construction: the checkpoint says so
    loaded = load_learner(save_learner(learner, tmp_path / "off.pt"), device="cpu")
    assert (loaded.augment, loaded.n_generated) == (False, 4)
    torch.testing.assert_close(loaded.predict(sx, sy, qx), learner.predict(sx, sy, qx), rtol=0, atol=0)


# --- the METHOD ----------------------------------------------------------------------------


def test_hyperparameters_per_budget():
    smoke, standard = dagan_hyperparameters(Budget("smoke")), dagan_hyperparameters(Budget("standard"))
    assert standard["loss"] in gan.LOSSES and standard["gan_steps"] > smoke["gan_steps"]
    from fsl_course.train import baseline_hyperparameters

    pretrain_hp = {k[len("pretrain_"):]: v for k, v in standard.items() if k.startswith("pretrain_")}
    assert pretrain_hp == baseline_hyperparameters(Budget("standard"))  # the backbone is the baseline's
    assert dagan_hyperparameters(Budget("full"))["feature_classes"] is None


def test_train_dagan_at_smoke_size_is_finite_deterministic_and_shares_the_baseline_backbone():
    from fsl_course.train import train_baseline

    images = torch.rand(10, 4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    runs = [train_dagan(images, Budget("smoke"), torch.device("cpu"), 3, False) for _ in range(2)]
    (learner, info), (again, _) = runs
    assert isinstance(learner, DAGANLearner) and learner.augmenting and not learner.training
    for key in ("final_pretrain_loss", "final_d_loss", "final_g_loss"):
        assert torch.isfinite(torch.tensor(info[key]))
    assert info["feature_classes"] == 8 and info["gan_steps"] == 4
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in learner.state_dict().items())
    torch.manual_seed(3)  # what `fsl-course train` does (seed_everything) before calling a METHOD
    baseline, _ = train_baseline(images, Budget("smoke"), torch.device("cpu"), 3, False)
    for key, value in baseline.state_dict().items():
        assert torch.equal(value, learner.state_dict()[key]), key
    sx, sy, qx = images[:5, :1].flatten(0, 1), torch.arange(5), images[:5, 1:].flatten(0, 1)
    assert learner.predict(sx, sy, qx).shape == (15, 5)
    learner.augment = False
    torch.testing.assert_close(learner.predict(sx, sy, qx), baseline.predict(sx, sy, qx), rtol=0, atol=0)


def test_a_dagan_checkpoint_loads_in_a_fresh_process(tmp_path):
    """load_learner imports the learner modules itself (LEARNER_MODULES): no `import fsl_course.dagan` needed."""
    import subprocess
    import sys

    from fsl_course.dagan import DAGANLearner
    from fsl_course.meta import save_learner

    path = save_learner(DAGANLearner(hidden=4, generator_hidden=8, noise_dim=2), tmp_path / "dagan.pt")
    code = f"from fsl_course.meta import load_learner; print(type(load_learner({str(path)!r}, device='cpu')).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "DAGANLearner"
