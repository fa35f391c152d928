"""Episodic accuracy and its 95% confidence interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fsl_course.data import load
from fsl_course.evaluation import evaluate, mean_ci95


def test_ci_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.4, 1.0, size=600)
    mean, ci = mean_ci95(a)
    assert mean == pytest.approx(a.mean())
    # independent oracle: the normal quantile times the standard error of the mean
    assert ci == pytest.approx(stats.norm.ppf(0.975) * stats.sem(a), rel=1e-12)
    assert ci == pytest.approx(1.96 * a.std(ddof=1) / math.sqrt(600), rel=1e-3)


def test_ci_covers_the_true_accuracy_95_percent_of_the_time():
    """Simulate many evaluations of a learner whose true accuracy is 0.7."""
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(2000):
        a = rng.binomial(15 * 5, 0.7, size=200) / 75
        m, ci = mean_ci95(a)
        hits += abs(m - 0.7) <= ci
    assert 0.93 < hits / 2000 < 0.97


def test_ci_needs_two_episodes():
    with pytest.raises(ValueError, match="at least 2"):
        mean_ci95([1.0])


class Oracle:
    """Cheats with the pixel values: returns the right class (the query equals a support image
    of its class in this dataset, where all instances of a class are identical)."""

    def predict(self, support_x, support_y, query_x):
        d = torch.cdist(query_x.flatten(1), support_x.flatten(1))
        return -torch.stack([d[:, support_y == c].min(1).values for c in range(int(support_y.max()) + 1)], 1)


class Constant:
    def predict(self, support_x, support_y, query_x):
        return torch.zeros(len(query_x), int(support_y.max()) + 1)


@pytest.fixture(scope="module")
def digits():
    return load("digits", "test")


def test_evaluate_perfect_and_chance(digits):
    same = digits.images[:, :1].expand_as(digits.images).contiguous()
    copy = type(digits)(same, digits.class_names, digits.alphabets, "digits", "test")
    perfect = evaluate(Oracle(), copy, way=5, shot=1, episodes=20, progress=False)
    assert perfect.accuracy == 1.0 and perfect.ci95 == 0.0
    chance = evaluate(Constant(), digits, way=5, shot=1, episodes=20, progress=False)
    assert chance.accuracy == pytest.approx(0.2)  # argmax of ties is label 0: 1 in 5
    assert chance.protocol == {"dataset": "digits", "split": "test", "way": 5, "shot": 1, "query": 15, "episodes": 20, "seed": 0}


def test_evaluate_is_paired_across_learners(digits):
    a = evaluate(Oracle(), digits, way=5, shot=1, episodes=30, seed=7, progress=False)
    b = evaluate(Oracle(), digits, way=5, shot=1, episodes=30, seed=7, progress=False)
    c = evaluate(Oracle(), digits, way=5, shot=1, episodes=30, seed=8, progress=False)
    assert np.array_equal(a.accuracies, b.accuracies) and not np.array_equal(a.accuracies, c.accuracies)


def test_wrong_logit_shape_is_a_clear_error(digits):
    class Bad:
        def predict(self, support_x, support_y, query_x):
            return torch.zeros(len(query_x), 3)

    with pytest.raises(ValueError, match=r"predict returned logits of shape \(75, 3\), expected \(75, 5\)"):
        evaluate(Bad(), digits, way=5, shot=1, episodes=2, progress=False)


# --------------------------------------------------------------------------- fsl-course eval on generative checkpoints


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory):
    from fsl_course.generative import save_model
    from fsl_course.vae import ConvVAE, train_vae

    torch.manual_seed(0)
    model = ConvVAE(latent_dim=4, hidden=8)
    train_vae(model, load("glyphs", "train"), steps=3, batch_size=8, lr=1e-3, device="cpu", progress=False)
    return save_model(model, tmp_path_factory.mktemp("eval") / "vae.pt", command="test", seed=0, budget="smoke")


def eval_json(capsys, *argv) -> dict:
    import argparse
    import json

    from fsl_course import evaluation

    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    assert evaluation.run(parser.parse_args([*map(str, argv), "--json", "--device", "cpu"])) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_of_a_vae_reports_frechet_few_shot_scores_and_nll(vae_checkpoint, capsys):
    report = eval_json(capsys, vae_checkpoint, "--samples", 40, "--episodes", 2, "--gen-samples", 4,
                       "--nll-k", 3, "--nll-images", 6, "--baselines")
    assert (report["model"], report["kind"], report["few_shot_method"]) == ("vae", "unconditional", "prototype-latent sampling")
    assert report["frechet"]["n_samples"] == 40 and report["frechet"]["fd"] > report["frechet"]["fd_real"] >= 0
    assert [entry["shot"] for entry in report["few_shot"]] == [1, 5]
    assert all(entry["method"]["episodes"] == 2 and entry["real"]["episodes"] == 2 for entry in report["few_shot"])
    assert report["nll"]["k"] == 3 and report["nll"]["images"] == 6 and report["nll"]["nll"] > 0
    assert "conditional" not in report
    for entry, baseline in zip(report["few_shot"], report["baselines"], strict=True):
        assert baseline["shot"] == entry["shot"] and baseline["augment_shots"]["episodes"] == 2
        assert baseline["random_samples"]["generate"] == "random_samples"


def test_eval_nll_is_deterministic_and_decreases_with_k(vae_checkpoint):
    from fsl_course.evaluation import estimate_nll
    from fsl_course.generative import load_model

    model, test = load_model(vae_checkpoint, device="cpu"), load("glyphs", "test")
    first, again = estimate_nll(model, test, 4, 8, 0, "cpu"), estimate_nll(model, test, 4, 8, 0, "cpu")
    assert first == again
    assert estimate_nll(model, test, 64, 8, 0, "cpu")["nll"] < estimate_nll(model, test, 1, 8, 0, "cpu")["nll"]
