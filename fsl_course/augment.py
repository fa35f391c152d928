"""Classic data augmentation for few-shot glyphs: the baseline every generative model has to beat.

Given the K shots of a new class, "classic" augmentation makes new instances by perturbing
the shots with transformations that should not change the class:

* :func:`random_affine`: a random rotation, shear, scale and translation, resampled with
  ``F.affine_grid`` / ``F.grid_sample`` (bicubic, zero = background outside the image);
* :func:`augment_shots`: cycles through the shots and applies a random affine map plus a small
  smooth elastic distortion (Simard et al. 2003, "Best practices for convolutional neural
  networks applied to visual document analysis") and, with some probability, thicker strokes.

Geometry. Coordinates are those of ``F.affine_grid`` with ``align_corners=False``: ``x`` to the
right and ``y`` *down*, both in [-1, 1] across the image. In pixel units around the image centre,
``q = D p`` with ``D = diag(W / 2, H / 2)``, the forward map taking an input point to its place in
the output is

    q_out = R(theta) Sh(phi) s q_in + t,
    R(theta) = [[cos theta, sin theta], [-sin theta, cos theta]],   Sh(phi) = [[1, tan phi], [0, 1]],

so a positive ``theta`` turns the image counter-clockwise *as displayed* (the convention of
``torch.rot90`` and torchvision), ``phi`` shears along x, ``s`` scales and ``t = (t_x W, t_y H)``
translates. ``F.affine_grid`` needs the inverse (output -> input) map in normalised
coordinates: ``p_in = M^-1 (p_out - 2 t_frac)`` with ``M = D^-1 R Sh s D``.

Resampling is bicubic by default, not bilinear. Bilinear interpolation at a fractional
offset averages neighbouring pixels, a blur that the glyphs' own (sharp, anti-aliased) edges
never show, and the metrics' feature net notices it at once. Ten copies of one instance of
each glyph test class are at Fréchet distance 7.6 from real instances
(:func:`fsl_course.metrics.image_frechet_distance`); shifted by up to 1.4 pixels, at 69 with
bilinear resampling and at 19 with bicubic. Bicubic overshoots a little at edges, so results
are clamped to [0, 1].

All random parameters are drawn from a CPU ``torch.Generator`` and then moved to the images'
device, so the same generator state gives the same augmentation on any device.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

Range = float | tuple[float, float]
MODES = ("bicubic", "bilinear", "nearest")


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, 1, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"{name} must have shape (n, 1, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [0, 1], got dtype {images.dtype}")


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError("generator must be a CPU torch.Generator, e.g. torch.Generator().manual_seed(0)")


def _as_range(value: Range | Sequence[float], name: str, symmetric: bool) -> tuple[float, float]:
    """``v`` -> ``(-v, v)`` (``symmetric``) or ``(v, v)``; ``(low, high)`` -> itself."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if symmetric and value < 0:
            raise ValueError(f"{name} must be >= 0 (it means U(-{name}, {name})), got {value}")
        low, high = (-float(value), float(value)) if symmetric else (float(value), float(value))
    else:
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number or a (low, high) pair, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{name} must be a finite range with low <= high, got ({low}, {high})")
    return low, high


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """``n`` draws from U(low, high) as float64 on the CPU (one draw per image even when low == high,
    so the generator advances the same way whatever the ranges are)."""
    low, high = bounds
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def affine_theta(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator,
    *,
    degrees: Range = 10.0,
    translate: Range = 0.1,
    scale: Range = (0.9, 1.1),
    shear: Range = 10.0,
) -> torch.Tensor:
    """``n`` random output -> input maps for ``F.affine_grid``: ``(n, 2, 3)`` float64 on the CPU.

    Each range is a number ``v`` (meaning U(-v, v); for ``scale``, the fixed value ``v``) or a
    ``(low, high)`` pair. ``degrees`` and ``shear`` are angles in degrees, ``translate`` is a
    fraction of the image side (independently in x and y), ``scale`` a factor > 0. The module
    docstring gives the map.
    """
    _check_generator(generator)
    shear_range = _as_range(shear, "shear", True)
    if max(abs(v) for v in shear_range) >= 90:
        raise ValueError(f"shear must stay within (-90, 90) degrees, got {shear_range}")
    theta = torch.deg2rad(_uniform(n, _as_range(degrees, "degrees", True), generator))
    phi = torch.deg2rad(_uniform(n, shear_range, generator))
    scale_range = _as_range(scale, "scale", False)
    if scale_range[0] <= 0:
        raise ValueError(f"scale must be > 0, got {scale_range}")
    s = _uniform(n, scale_range, generator)
    t_range = _as_range(translate, "translate", True)
    t = torch.stack([_uniform(n, t_range, generator), _uniform(n, t_range, generator)], dim=1)  # (n, 2)

    cos, sin = theta.cos(), theta.sin()
    rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (n, 2, 2)
    shearing = repeat(torch.eye(2, dtype=torch.float64), "i j -> n i j", n=n).clone()
    shearing[:, 0, 1] = phi.tan()
    a = rotation @ shearing * s[:, None, None]  # pixel-space linear map (n, 2, 2)
    d = torch.tensor([width / 2, height / 2], dtype=torch.float64)
    m = a * d[None, None, :] / d[None, :, None]  # D^-1 A D
    m_inv = torch.linalg.inv(m)
    offset = -(m_inv @ (2 * t)[:, :, None])  # (n, 2, 1)
    return torch.cat([m_inv, offset], dim=2)


