"""The few-shot learners of lessons 09-11: one interface, the equations they claim, checkpoints,
and the resumable episodic training loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from fsl_course.episodes import EpisodeSampler
from fsl_course.meta import LEARNERS, load_learner, parameters_of, prototypes, reptile_update, save_learner, train_episodic
from fsl_course.meta.hypernet import HyperNetLearner
from fsl_course.meta.maml import MAML, Reptile
from fsl_course.meta.mann import shifted_labels
from fsl_course.meta.matching import attention_log_probs, cosine_similarities
from fsl_course.meta.protonet import ProtoNet, prototype_linear_weights, squared_distances
from fsl_course.meta.relation import relation_pairs

META = ["protonet", "matching", "relation", "maml", "fomaml", "reptile", "mann", "hypernet"]


def images(n, seed):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def make_episode(way=5, shot=2, query=3, seed=0):
    labels = torch.arange(way)
    return images(way * shot, seed), labels.repeat_interleave(shot), images(way * query, seed + 1), labels.repeat_interleave(query)


def dense(n_classes=8, n_per_class=6, seed=0):
    """A tiny dense dataset (C, n, 1, 28, 28) whose classes differ in brightness, so they can be learned."""
    base = torch.rand(n_classes, 1, 1, 1, 1, generator=torch.Generator().manual_seed(seed))
    return (base + 0.3 * torch.rand(n_classes, n_per_class, 1, 28, 28, generator=torch.Generator().manual_seed(seed + 1))).clamp(0, 1)


def built(name):
    torch.manual_seed(0)
    return LEARNERS[name]()


@pytest.mark.parametrize("name", META)
@pytest.mark.parametrize("way,shot", [(5, 1), (3, 2)])
def test_every_learner_gives_logits_and_a_loss_with_gradients_everywhere(name, way, shot):
    learner = built(name).train()
    sx, sy, qx, qy = make_episode(way, shot)
    loss = learner.loss(sx, sy, qx, qy)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in learner.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient reaches {missing}"
    learner.eval()
    with torch.no_grad():
        logits = learner.predict(sx, sy, qx)
    assert logits.shape == (way * 3, way) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", META)
def test_queries_are_answered_independently_at_test_time(name):
    """Non-transductive evaluation: a query's logits do not depend on the other queries."""
    learner = built(name).eval()
    sx, sy, qx, _ = make_episode()
    with torch.no_grad():
        together = learner.predict(sx, sy, qx)
        alone = torch.cat([learner.predict(sx, sy, qx[i : i + 1]) for i in range(len(qx))])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", META)
def test_a_saved_learner_loads_and_predicts_the_same(name, tmp_path):
    learner = built(name)
    with torch.no_grad():  # move every parameter off its initial value, so a load that skipped one would show
        for p in learner.parameters():
            p.add_(0.01 * torch.randn_like(p))
    learner.eval()
    sx, sy, qx, _ = make_episode()
    with torch.no_grad():
        before = learner.predict(sx, sy, qx)
    save_learner(learner, tmp_path / "l.pt", command="test")
    loaded = load_learner(tmp_path / "l.pt", device="cpu")
    assert type(loaded) is type(learner) and loaded.training_info["command"] == "test"
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(sx, sy, qx), before)


