"""The datasets: glyphs (size, splits, determinism, no leakage), digits, omniglot, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fsl_course import data
from fsl_course.data import glyphs


@pytest.fixture(scope="module")
def splits():
    return {s: data.load("glyphs", s) for s in data.SPLITS}


def test_glyphs_size_and_format(splits):
    total = sum(d.n_classes for d in splits.values())
    alphabets = {a for d in splits.values() for a in d.alphabets}
    assert total >= 1000, total
    assert len(alphabets) >= 10, alphabets
    for d in splits.values():
        assert d.images.dtype == torch.float32
        assert d.images.shape[1:] == (20, 1, 28, 28)
        assert 0 <= d.images.min() and d.images.max() <= 1
        # ink = 1 on a 0 background: the border is empty and most pixels are background
        border = torch.cat([d.images[..., 0, :], d.images[..., -1, :], d.images[..., :, 0], d.images[..., :, -1]], -1)
        assert border.mean() < 0.01
        assert 0.05 < d.images.mean() < 0.4
        assert len(d.class_names) == len(set(d.class_names)) == d.n_classes


def test_glyphs_splits_are_disjoint_by_alphabet(splits):
    sets = {s: set(d.alphabets) for s, d in splits.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert len(sets["test"]) >= 5 and splits["test"].n_classes >= 100  # room for 20-way episodes
    names = [n for d in splits.values() for n in d.class_names]
    assert len(names) == len(set(names))


def test_glyph_instances_vary(splits):
    """Instances are not copies: every pair within a class differs noticeably."""
    x = splits["test"].images.flatten(2)  # (C, 20, 784)
    diffs = (x[:, :, None] - x[:, None]).abs().mean(-1)  # (C, 20, 20)
    off_diagonal = diffs[:, ~torch.eye(20, dtype=torch.bool)]
    assert off_diagonal.min() > 0.01


def _pil_signature(char: str, coverage: dict) -> np.ndarray:
    """A second, independent shape descriptor (PIL crop and resize, not the package's
    grid_sample): the glyph's square bounding box at 24x24, zero-mean, unit-norm."""
    from PIL import Image, ImageDraw, ImageFont

    font = next(f for f in glyphs.FONT_FILES if ord(char) in coverage[f])
    im = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(im).text((48, 48), char, fill=255, anchor="mm", font=ImageFont.truetype(str(glyphs.font_dir() / font), 56))
    a = np.asarray(im, np.float32) / 255
    ys, xs = np.nonzero(a > 0.2)
    crop = a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    side = max(crop.shape)
    square = np.zeros((side, side), np.float32)
    square[(side - crop.shape[0]) // 2 :][: crop.shape[0], (side - crop.shape[1]) // 2 :][:, : crop.shape[1]] = crop
    v = np.asarray(Image.fromarray(square).resize((24, 24), Image.Resampling.BILINEAR), np.float64).ravel()
    v = v - v.mean()
    return v / np.linalg.norm(v)


def test_held_out_classes_are_not_training_classes_in_disguise(splits):
    """No val/test character looks like a training character or a 90-degree rotation of one
    (checked with an independent shape descriptor, with a margin over the build's threshold)."""
    coverage = glyphs._font_coverage()

    def sigs(d):
        return np.stack([_pil_signature(name.split("/", 1)[1], coverage) for name in d.class_names])

    train = sigs(splits["train"])
    square = train.reshape(-1, 24, 24)
    bank = np.concatenate([train] + [np.rot90(square, k, axes=(1, 2)).reshape(len(train), -1) for k in (1, 2, 3)])
    for split in ("val", "test"):
        worst = (sigs(splits[split]) @ bank.T).max()
        assert worst < glyphs.DUPLICATE_CORRELATION + 0.05, (split, worst)
    # and the check can fail: a training character is found in the training bank
    assert (train[:5] @ bank.T).max(1).min() > 0.99


def test_rotations_are_extra_training_classes(splits):
    base = splits["train"]
    rotated = data.load("glyphs", "train", rotations=True)
    assert base.n_classes * 2 < rotated.n_classes <= base.n_classes * 4
    assert torch.equal(rotated.images[: base.n_classes], base.images)
    name = next(n for n in rotated.class_names if n.endswith("@90"))
    i, j = rotated.class_names.index(name), base.class_names.index(name[: -len("@90")])
    assert torch.equal(rotated.images[i], torch.rot90(base.images[j], 1, dims=(-2, -1)))
    # U+1401 and U+1403 are rotations of each other: no class may duplicate another
    assert len(set(rotated.class_names)) == rotated.n_classes


def test_fonts_never_include_last_resort():
    assert not any("lastresort" in f.lower() for f in glyphs.FONT_FILES)
    assert all((glyphs.font_dir() / f).is_file() for f in glyphs.FONT_FILES)


def test_cache_key_tracks_the_environment(monkeypatch):
    import PIL

    key = glyphs.cache_key()
    monkeypatch.setattr(PIL, "__version__", PIL.__version__ + ".post1")
    assert glyphs.cache_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(glyphs, "GLYPHS_VERSION", glyphs.GLYPHS_VERSION + 1)
    assert glyphs.cache_key() != key


def test_two_independent_builds_are_identical(tmp_path, splits):
    """A build in a fresh process with an empty cache equals the cached build."""
    env = {**os.environ, "FSL_COURSE_CACHE": str(tmp_path)}
    code = "import fsl_course.data.glyphs as g; print(g.load_arrays() and g.cache_path())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    fresh_path = Path(out.stdout.strip())
    assert fresh_path.parent == tmp_path
    with np.load(fresh_path) as fresh, np.load(glyphs.cache_path()) as cached:
        assert sorted(fresh.files) == sorted(cached.files)
        for key in fresh.files:
            np.testing.assert_array_equal(fresh[key], cached[key], err_msg=key)


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FSL_COURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(glyphs, "build", lambda: {"images": np.zeros((1, 20, 28, 28), np.uint8)})
    glyphs.cache_path().write_bytes(b"not an npz file")
    assert glyphs.load_arrays()["images"].shape == (1, 20, 28, 28)
    with np.load(glyphs.cache_path()) as z:  # and the cache was replaced atomically
        assert z["images"].shape == (1, 20, 28, 28)


def test_digits():
    train, val, test = (data.load("digits", s) for s in data.SPLITS)
    assert train.images.shape == (5, 170, 1, 28, 28) and val.images.shape == test.images.shape == (5, 85, 1, 28, 28)
    assert set(train.class_names).isdisjoint(test.class_names)
    assert val.class_names == test.class_names and not torch.equal(val.images, test.images)
    assert 0 <= test.images.min() and test.images.max() <= 1 and test.images.mean() < 0.5  # ink = 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="glyph", split="train"), "unknown dataset 'glyph'; expected one of: glyphs, digits, omniglot"),
        (dict(name="glyphs", split="training"), "unknown split 'training'"),
        (dict(name="glyphs", split="train", root="/tmp"), "takes no root"),
        (dict(name="omniglot", split="train"), "pass root=DIR"),
    ],
)
def test_bad_requests_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load(**kwargs)


