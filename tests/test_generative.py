"""Generative models: the registry, checkpoints, ``fsl-course train vae|cvae|set-vae|dcgan|wgan-gp|cgan``,
``fsl-course sample`` and ``fsl-course eval`` of generative checkpoints."""

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fsl_course import CheckpointError, load_checkpoint, save_checkpoint
from fsl_course import train as train_module
from fsl_course.cli import main
from fsl_course.generative import GENERATORS, GenerativeModel, load_model, model_kind, register_model, save_model
from fsl_course.meta import PixelPrototype, save_learner
from fsl_course.gan import GAN, ConditionalGAN
from fsl_course.sample import load_support_images
from fsl_course.vae import ConditionalVAE, ConvVAE, SetVAE

SMALL = {"vae": lambda: ConvVAE(latent_dim=3, hidden=4), "cvae": lambda: ConditionalVAE(5, latent_dim=3, hidden=4),
         "set-vae": lambda: SetVAE(latent_dim=3, context_dim=2, hidden=4),
         "dcgan": lambda: GAN(latent_dim=3, hidden=4), "cgan": lambda: ConditionalGAN(5, latent_dim=3, hidden=4)}
KINDS = {"vae": "unconditional", "cvae": "conditional", "set-vae": "few-shot", "dcgan": "unconditional", "cgan": "conditional"}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def draw(model, seed=0):
    """What the model generates, whatever its kind, for a fixed seed."""
    kind = model_kind(model)
    if kind == "unconditional":
        return model.sample(4, generator=gen(seed))
    if kind == "conditional":
        return model.sample(torch.tensor([0, 4, 2]), generator=gen(seed))
    return model.generate(torch.rand(3, 1, 28, 28, generator=gen(99)), 4, generator=gen(seed))


@pytest.fixture
def tiny_data(monkeypatch):
    """Replace the dataset loader by a tiny random dense dataset; record the calls."""
    calls = []

    def load(name, split, root=None, *, rotations=False):
        calls.append((name, split, root, rotations))
        images = torch.rand(6, 4, 1, 28, 28, generator=gen(0))
        names = [f"A/{c}" for c in "abcdef"]
        return SimpleNamespace(images=images, n_classes=6, n_per_class=4, name=name, split=split, class_names=names)

    monkeypatch.setattr(train_module.data, "load", load)
    return calls


# --------------------------------------------------------------------------- registry and checkpoints


def test_the_vae_and_gan_models_are_registered_with_their_kinds():
    registered = {"vae": ConvVAE, "cvae": ConditionalVAE, "set-vae": SetVAE, "dcgan": GAN, "cgan": ConditionalGAN}
    assert registered.items() <= GENERATORS.items()
    assert {name: model_kind(make()) for name, make in SMALL.items()} == KINDS
    assert ConditionalVAE(7, hidden=4).config == {"model": "cvae", "kwargs": {"n_classes": 7, "latent_dim": 16, "hidden": 4}}
    with pytest.raises(TypeError, match="not a generative model"):
        model_kind(PixelPrototype())


def test_register_model_refuses_non_models_and_name_clashes():
    with pytest.raises(TypeError, match="decorates GenerativeModel subclasses"):
        register_model("x")(PixelPrototype)
    with pytest.raises(ValueError, match="'vae' is already registered"):
        register_model("vae")(type("Other", (GenerativeModel,), {}))
    with pytest.raises(TypeError, match="JSON-able"):
        ConvVAE(latent_dim=torch.tensor(3))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_save_and_load_round_trip_gives_the_same_model(name, tmp_path):
    torch.manual_seed(0)
    model = SMALL[name]().eval()
    path = save_model(model, tmp_path / f"{name}.pt", seed=3, budget="smoke")
    loaded = load_model(path, device="cpu")
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.training_info == {"seed": 3, "budget": "smoke"}
    assert torch.equal(draw(loaded), draw(model))
    assert not torch.equal(draw(loaded, seed=1), draw(model))