def _resample(
    images: torch.Tensor, theta: torch.Tensor, displacement: torch.Tensor | None = None, mode: str = "bicubic"
) -> torch.Tensor:
    """Sample ``images`` (n, 1, H, W) at ``theta`` (n, 2, 3) applied to the output grid plus an
    optional ``displacement`` (n, H, W, 2) in normalised output units, with ``grid_sample``'s
    ``mode``. Returns (n, 1, H, W) clamped to [0, 1]."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    n, _, h, w = images.shape
    # float64 where the device has it: the identity map is then exact after rounding to float32
    dtype = torch.float64 if images.device.type in ("cpu", "cuda") else torch.float32
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], device=images.device, dtype=dtype)
    grid = F.affine_grid(identity, [1, 1, h, w], align_corners=False)  # (1, H, W, 2)
    if displacement is not None:
        grid = grid + displacement.to(images.device, dtype)
    theta = theta.to(images.device, dtype)
    grid = torch.einsum("bhwk,bjk->bhwj", grid.expand(n, -1, -1, -1), theta[:, :, :2]) + theta[:, None, None, :, 2]
    out = F.grid_sample(images.to(dtype), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.to(images.dtype).clamp_(0, 1)


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    degrees: Range = 10.0,
    translate: Range = 0.1,
    scale: Range = (0.9, 1.1),
    shear: Range = 10.0,
    mode: str = "bicubic",
) -> torch.Tensor:
    """A random affine map per image: ``(n, 1, H, W)`` in [0, 1] -> ``(n, 1, H, W)`` in [0, 1].

    The image is rotated by ``U(degrees)`` (counter-clockwise as displayed for positive
    angles), sheared along x by ``U(shear)`` degrees, scaled by ``U(scale)`` and shifted by
    ``U(translate)`` times the image side in x and in y (see the module docstring for the map).
    Numbers mean symmetric ranges (``degrees=10``: U(-10, 10)); pairs give ``(low, high)``.
    With all ranges zero (``scale=1``) the result equals the input up to float rounding;
    ``degrees=(90, 90)`` and nothing else matches ``torch.rot90(images, 1, (-2, -1))`` for square images.

    Resampling uses ``grid_sample`` with ``mode`` (default bicubic: sharp edges, see the module
    docstring; ``"bilinear"`` for devices without bicubic sampling) and zero (background)
    outside the image, so ink that leaves the frame is lost. Parameters come from the CPU
    ``generator``; the images may be on any device.
    """
    _check_images(images)
    _check_generator(generator)
    n, _, h, w = images.shape
    theta = affine_theta(n, h, w, generator, degrees=degrees, translate=translate, scale=scale, shear=shear)
    return _resample(images, theta, mode=mode)


def elastic_displacement(
    n: int, height: int, width: int, generator: torch.Generator, sigma: float, grid: int = 4
) -> torch.Tensor:
    """Smooth random displacement fields ``(n, H, W, 2)`` in normalised units (2 = image side).

    Each of ``grid x grid`` control points gets an independent N(0, sigma^2) displacement in x and
    in y; the field in between is the bicubic interpolation of the control values. ``sigma=0``
    gives zeros.
    """
    _check_generator(generator)
    if sigma < 0 or grid < 2:
        raise ValueError(f"need sigma >= 0 and grid >= 2, got sigma={sigma}, grid={grid}")
    coarse = sigma * torch.randn(n, 2, grid, grid, generator=generator)
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)  # (n, 2, H, W)
    return rearrange(field, "n c h w -> n h w c")


def thicken(images: torch.Tensor) -> torch.Tensor:
    """Strokes one pixel thicker on each side: a grey-scale dilation by the 3x3 cross,
    ``y[i, j] = max(x[i, j], x[i-1, j], x[i+1, j], x[i, j-1], x[i, j+1])`` (zero outside).
    ``(n, 1, H, W)`` -> ``(n, 1, H, W)``. A hard dilation keeps the edges sharp; softer ones
    (blending, or dilating at twice the resolution and averaging down) blur them, which the
    metrics' feature net sees as unlike any real glyph."""
    p = F.pad(images, (1, 1, 1, 1))
    neighbours = (images, p[..., :-2, 1:-1], p[..., 2:, 1:-1], p[..., 1:-1, :-2], p[..., 1:-1, 2:])
    return torch.stack(neighbours).amax(dim=0)