def test_protonet_logits_are_negative_squared_distances_to_class_means_and_a_linear_classifier():
    learner = built("protonet").eval()
    sx, sy, qx, _ = make_episode(way=4, shot=3)
    with torch.no_grad():
        logits = learner.predict(sx, sy, qx)
        fs, fq = learner.backbone(sx), learner.backbone(qx)
    by_loop = torch.tensor([[-((fq[q] - fs[sy == c].mean(0)) ** 2).sum() for c in range(4)] for q in range(len(qx))])
    torch.testing.assert_close(logits, by_loop, rtol=1e-5, atol=1e-4)
    weight, bias = prototype_linear_weights(prototypes(fs, sy, 4))
    gap = logits - (fq @ weight.T + bias)  # should be -||f(x_q)||^2 for every class
    torch.testing.assert_close(gap, -fq.pow(2).sum(1, keepdim=True).expand_as(gap), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(squared_distances(fq, fs), torch.cdist(fq, fs).pow(2), rtol=1e-4, atol=1e-3)


def test_matching_probabilities_are_the_attention_weighted_label_vote():
    g = torch.Generator().manual_seed(0)
    query, support = torch.randn(4, 6, generator=g), torch.randn(7, 6, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    cos = cosine_similarities(query, support)
    expected_cos = torch.tensor([[float(F.cosine_similarity(q, s, dim=0)) for s in support] for q in query])
    torch.testing.assert_close(cos, expected_cos)
    log_p = attention_log_probs(5 * cos, labels, 3)
    attention = torch.softmax(5 * cos, dim=1)
    vote = attention @ F.one_hot(labels, 3).float()
    torch.testing.assert_close(log_p.exp(), vote)
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(4))


def test_relation_pairs_are_query_major_and_class_maps_average_the_shots():
    q, e = torch.randn(3, 2, 7, 7), torch.randn(4, 2, 7, 7)
    pairs = relation_pairs(q, e)
    assert pairs.shape == (12, 4, 7, 7)
    torch.testing.assert_close(pairs[2 * 4 + 1], torch.cat([q[2], e[1]]))
    learner = built("relation").eval()
    sx, sy, qx, qy = make_episode(way=3, shot=2)
    captured = {}

    def keep_pairs(module, args, out):
        captured.setdefault("pairs", args[0])

    learner.relation.register_forward_hook(keep_pairs)
    with torch.no_grad():
        scores = learner.predict(sx, sy, qx)
        maps = learner.backbone(sx)
    assert ((scores > 0) & (scores < 1)).all()
    torch.testing.assert_close(captured["pairs"][1, 64:], (maps[2] + maps[3]) / 2)  # query 0, class 1: the mean of its 2 shots
    learner.train()
    scores = learner.predict(sx, sy, qx)
    torch.testing.assert_close(learner.loss(sx, sy, qx, qy), ((scores - F.one_hot(qy, 3)) ** 2).mean(), rtol=1e-4, atol=1e-6)


def test_maml_head_starts_equal_for_every_class_and_adapts_from_the_support_set():
    assert MAML().test_inner_steps == MAML().inner_steps == 1  # test as trained
    learner = MAML(test_inner_steps=0).eval()
    sx, sy, qx, _ = make_episode()
    with torch.no_grad():
        logits = learner.predict(sx, sy, qx)
    assert torch.equal(logits, logits[:, :1].expand_as(logits))  # no adaptation: no preference
    stripes = torch.zeros(5, 1, 28, 28)  # class c: a bright band at rows 5c..5c+5
    for c in range(5):
        stripes[c, 0, 5 * c : 5 * c + 6] = 1.0
    labels = torch.arange(5)
    learner = MAML(test_inner_steps=20).eval()
    with torch.no_grad():  # after adapting to them, the support images themselves are classified correctly
        assert (learner.predict(stripes, labels, stripes).argmax(1) == labels).all()


def test_maml_train_mode_loss_is_the_core_meta_loss_and_the_head_row_gets_the_sum_of_its_copies():
    from fsl_course.meta import maml_loss

    learner = MAML().train()
    sx, sy, qx, qy = make_episode(way=3, shot=1)
    loss = learner.loss(sx, sy, qx, qy)
    core = maml_loss(learner, learner.initial_params(3), sx, sy, qx, qy, steps=1, inner_lr=learner.inner_lr)
    torch.testing.assert_close(loss, core)
    (g_row,) = torch.autograd.grad(loss, learner.head.weight)
    expanded = {k: v.detach().clone().requires_grad_() for k, v in learner.initial_params(3).items()}
    copies = torch.autograd.grad(maml_loss(learner, expanded, sx, sy, qx, qy, steps=1, inner_lr=learner.inner_lr),
                                 expanded["head.weight"])[0]
    assert copies.shape == (3, learner.head.weight.shape[1])
    torch.testing.assert_close(g_row, copies.sum(0, keepdim=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["maml", "fomaml"])
def test_vmap_over_the_meta_batch_equals_the_loop(name):
    sampler = EpisodeSampler(dense(), 5, 1, 2, seed=0)
    episodes = [sampler.sample() for _ in range(3)]
    losses, grads = [], []
    for vectorise in (False, True):
        torch.manual_seed(0)
        learner = LEARNERS[name](vectorise=vectorise).train()
        loss = learner.batch_loss(episodes)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(learner.parameters())))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_one_sgd_step_on_the_reptile_surrogate_is_the_reptile_update():
    torch.manual_seed(0)
    learner = Reptile(inner_steps=2).train()
    sx, sy, qx, qy = make_episode(way=3, shot=1)
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    torch.manual_seed(1)
    learner.zero_grad()
    learner.loss(sx, sy, qx, qy).backward()
    torch.optim.SGD(learner.parameters(), lr=0.3).step()
    by_optimizer = {k: v.clone() for k, v in parameters_of(learner).items()}

    learner.load_state_dict(state)
    adapted = learner.adapt(torch.cat([sx, qx]), torch.cat([sy, qy]), 3, 2, True)
    adapted = {k: (v.mean(0, keepdim=True) if k.startswith("head.") and v.ndim == 2 else v.mean().reshape(1) if k == "head.bias" else v)
               for k, v in adapted.items()}
    reptile_update(parameters_of(learner), adapted, 0.3)
    for k, v in parameters_of(learner).items():
        torch.testing.assert_close(by_optimizer[k], v, rtol=1e-5, atol=1e-6)


