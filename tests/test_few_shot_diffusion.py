"""Few-shot diffusion (fsl_course.few_shot_diffusion): the set-conditioned DDPM, fine-tuning and
LoRA adaptation, the ``adapt`` command, and ``train --steps``."""

import json

import pytest
import torch
from torch import nn

from fsl_course import load_checkpoint
from fsl_course.cli import main
from fsl_course.diffusion import DDPM, ConditionalDDPM, noise_prediction_loss
from fsl_course.few_shot_diffusion import (
    ADAPT_DEFAULTS,
    SetConditionalDDPM,
    SetEncoder,
    adapt,
    support_batches,
    train_set_diffusion,
)
from fsl_course.generative import load_model, model_kind, save_model


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def strokes(n=6, seed=0):
    """n distinct bar images (n, 1, 28, 28) in [0, 1]."""
    images = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        images[i, 0, 4 + 2 * i : 8 + 2 * i, 4:24] = 1
        images[i, 0, 4:24, 6 + 2 * i : 9 + 2 * i] = 1
    return images


def small(model_class, **kwargs):
    torch.manual_seed(0)
    model = model_class(num_steps=20, schedule="cosine", channels=(8, 16), **kwargs)
    for name, module in model.unet.named_modules():  # zero-initialised layers re-drawn, as after training
        if name.endswith("conv2"):
            module.reset_parameters()
    nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    return model.eval()