def test_load_model_explains_what_is_wrong(tmp_path):
    learner = save_learner(PixelPrototype(), tmp_path / "learner.pt")
    with pytest.raises(ValueError, match=r"few-shot learner checkpoint \(learner 'pixel-prototype'\).*fsl-course eval"):
        load_model(learner)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable fsl-course checkpoint"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "other.pt", {}, {"something": 1})
    with pytest.raises(ValueError, match="not of a generative model"):
        load_model(tmp_path / "other.pt")
    save_checkpoint(tmp_path / "gan.pt", {}, {"model": "stylegan9", "kwargs": {}})
    with pytest.raises(ValueError, match=r"'stylegan9'.*known models: ") as unknown:
        load_model(tmp_path / "gan.pt")
    assert {"cvae", "set-vae", "vae"} <= set(str(unknown.value).split("known models: ")[1].rstrip(".").split(", "))
    state, config = load_checkpoint(save_model(ConvVAE(latent_dim=3, hidden=4), tmp_path / "v.pt"))
    save_checkpoint(tmp_path / "mismatch.pt", state, {**config, "kwargs": {"latent_dim": 5, "hidden": 4}})
    with pytest.raises(ValueError, match="saved weights do not fit model 'vae'"):
        load_model(tmp_path / "mismatch.pt")


def test_a_gan_checkpoint_loads_in_a_fresh_process_without_importing_gan_first(tmp_path):
    """fsl_course.gan is in MODEL_MODULES, so load_model finds "dcgan" and "cgan" on its own."""
    torch.manual_seed(0)
    paths = [save_model(GAN(latent_dim=3, hidden=4, loss="wgan-gp"), tmp_path / "w.pt"),
             save_model(ConditionalGAN(5, latent_dim=3, hidden=4), tmp_path / "c.pt")]
    script = ("import sys\nfrom fsl_course.generative import load_model\nassert 'fsl_course.gan' not in sys.modules\n"
              "for path in sys.argv[1:]:\n    model = load_model(path, device='cpu')\n"
              "    print(model.name, model.config['kwargs']['loss'], tuple(model.noise(2).shape))")
    done = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["dcgan wgan-gp (2, 3)", "cgan nonsaturating (2, 3)"]


def test_save_model_refuses_clashing_keys_and_unregistered_models(tmp_path):
    with pytest.raises(ValueError, match=r"keys \['kwargs'\] clash"):
        save_model(ConvVAE(hidden=4), tmp_path / "a.pt", kwargs={})
    with pytest.raises(TypeError, match="expects a GenerativeModel"):
        save_model(PixelPrototype(), tmp_path / "a.pt")


# --------------------------------------------------------------------------- fsl-course train


@pytest.mark.parametrize("method, rotations", [("vae", True), ("cvae", False), ("set-vae", True)])
def test_train_saves_a_loadable_generative_checkpoint(method, rotations, tiny_data, tmp_path, capsys):
    out = tmp_path / f"{method}.pt"
    assert main(["train", method, "--budget", "smoke", "--out", str(out), "--seed", "2"]) == 0
    assert tiny_data == [("glyphs", "train", None, rotations)]  # cvae: labels are the plain classes
    printed = capsys.readouterr().out
    assert f"saved {out}" in printed and f"fsl-course sample {out} --n 64 --out grid.png" in printed
    assert "fsl-course eval" not in printed

    model = load_model(out, device="cpu")
    assert model.name == method
    info = model.training_info
    assert info["command"] == f"fsl-course train {method} --dataset glyphs --budget smoke --out {out} --seed 2"
    assert (info["seed"], info["budget"], info["rotations"]) == (2, "smoke", rotations)
    training = info["training"]
    assert training["steps"] == 4 and training["binarization"] == "dynamic" and 0 < training["final_loss"] < 1000
    if method == "cvae":
        assert model.n_classes == 6 and training["class_names"][5] == "A/f"
    assert draw(model).shape[1:] == (1, 28, 28)


