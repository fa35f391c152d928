"""``fsl-course train``: every METHOD trains, saves a loadable checkpoint, and records how."""

import json
from types import SimpleNamespace

import pytest
import torch

from fsl_course import load_checkpoint
from fsl_course import train as train_module
from fsl_course.cli import main
from fsl_course.generative import load_model
from fsl_course.meta import LEARNERS, load_learner


@pytest.fixture
def tiny_data(monkeypatch):
    """Replace the dataset loader by a tiny random dense dataset; record the calls."""
    calls = []

    def load(name, split, root=None, *, rotations=False):
        calls.append((name, split, root, rotations))
        images = torch.rand(6, 4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        return SimpleNamespace(images=images, n_classes=6, n_per_class=4, name=name, split=split)

    monkeypatch.setattr(train_module.data, "load", load)
    return calls


def episode():
    g = torch.Generator().manual_seed(1)
    return torch.rand(10, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(2), torch.rand(5, 1, 28, 28, generator=g)


def test_each_method_names_a_registered_learner():
    assert {"pixel-nn", "pixel-prototype", "baseline"} <= set(train_module.METHODS)
    assert set(train_module.METHODS) <= set(LEARNERS)


@pytest.mark.parametrize("method", sorted(train_module.METHODS))
def test_train_saves_a_loadable_checkpoint_with_its_provenance(method, tiny_data, tmp_path, capsys):
    out = tmp_path / "runs" / f"{method}.pt"
    assert main(["train", method, "--dataset", "glyphs", "--budget", "smoke", "--out", str(out), "--seed", "3"]) == 0
    assert tiny_data == [("glyphs", "train", None, True)]

    printed = capsys.readouterr().out
    assert f"saved {out}" in printed and "wall time" in printed and "fsl-course eval" in printed

    learner = load_learner(out, device="cpu")
    assert learner.name == method
    info = learner.training_info
    assert info["command"] == f"fsl-course train {method} --dataset glyphs --budget smoke --out {out} --seed 3"
    assert (info["seed"], info["budget"], info["dataset"], info["split"], info["rotations"]) == (3, "smoke", "glyphs", "train", True)
    assert info["wall_time_s"] >= 0
    assert learner.predict(*episode()).shape == (5, 5)


def test_generative_methods_include_the_gans_with_budgets_that_grow():
    assert {"vae", "cvae", "set-vae", "dcgan", "wgan-gp", "cgan"} <= set(train_module.GENERATIVE_METHODS)
    assert train_module.GENERATIVE_METHODS["cgan"].rotations is False  # labels are the plain classes
    assert train_module.GENERATIVE_METHODS["dcgan"].rotations is None  # follows --no-rotations
    for sizes in (train_module.gan_hyperparameters, train_module.wgan_gp_hyperparameters):
        smoke, standard, full = (sizes(train_module.Budget(name)) for name in ("smoke", "standard", "full"))
        assert smoke["steps"] < 10 <= 100 < standard["steps"] < full["steps"] and full["steps"] >= 10_000
        assert smoke.keys() == standard.keys() == full.keys() and {"latent_dim", "hidden", "lr"} <= smoke.keys()
    assert train_module.wgan_gp_hyperparameters(train_module.Budget("full"))["critic_steps"] == 5  # as in the paper
    with pytest.raises(ValueError, match="unknown GAN method"):
        train_module.train_adversarial("stylegan")


@pytest.mark.parametrize("method", ["dcgan", "wgan-gp", "cgan"])
def test_the_same_seed_gives_the_same_gan_checkpoint(method, tiny_data, tmp_path):
    states = []
    for name in ("a.pt", "b.pt", "c.pt"):
        seed = "7" if name == "c.pt" else "4"
        assert main(["train", method, "--budget", "smoke", "--out", str(tmp_path / name), "--seed", seed]) == 0
        states.append(load_checkpoint(tmp_path / name)[0])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(value, states[1][key]) for key, value in states[0].items())
    assert not all(torch.equal(value, states[2][key]) for key, value in states[0].items())


def test_diffusion_methods_have_budgets_that_grow():
    assert train_module.GENERATIVE_METHODS["cond-ddpm"].rotations is False  # labels are the plain classes
    assert train_module.GENERATIVE_METHODS["ddpm"].rotations is None
    for conditional in (False, True):
        smoke, standard, full = (train_module.diffusion_hyperparameters(train_module.Budget(name), conditional)
                                 for name in ("smoke", "standard", "full"))
        assert smoke["steps"] < 10 <= 100 < standard["steps"] < full["steps"] and full["steps"] >= 10_000
        assert smoke.keys() == standard.keys() == full.keys() and ("p_uncond" in smoke) == conditional
    with pytest.raises(ValueError, match="unknown diffusion method"):
        train_module.train_denoising("score-sde")


@pytest.mark.parametrize("method", ["ddpm", "cond-ddpm"])
def test_the_same_seed_gives_the_same_diffusion_checkpoint_which_loads_and_samples(method, tiny_data, tmp_path):
    states = []
    for name, seed in (("a.pt", "4"), ("b.pt", "4"), ("c.pt", "7")):
        assert main(["train", method, "--budget", "smoke", "--out", str(tmp_path / name), "--seed", seed]) == 0
        states.append(load_checkpoint(tmp_path / name)[0])
    assert all(torch.equal(value, states[1][key]) for key, value in states[0].items())
    assert not all(torch.equal(value, states[2][key]) for key, value in states[0].items())
    model = load_model(tmp_path / "a.pt", device="cpu")
    config = load_checkpoint(tmp_path / "a.pt")[1]
    assert config["training"]["final_mse"] > 0 and config["training"]["schedule"] == "cosine"
    first = model.sample(2, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=3) if method == "ddpm" else \
        model.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0), sampler="ddim", steps=3, guidance=1.0)
    assert first.shape == (2, 1, 28, 28) and 0 <= first.min() and first.max() <= 1


