"""Conv-4 and the baselines: pixel nearest neighbour, pixel prototype, pretrain then fine-tune."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

from fsl_course.meta import (
    Conv4,
    PixelNearestNeighbour,
    PixelPrototype,
    PretrainFinetune,
    pretrain,
    prototypes,
    squared_distances,
)


def random_episode(way=5, shot=3, query=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    support_x = torch.rand(way * shot, 1, 28, 28, generator=g)
    support_y = torch.arange(way).repeat_interleave(shot)
    query_x = torch.rand(way * query, 1, 28, 28, generator=g)
    return support_x, support_y, query_x


def blob_images(n_classes, n_per_class, seed=0, noise=0.15):
    """Class c = a bright 7x7 square at a class-specific place, plus noise: (C, n, 1, 28, 28)."""
    g = torch.Generator().manual_seed(seed)
    images = noise * torch.rand(n_classes, n_per_class, 1, 28, 28, generator=g)
    for c in range(n_classes):
        r, s = divmod(c, 4)
        images[c, :, :, 7 * r : 7 * r + 7, 7 * s : 7 * s + 7] += 0.8
    return images.clamp(0, 1)


# --- Conv-4 ------------------------------------------------------------------------------


@pytest.mark.parametrize("size, dim", [(28, 64), (32, 256), (84, 1600)])
def test_conv4_feature_shape(size, dim):
    net = Conv4(norm="none")
    assert net.feature_dim(size, size) == dim
    assert net(torch.rand(2, 1, size, size)).shape == (2, dim)


@pytest.mark.parametrize(
    "norm, layer, bias", [("batch", torch.nn.BatchNorm2d, False), ("group", torch.nn.GroupNorm, False), ("none", torch.nn.Identity, True)]
)
def test_conv4_architecture(norm, layer, bias):
    net = Conv4(norm=norm)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.out_channels == 64 and c.kernel_size == (3, 3) for c in convs)
    assert all((c.bias is not None) == bias for c in convs)
    assert sum(isinstance(m, layer) for m in net.modules()) == 4
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 4


def test_conv4_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        Conv4(norm="layer")
    with pytest.raises(ValueError, match="H, W >= 16"):
        Conv4()(torch.rand(2, 1, 8, 8))


def test_batch_norm_in_eval_mode_embeds_each_image_on_its_own():
    torch.manual_seed(0)
    net = Conv4(norm="batch")
    x = torch.rand(6, 1, 28, 28)
    net.train()
    transductive = net(x)[:1], net(x[:1].repeat(2, 1, 1, 1))[:1]
    assert not torch.allclose(*transductive, atol=1e-3)  # train mode: depends on the batch
    net.eval()
    torch.testing.assert_close(net(x)[:1], net(x[:1]))  # eval mode: does not


# --- distances and prototypes ------------------------------------------------------------


def test_squared_distances_against_a_loop_and_cdist():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    d = squared_distances(a, b)
    loop = torch.tensor([[float(((ai - bj) ** 2).sum()) for bj in b] for ai in a])
    torch.testing.assert_close(d, loop)
    torch.testing.assert_close(d, torch.cdist(a, b) ** 2, rtol=1e-4, atol=1e-4)
    assert (squared_distances(a, a).diagonal() == 0).all()


def test_prototypes_are_class_means_even_for_unequal_class_sizes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g)
    y = torch.tensor([2, 0, 0, 1, 2, 2])
    expected = torch.stack([x[y == c].mean(0) for c in range(3)])
    torch.testing.assert_close(prototypes(x, y, 3), expected)


# --- pixel baselines ---------------------------------------------------------------------


def test_pixel_nearest_neighbour_logits_and_sklearn_agreement():
    sx, sy, qx = random_episode(way=4, shot=3, query=5)
    logits = PixelNearestNeighbour().predict(sx, sy, qx)
    flat_s, flat_q = sx.flatten(1), qx.flatten(1)
    for q in range(len(qx)):
        for c in range(4):
            nearest = min(float(((flat_q[q] - flat_s[i]) ** 2).sum()) for i in range(len(sx)) if sy[i] == c)
            assert logits[q, c].item() == pytest.approx(-nearest, rel=1e-5)
    knn = KNeighborsClassifier(n_neighbors=1).fit(flat_s.numpy(), sy.numpy())
    np.testing.assert_array_equal(logits.argmax(1).numpy(), knn.predict(flat_q.numpy()))


def test_pixel_nearest_neighbour_recognises_a_copy_of_a_support_image():
    sx, sy, _ = random_episode(way=5, shot=2)
    logits = PixelNearestNeighbour().predict(sx, sy, sx)
    assert torch.equal(logits.argmax(1), sy)
    assert torch.equal(logits.max(1).values, torch.zeros(len(sx)))


def test_pixel_prototype_logits_and_sklearn_agreement():
    sx, sy, qx = random_episode(way=5, shot=4, query=6, seed=1)
    logits = PixelPrototype().predict(sx, sy, qx)
    means = torch.stack([sx[sy == c].mean(0) for c in range(5)])
    expected = -((qx[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    torch.testing.assert_close(logits, expected)
    centroid = NearestCentroid().fit(sx.flatten(1).numpy(), sy.numpy())
    np.testing.assert_array_equal(logits.argmax(1).numpy(), centroid.predict(qx.flatten(1).numpy()))


def test_one_shot_prototype_equals_nearest_neighbour():
    sx, sy, qx = random_episode(way=5, shot=1, seed=2)
    torch.testing.assert_close(PixelPrototype().predict(sx, sy, qx), PixelNearestNeighbour().predict(sx, sy, qx))


@pytest.mark.parametrize("learner", [PixelNearestNeighbour(), PixelPrototype()])
def test_pixel_baselines_solve_well_separated_classes(learner):
    images = blob_images(5, 6)
    sx, sy = images[:, :3].flatten(0, 1), torch.arange(5).repeat_interleave(3)
    qx, qy = images[:, 3:].flatten(0, 1), torch.arange(5).repeat_interleave(3)
    assert torch.equal(learner.predict(sx, sy, qx).argmax(1), qy)


# --- pretrain then fine-tune ---------------------------------------------------------------


def small_baseline(**kwargs):
    torch.manual_seed(0)
    return PretrainFinetune(**{"hidden": 16, "finetune_steps": 100, **kwargs})


def test_finetuned_head_fits_the_support_set_and_is_deterministic():
    learner = small_baseline(norm="group")  # features of order 1 even without pre-training
    sx, sy, _ = random_episode(way=5, shot=2)
    logits = learner.predict(sx, sy, sx)
    assert torch.equal(logits.argmax(1), sy)  # a linear head on 16 features separates 10 points
    torch.testing.assert_close(learner.predict(sx, sy, sx), logits, rtol=0, atol=0)


def test_finetuning_is_non_transductive_and_leaves_the_backbone_untouched():
    learner = small_baseline().train()  # even if left in train mode by mistake
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    sx, sy, qx = random_episode()
    logits = learner.predict(sx, sy, qx)
    # each query's logits do not depend on the other queries
    torch.testing.assert_close(learner.predict(sx, sy, qx[:1]), logits[:1])
    assert learner.training and learner.backbone.training  # mode restored
    for key, value in learner.state_dict().items():  # weights and batch-norm statistics unchanged
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in learner.parameters())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_finetuning_works_inside_no_grad_and_inference_mode(context):
    learner = small_baseline(finetune_steps=20)
    sx, sy, qx = random_episode()
    expected = learner.predict(sx, sy, qx)
    with context():
        torch.testing.assert_close(learner.predict(sx, sy, qx), expected)


def test_finetune_steps_must_be_positive():
    with pytest.raises(ValueError, match="finetune_steps must be >= 1"):
        PretrainFinetune(finetune_steps=0)


def test_pretrain_reduces_the_loss_and_helps_on_new_classes():
    images = blob_images(16, 6, seed=3)
    train, test = images[:12], images[12:]  # 12 training classes, 4 held-out classes
    learner = small_baseline(finetune_steps=50)
    losses = pretrain(learner.backbone, SimpleNamespace(images=train), steps=60, batch_size=32, lr=3e-3, device="cpu", progress=False)
    assert len(losses) == 60 and not learner.backbone.training
    assert np.mean(losses[-10:]) < 0.5 * losses[0]
    sx, sy = test[:, :2].flatten(0, 1), torch.arange(4).repeat_interleave(2)
    qx, qy = test[:, 2:].flatten(0, 1), torch.arange(4).repeat_interleave(4)
    accuracy = (learner.predict(sx, sy, qx).argmax(1) == qy).float().mean().item()
    assert accuracy >= 0.9


def test_pretrain_is_seeded():
    images = blob_images(4, 5)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(pretrain(Conv4(hidden=8), images, steps=5, batch_size=8, lr=1e-3, device="cpu", progress=False, seed=1))
    assert runs[0] == runs[1]


def test_pretrain_rejects_a_non_dense_dataset():
    with pytest.raises(ValueError, match=r"dense \(C, n, 1, H, W\)"):
        pretrain(Conv4(), torch.rand(10, 1, 28, 28), steps=1, batch_size=2, lr=1e-3, device="cpu")
