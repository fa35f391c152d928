r"""Denoising diffusion models (DDPM and DDIM) from the variational bound.

Forward process. Fix a *noise schedule* ``beta_1..beta_T`` in ``(0, 1)`` and corrupt data
``x_0`` step by step (Sohl-Dickstein et al. 2015, arXiv:1503.03585; Ho et al. 2020, *Denoising
Diffusion Probabilistic Models*, arXiv:2006.11239):

    q(x_t | x_{t-1}) = N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t I),   t = 1..T.

With ``alpha_t = 1 - beta_t`` and ``abar_t = prod_{s <= t} alpha_s``, a sum of independent
Gaussians is Gaussian, so every marginal has a closed form (:meth:`NoiseSchedule.q_sample`):

    q(x_t | x_0) = N(x_t; sqrt(abar_t) x_0, (1 - abar_t) I),  i.e.  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

Posterior. By Bayes' rule (a product of two Gaussians in ``x_{t-1}``) the forward process
run backwards, *given* ``x_0``, is Gaussian too (:meth:`NoiseSchedule.posterior_mean_variance`):

    q(x_{t-1} | x_t, x_0) = N(mu~_t(x_t, x_0), beta~_t I),
    mu~_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t,
    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t),       with abar_0 = 1.

The bound. With a reverse model ``p(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)`` and
``p(x_T) = N(0, I)``, the negative ELBO splits into KL terms (Ho et al. 2020, eq. 5):

    -ELBO = KL(q(x_T | x_0) || p(x_T))                                    (L_T, no parameters)
          + sum_{t >= 2} E_q KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))  (L_{t-1})
          - E_q log p(x_0 | x_1)                                          (L_0).

Parameterising ``mu_theta`` through a noise predictor, ``mu_theta = mu~_t(x_t, x0_hat)`` with
``x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)`` (:meth:`NoiseSchedule.predict_x0`),
each ``L_{t-1}`` becomes a weighted ``||eps - eps_theta||^2``; dropping the weights gives the
*simple loss* that everyone trains with (:func:`noise_prediction_loss`):

    L_simple = E_{t ~ U{1..T}, x_0, eps ~ N(0, I)} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2.

Sampling. Ancestral sampling (:func:`ancestral_step`, :func:`ancestral_sample`) runs
``x_T ~ N(0, I)`` and ``x_{t-1} = mu_theta(x_t, t) + sigma_t z`` down to ``x_0``, with
``sigma_t^2 = beta_t`` or ``beta~_t`` (the two choices of Ho et al. 2020, section 3.2).
DDIM (Song, Meng & Ermon 2021, *Denoising Diffusion Implicit Models*, arXiv:2010.02502) keeps
the marginals ``q(x_t | x_0)`` but uses a non-Markovian forward process, giving (their eq. 12)

    x_{t'} = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_theta + sigma z,
    sigma = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'}),

for any earlier ``t' < t``: it can skip steps (:func:`ddim_step`, :func:`ddim_sample`);
``eta = 0`` is deterministic and ``eta = 1`` with every step is the ancestral sampler with
``sigma_t^2 = beta~_t``.

Schedules. ``"linear"``: ``beta`` linear from ``1e-4`` to ``0.02`` (Ho et al. 2020).
``"cosine"``: ``abar(t) = f(t) / f(0)``, ``f(t) = cos(((t / T + s) / (1 + s)) pi / 2)^2``,
``s = 0.008`` (Nichol & Dhariwal 2021, *Improved DDPM*, arXiv:2102.09672), which destroys
information more slowly at the start and does not waste the last steps on pure noise.

Conditioning (lesson 07). :class:`UNet` takes class labels (a label embedding) and/or an
arbitrary vector ``cond`` (e.g. a support-set embedding), both added to the time embedding
and applied in every residual block by FiLM / adaptive group normalisation,
``h = GroupNorm(h) * (1 + scale) + shift`` (Perez et al. 2018, arXiv:1709.07871; Dhariwal &
Nichol 2021, arXiv:2105.05233). Classifier-free guidance (Ho & Salimans 2022,
arXiv:2207.12598; :func:`guided_eps`) trains one network both with labels and, with
probability ``p_uncond``, with a "null" label, then samples with

    eps_guided = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, null)        (w >= 0).

Few-shot adaptation (lesson 08). LoRA (Hu et al. 2021, *Low-Rank Adaptation*,
arXiv:2106.09685; :class:`LoRALinear`, :class:`LoRAConv2d`, :func:`attach_lora`) freezes a
pre-trained layer ``W`` and learns a low-rank update, ``y = W x + (alpha / r) B A x`` with
``A`` (r, in) random and ``B`` (out, r) zero, so the adapted model starts exactly at the
pre-trained one and trains ``r (in + out)`` numbers per layer instead of ``in * out``.

Models (registered with :mod:`fsl_course.generative`): :class:`DDPM` (``"ddpm"``) and
:class:`ConditionalDDPM` (``"cond-ddpm"``), trained by :func:`train_diffusion`.

Conventions of this module:

* **Timesteps are 0-based**: index ``k = 0..T-1`` is the paper's ``t = k + 1``. So ``k = 0`` is
  the last denoising step (``x_1 -> x_0``), ``abar_prev[0] = abar_0 = 1`` and the posterior
  variance ``beta~`` is 0 there; no noise is added at ``k = 0``.
* Images are in ``[0, 1]`` at the package boundary; the networks and samplers work in
  ``[-1, 1]`` ("model space"): ``x0`` arguments and sampler outputs are in ``[-1, 1]``, and
  ``DDPM.sample`` returns ``[0, 1]``.
* Noise that must be reproducible is drawn from a CPU ``torch.Generator`` on the CPU and moved,
  so a seed gives the same samples on every device (up to floating-point error).
* Shapes: ``B`` batch; images ``(B, 1, 28, 28)``; schedule methods and samplers accept any
  ``(B, ...)``; timesteps ``t`` are ``(B,)`` integer tensors.
"""

from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from fsl_course.gan import from_tanh_range, to_tanh_range
from fsl_course.generative import (
    IMAGE_SHAPE,
    GenerativeModel,
    check_count,
    check_labels,
    check_same_shape,
    check_tensor,
    dense_images,
    register_model,
    standard_normal,
)

SCHEDULES = ("linear", "cosine")
VARIANCES = ("beta", "beta_tilde")
SAMPLERS = ("ancestral", "ddim")

LINEAR_BETA_START, LINEAR_BETA_END = 1e-4, 0.02
COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal 2021
MAX_BETA = 0.999  # the cosine schedule's cap on beta_t


# --------------------------------------------------------------------------- small helpers