def augment_shots(
    support_x: torch.Tensor,
    n: int,
    generator: torch.Generator,
    *,
    degrees: Range = 10.0,
    translate: Range = 0.05,
    scale: Range = (0.9, 1.1),
    shear: Range = 10.0,
    elastic: float = 0.03,
    thicken_p: float = 0.25,
    mode: str = "bicubic",
) -> torch.Tensor:
    """``n`` new images of one class from its ``K`` shots ``support_x`` ``(K, 1, H, W)``: ``(n, 1, H, W)``.

    Image ``i`` starts from shot ``i mod K`` and is warped once (one resampling with ``mode``) by a
    random affine map (as in :func:`random_affine`) composed with a smooth elastic displacement
    (:func:`elastic_displacement`, standard deviation ``elastic`` in normalised units, i.e.
    ``elastic * W / 2`` pixels); then, with probability ``thicken_p``, its strokes are made one
    pixel thicker on each side (:func:`thicken`). The defaults are milder than the "hand" that made the
    glyph instances, so the class stays recognisable. This is the classic-augmentation baseline
    of :func:`fsl_course.metrics.few_shot_generation_scores`:
    ``generate(support_x, n, generator) -> (n, 1, H, W)``.
    """
    _check_images(support_x, "support_x")
    _check_generator(generator)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if len(support_x) == 0:
        raise ValueError("support_x is empty: need at least one shot")
    if not 0 <= thicken_p <= 1:
        raise ValueError(f"thicken_p must be a probability in [0, 1], got {thicken_p}")
    k, _, h, w = support_x.shape
    source = support_x[torch.arange(n, device=support_x.device) % k]  # shot i mod K
    theta = affine_theta(n, h, w, generator, degrees=degrees, translate=translate, scale=scale, shear=shear)
    displacement = elastic_displacement(n, h, w, generator, elastic)
    thicker = (torch.rand(n, generator=generator) < thicken_p).to(support_x.device)
    out = _resample(source, theta, displacement, mode=mode)
    if thicker.any():
        out[thicker] = thicken(out[thicker])
    return out


__all__ = ["affine_theta", "augment_shots", "elastic_displacement", "random_affine", "thicken"]