def test_set_encoder_is_a_permutation_invariant_masked_mean():
    torch.manual_seed(0)
    enc = SetEncoder(dim=8, width=4)
    x = torch.rand(3, 5, 1, 28, 28) * 2 - 1
    full = enc(x)
    torch.testing.assert_close(enc(x[:, torch.randperm(5)]), full, rtol=1e-5, atol=1e-6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    masked = enc(x, mask)
    for b, k in enumerate((2, 1, 5)):
        torch.testing.assert_close(masked[b], enc(x[b : b + 1, :k])[0], rtol=1e-5, atol=1e-6)
    # the mean of per-image embeddings, computed one image at a time
    one_by_one = torch.stack([enc(x[:, i : i + 1]) for i in range(5)]).mean(0)
    torch.testing.assert_close(full, one_by_one, rtol=1e-5, atol=1e-6)


def test_support_batches_never_show_the_target_and_stay_in_its_class():
    # class c, instance i holds the value 100 c + i everywhere, so images name themselves
    images = (torch.arange(7)[:, None] * 100 + torch.arange(6)[None, :]).float()[:, :, None, None, None].expand(7, 6, 1, 28, 28)
    target, support, mask = support_batches(images, 50, 5, gen(1))
    assert target.shape == (50, 1, 28, 28) and support.shape == (50, 5, 1, 28, 28) and mask.shape == (50, 5)
    sizes = mask.sum(1)
    assert sizes.min() >= 1 and sizes.max() <= 5 and len(set(sizes.tolist())) > 1
    assert torch.all(mask[:, :1]) and torch.equal(mask, mask.cummin(dim=1).values)  # slots used from the left
    t_id, s_id = target[:, 0, 0, 0], support[:, :, 0, 0, 0]
    assert torch.all(s_id // 100 == (t_id // 100)[:, None])  # same class
    assert not torch.any(s_id == t_id[:, None])  # never the target itself
    assert all(len(set(row.tolist())) == 5 for row in s_id)  # distinct shots
    with pytest.raises(ValueError, match="at least 2 images per class"):
        support_batches(images[:, :1], 4, 5, gen())


def test_generate_is_deterministic_and_guidance_combines_two_predictions():
    model = small(SetConditionalDDPM, cond_dim=8)
    nn.init.normal_(model.null, std=1.0)
    support = strokes(3)
    a = model.generate(support, 4, generator=gen(3), steps=5)
    b = model.generate(support, 4, generator=gen(3), steps=5)
    assert a.shape == (4, 1, 28, 28) and 0 <= a.min() and a.max() <= 1 and torch.equal(a, b)
    assert not torch.equal(a, model.generate(strokes(6)[3:], 4, generator=gen(3), steps=5))  # the support matters
    assert model_kind(model) == "few-shot"
    # guidance w: (1 + w) eps(x, c(S)) - w eps(x, null), from two direct U-Net calls
    from fsl_course.few_shot_diffusion import _Guided

    x, t = torch.randn(4, 1, 28, 28), torch.tensor([0, 5, 10, 19])
    c, m = model.embed_support(support)
    # the condition: c(S) from the encoder and m(S), the shots' mean image in model space [-1, 1]
    assert c.shape == (1, 8) and torch.allclose(m[0], (support * 2 - 1).mean(0), atol=1e-6)
    eps_c = model.unet(x, t, cond=c.expand(4, -1), cond_image=m.expand(4, -1, -1, -1))
    eps_0 = model.unet(x, t, cond=model.null[None].expand(4, -1), cond_image=torch.zeros(4, 1, 28, 28))
    guided = {w: _Guided(model.unet, c, m, model.null[None], w)(x, t) for w in (0.0, 3.0)}
    torch.testing.assert_close(guided[3.0], 4 * eps_c - 3 * eps_0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[0.0], eps_c, rtol=1e-5, atol=1e-6)
    guided = model.generate(support, 4, generator=gen(3), steps=5, guidance=2.0)
    assert not torch.allclose(guided, a)
    with pytest.raises(ValueError, match=r"\(K, 1, 28, 28\)"):
        model.generate(torch.rand(3, 28, 28), 2)
    with pytest.raises(ValueError, match="guidance needs a support set"):
        model.sample(2, guidance=1.0)


def test_train_set_diffusion_learns_and_survives_a_checkpoint(tmp_path):
    model = SetConditionalDDPM(num_steps=50, schedule="cosine", channels=(8, 16), cond_dim=8, max_set_size=3)
    data = strokes(6)[:, None].repeat(1, 4, 1, 1, 1) * torch.linspace(0.7, 1.0, 4)[None, :, None, None, None]
    history = train_set_diffusion(model, data, steps=60, batch_size=16, lr=3e-3, device="cpu", seed=0, progress=False)
    first, last = sum(history["loss"][:10]) / 10, sum(history["loss"][-10:]) / 10
    assert last < 0.7 * first
    assert model.null.grad is not None and model.encoder.out.weight.grad is not None  # both are trained
    path = save_model(model, tmp_path / "set.pt")
    loaded = load_model(path, device="cpu")
    assert isinstance(loaded, SetConditionalDDPM) and loaded.max_set_size == 3
    torch.testing.assert_close(loaded.generate(data[0, :2], 3, generator=gen(), steps=4),
                               model.generate(data[0, :2], 3, generator=gen(), steps=4))
    with pytest.raises(TypeError, match="SetConditionalDDPM"):
        train_set_diffusion(DDPM(20), data, steps=1, batch_size=2, lr=1e-3, device="cpu")


def fixed_loss(model, x0):
    """The noise-prediction loss on fixed (t, eps): comparable before and after adaptation."""
    with torch.no_grad():
        return noise_prediction_loss(model.unet, x0.repeat(8, 1, 1, 1), model.schedule, gen(123)).item()


@pytest.mark.parametrize("method", ["finetune", "lora"])
def test_adaptation_fits_the_shots_and_leaves_the_pretrained_model_alone(method):
    model = small(DDPM)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    support = strokes(2)
    x0 = support * 2 - 1
    adapted = adapt(model, support, method, steps=40, lr=3e-3, seed=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the pre-trained model is untouched
    assert fixed_loss(adapted.model, x0) < 0.8 * fixed_loss(model, x0)
    assert adapted.model.state_dict().keys() == model.state_dict().keys()  # LoRA merged: a plain DDPM again
    assert len(adapted.losses) == 40 and adapted.seconds > 0
    full = sum(p.numel() for p in model.unet.parameters())
    if method == "finetune":
        assert adapted.trainable_parameters == full
    else:  # r (in k k + out) per convolution, r (in + out) per linear layer, counted independently
        r = 4
        expected = sum(r * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels) if isinstance(m, nn.Conv2d)
                       else r * (m.in_features + m.out_features)
                       for m in model.unet.modules() if type(m) in (nn.Conv2d, nn.Linear))
        assert adapted.trainable_parameters == expected < full / 3
    samples = adapted.sample(3, generator=gen(), steps=4)
    assert samples.shape == (3, 1, 28, 28)
    again = adapt(model, support, method, steps=40, lr=3e-3, seed=1)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in adapted.model.state_dict().items())  # seeded


def test_conditioning_trains_nothing_and_wrong_models_are_refused():
    set_model, ddpm = small(SetConditionalDDPM, cond_dim=8), small(DDPM)
    support = strokes(2)
    adapted = adapt(set_model, support, "condition")
    assert adapted.model is set_model and adapted.trainable_parameters == 0 and adapted.losses == []
    torch.testing.assert_close(adapted.sample(2, generator=gen(), steps=3), set_model.generate(support, 2, generator=gen(), steps=3))
    with pytest.raises(ValueError, match="set-ddpm"):
        adapt(ddpm, support, "condition")
    with pytest.raises(ValueError, match="unconditional DDPM"):
        adapt(set_model, support, "lora")
    with pytest.raises(ValueError, match="unconditional DDPM"):
        adapt(ConditionalDDPM(3, num_steps=10, channels=(8,)), support, "finetune")
    with pytest.raises(ValueError, match="method must be one of"):
        adapt(ddpm, support, "dreambooth")
    with pytest.raises(ValueError, match=r"\(K, 1, 28, 28\)"):
        adapt(ddpm, torch.rand(0, 1, 28, 28), "finetune")
    assert set(ADAPT_DEFAULTS) == {"finetune", "lora", "condition"}


@pytest.fixture
def tiny_glyphs(monkeypatch):
    """The glyph loader replaced by a tiny seeded dataset for train and adapt."""
    from types import SimpleNamespace

    from fsl_course import data

    def load(name, split, root=None, *, rotations=False):
        images = strokes(6)[:, None].repeat(1, 20, 1, 1, 1) * torch.linspace(0.6, 1.0, 20)[None, :, None, None, None]
        return SimpleNamespace(images=images, n_classes=6, n_per_class=20, name=name, split=split,
                               class_names=[f"Latin/{c}" for c in "abcdef"])

    monkeypatch.setattr(data, "load", load)


def test_train_steps_override_is_recorded_and_refused_where_unsupported(tiny_glyphs, tmp_path, capsys):
    out = tmp_path / "set.pt"
    assert main(["train", "set-ddpm", "--budget", "smoke", "--steps", "5", "--out", str(out)]) == 0
    config = load_checkpoint(out)[1]
    assert config["training"]["steps"] == 5 and config["command"].endswith("--steps 5") and config["budget"] == "smoke"
    assert isinstance(load_model(out, device="cpu"), SetConditionalDDPM)
    assert main(["train", "baseline", "--budget", "smoke", "--steps", "5", "--out", str(tmp_path / "b.pt")]) == 2
    assert "--steps is not supported by baseline" in capsys.readouterr().err
    assert main(["train", "ddpm", "--budget", "smoke", "--steps", "0", "--out", str(tmp_path / "d.pt")]) == 2


def test_adapt_command_draws_saves_and_scores(tiny_glyphs, tmp_path, capsys):
    from PIL import Image

    ddpm, set_ckpt = tmp_path / "ddpm.pt", tmp_path / "set.pt"
    assert main(["train", "ddpm", "--budget", "smoke", "--out", str(ddpm)]) == 0
    assert main(["train", "set-ddpm", "--budget", "smoke", "--out", str(set_ckpt)]) == 0
    folder = tmp_path / "shots"
    folder.mkdir()
    for i, image in enumerate(strokes(2)):
        Image.fromarray((255 * (1 - image[0].numpy())).astype("uint8")).save(folder / f"{i}.png")  # dark ink on white
    capsys.readouterr()
    grid, out = tmp_path / "g.png", tmp_path / "adapted.pt"
    argv = ["adapt", str(ddpm), "--method", "lora", "--support", str(folder), "--adapt-steps", "3", "--steps", "3",
            "--n", "4", "--grid", str(grid), "--out", str(out), "--json", "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_parameters"] > 0 and report["support"].startswith("2 image(s)") and grid.exists()
    adapted = load_model(out, device="cpu")
    assert type(adapted) is DDPM and "fsl-course adapt" in adapted.training_info["command"]
    assert main(["adapt", str(set_ckpt), "--method", "condition", "--support", "Latin/c", "--shot", "3", "--steps", "3",
                 "--guidance", "1", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_parameters"] == 0 and "class 2 (Latin/c)" in report["support"]
    assert main(["adapt", str(ddpm), "--method", "finetune", "--episodes", "2", "--way", "2", "--shot", "1", "--adapt-steps", "2",
                 "--steps", "2", "--gen-samples", "3", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["episodes"] == 2 and 0 <= report["fidelity"] <= 1 and report["trainable_parameters"] > 0
    bad = [
        (["adapt", str(ddpm), "--method", "lora"], "either --support"),
        (["adapt", str(set_ckpt), "--method", "condition", "--support", "1", "--out", str(out)], "trains nothing"),
        (["adapt", str(ddpm), "--method", "condition", "--support", "1"], "set-ddpm"),
        (["adapt", str(ddpm), "--method", "lora", "--support", "Klingon/x"], "neither a file or folder nor a class"),
        (["adapt", str(ddpm), "--method", "lora", "--support", "99"], "class index must be in 0..5"),
        (["adapt", str(ddpm), "--method", "lora", "--support", "1", "--guidance", "2"], "--guidance applies to --method condition"),
    ]
    for argv, message in bad:
        assert main([*argv, "--device", "cpu"]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_eval_and_sample_take_the_sampler_options(tiny_glyphs, tmp_path, capsys):
    ddpm, set_ckpt = tmp_path / "ddpm.pt", tmp_path / "set.pt"
    assert main(["train", "ddpm", "--budget", "smoke", "--out", str(ddpm)]) == 0
    assert main(["train", "set-ddpm", "--budget", "smoke", "--out", str(set_ckpt)]) == 0
    grid = tmp_path / "g.png"
    assert main(["sample", str(set_ckpt), "--n", "2", "--out", str(grid), "--steps", "3", "--guidance", "1", "--shot", "2",
                 "--device", "cpu"]) == 0
    assert "steps 3, guidance 1.0" in capsys.readouterr().out
    assert main(["sample", str(ddpm), "--n", "2", "--out", str(grid), "--steps", "3", "--device", "cpu"]) == 2
    assert "add --sampler ddim" in capsys.readouterr().err
    assert main(["eval", str(ddpm), "--sampler", "ddim", "--steps", "2", "--samples", "40", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sampling"] == {"sampler": "ddim", "steps": 2} and report["frechet"]["n_samples"] == 40
    assert report["sample_seconds"] >= 0


def test_generate_sets_draws_one_image_per_set_like_generate():
    model = small(SetConditionalDDPM, cond_dim=8)
    sets = torch.stack([strokes(6)[:3], strokes(6)[3:]])  # (2, 3, 1, 28, 28)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    both = model.generate_sets(sets, mask, generator=gen(5), steps=4)
    assert both.shape == (2, 1, 28, 28)
    # each row is the DDIM sample of its own set's embedding from the same x_T (drawn first, for the batch)
    from fsl_course.diffusion import ddim_sample
    from fsl_course.few_shot_diffusion import _Guided
    from fsl_course.gan import from_tanh_range, to_tanh_range

    for b, shots in enumerate((sets[0, :2], sets[1])):
        cond, image = model.encoder(to_tanh_range(shots)[None]), to_tanh_range(shots).mean(0, keepdim=True)
        one = ddim_sample(_Guided(model.unet, cond, image, model.null[None], None), (2, 1, 28, 28), model.schedule, 4,
                          generator=gen(5))
        torch.testing.assert_close(both[b], from_tanh_range(one[b]).clamp(0, 1), rtol=1e-3, atol=1e-4)  # float32, batched
    with pytest.raises(ValueError, match=r"\(B, K, 1, 28, 28\)"):
        model.generate_sets(strokes(3))
    with pytest.raises(ValueError, match="at least one shot per set"):
        model.generate_sets(sets, torch.zeros(2, 3, dtype=torch.bool))


def test_unet_conditioning_images_are_extra_input_channels():
    from fsl_course.diffusion import UNet

    torch.manual_seed(0)
    net = UNet((8, 16), cond_channels=1)
    nn.init.normal_(net.conv_out.weight, std=0.05)
    for name, module in net.named_modules():
        if name.endswith("conv2"):
            module.reset_parameters()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 7])
    a, b = torch.zeros(2, 1, 28, 28), torch.ones(2, 1, 28, 28)
    assert net.conv_in.in_channels == 2 and not torch.allclose(net(x, t, cond_image=a), net(x, t, cond_image=b))
    # the image is the second input channel of the first convolution, nothing else
    expected = torch.nn.functional.conv2d(torch.cat([x, b], 1), net.conv_in.weight, net.conv_in.bias, padding=1)
    torch.testing.assert_close(net.conv_in(torch.cat([x, b], 1)), expected)
    with pytest.raises(ValueError, match=r"needs cond_image of shape \(B, 1, 28, 28\)"):
        net(x, t)
    with pytest.raises(ValueError, match="needs cond_image"):
        net(x, t, cond_image=torch.zeros(2, 2, 28, 28))
    with pytest.raises(ValueError, match="takes no conditioning image"):
        UNet((8,))(x, t, cond_image=a)
    with pytest.raises(ValueError, match="cond_channels must be an int"):
        UNet((8,), cond_channels=-1)