def _real(name: str, value, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a finite float (optionally within ``[low, high]``), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return float(value)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample coefficients -> (B, 1, ..., 1), to broadcast against ``like`` (B, ...),
    with ``like``'s dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _device_of(model) -> torch.device:
    """Where ``model``'s parameters are; the CPU for a plain function or a parameter-free module."""
    if isinstance(model, nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.device
        buffer = next(model.buffers(), None)
        if buffer is not None:
            return buffer.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(model):
    """Run an ``nn.Module`` in eval mode, then restore its mode (a plain function is left alone)."""
    if not isinstance(model, nn.Module):
        yield model
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be a tuple of positive ints with the batch size first, e.g. (16, 1, 28, 28), got {shape!r}")
    return tuple(shape)


# --------------------------------------------------------------------------- the noise schedule


class NoiseSchedule(nn.Module):
    r"""The ``T``-step noise schedule and the closed forms of the forward process.

    Attributes (buffers, computed in float64 and stored as float32, so ``.to(device)`` moves
    them; not saved in a ``state_dict``, since the constructor arguments define them), each
    ``(T,)`` and indexed by the **0-based** step ``k`` (the paper's ``t = k + 1``). The methods
    use these float32 values for float32 inputs and the float64 originals (kept on the CPU) for
    float64 inputs, so a float64 check is accurate to ~1e-15.

    * ``betas``: ``beta_k``;
    * ``alphas``: ``alpha_k = 1 - beta_k``;
    * ``alphas_cumprod``: ``abar_k = prod_{j <= k} alpha_j``;
    * ``alphas_cumprod_prev``: ``abar_{k-1}``, with the value 1 at ``k = 0`` (``abar`` of the paper's ``t = 0``);
    * ``posterior_variance``: ``beta~_k = beta_k (1 - abar_{k-1}) / (1 - abar_k)``, which is **0 at
      k = 0** (``x_0`` is determined by ``x_1`` and itself);
    * ``posterior_log_variance_clipped``: ``log beta~_k`` with the ``k = 0`` entry replaced by
      ``beta~_1`` (as in Ho et al.'s code; with ``T = 1``, by ``beta_0``), so it stays finite;
    * ``posterior_mean_coef1``, ``posterior_mean_coef2``: the coefficients of ``x_0`` and ``x_t`` in ``mu~``.

    ``kind="linear"``: ``betas = linspace(1e-4, 0.02, T)`` (Ho et al. 2020). The endpoints are
    kept for every ``T`` (the paper used ``T = 1000``). With far fewer steps the last ``abar`` is then
    far from 0 (about 0.6 at ``T = 50``), so ``x_T`` is not close to ``N(0, I)``: use the cosine
    schedule for small ``T``.

    ``kind="cosine"`` (Nichol & Dhariwal 2021): ``abar(t) = f(t) / f(0)``,
    ``f(t) = cos(((t / T + s) / (1 + s)) pi / 2)^2``, ``s = 0.008``; ``beta_t = min(1 - abar(t) /
    abar(t - 1), 0.999)`` for ``t = 1..T``. ``alphas_cumprod`` is then recomputed as
    ``cumprod(1 - betas)``, consistent with the clipped betas. It differs from ``abar(t)`` only
    where the cap bites, at the last step: ``f(T) = cos(pi / 2)^2 = 0`` would give ``beta_T = 1``
    and ``abar_T = 0``, so ``1 / sqrt(abar_T)`` in :meth:`predict_x0` would be infinite.
    """

    def __init__(self, num_steps: int = 1000, kind: str = "linear"):
        super().__init__()
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1 (the number of diffusion steps T), got {num_steps!r}")
        if kind not in SCHEDULES:
            raise ValueError(f"kind must be one of {SCHEDULES}, got {kind!r}")
        self.num_steps, self.kind = num_steps, kind
        f64 = torch.float64
        if kind == "linear":
            betas = torch.linspace(LINEAR_BETA_START, LINEAR_BETA_END, num_steps, dtype=f64)
        else:
            steps = torch.arange(num_steps + 1, dtype=f64)  # the paper's t = 0..T
            f = torch.cos((steps / num_steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
            abar = f / f[0]
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=MAX_BETA)
        alphas = 1 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=f64), abar[:-1]])
        posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        first = posterior_variance[1] if num_steps > 1 else betas[0]
        values = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.cat([first.reshape(1), posterior_variance[1:]]).log(),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
            "posterior_mean_coef2": (1 - abar_prev) * alphas.sqrt() / (1 - abar),
        }
        self._float64 = values  # for float64 inputs and DDIM's coefficients; stays on the CPU
        for name, value in values.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    def __len__(self) -> int:
        return self.num_steps

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}, kind={self.kind!r}"

    # ------------------------------------------------------------------ checks

    def check_timesteps(self, t, batch: int | None = None, name: str = "t", allow_minus_one: bool = False) -> torch.Tensor:
        """Raise a clear error unless ``t`` is a ``(batch,)`` integer tensor of 0-based steps in
        ``0..T-1`` (``-1..T-2`` with ``allow_minus_one``, for DDIM's "previous" step); returns it as int64."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name} must be a (B,) int64 tensor of 0-based timesteps, got {type(t).__name__}; "
                f"e.g. torch.full((B,), k) for one step k for the whole batch"
            )
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer (int64) tensor of 0-based timestep indices, got dtype {t.dtype}")
        if t.ndim != 1 or (batch is not None and len(t) != batch):
            expected = "(B,)" if batch is None else f"(B,) = ({batch},), one per sample"
            raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
        low, high = (-1, self.num_steps - 2) if allow_minus_one else (0, self.num_steps - 1)
        if len(t) and (t.min() < low or t.max() > high):
            what = "previous timesteps (-1 = the end, abar = 1)" if allow_minus_one else "timesteps"
            raise ValueError(
                f"{name} must hold 0-based {what} in {low}..{high} for this {self.num_steps}-step schedule "
                f"(timesteps are 0-based: index k is the paper's t = k + 1), got values in [{t.min().item()}, {t.max().item()}]"
            )
        return t.long()

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The schedule's ``name`` at ``t`` as ``(B, 1, ..., 1)`` with ``like``'s dtype and device:
        from the float32 buffer, or, for float64 ``like``, from the float64 values (on the CPU)."""
        values = self._float64[name] if like.dtype == torch.float64 else getattr(self, name)
        return _per_sample(values[t.to(values.device)], like)

    def _ddim_coefficients(self, t: torch.Tensor, t_prev: torch.Tensor, eta: float, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(sqrt(abar_prev), sqrt(1 - abar_prev - sigma^2), sigma)`` of :func:`ddim_step`, each
        ``(B, 1, ..., 1)`` like ``like``; ``t_prev = -1`` means ``abar_prev = 1``. Computed in float64
        (on the CPU): ``1 - abar_t / abar_prev`` is a difference of nearby numbers when the steps are
        close (it is ``beta_t`` for ``t_prev = t - 1``), which float32 ``abar`` would get wrong in the
        third digit for the first steps of the linear schedule."""
        abar = self._float64["alphas_cumprod"]
        t, t_prev = t.to(abar.device), t_prev.to(abar.device)
        abar_t = abar[t]
        abar_prev = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], torch.ones_like(abar_t))
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
        return tuple(_per_sample(v, like) for v in (abar_prev.sqrt(), direction, sigma))

    # ------------------------------------------------------------------ closed forms

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw of ``q(x_t | x_0)``: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``.

        ``x0``, ``noise`` (B, ...) of one shape; ``t`` (B,) int64, 0-based. Returns (B, ...).
        """
        check_same_shape(x0=x0, noise=noise)
        t = self.check_timesteps(t, len(x0))
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The posterior ``q(x_{t-1} | x_t, x_0) = N(mean, variance)``:

            mean = coef1 x_0 + coef2 x_t,  coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t),
                                            coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t),
            variance = beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).

        ``x0``, ``xt`` (B, ...); ``t`` (B,) int64, 0-based. Returns ``(mean, variance,
        log_variance)``, each (B, ...) (the last two constant per sample; ``log_variance`` is the
        clipped one: at ``k = 0``, where ``beta~ = 0``, it is ``log beta~_1``).
        """
        check_same_shape(x0=x0, xt=xt)
        t = self.check_timesteps(t, len(x0))
        mean = self._at("posterior_mean_coef1", t, x0) * x0 + self._at("posterior_mean_coef2", t, x0) * xt
        variance = self._at("posterior_variance", t, x0).expand_as(x0)
        log_variance = self._at("posterior_log_variance_clipped", t, x0).expand_as(x0)
        return mean, variance, log_variance

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`q_sample` for ``x_0`` given the noise: ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``.

        ``xt``, ``eps`` (B, ...); ``t`` (B,) int64, 0-based. Returns (B, ...).
        """
        check_same_shape(xt=xt, eps=eps)
        t = self.check_timesteps(t, len(xt))
        return (xt - self._at("sqrt_one_minus_alphas_cumprod", t, xt) * eps) / self._at("sqrt_alphas_cumprod", t, xt)

    def predict_eps(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`q_sample` for the noise given ``x_0``: ``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``."""
        check_same_shape(xt=xt, x0=x0)
        t = self.check_timesteps(t, len(xt))
        return (xt - self._at("sqrt_alphas_cumprod", t, xt) * x0) / self._at("sqrt_one_minus_alphas_cumprod", t, xt)


def _check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    return schedule


# --------------------------------------------------------------------------- the training loss


def _call_model(model, x: torch.Tensor, t: torch.Tensor, labels=None, cond=None) -> torch.Tensor:
    """``eps_theta(x, t[, labels][, cond])``; the keyword arguments are passed only when given, so a
    plain ``model(x, t)`` function works too."""
    kwargs = {}
    if labels is not None:
        kwargs["labels"] = labels.to(x.device)
    if cond is not None:
        kwargs["cond"] = cond.to(x.device)
    eps = model(x, t, **kwargs)
    if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
        got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
        raise ValueError(f"the model must return a noise prediction of x's shape {tuple(x.shape)}, got {got}")
    return eps


def noise_prediction_loss(
    model: Callable,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ho et al.'s simple loss, a Monte-Carlo estimate with one ``(t, eps)`` per sample:

        L_simple = E_{t ~ U{0..T-1}, eps ~ N(0, I)} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2,

    averaged over every element (so a model that predicts 0 scores about 1).

    Args:
        model: ``eps_theta(x_t, t[, labels=...][, cond=...]) -> (B, ...)``, e.g. a :class:`UNet`.
        x0: data in model space ``[-1, 1]``, (B, ...).
        schedule: the :class:`NoiseSchedule`.
        generator: a CPU generator for ``t`` and ``eps`` (drawn on the CPU and moved).
        labels, cond: passed on to ``model`` when given.
    Returns a scalar.
    """
    check_tensor("x0", x0)
    _check_schedule(schedule)
    if generator is None:
        t = torch.randint(schedule.num_steps, (len(x0),), device=x0.device)
    else:
        t = torch.randint(schedule.num_steps, (len(x0),), generator=generator, device=generator.device).to(x0.device)
    eps = standard_normal(x0.shape, like=x0, generator=generator)
    xt = schedule.q_sample(x0, t, eps)
    return F.mse_loss(_call_model(model, xt, t, labels, cond), eps)


# --------------------------------------------------------------------------- classifier-free guidance


def guided_eps(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w: float, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598):

        eps_guided = (1 + w) eps_theta(x, t, y) - w eps_theta(x, t, null),

    with the *null label* ``null = model.n_classes`` (the label the model was trained with when
    the condition was dropped). ``w = 0`` is the plain conditional model; ``w > 0`` pushes
    samples towards what makes ``y`` likely (``eps_guided = eps(x, null) + (1 + w) (eps(x, y) -
    eps(x, null))``). The other common convention (e.g. Stable Diffusion's ``guidance_scale``)
    writes ``s = 1 + w``: ``eps(x, null) + s (eps(x, y) - eps(x, null))``.

    ``model``: a class-conditional noise predictor with an int attribute ``n_classes`` that
    accepts label ``n_classes`` (:class:`UNet` or :class:`ConditionalDDPM`); ``x`` (B, ...);
    ``t`` (B,) int64; ``labels`` (B,) int64 in ``0..n_classes - 1``; ``cond`` is passed to both
    evaluations unchanged. Both evaluations run as one batch of ``2B``. Returns (B, ...).
    """
    n_classes = getattr(model, "n_classes", None)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int):
        raise ValueError(
            f"classifier-free guidance needs a class-conditional model with a null label (an int attribute n_classes), "
            f"got {type(model).__name__} with n_classes={n_classes!r}: sample without guidance"
        )
    w = _real("guidance weight w", w)
    check_tensor("x", x)
    check_labels(labels, n_classes, len(x), name="labels")
    labels = labels.to(x.device)
    null = torch.full_like(labels, n_classes)
    both = _call_model(
        model,
        torch.cat([x, x]),
        torch.cat([t, t]),
        torch.cat([labels, null]),
        None if cond is None else torch.cat([cond, cond]),
    )
    return combine_guidance(*both.chunk(2), w)


def combine_guidance(eps_cond: torch.Tensor, eps_null: torch.Tensor, w: float) -> torch.Tensor:
    """The classifier-free guidance combination ``(1 + w) eps_cond - w eps_null`` (``w = 0``: the
    conditional prediction), shared by :func:`guided_eps` and the set-conditioned model of
    :mod:`fsl_course.few_shot_diffusion`. Any matching shapes."""
    return (1 + w) * eps_cond - w * eps_null


def _predict_eps(model, x, t, labels, cond, guidance) -> torch.Tensor:
    if guidance is None:
        return _call_model(model, x, t, labels, cond)
    if labels is None:
        raise ValueError("guidance needs labels: the class to guide towards, (B,) int64")
    return guided_eps(model, x, t, labels, guidance, cond)


# --------------------------------------------------------------------------- ancestral sampling (DDPM)


def _check_variance(variance) -> str:
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES} (sigma_t^2 = beta_t or beta~_t), got {variance!r}")
    return variance


def _x0_and_eps(schedule: NoiseSchedule, xt, t, eps, clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x0_hat`` from the predicted noise, clipped to ``[-1, 1]`` if asked, and the noise consistent
    with it (``eps`` itself without clipping)."""
    x0 = schedule.predict_x0(xt, t, eps)
    if not clip_x0:
        return x0, eps
    x0 = x0.clamp(-1, 1)
    return x0, schedule.predict_eps(xt, t, x0)


def _ancestral_step(model_eps, xt, t, schedule, noise, variance, clip_x0) -> tuple[torch.Tensor, torch.Tensor]:
    _check_schedule(schedule)
    check_same_shape(xt=xt, model_eps=model_eps)
    t = schedule.check_timesteps(t, len(xt))
    _check_variance(variance)
    x0, _ = _x0_and_eps(schedule, xt, t, model_eps, clip_x0)
    mean, _, _ = schedule.posterior_mean_variance(x0, xt, t)
    last = t == 0
    if bool(last.all()):
        return mean, x0
    if noise is None:
        raise ValueError("noise (B, ...) ~ N(0, I) is needed for an ancestral step at k > 0")
    check_same_shape(xt=xt, noise=noise)
    var = "betas" if variance == "beta" else "posterior_variance"
    sigma = schedule._at(var, t, xt).sqrt() * _per_sample(~last, xt)  # no noise at k = 0
    return mean + sigma * noise, x0


def ancestral_step(
    model_eps: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None,
    variance: str = "beta",
    clip_x0: bool = True,
) -> torch.Tensor:
    """One step of ancestral sampling, ``x_{t-1} ~ p_theta(x_{t-1} | x_t)``:

        x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)         (clipped to [-1, 1] if clip_x0)
        x_{t-1} = mu~_t(x_t, x0_hat) + sigma_t z,  sigma_t^2 = beta_t ("beta") or beta~_t ("beta_tilde").

    Without clipping ``mu~_t(x_t, x0_hat) = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)``
    (Ho et al. 2020, Algorithm 2); with clipping (the default, as in their code) the mean uses the
    clipped ``x0_hat``. No noise is added where ``t = 0`` (the last step returns the mean).

    Args:
        model_eps: the predicted noise ``eps_theta(x_t, t)``, (B, ...): the step is a pure function.
        xt: (B, ...) in model space. t: (B,) int64, 0-based.
        noise: ``z ~ N(0, I)`` (B, ...); may be None if every ``t`` is 0.
        variance: ``"beta"`` or ``"beta_tilde"``.
    Returns ``x_{t-1}``, (B, ...).
    """
    return _ancestral_step(model_eps, xt, t, schedule, noise, variance, clip_x0)[0]


@torch.no_grad()
def ancestral_sample(
    model: Callable,
    shape,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    variance: str = "beta",
    labels: torch.Tensor | None = None,
    guidance: float | None = None,
    trajectory: bool = False,
    cond: torch.Tensor | None = None,
    clip_x0: bool = True,
    progress: bool = False,
):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): ``x_T ~ N(0, I)``, then
    :func:`ancestral_step` for ``k = T-1, ..., 0`` with ``eps = model(x_k, k[, labels][, cond])``
    (or :func:`guided_eps` with weight ``guidance``), the model in eval mode, on its device.

    The generator draws ``x_T`` first and then one ``z`` per step with ``k > 0``, on the CPU.

    Args:
        shape: ``(B, ...)``, e.g. ``(16, 1, 28, 28)``.
        labels, cond: the condition, (B,) int64 and (B, cond_dim), for a conditional model.
        guidance: classifier-free guidance weight ``w`` (None: no guidance).
        trajectory: also return the per-step list of ``(x_k, x0_hat_k)`` (both on the CPU),
            ``k = T-1..0``, for a scrubbing widget.
    Returns ``x_0`` (B, ...) in model space ``[-1, 1]`` (when ``clip_x0``), or ``(x_0, trajectory)``.
    """
    _check_schedule(schedule)
    _check_variance(variance)
    device = _device_of(model)
    like = torch.empty(0, device=device)
    x = standard_normal(_check_shape(shape), like=like, generator=generator)
    path: list[tuple[torch.Tensor, torch.Tensor]] = []
    with _eval_mode(model):
        for k in tqdm(range(schedule.num_steps - 1, -1, -1), desc="DDPM sampling", disable=not progress, leave=False):
            t = torch.full((len(x),), k, dtype=torch.long, device=device)
            eps = _predict_eps(model, x, t, labels, cond, guidance)
            noise = standard_normal(x.shape, like=x, generator=generator) if k > 0 else None
            x_prev, x0 = _ancestral_step(eps, x, t, schedule, noise, variance, clip_x0)
            if trajectory:
                path.append((x.cpu(), x0.cpu()))
            x = x_prev
    return (x, path) if trajectory else x


# --------------------------------------------------------------------------- DDIM


def ddim_timesteps(num_steps: int, steps: int) -> torch.Tensor:
    """The DDIM subsequence of 0-based timesteps, descending: ``linspace(T-1, 0, steps)`` rounded
    (evenly spaced, from the noisiest step ``T-1`` to ``0``; with ``steps = 1`` just ``[T-1]``; with
    ``steps = T`` every step). Rounding keeps them distinct because the spacing is ``>= 1``. (steps,) int64."""
    num_steps, steps = check_count("num_steps", num_steps), check_count("steps", steps)
    if steps > num_steps:
        raise ValueError(f"steps must be at most the schedule's {num_steps} steps, got {steps}")
    timesteps = torch.linspace(num_steps - 1, 0, steps, dtype=torch.float64).round().long()
    return torch.unique(timesteps).flip(0)


def _check_eta(eta) -> float:
    return _real("eta", eta, low=0.0, high=1.0)


def _ddim_step(xt, eps, t, t_prev, schedule, eta, noise, clip_x0) -> tuple[torch.Tensor, torch.Tensor]:
    _check_schedule(schedule)
    check_same_shape(xt=xt, eps=eps)
    t = schedule.check_timesteps(t, len(xt))
    t_prev = schedule.check_timesteps(t_prev, len(xt), name="t_prev", allow_minus_one=True)
    if (t_prev.to(t.device) >= t).any():
        raise ValueError("t_prev must be earlier than t (t_prev < t; -1 for the final step to x_0)")
    eta = _check_eta(eta)
    x0, eps = _x0_and_eps(schedule, xt, t, eps, clip_x0)
    sqrt_abar_prev, direction, sigma = schedule._ddim_coefficients(t, t_prev, eta, xt)
    x_prev = sqrt_abar_prev * x0 + direction * eps
    if eta > 0 and bool((t_prev >= 0).any()):
        if noise is None:
            raise ValueError("noise (B, ...) ~ N(0, I) is needed for a DDIM step with eta > 0")
        check_same_shape(xt=xt, noise=noise)
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddim_step(
    xt: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    schedule: NoiseSchedule,
    eta: float,
    noise: torch.Tensor | None,
    clip_x0: bool = True,
) -> torch.Tensor:
    """One DDIM step from ``t`` to an earlier ``t_prev`` (Song et al. 2021, eq. 12):

        x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).

    ``t_prev = -1`` means ``abar_prev = 1`` (the final step: ``x_prev = x0_hat``, ``sigma = 0``).
    With ``clip_x0`` (default) ``x0_hat`` is clipped to ``[-1, 1]`` and ``eps`` replaced by the
    noise consistent with it, ``(x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``, so that ``eta = 1``
    over every step stays exactly the ancestral sampler with ``sigma^2 = beta~`` (then
    ``sigma^2 = beta~_t``). ``eta = 0`` is deterministic: ``noise`` is ignored (may be None).

    ``xt``, ``eps``, ``noise``: (B, ...); ``t``, ``t_prev``: (B,) int64, 0-based; ``eta`` in [0, 1].
    Returns ``x_prev``, (B, ...).
    """
    return _ddim_step(xt, eps, t, t_prev, schedule, eta, noise, clip_x0)[0]


@torch.no_grad()
def ddim_sample(
    model: Callable,
    shape,
    schedule: NoiseSchedule,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
    guidance: float | None = None,
    trajectory: bool = False,
    cond: torch.Tensor | None = None,
    clip_x0: bool = True,
    progress: bool = False,
):
    """DDIM sampling on ``steps`` evenly spaced timesteps (:func:`ddim_timesteps`): ``x ~ N(0, I)``
    at ``k = T-1``, then :func:`ddim_step` from each timestep to the next one and finally to ``-1``.

    The generator draws ``x_T`` first and then (only if ``eta > 0``) one ``z`` per step that does
    not end at ``-1``, on the CPU; so ``eta = 1, steps = T`` draws exactly what
    :func:`ancestral_sample` draws, and with ``variance="beta_tilde"`` gives the same samples.
    Arguments and return value as :func:`ancestral_sample` (the trajectory has ``steps`` entries).
    """
    _check_schedule(schedule)
    eta = _check_eta(eta)
    timesteps = ddim_timesteps(schedule.num_steps, steps).tolist()
    device = _device_of(model)
    x = standard_normal(_check_shape(shape), like=torch.empty(0, device=device), generator=generator)
    path: list[tuple[torch.Tensor, torch.Tensor]] = []
    with _eval_mode(model):
        for i, k in enumerate(tqdm(timesteps, desc="DDIM sampling", disable=not progress, leave=False)):
            k_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            t = torch.full((len(x),), k, dtype=torch.long, device=device)
            t_prev = torch.full((len(x),), k_prev, dtype=torch.long, device=device)
            eps = _predict_eps(model, x, t, labels, cond, guidance)
            noise = standard_normal(x.shape, like=x, generator=generator) if eta > 0 and k_prev >= 0 else None
            x_prev, x0 = _ddim_step(x, eps, t, t_prev, schedule, eta, noise, clip_x0)
            if trajectory:
                path.append((x.cpu(), x0.cpu()))
            x = x_prev
    return (x, path) if trajectory else x


# --------------------------------------------------------------------------- the network


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style position encoding of the timestep (Vaswani et al. 2017; Ho et al. 2020):

        e(t) = [sin(t w_0), ..., sin(t w_{d/2-1}), cos(t w_0), ..., cos(t w_{d/2-1})],  w_i = max_period^(-i / (d/2)).

    ``t``: (B,) timesteps (any number type); ``dim`` even. Returns (B, dim) float32.
    """
    check_tensor("t", t, floating=False)
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even int >= 2, got {dim!r}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = rearrange(t.float(), "b -> b 1") * rearrange(freqs, "f -> 1 f")
    return torch.cat([args.sin(), args.cos()], dim=1)


class TimeEmbedding(nn.Module):
    """``t`` (B,) int64 -> (B, out_dim): :func:`sinusoidal_embedding` of size ``dim``, then
    Linear -> SiLU -> Linear."""

    def __init__(self, dim: int = 32, out_dim: int = 128):
        super().__init__()
        self.dim = dim
        sinusoidal_embedding(torch.zeros(1, dtype=torch.long), dim)  # validates dim
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    """A residual block conditioned by FiLM / adaptive group norm:

        h = conv1(SiLU(GroupNorm(x)))
        scale, shift = Linear(SiLU(emb))                          (each (B, out))
        h = conv2(SiLU(GroupNorm(h) * (1 + scale) + shift))
        out = skip(x) + h                                         (skip: 1x1 conv if channels change)

    ``x`` (B, in, H, W), ``emb`` (B, emb_dim) -> (B, out, H, W). ``conv2`` starts at zero, so the
    block starts as (a projection of) the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int):
        super().__init__()
        self.norm1, self.norm2 = _group_norm(in_channels), _group_norm(out_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.film = nn.Linear(emb_dim, 2 * out_channels)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.film(F.silu(emb)), "b (two c) -> two b c 1 1", two=2)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class UNet(nn.Module):
    """A small U-Net noise predictor ``eps_theta(x_t, t[, y][, c])`` for (B, 1, 28, 28) images
    (Ronneberger et al. 2015, arXiv:1505.04597; the DDPM variant of Ho et al. 2020, without
    attention). ``channels`` gives the width at each resolution, 28x28, 14x14, 7x7 (1 to 3
    entries); with the default ``(16, 32, 64)``:

        x (1, 28, 28) -> conv (16, 28x28) ------------------------------------------------- skip --+
          -> stride-2 conv -> ResBlock (32, 14x14) ------------------------ skip --+               |
          -> stride-2 conv -> ResBlock (64, 7x7) ------------ skip --+             |               |
          -> ResBlock (64, 7x7, middle) -> concat -------------------+             |               |
          -> ResBlock (64, 7x7) -> 2x2 transposed conv (32, 14x14) -> concat ------+               |
          -> ResBlock (32, 14x14) -> 2x2 transposed conv (16, 28x28) -> concat --------------------+
          -> ResBlock (16, 28x28) -> GroupNorm, SiLU, conv -> eps (1, 28, 28)

    Most of the cost is at 28x28, so that level is the thinnest and has no residual block on the
    way down (its skip connection is the input convolution's output).
    Every ResBlock gets the embedding

        emb = TimeEmbedding(t) [+ LabelEmbedding(y)] [+ Linear(cond)]       (B, 4 * channels[0])

    through FiLM / adaptive group norm (:class:`ResBlock`). Conditioning:

    * ``n_classes``: labels ``y`` in ``0..n_classes``, where ``n_classes`` is the learned **null
      label** ("no condition", for classifier-free guidance); ``labels`` are then required.
    * ``cond_dim``: an arbitrary conditioning vector ``cond`` (B, cond_dim), e.g. a support-set
      embedding from a set encoder; ``cond`` is then required.
    * ``cond_channels``: conditioning *images* ``cond_image`` (B, cond_channels, 28, 28) concatenated
      to ``x`` as extra input channels (spatial conditioning, e.g. the mean image of a support set);
      ``cond_image`` is then required.

    The output convolution starts at zero, so an untrained net predicts ``eps = 0``. The default
    has 0.37 M parameters (+ 64 per class with ``n_classes``); a forward pass of 64 images is
    about 1.8 G multiply-adds (tens of milliseconds on one CPU core).
    """

    def __init__(self, channels=(16, 32, 64), n_classes: int | None = None, cond_dim: int | None = None, cond_channels: int = 0):
        super().__init__()
        channels = tuple(channels) if isinstance(channels, (tuple, list)) else channels
        if not isinstance(channels, tuple) or len(channels) not in (1, 2, 3):
            raise ValueError(f"channels must be a tuple of 1 to 3 widths, for 28x28, 14x14, 7x7, got {channels!r}")
        for c in channels:
            check_count("each of channels", c)
        self.channels = channels
        self.n_classes = None if n_classes is None else check_count("n_classes", n_classes)
        self.cond_dim = None if cond_dim is None else check_count("cond_dim", cond_dim)
        self.emb_dim = emb_dim = 4 * channels[0]
        self.time_embedding = TimeEmbedding(max(channels[0], 16), emb_dim)
        self.label_embedding = None if n_classes is None else nn.Embedding(n_classes + 1, emb_dim)
        self.cond_projection = None if cond_dim is None else nn.Linear(cond_dim, emb_dim)
        if isinstance(cond_channels, bool) or not isinstance(cond_channels, int) or cond_channels < 0:
            raise ValueError(f"cond_channels must be an int >= 0, got {cond_channels!r}")
        self.cond_channels = cond_channels
        self.conv_in = nn.Conv2d(1 + cond_channels, channels[0], 3, padding=1)
        self.down_blocks, self.downsample = nn.ModuleList(), nn.ModuleList()
        previous = channels[0]
        for c in channels[1:]:
            self.downsample.append(nn.Conv2d(previous, previous, 3, stride=2, padding=1))
            self.down_blocks.append(ResBlock(previous, c, emb_dim))
            previous = c
        self.mid = ResBlock(previous, previous, emb_dim)
        self.up_blocks, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(channels))):
            self.up_blocks.append(ResBlock(previous + channels[i], channels[i], emb_dim))
            previous = channels[i]
            if i > 0:
                self.upsample.append(nn.ConvTranspose2d(previous, channels[i - 1], 2, stride=2))
                previous = channels[i - 1]
        self.norm_out = _group_norm(previous)
        self.conv_out = nn.Conv2d(previous, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def embed(self, t: torch.Tensor, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning embedding (B, emb_dim), checking ``labels`` and ``cond``."""
        batch = len(t)
        emb = self.time_embedding(t)
        if self.label_embedding is None:
            if labels is not None:
                raise ValueError("this UNet is not class-conditional (n_classes=None): call it without labels")
        else:
            if labels is None:
                raise ValueError(
                    f"this UNet is class-conditional: pass labels, (B,) int64 in 0..{self.n_classes - 1}, "
                    f"or {self.n_classes} (the null label) for the unconditional prediction"
                )
            check_labels(labels, self.n_classes + 1, batch, name="labels")
            emb = emb + self.label_embedding(labels)
        if self.cond_projection is None:
            if cond is not None:
                raise ValueError("this UNet takes no conditioning vector (cond_dim=None): call it without cond")
        else:
            if cond is not None:
                check_tensor("cond", cond)
            if cond is None or cond.ndim != 2 or tuple(cond.shape) != (batch, self.cond_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"this UNet needs cond of shape (B, cond_dim) = ({batch}, {self.cond_dim}), got {got}")
            emb = emb + self.cond_projection(cond)
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                cond_image: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, 1, 28, 28), ``t`` (B,) int64 0-based [, ``labels``, ``cond``, ``cond_image``] -> predicted noise (B, 1, 28, 28)."""
        check_tensor("x", x)
        if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"x must be images of shape (B, 1, 28, 28) in model space [-1, 1], got {tuple(x.shape)}")
        check_tensor("t", t, floating=False)
        if t.is_floating_point() or t.dtype == torch.bool or t.ndim != 1 or len(t) != len(x):
            raise ValueError(f"t must be a (B,) = ({len(x)},) integer tensor of 0-based timesteps, got dtype {t.dtype}, shape {tuple(t.shape)}")
        emb = self.embed(t, labels, cond)
        if self.cond_channels:
            if cond_image is not None:
                check_tensor("cond_image", cond_image)
            if cond_image is None or tuple(cond_image.shape) != (len(x), self.cond_channels, *IMAGE_SHAPE[1:]):
                got = None if cond_image is None else tuple(cond_image.shape)
                raise ValueError(f"this UNet needs cond_image of shape (B, {self.cond_channels}, 28, 28) = "
                                 f"({len(x)}, {self.cond_channels}, 28, 28), got {got}")
            x = torch.cat([x, cond_image], dim=1)
        elif cond_image is not None:
            raise ValueError("this UNet takes no conditioning image (cond_channels=0): call it without cond_image")
        h = self.conv_in(x)
        skips = [h]
        for down, block in zip(self.downsample, self.down_blocks):
            h = block(down(h), emb)
            skips.append(h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------- LoRA


class _LoRA(nn.Module):
    """Shared part of :class:`LoRALinear` and :class:`LoRAConv2d`: ``y = base(x) + (alpha / r) B(A(x))``."""

    base: nn.Module

    def _setup(self, base: nn.Module, rank: int, alpha: float | None, lora_a: nn.Module, lora_b: nn.Module) -> None:
        self.rank = check_count("rank", rank)
        self.alpha = float(rank) if alpha is None else _real("alpha", alpha)
        self.scaling = self.alpha / self.rank
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.lora_A, self.lora_B = lora_a, lora_b
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear's default (and peft's)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))

    def lora_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


class LoRALinear(_LoRA):
    """LoRA around a frozen ``nn.Linear`` (Hu et al. 2021): ``y = W x + b + (alpha / r) B A x`` with
    ``A`` (r, in) Kaiming-uniform and ``B`` (out, r) zero, so at attach time the output is the base
    layer's. The base layer's parameters get ``requires_grad=False`` and are never changed.
    ``alpha=None`` means ``alpha = r`` (scaling 1)."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        r = check_count("rank", rank)
        self._setup(base, r, alpha, nn.Linear(base.in_features, r, bias=False), nn.Linear(r, base.out_features, bias=False))

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A``, (out, in)."""
        return self.scaling * self.lora_B.weight @ self.lora_A.weight

    def merged(self) -> nn.Linear:
        """A new ``nn.Linear`` with weight ``W + (alpha / r) B A`` (same output, no LoRA overhead)."""
        layer = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        layer.to(self.base.weight)
        with torch.no_grad():
            layer.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                layer.bias.copy_(self.base.bias)
        return layer


class LoRAConv2d(_LoRA):
    """LoRA around a frozen ``nn.Conv2d``: ``A`` is a convolution with the base's kernel size,
    stride, padding and dilation from ``in`` to ``r`` channels (Kaiming-uniform), ``B`` a 1x1
    convolution from ``r`` to ``out`` channels (zero): ``y = conv(x) + (alpha / r) B(A(x))``, which is
    the convolution with weight ``W + (alpha / r) B A`` (a rank-``r`` update of ``W`` seen as an
    ``out x (in k k)`` matrix). Grouped convolutions are not supported."""

    def __init__(self, base: nn.Conv2d, rank: int = 4, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps an nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError("LoRAConv2d supports convolutions with groups=1, zero padding given as numbers")
        r = check_count("rank", rank)
        lora_a = nn.Conv2d(base.in_channels, r, base.kernel_size, stride=base.stride, padding=base.padding,
                           dilation=base.dilation, bias=False)
        self._setup(base, r, alpha, lora_a, nn.Conv2d(r, base.out_channels, 1, bias=False))

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A`` as a convolution weight, (out, in, kh, kw)."""
        return self.scaling * torch.einsum("or,rikl->oikl", self.lora_B.weight[:, :, 0, 0], self.lora_A.weight)

    def merged(self) -> nn.Conv2d:
        """A new ``nn.Conv2d`` with weight ``W + (alpha / r) B A``."""
        b = self.base
        layer = nn.Conv2d(b.in_channels, b.out_channels, b.kernel_size, stride=b.stride, padding=b.padding,
                          dilation=b.dilation, bias=b.bias is not None)
        layer.to(b.weight)
        with torch.no_grad():
            layer.weight.copy_(b.weight + self.delta_weight())
            if b.bias is not None:
                layer.bias.copy_(b.bias)
        return layer


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def attach_lora(
    module: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    targets: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
) -> list[nn.Parameter]:
    """Freeze every parameter of ``module`` and wrap chosen ``nn.Linear`` / ``nn.Conv2d``
    submodules, in place, in :class:`LoRALinear` / :class:`LoRAConv2d` of rank ``rank`` and
    scale ``alpha / rank`` (``alpha=None``: ``alpha = rank``).

    ``targets``: None for every Linear and (ungrouped) Conv2d; a list of ``fnmatch`` patterns
    matched against the qualified names (e.g. ``["*.conv1", "*.conv2"]``, ``["time_embedding.*"]``);
    or a function ``(name, submodule) -> bool``. Layers already wrapped are skipped.
    Returns the new trainable parameters (the LoRA ``A`` and ``B`` weights), e.g. for an optimizer.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    check_count("rank", rank)
    if targets is None:
        def chosen(name, sub):
            return not (isinstance(sub, nn.Conv2d) and sub.groups != 1)
    elif callable(targets):
        chosen = targets
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        if not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"targets must be None, a list of name patterns or a function (name, module) -> bool, got {targets!r}")

        def chosen(name, sub):
            return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    inside_lora = {name for name, sub in module.named_modules() if isinstance(sub, _LoRA)}
    candidates = [
        (name, sub)
        for name, sub in module.named_modules()
        if type(sub) in (nn.Linear, nn.Conv2d) and not any(name.startswith(prefix + ".") for prefix in inside_lora)
    ]
    selected = [(name, sub) for name, sub in candidates if chosen(name, sub)]
    if not selected:
        names = ", ".join(name for name, _ in candidates[:20]) + (", ..." if len(candidates) > 20 else "")
        raise ValueError(f"no nn.Linear / nn.Conv2d layer matches targets={targets!r}; the layers are: {names or 'none'}")
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    trainable = []
    for name, sub in selected:
        wrapper = (LoRALinear if isinstance(sub, nn.Linear) else LoRAConv2d)(sub, rank, alpha)
        wrapper.to(sub.weight)
        _set_submodule(module, name, wrapper)
        trainable.extend(wrapper.lora_parameters())
    return trainable


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA ``A`` and ``B`` weights of every wrapper in ``module``."""
    return [p for sub in module.modules() if isinstance(sub, _LoRA) for p in sub.lora_parameters()]


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every LoRA wrapper in ``module`` (in place) by its merged plain layer
    (``W + (alpha / r) B A``); returns ``module``. The merged layers' parameters are trainable
    again (``requires_grad=True``); the rest of the module keeps its flags."""
    for name, sub in list(module.named_modules()):
        if isinstance(sub, _LoRA) and name:
            _set_submodule(module, name, sub.merged())
    return module


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """The number of (trainable, by default) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- registered models


def _check_sampler(sampler) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return sampler


class _DiffusionModel(GenerativeModel):
    """The parts shared by :class:`DDPM`, :class:`ConditionalDDPM` and the set-conditioned model of
    :mod:`fsl_course.few_shot_diffusion`: ``unet`` and ``schedule``."""

    unet: UNet
    schedule: NoiseSchedule
    #: the sampler used when ``sampler=None`` (the CLIs also read it to check ``--steps``)
    default_sampler: str = "ancestral"

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The noise prediction ``eps_theta(x_t, t[, y])`` of :attr:`unet`, (B, 1, 28, 28)."""
        return self.unet(x, t, labels=labels, cond=cond)

    def _sample(self, n: int, labels, generator, steps, sampler, eta, guidance, variance) -> torch.Tensor:
        return self._sample_with(self, n, generator, steps, sampler, eta, variance, labels, guidance)

    def _sample_with(self, eps_model, n: int, generator, steps, sampler, eta, variance, labels=None, guidance=None) -> torch.Tensor:
        """``n`` images in [0, 1] from the noise predictor ``eps_model(x, t[, labels])`` with this model's schedule
        (``sampler=None``: :attr:`default_sampler`)."""
        sampler = _check_sampler(self.default_sampler if sampler is None else sampler)
        shape = (n, *IMAGE_SHAPE)
        if sampler == "ancestral":
            if steps is not None and steps != self.schedule.num_steps:
                raise ValueError(f"the ancestral sampler runs all {self.schedule.num_steps} steps; use sampler='ddim' for fewer (got steps={steps})")
            x = ancestral_sample(eps_model, shape, self.schedule, generator, variance=variance, labels=labels, guidance=guidance)
        else:
            steps = min(50, self.schedule.num_steps) if steps is None else steps
            x = ddim_sample(eps_model, shape, self.schedule, steps, eta=eta, generator=generator, labels=labels, guidance=guidance)
        return from_tanh_range(x).clamp(0, 1)


@register_model("ddpm")
class DDPM(_DiffusionModel):
    """An unconditional DDPM for 28x28 images: a :class:`UNet` ``unet`` (noise predictor) and a
    :class:`NoiseSchedule` ``schedule`` (not saved: rebuilt from ``num_steps`` and ``schedule``).
    Trained by :func:`train_diffusion` with :func:`noise_prediction_loss`.
    """

    def __init__(self, num_steps: int = 1000, schedule: str = "linear", channels=(16, 32, 64)):
        channels = list(channels) if isinstance(channels, (tuple, list)) else channels
        super().__init__(num_steps=num_steps, schedule=schedule, channels=channels)
        self.n_classes = None
        self.schedule = NoiseSchedule(num_steps, schedule)
        self.unet = UNet(channels)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, steps: int | None = None, sampler: str | None = None,
               eta: float = 0.0, guidance: float | None = None, variance: str = "beta") -> torch.Tensor:
        """``n`` images (n, 1, 28, 28) in ``[0, 1]``: ``sampler="ancestral"`` (the default, all ``T`` steps,
        :func:`ancestral_sample` with ``variance``) or ``"ddim"`` (:func:`ddim_sample` with ``eta``;
        ``steps=None`` means ``min(50, T)``); then ``(x + 1) / 2``, clamped to [0, 1]."""
        n = check_count("n", n)
        if guidance is not None:
            raise ValueError("guidance needs a class-conditional model (cond-ddpm) trained with label dropout; this DDPM is unconditional")
        return self._sample(n, None, generator, steps, sampler, eta, None, variance)


@register_model("cond-ddpm")
class ConditionalDDPM(_DiffusionModel):
    """A class-conditional DDPM: :class:`UNet` with ``n_classes`` (labels in ``0..n_classes - 1``
    plus the null label ``n_classes``), trained by :func:`train_diffusion` with the labels
    replaced by the null label with probability ``p_uncond``, so that it can sample with
    classifier-free guidance (:func:`guided_eps`)."""

    def __init__(self, n_classes: int, num_steps: int = 1000, schedule: str = "linear", channels=(16, 32, 64)):
        channels = list(channels) if isinstance(channels, (tuple, list)) else channels
        super().__init__(n_classes=n_classes, num_steps=num_steps, schedule=schedule, channels=channels)
        self.n_classes = check_count("n_classes", n_classes)
        self.schedule = NoiseSchedule(num_steps, schedule)
        self.unet = UNet(channels, n_classes=n_classes)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, generator: torch.Generator | None = None, steps: int | None = None,
               sampler: str | None = None, eta: float = 0.0, guidance: float | None = None, variance: str = "beta") -> torch.Tensor:
        """One image per label, (n, 1, 28, 28) in ``[0, 1]``, ``x ~ p(x | y)``; ``guidance=w``
        uses classifier-free guidance with ``eps = (1 + w) eps(x, y) - w eps(x, null)`` (None or 0:
        plain conditional). Other arguments as :meth:`DDPM.sample`."""
        check_labels(labels, self.n_classes, name="labels")
        if len(labels) == 0:
            raise ValueError("labels must hold at least one class label")
        return self._sample(len(labels), labels.to(self.device), generator, steps, sampler, eta, guidance, variance)


# --------------------------------------------------------------------------- training


def train_diffusion(
    model: DDPM | ConditionalDDPM,
    dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    device: torch.device | str,
    seed: int = 0,
    progress: bool = True,
    p_uncond: float = 0.1,
    grad_clip: float | None = 1.0,
) -> dict[str, list[float]]:
    """Train a :class:`DDPM` or :class:`ConditionalDDPM` with Adam on :func:`noise_prediction_loss`.

    Each step draws ``batch_size`` images uniformly from all ``C * n`` images (with
    replacement), maps them to ``[-1, 1]`` and takes one Adam step (gradient norm clipped to
    ``grad_clip``, 1.0 as in Ho et al.; None: no clipping). For a :class:`ConditionalDDPM` the
    label is the class index (class ``c`` of the dense tensor has label ``c``), replaced by the
    null label ``n_classes`` with probability ``p_uncond`` (condition dropout for classifier-free
    guidance; 0.1 in Ho & Salimans 2022). No EMA of the weights.

    Args:
        dataset: a :class:`~fsl_course.data.FewShotDataset` or a dense ``(C, n, 1, 28, 28)`` tensor in [0, 1].
        steps, batch_size, lr: Adam steps, images per step, learning rate.
        device: where to train (batches, timesteps and noise are drawn on the CPU and moved).
        seed: seeds the batches, label dropout, timesteps and noise (the initialisation is the model's own).
        progress: show a tqdm bar with the last loss.
    Returns ``{"loss": [...]}``, one value per step.
    """
    if not isinstance(model, (DDPM, ConditionalDDPM)):
        raise TypeError(f"train_diffusion trains a DDPM or a ConditionalDDPM, got {type(model).__name__}")
    images = dense_images(dataset, model)
    n_per_class = images.shape[1]
    conditional = isinstance(model, ConditionalDDPM)
    steps, batch_size = check_count("steps", steps), check_count("batch_size", batch_size)
    p_uncond = _real("p_uncond", p_uncond, low=0.0, high=1.0)
    if grad_clip is not None:
        grad_clip = _real("grad_clip", grad_clip, low=0.0)
    flat = rearrange(images, "c n ch h w -> (c n) ch h w")
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()

    def batch_loss() -> torch.Tensor:
        index = torch.randint(len(flat), (batch_size,), generator=generator)
        x0 = to_tanh_range(flat[index]).to(device)
        labels = None
        if conditional:
            labels = index // n_per_class
            drop = torch.rand(batch_size, generator=generator) < p_uncond
            labels = torch.where(drop, torch.full_like(labels, model.n_classes), labels).to(device)
        return noise_prediction_loss(model.unet, x0, model.schedule, generator, labels)

    history = adam_steps(list(model.unet.parameters()), batch_loss, steps=steps, lr=lr, grad_clip=grad_clip,
                         desc=f"train {model.name or type(model).__name__}", progress=progress)
    model.eval()
    return history


def adam_steps(parameters: list[nn.Parameter], batch_loss: Callable[[], torch.Tensor], *, steps: int, lr: float,
               grad_clip: float | None, desc: str, progress: bool) -> dict[str, list[float]]:
    """``steps`` Adam steps on ``parameters``, each on ``batch_loss()`` (a fresh batch's scalar loss), with
    the gradient norm clipped to ``grad_clip`` (None: no clipping) and a tqdm bar showing the last loss.
    The training loop of :func:`train_diffusion` and of :mod:`fsl_course.few_shot_diffusion`. Returns
    ``{"loss": [...]}``, one value per step."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    history: dict[str, list[float]] = {"loss": []}
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        loss = batch_loss()
        optimizer.zero_grad()
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", refresh=False)
    return history


__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "VARIANCES",
    "ConditionalDDPM",
    "DDPM",
    "LoRAConv2d",
    "LoRALinear",
    "NoiseSchedule",
    "ResBlock",
    "TimeEmbedding",
    "adam_steps",
    "UNet",
    "ancestral_sample",
    "ancestral_step",
    "attach_lora",
    "combine_guidance",
    "count_parameters",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "guided_eps",
    "lora_parameters",
    "merge_lora",
    "noise_prediction_loss",
    "sinusoidal_embedding",
    "train_diffusion",
]