def test_mann_feeds_each_label_one_step_late():
    shifted = shifted_labels(torch.tensor([2, 0, 1]), 4)
    torch.testing.assert_close(shifted, torch.tensor([[0.0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]))


def test_mann_uses_the_support_labels_and_is_consistent_under_relabelling():
    learner = built("mann").eval()
    sx, sy, qx, _ = make_episode(way=3, shot=1)
    with torch.no_grad():
        logits = learner.predict(sx, sy, qx)
        swapped = learner.predict(sx[[1, 0, 2]], sy, qx)  # images of classes 0 and 1 swap their labels
    assert not torch.allclose(logits, swapped)
    with pytest.raises(ValueError, match="label slots"):
        learner.predict(images(21, 0), torch.arange(21), qx)


def test_an_untrained_hypernetwork_is_half_the_prototypical_network():
    torch.manual_seed(0)
    hyper = HyperNetLearner().eval()
    proto = ProtoNet()
    proto.backbone.load_state_dict(hyper.backbone.state_dict())
    proto.eval()
    sx, sy, qx, _ = make_episode()
    with torch.no_grad():
        gap = 2 * hyper.predict(sx, sy, qx) - proto.predict(sx, sy, qx)  # -||f(x_q)||^2... per query, not per class
    torch.testing.assert_close(gap, gap[:, :1].expand_as(gap), rtol=1e-5, atol=1e-3)


def test_episodic_training_lowers_the_loss():
    torch.manual_seed(0)
    learner = ProtoNet()
    history = train_episodic(learner, dense(), way=5, shot=1, query=3, steps=30, lr=3e-3, progress=False)
    assert len(history["loss"]) == 30
    assert sum(history["loss"][-5:]) < 0.7 * sum(history["loss"][:5])
    assert not learner.training


class Interrupting(ProtoNet):
    """Raises KeyboardInterrupt in its ``stop_at``-th loss call (like Ctrl-C during training)."""

    calls, stop_at = 0, None

    def loss(self, *args):
        type(self).calls += 1
        if type(self).calls == self.stop_at:
            raise KeyboardInterrupt
        return super().loss(*args)


@pytest.mark.parametrize("meta_batch", [1, 2])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, meta_batch):
    settings = dict(way=5, shot=1, query=2, steps=12, lr=3e-3, meta_batch=meta_batch, progress=False)
    torch.manual_seed(0)
    straight = ProtoNet()
    train_episodic(straight, dense(), **settings)

    resume = tmp_path / "run.pt.partial"
    torch.manual_seed(0)
    learner = Interrupting()
    Interrupting.calls, Interrupting.stop_at = 0, 7 * meta_batch  # mid-run, inside a meta-batch when meta_batch = 2
    with pytest.raises(KeyboardInterrupt):
        train_episodic(learner, dense(), **settings, resume=resume)
    assert resume.exists()
    torch.manual_seed(123)  # a new process: another initialisation and global random state
    learner = Interrupting()
    Interrupting.stop_at = None
    history = train_episodic(learner, dense(), **settings, resume=resume)
    assert len(history["loss"]) == 12 and not resume.exists()
    for (name, a), b in zip(straight.state_dict().items(), learner.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_resume_file_from_other_settings_or_garbage_is_refused_clearly(tmp_path):
    resume = tmp_path / "run.pt.partial"
    learner = Interrupting()
    Interrupting.calls, Interrupting.stop_at = 0, 3
    with pytest.raises(KeyboardInterrupt):
        train_episodic(learner, dense(), way=5, shot=1, query=2, steps=10, lr=1e-3, progress=False, resume=resume, save_every_s=0)
    with pytest.raises(ValueError, match="different settings"):
        train_episodic(ProtoNet(), dense(), way=5, shot=1, query=2, steps=10, lr=2e-3, progress=False, resume=resume)
    resume.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable resume file"):
        train_episodic(ProtoNet(), dense(), way=5, shot=1, query=2, steps=10, lr=1e-3, progress=False, resume=resume)


def test_inner_steps_must_be_counts():
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(inner_steps=-1)
    with pytest.raises(ValueError, match="test_inner_steps"):
        MAML(test_inner_steps=1.5)
    assert math.isclose(MAML().inner_lr, 0.4)
