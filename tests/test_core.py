"""The package's foundations: budgets, seeds, devices, atomic writes, checkpoints, the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fsl_course
from fsl_course import Budget, CheckpointError, atomic_write, budget, load_checkpoint, save_checkpoint


# --------------------------------------------------------------------------- budget


def test_budget_defaults_to_standard(monkeypatch):
    monkeypatch.delenv("FSL_COURSE_BUDGET", raising=False)
    assert budget() == Budget("standard")
    monkeypatch.setenv("FSL_COURSE_BUDGET", "")  # set but empty counts as unset
    assert budget().name == "standard"


@pytest.mark.parametrize("value, expected", [("smoke", "smoke"), ("full", "full"), (" Smoke ", "smoke")])
def test_budget_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("FSL_COURSE_BUDGET", value)
    assert budget().name == expected


def test_budget_argument_beats_the_environment(monkeypatch):
    monkeypatch.setenv("FSL_COURSE_BUDGET", "smoke")
    assert budget("full").name == "full"


@pytest.mark.parametrize("make", [lambda: budget("quick"), lambda: Budget("huge")])
def test_unknown_budget_lists_the_valid_ones(make):
    with pytest.raises(ValueError) as err:
        make()
    message = str(err.value)
    for name in ("smoke", "standard", "full"):
        assert name in message
    assert "FSL_COURSE_BUDGET" in message


def test_unknown_budget_from_the_environment_is_an_error(monkeypatch):
    monkeypatch.setenv("FSL_COURSE_BUDGET", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        budget()


def test_pick_chooses_the_preset_value():
    values = dict(smoke=10, standard=2_000, full=20_000)
    assert [Budget(n).pick(**values) for n in ("smoke", "standard", "full")] == [10, 2_000, 20_000]
    assert str(Budget("smoke")) == "smoke"


def test_pick_needs_all_three_presets_by_keyword():
    with pytest.raises(TypeError):
        Budget("smoke").pick(smoke=1, standard=2)  # full missing
    with pytest.raises(TypeError):
        Budget("smoke").pick(1, 2, 3)


# --------------------------------------------------------------------------- seeds


def _draws(generator: torch.Generator):
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        torch.rand(3, generator=generator).tolist(),
    )


def test_same_seed_gives_the_same_draws_everywhere():
    first = _draws(fsl_course.seed_everything(123))
    second = _draws(fsl_course.seed_everything(123))
    assert first == second
    other = _draws(fsl_course.seed_everything(124))
    for a, b in zip(first, other):  # every source of randomness depends on the seed
        assert a != b


def test_seed_everything_returns_a_seeded_cpu_generator():
    generator = fsl_course.seed_everything(7)
    assert isinstance(generator, torch.Generator)
    assert generator.device.type == "cpu"
    assert generator.initial_seed() == 7


def test_large_seeds_are_accepted():
    # numpy only takes 32-bit seeds; torch takes 64 bits and the generator keeps the full seed
    generator = fsl_course.seed_everything(2**40)
    assert generator.initial_seed() == 2**40
    assert _draws(generator) == _draws(fsl_course.seed_everything(2**40))


@pytest.mark.parametrize("bad", [1.5, "0", None, True])
def test_seed_must_be_an_int(bad):
    with pytest.raises(TypeError, match="seed must be an int"):
        fsl_course.seed_everything(bad)


# --------------------------------------------------------------------------- device


def test_device_picks_the_best_available(monkeypatch):
    monkeypatch.delenv("FSL_COURSE_DEVICE", raising=False)
    dev = fsl_course.device()
    assert isinstance(dev, torch.device)
    if torch.cuda.is_available():
        assert dev.type == "cuda"
    elif torch.backends.mps.is_available():
        assert dev.type == "mps"
    else:
        assert dev == torch.device("cpu")
    torch.zeros(2, device=dev)  # the chosen device works


def test_device_override(monkeypatch):
    monkeypatch.setenv("FSL_COURSE_DEVICE", "cpu")
    assert fsl_course.device() == torch.device("cpu")


def test_invalid_device_override_says_what_is_valid(monkeypatch):
    monkeypatch.setenv("FSL_COURSE_DEVICE", "gpu")
    with pytest.raises(ValueError) as err:
        fsl_course.device()
    message = str(err.value)
    assert "FSL_COURSE_DEVICE" in message and "'gpu'" in message
    assert "cpu" in message and "cuda" in message


# --------------------------------------------------------------------------- cache, atomic writes


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    target = tmp_path / "somewhere" / "cache"
    monkeypatch.setenv("FSL_COURSE_CACHE", str(target))
    assert fsl_course.cache_dir() == target
    assert target.is_dir()


def test_atomic_write_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "data.txt"  # parent is created
    with atomic_write(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("complete")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "complete"
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.txt"]  # no temporary left


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "data.txt"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            tmp.write_text("new but interrupted")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    config = {"class": "Sequential", "sizes": [4, 3, 2], "seed": 0, "budget": "smoke"}
    path = save_checkpoint(tmp_path / "model.pt", model.state_dict(), config)
    return path, model, config


def test_checkpoint_round_trip(checkpoint):
    path, model, config = checkpoint
    state, loaded_config = load_checkpoint(path)
    assert loaded_config == config
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert state[key].device.type == "cpu"
        assert torch.equal(state[key], value)
    clone = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    clone.load_state_dict(state)
    x = torch.randn(5, 4)
    assert torch.equal(clone(x), model(x))


def test_truncated_checkpoint_is_a_clear_error(checkpoint):
    path, _, _ = checkpoint
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "not a readable fsl-course checkpoint" in message
    assert "\n" not in message  # one line, fit for the CLI


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="not a readable fsl-course checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "payload",
    [torch.arange(3), {"weight": torch.ones(2)}, {"format": "something-else", "state_dict": {}}],
    ids=["tensor", "bare-state-dict", "foreign-format"],
)
def test_foreign_torch_files_are_rejected(tmp_path, payload):
    path = tmp_path / "foreign.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="not an fsl-course checkpoint"):
        load_checkpoint(path)


def test_newer_checkpoint_format_is_rejected(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": "fsl-course-checkpoint", "version": 99, "config": "{}", "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError):  # a directory is not a checkpoint either
        load_checkpoint(tmp_path)


def test_checkpoint_config_must_be_json(tmp_path):
    path = tmp_path / "model.pt"
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(path, {"w": torch.ones(1)}, {"model": torch.nn.Linear(1, 1)})
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_checkpoint_is_saved_on_cpu_and_detached(tmp_path):
    w = torch.ones(2, requires_grad=True)
    state, _ = load_checkpoint(save_checkpoint(tmp_path / "m.pt", {"w": w * 2}, {}))
    assert not state["w"].requires_grad and torch.equal(state["w"], torch.full((2,), 2.0))


# --------------------------------------------------------------------------- command line


def test_cli_turns_a_value_error_into_one_line(monkeypatch, capsys):
    from fsl_course import cli, doctor

    def broken(args):
        raise ValueError("unknown dataset 'glyfs'; valid datasets are: glyphs, digits, omniglot")

    monkeypatch.setattr(doctor, "run", broken)
    code = cli.main(["doctor"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().splitlines() == [
        "fsl-course doctor: error: unknown dataset 'glyfs'; valid datasets are: glyphs, digits, omniglot"
    ]
    assert "Traceback" not in captured.err + captured.out


def test_doctor_runs_from_the_command_line(tmp_path):
    """The real entry point, in a fresh process (the other doctor tests call main())."""
    environ = dict(os.environ, FSL_COURSE_DEVICE="cpu", FSL_COURSE_BUDGET="smoke", FSL_COURSE_CACHE=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "fsl_course.cli", "doctor"],
        capture_output=True, text=True, env=environ, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    text = out.stdout
    assert f"torch {torch.__version__}" in text
    assert f"numpy {np.__version__}" in text
    for label in ("matplotlib", "PIL", "einops", "Python", "CUDA", "MPS"):
        assert label in text
    assert "Device        cpu  (forced by FSL_COURSE_DEVICE=cpu)" in text
    assert "Budget        smoke  (from FSL_COURSE_BUDGET=smoke)" in text
    assert str(tmp_path) in text
    assert "glyphs" in text and "No problems found." in text


def _doctor_json(monkeypatch, capsys, **env) -> tuple[int, dict]:
    from fsl_course import cli

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = cli.main(["doctor", "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_doctor_json(tmp_path, monkeypatch, capsys):
    (tmp_path / "blob.bin").write_bytes(b"x" * 3000)
    code, report = _doctor_json(monkeypatch, capsys, FSL_COURSE_BUDGET="", FSL_COURSE_DEVICE="",
                                FSL_COURSE_CACHE=str(tmp_path))
    assert code == 0 and report["problems"] == []
    assert report["packages"]["torch"] == torch.__version__
    assert report["budget"] == {"name": "standard", "from_env": False, "env_value": None}
    assert report["device"]["override"] is None
    monkeypatch.delenv("FSL_COURSE_DEVICE")
    assert report["device"]["chosen"] == str(fsl_course.device())
    assert report["device"]["cuda"]["available"] == torch.cuda.is_available()
    assert Path(report["cache"]["path"]) == tmp_path
    assert report["cache"]["bytes"] >= 3000
    names = {d["name"] for d in report["datasets"]}
    assert {"glyphs", "digits", "omniglot"} <= names


def test_doctor_lists_bad_settings_as_problems(tmp_path, monkeypatch, capsys):
    code, report = _doctor_json(monkeypatch, capsys, FSL_COURSE_BUDGET="turbo", FSL_COURSE_DEVICE="gpu",
                                FSL_COURSE_CACHE=str(tmp_path))
    assert code == 1
    assert report["device"]["chosen"] is None and report["budget"]["name"] is None
    problems = " ".join(report["problems"])
    assert "FSL_COURSE_DEVICE='gpu'" in problems and "'turbo'" in problems
