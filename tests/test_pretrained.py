"""The pre-trained models shipped in fsl_course/pretrained (diffusion models and meta-learners):
present, small, loadable, made by the recorded `fsl-course train` command, and actually trained."""

import shlex

import pytest
import torch

from fsl_course import budget, data, pretrained
from fsl_course import train as train_module
from fsl_course.cli import build_parser
from fsl_course.diffusion import noise_prediction_loss
from fsl_course.gan import to_tanh_range


def test_the_shipped_files_fit_the_size_limit():
    sizes = {name: pretrained.path(name).stat().st_size for name in pretrained.NAMES}
    assert sum(sizes.values()) <= pretrained.MAX_TOTAL_BYTES, sizes


@pytest.mark.parametrize("name", pretrained.NAMES)
def test_each_file_records_the_documented_command_and_it_parses_back(name):
    config = pretrained.config(name)
    assert config["command"] == pretrained.recreate_command(name) == pretrained.RECIPES[name]
    assert config["seed"] == 0 and config["budget"] == "standard" and config.get("model", config.get("learner")) == name
    argv = shlex.split(config["command"])
    assert argv[:3] == ["fsl-course", "train", name]
    args = build_parser("train").parse_args(argv[1:])
    assert train_module.command_line(args, budget(args.budget)) == config["command"]  # the command is canonical
    assert args.out == f"fsl_course/pretrained/{name}.pt"
    if name in pretrained.LEARNER_NAMES:  # exactly the standard budget
        assert args.steps is None and config["training"]["steps"] == train_module.meta_hyperparameters(name, budget("standard"))["steps"]
    else:
        assert config["training"]["steps"] == args.steps


@pytest.mark.parametrize("name", pretrained.LEARNER_NAMES)
def test_each_shipped_learner_loads_on_the_cpu_and_has_learned(name):
    from fsl_course.evaluation import evaluate

    learner = pretrained.load(name, device="cpu")
    assert learner.name == name and not learner.training
    result = evaluate(learner, data.load("glyphs", "test"), way=5, shot=1, query=5, episodes=10, seed=1, device="cpu")
    assert result.accuracy > 0.45  # chance 0.2, an untrained Conv-4 about 0.4; the shipped learners 0.6-0.95 on 600 episodes


@pytest.mark.parametrize("name", [n for n in pretrained.NAMES if n not in pretrained.LEARNER_NAMES])
def test_each_shipped_model_loads_on_the_cpu_and_predicts_noise(name):
    model = pretrained.load(name, device="cpu")
    assert model.name == name and not model.training
    images = data.load("glyphs", "train").images[:64, 0]  # one image of each of 64 training classes
    x0 = to_tanh_range(images)
    kwargs = {}
    if name == "cond-ddpm":
        kwargs["labels"] = torch.arange(64)
    elif name == "set-ddpm":
        with torch.no_grad():
            cond, image = model.embed_sets(data.load("glyphs", "train").images[:64, 1:4])
        kwargs = {"cond": cond, "cond_image": image}
    with torch.no_grad():
        loss = noise_prediction_loss(lambda x, t: model.unet(x, t, **kwargs), x0, model.schedule, torch.Generator().manual_seed(0)).item()
    assert loss < 0.15  # an untrained U-Net scores about 1 (it predicts 0)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="ships ddpm, cond-ddpm, set-ddpm, protonet"):
        pretrained.path("stable-diffusion")
    with pytest.raises(ValueError, match="ships"):
        pretrained.recreate_command("vae")