# ---------------------------------------------------------------------------- omniglot


def make_omniglot(root: Path, n_background: int = 7, n_evaluation: int = 2, characters: int = 3, drawers: int = 4) -> Path:
    """A tiny Omniglot in the official layout: 105x105 PNGs, black ink on white."""
    from PIL import Image, ImageDraw

    for part, n_alphabets in (("images_background", n_background), ("images_evaluation", n_evaluation)):
        for a in range(n_alphabets):
            for c in range(characters):
                folder = root / part / f"{part[7:11]}_alphabet_{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                for d in range(drawers):
                    im = Image.new("1", (105, 105), 1)
                    ImageDraw.Draw(im).rectangle([10 + 5 * c, 10 + 3 * a, 60 + d, 90], outline=0, width=6)
                    im.save(folder / f"{c:04d}_{d + 1:02d}.png")
    return root


@pytest.fixture
def omniglot_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FSL_COURSE_CACHE", str(tmp_path / "cache"))
    return make_omniglot(tmp_path / "omniglot")


def test_omniglot_layout_and_splits(omniglot_root):
    train, val, test = (data.load("omniglot", s, root=omniglot_root) for s in data.SPLITS)
    assert train.images.shape == (6 * 3, 4, 1, 28, 28)  # 7 background alphabets, every 6th is val
    assert val.images.shape == (1 * 3, 4, 1, 28, 28)
    assert test.images.shape == (2 * 3, 4, 1, 28, 28)
    assert set(train.alphabets).isdisjoint(val.alphabets)
    # inverted: ink (black in the file) is 1, paper is 0
    assert test.images[..., 0, 0].max() == 0 and test.images.max() > 0.9
    again = data.load("omniglot", "test", root=omniglot_root)  # from the cache
    assert torch.equal(again.images, test.images)


def test_omniglot_torchvision_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FSL_COURSE_CACHE", str(tmp_path / "cache"))
    make_omniglot(tmp_path / "data" / "omniglot-py", n_background=0, n_evaluation=1)
    assert data.load("omniglot", "test", root=tmp_path / "data").n_classes == 3


def test_omniglot_errors(tmp_path, omniglot_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("omniglot", "test", root=tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="does not have the Omniglot layout"):
        data.load("omniglot", "test", root=tmp_path / "flat")
    empty = omniglot_root / "images_evaluation" / "eval_alphabet_0" / "character99"
    empty.mkdir()
    with pytest.raises(ValueError, match="have no .png images"):
        data.load("omniglot", "test", root=omniglot_root)
    empty.rmdir()
    bad = next((omniglot_root / "images_evaluation").rglob("*.png"))
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        data.load("omniglot", "test", root=omniglot_root)


# ---------------------------------------------------------------------------- command line


def test_data_show_writes_a_grid(tmp_path):
    from PIL import Image

    from fsl_course.cli import main

    out = tmp_path / "grid.png"
    assert main(["data", "show", "digits", "--split", "test", "--classes", "4", "--instances", "6", "--scale", "2", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (6 * 28 * 2, 4 * 28 * 2)


def test_data_cli_bad_input_is_one_line(capsys):
    from fsl_course.cli import main

    assert main(["data", "show", "nope", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nope'" in err and "Traceback" not in err


def test_grid_rows_are_classes_and_columns_instances():
    d = data.load("digits", "test")
    grid = d.grid(n_instances=3, classes=[2, 0])
    assert grid.shape == (2 * 28, 3 * 28)
    assert torch.equal(grid[:28, 28:56], d.images[2, 1, 0]) and torch.equal(grid[28:, :28], d.images[0, 0, 0])
    assert torch.equal(d.grid(4, 2, seed=5), d.grid(4, 2, seed=5)) and not torch.equal(d.grid(4, 2, seed=5), d.grid(4, 2, seed=None))