def test_fsl_course_sample_takes_the_diffusion_options(tiny_data, tmp_path, capsys):
    ckpt, grid = tmp_path / "c.pt", tmp_path / "g.png"
    assert main(["train", "cond-ddpm", "--budget", "smoke", "--out", str(ckpt)]) == 0
    argv = ["sample", str(ckpt), "--n", "4", "--labels", "0,1", "--out", str(grid), "--scale", "1", "--device", "cpu"]
    assert main([*argv, "--sampler", "ddim", "--steps", "4", "--guidance", "3"]) == 0
    assert grid.exists() and "sampler ddim, steps 4, guidance 3.0" in capsys.readouterr().out
    assert main([*argv, "--steps", "4"]) != 0
    assert "add --sampler ddim" in capsys.readouterr().err
    gan = tmp_path / "gan.pt"
    assert main(["train", "dcgan", "--budget", "smoke", "--out", str(gan)]) == 0
    assert main(["sample", str(gan), "--out", str(grid), "--guidance", "1"]) != 0
    assert "only for diffusion models" in capsys.readouterr().err


def test_train_help_lists_the_gan_methods(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert all(f"{name}:" in printed for name in ("dcgan", "wgan-gp", "cgan"))
    assert "saved as model 'dcgan'" in printed and "never rotations" in printed


def test_baseline_training_is_recorded_and_changes_the_weights(tiny_data, tmp_path):
    out = tmp_path / "b.pt"
    assert main(["train", "baseline", "--budget", "smoke", "--out", str(out)]) == 0
    state, config = load_checkpoint(out)
    training = config["training"]
    assert training["steps"] == 8 and training["batch_size"] == 16 and training["final_loss"] > 0
    torch.manual_seed(0)  # the initialisation `fsl-course train --seed 0` starts from
    fresh = LEARNERS["baseline"]().state_dict()
    assert fresh.keys() == state.keys()
    assert not torch.equal(fresh["backbone.blocks.0.weight"], state["backbone.blocks.0.weight"])


def test_the_same_seed_gives_the_same_checkpoint(tiny_data, tmp_path):
    states = []
    for name in ("a.pt", "b.pt"):
        assert main(["train", "baseline", "--budget", "smoke", "--out", str(tmp_path / name), "--seed", "5"]) == 0
        states.append(load_checkpoint(tmp_path / name)[0])
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_options_reach_the_loader_and_the_record(tiny_data, tmp_path):
    out = tmp_path / "p.pt"
    argv = ["train", "pixel-nn", "--dataset", "omniglot", "--root", "/data/omni", "--no-rotations", "--budget", "smoke", "--out", str(out)]
    assert main(argv) == 0
    assert tiny_data == [("omniglot", "train", "/data/omni", False)]
    info = load_learner(out).training_info
    assert "--root /data/omni" in info["command"] and info["command"].endswith("--no-rotations")
    assert info["rotations"] is False


def test_budget_defaults_to_the_environment(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FSL_COURSE_BUDGET", "smoke")
    out = tmp_path / "p.pt"
    assert main(["train", "pixel-prototype", "--out", str(out)]) == 0
    assert load_learner(out).training_info["budget"] == "smoke"


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "telepathy", "--out", "x.pt"],
        ["train", "baseline", "--budget", "huge", "--out", "x.pt"],
        ["train", "baseline"],  # --out is required
    ],
)
def test_bad_command_lines_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_train_then_eval_on_real_data(tmp_path, capsys):
    """The whole cycle on the bundled digits: train (smoke), then `fsl-course eval` the checkpoint."""
    out = tmp_path / "baseline.pt"
    assert main(["train", "baseline", "--dataset", "digits", "--budget", "smoke", "--out", str(out)]) == 0
    assert "digits/train (20 classes incl. rotations" in capsys.readouterr().out  # 5 digits x 4 rotations
    assert main(["eval", str(out), "--dataset", "digits", "--way", "5", "--shot", "1", "--episodes", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["accuracy"] <= 1 and result["episodes"] == 3 and result["checkpoint"] == str(out)


def test_a_bad_dataset_is_one_clear_error(tmp_path, capsys):
    assert main(["train", "pixel-nn", "--dataset", "mnist", "--out", str(tmp_path / "x.pt")]) == 2
    assert "unknown dataset 'mnist'" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


META = ["protonet", "matching", "relation", "maml", "fomaml", "reptile", "mann", "hypernet"]


def test_every_meta_learner_is_a_resumable_method_with_budgets_that_grow():
    from fsl_course.budgets import Budget

    for name in META:
        method = train_module.METHODS[name]
        assert method.resumable and method.steps_override
        steps = [train_module.meta_hyperparameters(name, Budget(b))["steps"] for b in ("smoke", "standard", "full")]
        assert steps == sorted(steps) and steps[0] < steps[1] < steps[2]
        smoke = train_module.meta_hyperparameters(name, Budget("smoke"))
        assert (smoke["way"], smoke["query"]) == (5, 2)  # fits any dataset of 5 classes of 3 images


def test_an_interrupted_training_resumes_from_its_state_and_ends_where_an_uninterrupted_one_does(tiny_data, tmp_path, monkeypatch, capsys):
    argv = ["train", "protonet", "--budget", "smoke", "--steps", "8"]
    assert main([*argv, "--out", str(tmp_path / "straight.pt")]) == 0

    out = tmp_path / "run.pt"
    original, calls = LEARNERS["protonet"].loss, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(LEARNERS["protonet"], "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(out)])
    assert (tmp_path / "run.pt.partial").exists() and not out.exists()
    assert "interrupted at step 4 of 8" in capsys.readouterr().out
    monkeypatch.setattr(LEARNERS["protonet"], "loss", original)
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "continuing it" in printed and "resuming from step 4 of 8" in printed
    assert not (tmp_path / "run.pt.partial").exists()
    straight, resumed = load_checkpoint(tmp_path / "straight.pt")[0], load_checkpoint(out)[0]
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def test_restart_discards_the_state_of_an_interrupted_run_with_other_settings(tiny_data, tmp_path, capsys):
    out = tmp_path / "run.pt"
    (tmp_path / "run.pt.partial").write_bytes(b"from another run")
    assert main(["train", "matching", "--budget", "smoke", "--out", str(out)]) == 2
    assert "not a readable resume file" in capsys.readouterr().err
    assert main(["train", "matching", "--budget", "smoke", "--out", str(out), "--restart"]) == 0
    assert "--restart: removed" in capsys.readouterr().out and out.exists()


def test_a_meta_learner_evaluates_on_omniglot_in_the_official_layout(tmp_path, monkeypatch, capsys):
    from test_data import make_omniglot

    monkeypatch.setenv("FSL_COURSE_CACHE", str(tmp_path / "cache"))
    root = make_omniglot(tmp_path / "omniglot")
    out = tmp_path / "protonet.pt"
    assert main(["train", "protonet", "--dataset", "omniglot", "--root", str(root), "--budget", "smoke", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--dataset", "omniglot", "--root", str(root), "--way", "5", "--shot", "1", "--query", "3",
                 "--episodes", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["dataset"], result["split"], result["way"], result["episodes"]) == ("omniglot", "test", 5, 4)
