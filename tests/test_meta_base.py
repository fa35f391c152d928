"""The few-shot learner interface: episode validation, the registry, save/load."""

import pytest
import torch

import fsl_course
from fsl_course import load_checkpoint, save_checkpoint
from fsl_course.meta import (
    LEARNERS,
    FewShotLearner,
    PixelPrototype,
    PretrainFinetune,
    load_learner,
    register_learner,
    save_learner,
    validate_episode,
)


def episode(way=5, shot=2, query=3, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    support_x = torch.rand(way * shot, 1, size, size, generator=g)
    support_y = torch.arange(way).repeat_interleave(shot)
    query_x = torch.rand(way * query, 1, size, size, generator=g)
    return support_x, support_y, query_x


def small_baseline(**kwargs):
    kwargs = {"hidden": 8, "norm": "group", "finetune_steps": 5, **kwargs}
    torch.manual_seed(0)
    return PretrainFinetune(**kwargs)


# --- episode validation --------------------------------------------------------------


def test_validate_returns_n_way_and_accepts_any_label_order():
    sx, sy, qx = episode(way=4, shot=3)
    assert validate_episode(sx, sy, qx) == 4
    perm = torch.randperm(len(sy), generator=torch.Generator().manual_seed(1))
    assert validate_episode(sx[perm], sy[perm], qx) == 4


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sx, sy, qx: (sx[:, 0], sy, qx), r"support_x must have shape \(n, 1, H, W\)"),
        (lambda sx, sy, qx: (sx.repeat(1, 3, 1, 1), sy, qx), "one grey channel"),
        (lambda sx, sy, qx: (sx, sy, (qx * 255).to(torch.uint8)), "query_x must be a float tensor"),
        (lambda sx, sy, qx: (sx, sy.int(), qx), "int64"),
        (lambda sx, sy, qx: (sx, sy.float(), qx), "int64"),
        (lambda sx, sy, qx: (sx, sy[:-1], qx), "to match support_x"),
        (lambda sx, sy, qx: (sx, sy, qx[:, :, :20]), "differ in size"),
        (lambda sx, sy, qx: (sx, sy + 1, qx), r"exactly 0..N-1.*\[1, 2, 3, 4, 5\]"),
        (lambda sx, sy, qx: (sx, torch.where(sy == 2, 7, sy), qx), r"exactly 0..N-1"),
        (lambda sx, sy, qx: (sx, sy, qx[:0]), "query_x is empty"),
    ],
)
def test_validate_rejects_bad_episodes_with_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        validate_episode(*change(*episode()))


def test_validate_rejects_non_tensors():
    sx, sy, qx = episode()
    with pytest.raises(TypeError, match="support_y must be a torch.Tensor"):
        validate_episode(sx, sy.tolist(), qx)


def test_predict_validates_before_computing():
    sx, sy, qx = episode()
    with pytest.raises(ValueError, match="int64"):
        PixelPrototype().predict(sx, sy.int(), qx)


def test_predict_refuses_an_episode_on_another_device_than_the_learner():
    learner = small_baseline().to("meta")  # parameters without storage: a stand-in for "cuda"
    with pytest.raises(ValueError, match="episode is on cpu but the learner is on meta"):
        learner.predict(*episode())


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_every_registered_learner_returns_n_query_by_n_way_logits(name):
    torch.manual_seed(0)
    learner = LEARNERS[name]()
    sx, sy, qx = episode(way=3, shot=2, query=4)
    logits = learner.predict(sx, sy, qx)
    assert logits.shape == (12, 3)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# --- registry ----------------------------------------------------------------------------


def test_registry_names_and_configs():
    assert {"pixel-nn", "pixel-prototype", "baseline"} <= set(LEARNERS)
    for name, cls in LEARNERS.items():
        assert cls.name == name
    assert small_baseline().config == {
        "learner": "baseline",
        "kwargs": {"hidden": 8, "norm": "group", "finetune_steps": 5, "finetune_lr": 0.01},
    }


def test_registering_a_second_class_under_a_taken_name_fails():
    with pytest.raises(ValueError, match="already registered"):

        @register_learner("pixel-prototype")
        class Impostor(FewShotLearner):
            pass

    assert LEARNERS["pixel-prototype"] is PixelPrototype


def test_register_learner_only_takes_learners():
    with pytest.raises(TypeError, match="FewShotLearner subclasses"):
        register_learner("not-a-learner")(torch.nn.Linear)


def test_learner_arguments_must_be_json_able():
    class Odd(FewShotLearner):
        def __init__(self, thing):
            super().__init__(thing=thing)

    with pytest.raises(TypeError, match="JSON-able"):
        Odd(thing=torch.zeros(1))


def test_an_unregistered_learner_cannot_be_saved(tmp_path):
    class Unregistered(FewShotLearner):
        pass

    with pytest.raises(ValueError, match="not registered"):
        save_learner(Unregistered(), tmp_path / "x.pt")


# --- save / load -------------------------------------------------------------------------


def test_save_load_round_trip_restores_config_weights_and_predictions(tmp_path):
    learner = small_baseline(finetune_lr=0.05)
    with torch.no_grad():  # weights that differ from any fresh initialisation
        for p in learner.parameters():
            p.add_(torch.randn_like(p))
    training = {"command": "fsl-course train baseline ...", "seed": 3, "budget": "smoke", "dataset": "glyphs"}
    path = save_learner(learner, tmp_path / "sub" / "b.pt", **training)

    state, config = load_checkpoint(path)
    assert config == {**learner.config, **training}

    loaded = load_learner(path, device="cpu")
    assert type(loaded) is PretrainFinetune and not loaded.training
    assert loaded.config == learner.config and loaded.training_info == training
    for key, value in learner.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    sx, sy, qx = episode()
    torch.testing.assert_close(loaded.predict(sx, sy, qx), learner.eval().predict(sx, sy, qx))


def test_load_uses_the_default_device(tmp_path):
    path = save_learner(PixelPrototype(), tmp_path / "p.pt")
    learner = load_learner(path)
    assert isinstance(learner, PixelPrototype) and learner.training_info == {}
    assert all(t.device == fsl_course.device() for t in learner.state_dict().values())


def test_extra_config_may_not_overwrite_the_learner_config(tmp_path):
    with pytest.raises(ValueError, match="clash"):
        save_learner(PixelPrototype(), tmp_path / "p.pt", kwargs={"a": 1})


def test_unknown_learner_name_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "u.pt", {}, {"learner": "telepathy", "kwargs": {}})
    with pytest.raises(ValueError, match="'telepathy'.*known learners: .*pixel-prototype"):
        load_learner(path)


def test_mismatched_weights_are_a_clear_error(tmp_path):
    path = save_learner(small_baseline(hidden=8), tmp_path / "b.pt")
    state, config = load_checkpoint(path)
    config["kwargs"]["hidden"] = 16
    save_checkpoint(path, state, config)
    with pytest.raises(ValueError, match="saved weights do not fit learner 'baseline'"):
        load_learner(path)


def test_unusable_saved_arguments_are_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "b.pt", {}, {"learner": "pixel-nn", "kwargs": {"k": 3}})
    with pytest.raises(ValueError, match="cannot rebuild learner 'pixel-nn'"):
        load_learner(path)


def test_a_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable fsl-course checkpoint"):
        load_learner(path)