@pytest.mark.parametrize("method, model_name, loss, rotations", [
    ("dcgan", "dcgan", "nonsaturating", True),
    ("wgan-gp", "dcgan", "wgan-gp", True),  # the same networks; the checkpoint's kwargs say the loss
    ("cgan", "cgan", "nonsaturating", False),  # labels are the plain classes, like cvae
])
def test_train_saves_a_loadable_gan_checkpoint(method, model_name, loss, rotations, tiny_data, tmp_path, capsys):
    out = tmp_path / f"{method}.pt"
    assert main(["train", method, "--budget", "smoke", "--out", str(out), "--seed", "2"]) == 0
    assert tiny_data == [("glyphs", "train", None, rotations)]
    printed = capsys.readouterr().out
    assert f"saved {out}" in printed and f"fsl-course sample {out} --n 64 --out grid.png" in printed
    assert re.search(rf"final losses: {'critic' if loss == 'wgan-gp' else 'discriminator'} -?\d+\.\d+, generator -?\d+\.\d+", printed)

    model = load_model(out, device="cpu")
    assert model.name == model_name and model.config["kwargs"]["loss"] == loss and model.loss_kind == loss
    info = model.training_info
    assert info["command"] == f"fsl-course train {method} --dataset glyphs --budget smoke --out {out} --seed 2"
    assert (info["seed"], info["budget"], info["rotations"]) == (2, "smoke", rotations)
    training = info["training"]
    hyperparameters = (train_module.wgan_gp_hyperparameters if loss == "wgan-gp" else train_module.gan_hyperparameters)(
        train_module.Budget("smoke"))
    assert {k: training[k] for k in ("steps", "batch_size", "lr")} == {k: hyperparameters[k] for k in ("steps", "batch_size", "lr")}
    assert training["loss"] == loss and ("critic_steps" in training) == (loss == "wgan-gp")
    assert all(np.isfinite(training[k]) for k in ("final_d_loss", "final_g_loss"))
    if method == "cgan":
        assert model.n_classes == 6 and training["class_names"][5] == "A/f"
    assert draw(model).shape[1:] == (1, 28, 28)

    grid = tmp_path / f"{method}.png"
    labels = ["--labels", "5,0"] if method == "cgan" else []
    assert main(["sample", str(out), "--n", "6", *labels, "--out", str(grid), "--scale", "1", "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert f"6 samples of {model_name} (" in said and f"loss {loss}" in said
    assert png(grid).shape == ((3 * 29 + 1, 2 * 29 + 1) if method == "cgan" else (29 + 1, 8 * 29 + 1))  # 6 samples in a row of 8
    if method == "cgan":
        assert "one column per class: 5 A/f, 0 A/a" in said


def test_the_same_seed_gives_the_same_generative_checkpoint(tiny_data, tmp_path):
    states = []
    for name in ("a.pt", "b.pt"):
        assert main(["train", "set-vae", "--budget", "smoke", "--out", str(tmp_path / name), "--seed", "4"]) == 0
        states.append(load_checkpoint(tmp_path / name)[0])
    assert all(torch.equal(value, states[1][key]) for key, value in states[0].items())


# --------------------------------------------------------------------------- fsl-course sample


@pytest.fixture
def checkpoints(tmp_path):
    torch.manual_seed(0)
    return {name: save_model(make().eval(), tmp_path / f"{name}.pt", dataset="digits") for name, make in SMALL.items()}


def png(path):
    return np.asarray(Image.open(path))


def test_sample_writes_a_seeded_grid(checkpoints, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(checkpoints["vae"]), "--n", "10", "--out", str(out), "--scale", "1", "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    grid = png(out)
    assert grid.shape == (2 * 29 + 1, 8 * 29 + 1) and grid.dtype == np.uint8  # 10 samples in rows of 8
    again = tmp_path / "again.png"
    assert main(["sample", str(checkpoints["vae"]), "--n", "10", "--out", str(again), "--scale", "1", "--device", "cpu"]) == 0
    assert np.array_equal(png(again), grid)
    assert main(["sample", str(checkpoints["vae"]), "--n", "10", "--out", str(again), "--scale", "1", "--seed", "1", "--device", "cpu"]) == 0
    assert not np.array_equal(png(again), grid)


def test_sample_conditional_puts_one_class_per_column(checkpoints, tmp_path, capsys):
    out = tmp_path / "c.png"
    argv = ["sample", str(checkpoints["cvae"]), "--n", "6", "--labels", "4,1", "--out", str(out), "--scale", "1", "--device", "cpu"]
    assert main(argv) == 0
    assert "one column per class: 4, 1" in capsys.readouterr().out
    assert png(out).shape == (3 * 29 + 1, 2 * 29 + 1)


def test_sample_few_shot_from_files_and_from_a_dataset(checkpoints, tmp_path, capsys):
    folder = tmp_path / "support"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40), 255, np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "f.png"
    argv = ["sample", str(checkpoints["set-vae"]), "--n", "8", "--out", str(out), "--scale", "1", "--device", "cpu"]
    assert main([*argv, "--support", str(folder)]) == 0
    assert "3 support image(s)" in capsys.readouterr().out
    assert png(out).shape == (29 + 1 + 6 + 29 + 1, 8 * 29 + 1)  # the support row, a gap, the samples
    assert main([*argv, "--split", "test", "--class-index", "2", "--shot", "1"]) == 0  # digits, from the checkpoint
    assert "1 support image(s) of digits/test class 2" in capsys.readouterr().out


def test_support_images_are_inverted_when_the_background_is_light(tmp_path):
    light = np.full((56, 56), 255, np.uint8)
    light[20:36, 26:30] = 0  # a dark stroke on white paper
    Image.fromarray(light).save(tmp_path / "light.png")
    Image.fromarray(255 - light).save(tmp_path / "dark.png")
    images = load_support_images([tmp_path / "light.png", tmp_path / "dark.png"])
    assert images.shape == (2, 1, 28, 28) and images.dtype == torch.float32
    torch.testing.assert_close(images[0], images[1])  # both end up ink = 1 on 0
    assert images[0, 0, 14, 14] > 0.9 and images[0, 0, 0, 0] < 0.01


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", "0"], r"--labels: not used by .*vae.pt, which holds an unconditional model \('vae'\)"),
        (["--support", "nowhere", "--shot", "2"], "--support --shot: not used by"),
    ],
)
def test_sample_refuses_options_that_do_not_apply(extra, message, checkpoints, tmp_path, capsys):
    assert main(["sample", str(checkpoints["vae"]), "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsl-course sample: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)


def test_sample_errors_are_one_line_with_exit_status_2(checkpoints, tmp_path, capsys):
    learner = save_learner(PixelPrototype(), tmp_path / "learner.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(checkpoints["cgan"]), "--labels", "5"], r"class indices in 0..4"),
        ([str(checkpoints["dcgan"]), "--classes", "2"], r"--classes: not used by .*dcgan.pt, which holds an unconditional model \('dcgan'\)"),
        ([str(checkpoints["cgan"]), "--support", str(empty)], r"--support: not used by .*cgan.pt, which holds a class-conditional model"),
        ([str(tmp_path / "missing.pt")], "no checkpoint at"),
        ([str(learner)], "few-shot learner checkpoint"),
        ([str(checkpoints["set-vae"]), "--support", str(empty)], "has no image files"),
        ([str(checkpoints["set-vae"]), "--support", str(tmp_path / "nope.png")], "no support image or folder"),
        ([str(checkpoints["set-vae"]), "--support", str(learner)], "cannot read support image"),
        ([str(checkpoints["cvae"]), "--labels", "0,9"], r"class indices in 0..4"),
        ([str(checkpoints["cvae"]), "--labels", "a,b"], "comma-separated"),
        ([str(checkpoints["set-vae"]), "--split", "test", "--class-index", "99"], "--class-index must be in"),
    ]
    for argv, message in cases:
        out = tmp_path / "never.png"
        assert main(["sample", *argv, "--out", str(out), "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
        assert len(err.strip().splitlines()) == 1 and not out.exists()


# --------------------------------------------------------------------------- fsl-course eval of GAN checkpoints


def eval_report(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--samples", "40", "--device", "cpu", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_of_gans_reports_the_frechet_distance_and_the_conditional_accuracy(tmp_path, capsys):
    """Unconditional: FD and its floor; cgan trained on plain glyphs: also the class-conditional
    accuracy; a cgan trained on anything else: FD and a note, since its labels are not the feature net's classes."""
    from fsl_course.evaluation import format_generative

    torch.manual_seed(0)
    wgan = save_model(GAN(latent_dim=3, hidden=4, loss="wgan-gp").eval(), tmp_path / "wgan.pt", dataset="glyphs", rotations=True)
    assert main(["eval", str(wgan), "--samples", "40", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{wgan}: dcgan (unconditional, loss wgan-gp)" and len(lines) == 3
    fd = re.fullmatch(r"  Fréchet distance (\d+\.\d+) \(40 samples; real held-out images: (\d+\.\d+)\) in the glyph feature net's space",
                      lines[1])
    assert fd and float(fd[1]) > float(fd[2]) >= 0

    cgan = ConditionalGAN(5, latent_dim=3, hidden=4).eval()
    report = eval_report(capsys, save_model(cgan, tmp_path / "cgan.pt", dataset="glyphs", rotations=False))
    assert (report["model"], report["kind"], report["model_kwargs"]) == ("cgan", "conditional", cgan.config["kwargs"])
    assert 0 <= report["conditional"]["accuracy"] <= 1 and report["conditional"]["real_accuracy"] > 0.5
    assert report["frechet"]["n_samples"] == 40 and "conditional_note" not in report and report["few_shot_method"] is None

    report = eval_report(capsys, save_model(cgan, tmp_path / "digits.pt", dataset="digits", rotations=False))
    assert "conditional" not in report and "frechet" in report
    assert report["conditional_note"].startswith("no class-conditional accuracy: the model's labels are the classes of digits/train")
    assert f"\n  {report['conditional_note']}\n" in format_generative(report)
