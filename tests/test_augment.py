"""Classic augmentation: random affine maps (checked against exact transforms), elastic
distortion, thicker strokes, and the augment_shots generator."""

import pytest
import torch

from fsl_course.augment import affine_theta, augment_shots, elastic_displacement, random_affine, thicken

IDENTITY = dict(degrees=0, translate=0, scale=1, shear=0)


def letter_images(n=3, size=28):
    """An asymmetric "F"-like shape (no rotation or flip maps it onto itself), plus grey levels."""
    x = torch.zeros(n, 1, size, size)
    x[:, :, 5:22, 8:11] = 1.0  # vertical bar
    x[:, :, 5:8, 8:20] = 0.8  # top arm
    x[:, :, 12:14, 8:16] = 0.6  # middle arm
    x[1:, :, 20:23, 14:17] = 0.3  # differs between images
    return x


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_all_ranges_zero_is_the_identity():
    x = letter_images()
    torch.testing.assert_close(random_affine(x, gen(), **IDENTITY), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_by_multiples_of_90_degrees_matches_rot90(k):
    x = letter_images()
    rotated = random_affine(x, gen(), **{**IDENTITY, "degrees": (90 * k, 90 * k)})
    torch.testing.assert_close(rotated, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5, rtol=0)
    if k != 2:  # the direction matters
        assert not torch.allclose(rotated, torch.rot90(x, -k, dims=(-2, -1)), atol=0.1)


def test_translation_by_whole_pixels_matches_a_shift():
    x = letter_images()
    shifted = random_affine(x, gen(), **{**IDENTITY, "translate": (3 / 28, 3 / 28)})  # 3 px right and down
    torch.testing.assert_close(shifted, torch.roll(x, (3, 3), dims=(-2, -1)), atol=1e-5, rtol=0)


def test_scale_two_magnifies_about_the_centre():
    x = torch.zeros(1, 1, 28, 28)
    x[..., 12:16, 12:16] = 1.0  # a 4x4 square in the middle
    big = random_affine(x, gen(), **{**IDENTITY, "scale": 2}, mode="bilinear")
    # bilinear: the square is 1 on [12, 15] (pixel centres), so 2x about 13.5 gives 1 on [10.5, 16.5]
    assert (big > 0.99).sum() == 36 and big[..., 11:17, 11:17].min() > 0.99
    assert big[..., :9, :].max() == 0 and big[..., 19:, :].max() == 0


def test_same_seed_same_output_other_seed_other_output():
    x = letter_images()
    a, b, c = random_affine(x, gen(1)), random_affine(x, gen(1)), random_affine(x, gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1] * 0 + a[0].roll(1))  # images get their own parameters
    theta = affine_theta(4, 28, 28, gen(3))
    assert theta.shape == (4, 2, 3) and theta.dtype == torch.float64
    assert len({tuple(t.flatten().tolist()) for t in theta}) == 4


def test_output_stays_in_the_unit_interval():
    x = torch.rand(16, 1, 28, 28, generator=gen(5))
    y = random_affine(x, gen(), degrees=180, translate=0.3, scale=(0.5, 2.0), shear=40)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert 0 <= y.min() and y.max() <= 1
    z = augment_shots(x[:3], 16, gen(), elastic=0.2, thicken_p=1.0)
    assert 0 <= z.min() and z.max() <= 1


def test_bad_input_raises_clear_errors():
    x = letter_images()
    with pytest.raises(ValueError, match=r"\(n, 1, H, W\)"):
        random_affine(x[0], gen())
    with pytest.raises(ValueError, match=r"\(n, 1, H, W\)"):
        random_affine(x.repeat(1, 3, 1, 1), gen())
    with pytest.raises(TypeError, match="float"):
        random_affine((x * 255).to(torch.uint8), gen())
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        random_affine(x, None)
    with pytest.raises(ValueError, match="degrees must be >= 0"):
        random_affine(x, gen(), degrees=-5)
    with pytest.raises(ValueError, match="low <= high"):
        random_affine(x, gen(), scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="scale must be > 0"):
        random_affine(x, gen(), scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="shear must stay within"):
        random_affine(x, gen(), shear=90)
    with pytest.raises(ValueError, match="number or a"):
        random_affine(x, gen(), translate="a lot")
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        augment_shots(x, 0, gen())
    with pytest.raises(ValueError, match="thicken_p"):
        augment_shots(x, 4, gen(), thicken_p=1.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        random_affine(x, gen(), mode="lanczos")


def test_elastic_displacement_is_smooth_and_scaled():
    assert torch.equal(elastic_displacement(2, 28, 28, gen(), 0.0), torch.zeros(2, 28, 28, 2))
    field = elastic_displacement(64, 28, 28, gen(), 0.05)
    assert field.shape == (64, 28, 28, 2)
    assert 0.03 < field.std() < 0.07  # about sigma
    step = (field[:, 1:] - field[:, :-1]).abs().mean()
    assert step < field.abs().mean() / 4  # neighbouring pixels move together


def test_thicken_adds_one_pixel_around_the_strokes():
    x = torch.zeros(1, 1, 9, 9)
    x[..., 4, 2:7] = 1.0  # a horizontal stroke, one pixel wide
    y = thicken(x)
    expected = torch.zeros_like(x)
    expected[..., 3:6, 2:7] = 1.0
    expected[..., 4, 1] = expected[..., 4, 7] = 1.0  # the cross reaches one pixel past the ends
    assert torch.equal(y, expected)
    letters = letter_images()
    assert (thicken(letters) >= letters).all() and thicken(letters).sum() > 1.3 * letters.sum()


def test_augment_shots_cycles_through_the_shots():
    x = letter_images(3)
    x = torch.stack([x[0], x[1].transpose(-1, -2), x[2].flip(-1)])  # three clearly different shots
    copies = augment_shots(x, 7, gen(), **IDENTITY, elastic=0.0, thicken_p=0.0)
    torch.testing.assert_close(copies, x[torch.arange(7) % 3], atol=1e-5, rtol=0)
    samples = augment_shots(x, 7, gen(4))
    assert samples.shape == (7, 1, 28, 28) and samples.dtype == torch.float32
    assert torch.equal(samples, augment_shots(x, 7, gen(4)))
    assert not torch.allclose(samples[0], samples[3])  # same shot, different perturbation
    # mild: each sample still looks like its own shot more than like the others
    d = torch.cdist(samples.flatten(1), x.flatten(1))
    assert (d.argmin(dim=1) == torch.arange(7) % 3).float().mean() >= 5 / 7
