"""Visible checks of exercise 08 (few-shot diffusion): a LoRA layer around a frozen linear layer,
merging it back into one linear layer, the masked set embedding of a support set, and adapting a
pre-trained DDPM's U-Net to K shots with LoRA.

The expected values are worked out by hand or from the stated formulas, so the checks do not
depend on the package's reference implementations:

* LoRA (Hu et al. 2021, arXiv:2106.09685): ``y = W x + b + (alpha / r) B A x`` with ``A`` (r, in)
  random and ``B`` (out, r) zero at the start; a hand-made layer ``W`` (2, 3) with rank 2 and
  ``alpha = 3`` (scaling 1.5), and ``A``, ``B`` set by hand;
* the set embedding (Deep Sets, Zaheer et al. 2017, arXiv:1703.06114): the mean of the features of
  the shots that are present, on hand numbers;
* the adaptation on a tiny U-Net: with learning rate 0 nothing moves, so the losses must be the
  base model's noise-prediction losses on the stated batch for the same generator; with a real
  learning rate the loss on the shots, at fixed timesteps and noise, goes down.

Parts B and D are checked on their own: they are run with a right answer for Part A (the class
below, with the attribute names of the exercise), bound to the name ``LoRALinear`` in the
learner's notebook while Part D's check runs and restored afterwards, so a mistake in Part A fails
only Part A. The hidden tests do the same.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fsl_course.checks import (
    bound_in_globals_of,
    close64,
    first_line as _first_line,
    fmt_values as _fmt,
    visible_check,
)
from fsl_course.checks.losses import shape_of as _shape

F64 = torch.float64
# Part A's hand-made layer: W (out = 2, in = 3), b, rank 2, alpha 3 (scaling 1.5), and A, B set by hand.
HAND_W = ((1.0, 2.0, 0.0), (0.0, -1.0, 3.0))
HAND_BIAS = (0.5, -0.5)
HAND_A = ((1.0, 0.0, -1.0), (0.0, 2.0, 1.0))  # (r, in)
HAND_B = ((1.0, 0.0), (-1.0, 1.0))  # (out, r)
HAND_X = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, -1.0, 2.0), (0.5, 0.5, -1.0))
RANK, ALPHA = 2, 3.0


def _close(value, target: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """``value`` is a floating tensor of ``target``'s shape, close to it (float64, this bank's tolerances)."""
    return close64(value, target, rtol, atol)


def _hand_linear(bias: bool = True, dtype=torch.float32) -> nn.Linear:
    layer = nn.Linear(3, 2, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(HAND_W))
        if bias:
            layer.bias.copy_(torch.tensor(HAND_BIAS))
    return layer


def _hand_delta(scaling: float = ALPHA / RANK) -> torch.Tensor:
    """``scaling * B A`` for the hand-made A and B, (out, in) = (2, 3)."""
    return scaling * torch.tensor(HAND_B, dtype=F64) @ torch.tensor(HAND_A, dtype=F64)


def _rng_neutral(check):
    """Run ``check`` with torch's global random state saved and restored: a check cell leaves the notebook's random
    numbers as they were (the layers it builds draw their initial weights from the global generator)."""
    import functools

    @functools.wraps(check)
    def run(function, expect):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(89)
            return check(function, expect)

    return run


# --------------------------------------------------------------------------- the right answer for Part A


class LoRALinearOfPartA(nn.Module):
    """Part A's answer, with the exercise's attribute names ``base``, ``A``, ``B``, ``rank``, ``alpha``,
    ``scaling``: what Parts B and D are checked (and graded) with."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base, self.rank = base, rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        weight = base.weight
        self.A = nn.Parameter(torch.empty(rank, base.in_features, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.A.T) @ self.B.T


def _hand_lora(bias: bool = True, dtype=torch.float32) -> LoRALinearOfPartA:
    lora = LoRALinearOfPartA(_hand_linear(bias, dtype), RANK, ALPHA)
    with torch.no_grad():
        lora.A.copy_(torch.tensor(HAND_A))
        lora.B.copy_(torch.tensor(HAND_B))
    return lora


# --------------------------------------------------------------------------- Part A


def _attributes(expect, layer) -> None:
    missing = [name for name in ("base", "A", "B", "scaling") if not hasattr(layer, name)]
    expect(not missing, f"the layer has no attribute {', '.join(missing)}. hint: keep the names of the docstring: "
                        "self.base (the wrapped nn.Linear), self.A, self.B (nn.Parameter) and self.scaling = alpha / rank")


@visible_check
@_rng_neutral
def LoRALinear(LoRALinear, expect):  # noqa: N802 (the check of the class LoRALinear)
    base = _hand_linear()
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(80)
        layer = LoRALinear(base, RANK, ALPHA)
    expect(isinstance(layer, nn.Module), f"LoRALinear(base, 2, alpha=3) is an nn.Module, got {type(layer).__name__}. "
                                         "hint: class LoRALinear(nn.Module) with super().__init__() first")
    _attributes(expect, layer)
    expect(all(not p.requires_grad for p in base.parameters()),
           "the base layer is frozen: its weight and bias have requires_grad False. hint: for p in base.parameters(): "
           "p.requires_grad_(False); only A and B are trained")
    A, B = layer.A, layer.B
    expect(isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter),
           f"A and B are nn.Parameter (so that layer.parameters() and an optimizer see them), got {type(A).__name__} and "
           f"{type(B).__name__}. hint: self.A = nn.Parameter(...)")
    hint = "A is (rank, in), B is (out, rank): here in = 3, out = 2, rank = 2, so B A is (out, in) like W"
    if _shape(A) == "(3, 2)" or _shape(B) == "(2, 2)" and _shape(A) != "(2, 3)":
        hint = "A maps the input down to the rank: (rank, in) = (2, 3); B maps it up: (out, rank) = (2, 2)"
    expect(_shape(A) == "(2, 3)" and _shape(B) == "(2, 2)",
           f"nn.Linear(3, 2) with rank 2: A (2, 3) and B (2, 2), got {_shape(A)} and {_shape(B)}. hint: {hint}")
    trainable = [p for p in layer.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    expect(len(trainable) == 2 and count == RANK * (3 + 2),
           f"exactly two trainable tensors, A and B, with r (in + out) = 2 (3 + 2) = 10 numbers, got {len(trainable)} "
           f"tensors with {count} numbers. hint: the base layer's weight and bias are frozen (requires_grad False)")
    expect(bool((B.detach() == 0).all()), f"B starts at zero, got {_fmt(B)}. hint: nn.Parameter(torch.zeros(out, rank)): "
                                          "then B A = 0 and the wrapped layer starts as the base layer")
    expect(bool(torch.isfinite(A.detach()).all()) and bool((A.detach() != 0).any())
           and int(torch.linalg.matrix_rank(A.detach().to(F64))) == RANK,
           f"A starts random (Kaiming-uniform), got {_fmt(A)}. hint: with A = 0 and B = 0 the gradients of both are zero "
           "(dL/dB needs A x, dL/dA needs B) and LoRA never learns; nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))")
    hint = "scaling = alpha / rank (alpha=None: alpha = rank, scaling 1)"
    scaling = getattr(layer, "scaling", None)
    if isinstance(scaling, (int, float, torch.Tensor)) and float(scaling) == ALPHA:
        hint = "divide by the rank: scaling = alpha / rank, so that changing r does not change the size of the update"
    elif isinstance(scaling, (int, float, torch.Tensor)) and math.isclose(float(scaling), RANK / ALPHA):
        hint = "alpha / rank, not rank / alpha"
    expect(isinstance(scaling, (int, float, torch.Tensor)) and math.isclose(float(scaling), ALPHA / RANK),
           f"rank 2, alpha 3: scaling = alpha / rank = 1.5, got {scaling!r}. hint: {hint}")
    x = torch.tensor(HAND_X)
    out = layer(x)
    expect(_close(out, x @ weight.T + bias),
           f"at the start (B = 0) the output is the base layer's, W x + b = {_fmt(x @ weight.T + bias)}, got {_fmt(out)}. "
           "hint: forward(x) = base(x) + scaling * x A^T B^T")
    expect(out.requires_grad, "the output depends on A and B (requires_grad). hint: no torch.no_grad() or .detach() in forward")

    with torch.no_grad():
        A.copy_(torch.tensor(HAND_A))
        B.copy_(torch.tensor(HAND_B))
    out = layer(x)
    want = x.to(F64) @ (torch.tensor(HAND_W, dtype=F64) + _hand_delta()).T + torch.tensor(HAND_BIAS, dtype=F64)
    hint = "y = W x + b + (alpha / r) B A x, i.e. base(x) + scaling * (x @ A.T) @ B.T"
    if _close(out, x.to(F64) @ (torch.tensor(HAND_W, dtype=F64) + _hand_delta(ALPHA)).T + torch.tensor(HAND_BIAS, dtype=F64)):
        hint = "the update is scaled by alpha / rank = 1.5, not by alpha = 3"
    elif _close(out, x.to(F64) @ (torch.tensor(HAND_W, dtype=F64) + _hand_delta(1.0)).T + torch.tensor(HAND_BIAS, dtype=F64)):
        hint = "multiply the update by scaling = alpha / rank"
    expect(_close(out, want),
           f"with A = {list(HAND_A)} and B = {list(HAND_B)} set by hand, the layer is the linear map with weight "
           f"W + (3 / 2) B A: expected {_fmt(want)}, got {_fmt(out)}. hint: {hint}")
    A.grad = B.grad = None
    (out ** 2).sum().backward()
    hand_a = torch.tensor(HAND_A, dtype=F64)
    want_grad_b = 1.5 * (2 * want).T @ (x.to(F64) @ hand_a.T)
    want_grad_a = 1.5 * torch.tensor(HAND_B, dtype=F64).T @ (2 * want).T @ x.to(F64)
    expect(_close(B.grad, want_grad_b, rtol=1e-4, atol=1e-5) and _close(A.grad, want_grad_a, rtol=1e-4, atol=1e-5),
           f"for L = sum(y^2) and g = dL/dy = 2 y: dL/dB = scaling g^T (x A^T) = {_fmt(want_grad_b)} and dL/dA = scaling "
           f"B^T g^T x = {_fmt(want_grad_a)}, got {_fmt(B.grad) if B.grad is not None else 'None'} and "
           f"{_fmt(A.grad) if A.grad is not None else 'None'}. hint: y = base(x) + scaling * (x @ A.T) @ B.T, "
           "no .detach() inside")
    x3 = torch.arange(18.0).reshape(2, 3, 3) / 10
    out3 = layer(x3)
    expect(_close(out3, layer(x3.reshape(-1, 3)).reshape(2, 3, 2)),
           f"inputs (..., in) of any number of dimensions, like nn.Linear: (2, 3, 3) gives (2, 3, 2), got {_shape(out3)}. "
           "hint: x @ self.A.T works on the last dimension")

    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    (layer(x) ** 2).sum().backward()
    optimizer.step()
    expect(torch.equal(base.weight.detach(), weight) and torch.equal(base.bias.detach(), bias),
           "an optimizer step on layer.parameters() leaves the base layer's weight and bias as they were. hint: freeze "
           "them (requires_grad False): the pre-trained weights never change")
    expect(not torch.equal(B.detach(), torch.tensor(HAND_B)), "an optimizer step changes B. hint: B is an nn.Parameter that requires grad")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(81)
        default = LoRALinear(_hand_linear(), 4)
    scaling = getattr(default, "scaling", None)
    expect(isinstance(scaling, (int, float, torch.Tensor)) and math.isclose(float(scaling), 1.0),
           f"LoRALinear(base, 4) (alpha=None) means alpha = rank: scaling 1, got {scaling!r}. hint: "
           "alpha = rank if alpha is None else alpha")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(82)
        double = LoRALinear(_hand_linear(dtype=F64), 2)
    hint = ("create A and B with the base weight's dtype and device: torch.zeros(out, rank, dtype=w.dtype, "
            "device=w.device)")
    try:
        out = double(torch.tensor(HAND_X, dtype=F64))
    except RuntimeError as err:
        expect(False, f"a float64 base layer gives float64 A, B and outputs; the forward pass raised {_first_line(err)}. hint: {hint}")
    expect(isinstance(out, torch.Tensor) and out.dtype == F64 and double.A.dtype == F64 and double.B.dtype == F64,
           f"a float64 base layer gives float64 A, B and outputs, got A {double.A.dtype}, B {double.B.dtype}. hint: {hint}")


# --------------------------------------------------------------------------- Part B


@visible_check
@_rng_neutral
def merge(merge, expect):
    lora = _hand_lora()
    before = {name: value.detach().clone() for name, value in lora.state_dict().items()}
    merged = merge(lora)
    expect(isinstance(merged, nn.Linear) and not isinstance(merged, LoRALinearOfPartA),
           f"merge returns a plain nn.Linear, got {type(merged).__name__}. hint: nn.Linear(in, out) with the merged weight")
    expect(merged is not lora.base, "merge returns a new layer, not the base layer changed in place. hint: "
                                    "layer = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)")
    want = torch.tensor(HAND_W, dtype=F64) + _hand_delta()
    hint = "W + scaling * B A, (out, in) = (2, 3) like W"
    if _close(merged.weight, torch.tensor(HAND_W, dtype=F64) + _hand_delta(1.0)):
        hint = "scale the update: W + lora.scaling * B A"
    elif _close(merged.weight, torch.tensor(HAND_W, dtype=F64)):
        hint = "add the low-rank update scaling * B A to the base weight"
    expect(_close(merged.weight, want),
           f"weight W + (3 / 2) B A = {_fmt(want)}, got {_fmt(merged.weight)}. hint: {hint}")
    expect(merged.bias is not None and _close(merged.bias, torch.tensor(HAND_BIAS, dtype=F64)),
           f"the bias is the base layer's, {list(HAND_BIAS)}, got {_fmt(merged.bias) if merged.bias is not None else None}")
    x = torch.tensor(HAND_X)
    with torch.no_grad():
        expect(_close(merged(x), lora(x)), f"the merged layer gives the LoRA layer's outputs {_fmt(lora(x))}, got {_fmt(merged(x))}")
    expect(all(torch.equal(value, lora.state_dict()[name]) for name, value in before.items()),
           "merge leaves the LoRA layer (and its base layer) as they were. hint: copy into the new layer's weight "
           "under torch.no_grad(), no += on base.weight")
    no_bias = merge(_hand_lora(bias=False))
    expect(isinstance(no_bias, nn.Linear) and no_bias.bias is None,
           f"a base layer without bias gives a merged layer without bias, got "
           f"{_shape(no_bias.bias) if isinstance(no_bias, nn.Linear) else type(no_bias).__name__}. hint: "
           "bias=base.bias is not None")
    double = merge(_hand_lora(dtype=F64))
    expect(isinstance(double, nn.Linear) and double.weight.dtype == F64 and _close(double.weight, want, 1e-12, 1e-12),
           f"a float64 LoRA layer merges into a float64 layer, got {double.weight.dtype if isinstance(double, nn.Linear) else None}. "
           "hint: nn.Linear(..., dtype=base.weight.dtype, device=base.weight.device)")


# --------------------------------------------------------------------------- Part C


@visible_check
@_rng_neutral
def set_embedding(set_embedding, expect):
    features = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]],
                             [[0.0, 1.0], [2.0, -1.0], [4.0, 3.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    before = features.clone(), mask.clone()
    out = set_embedding(features, mask)
    want = torch.tensor([[2.0, 3.0], [2.0, 1.0]])
    expect(isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 2),
           f"features (B, K, D) = (2, 3, 2) give one embedding per set, (B, D) = (2, 2), got {_shape(out)}. hint: reduce over "
           "dim=1, the shots")
    hint = "the sum of the present shots' features divided by how many are present"
    if _close(out, torch.tensor([[4.0 / 3, 2.0], [2.0, 1.0]])):
        hint = "divide by the number of shots present (mask.sum(dim=1)), not by K"
    elif _close(out, features.mean(dim=1)):
        hint = "leave out the absent shots: multiply the features by the mask before summing"
    expect(_close(out, want),
           f"set 0 has shots [1, 2] and [3, 4] present (the third is absent: mask False), set 1 all three: the means are "
           f"[2, 3] and [2, 1], got {_fmt(out)}. hint: {hint}")
    expect(all(torch.equal(a, b) for a, b in zip((features, mask), before)), "do not modify the inputs in place")
    g = torch.Generator().manual_seed(83)
    features = torch.randn(4, 5, 3, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    out = set_embedding(features, mask)
    expect(isinstance(out, torch.Tensor) and out.dtype == F64,
           f"float64 features give a float64 embedding, got {out.dtype if isinstance(out, torch.Tensor) else type(out).__name__}. "
           "hint: mask.to(features.dtype)")
    expect(_close(out[2], features[2, 3], 1e-12, 1e-12),
           f"a set with one shot present embeds as that shot's features {_fmt(features[2, 3])}, got {_fmt(out[2])}")
    order = torch.randperm(5, generator=g)
    shuffled = set_embedding(features[:, order], mask[:, order])
    expect(_close(shuffled, out, 1e-12, 1e-12), "the embedding does not depend on the order of the shots (Deep Sets): "
                                                "shuffling the shots and the mask alike gives the same embedding")
    garbage = torch.where(mask[..., None], features, torch.full_like(features, 1e6))
    expect(_close(set_embedding(garbage, mask), out, 1e-9, 1e-9),
           "the features of absent shots (mask False) do not matter: set them to 1e6 and the embedding stays the same. hint: "
           "(features * mask[..., None]).sum(dim=1)")
    empty = set_embedding(features[:1], torch.zeros(1, 5, dtype=torch.bool))
    expect(_close(empty, torch.zeros(1, 3, dtype=F64), 0, 0),
           f"a set with no shot present embeds as 0 (the docstring's convention), got {_fmt(empty)}. hint: divide by the "
           "count clamped at 1, .clamp_min(1)")


# --------------------------------------------------------------------------- Part D


def tiny_ddpm(seed: int = 84, channels=(8, 16), num_steps: int = 50):
    """A small random DDPM for the checks: its zero-initialised convolutions (each block's ``conv2`` and the
    output convolution) are made random too, so that the output depends on every linear layer."""
    from fsl_course.diffusion import DDPM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DDPM(num_steps=num_steps, channels=channels)
        for module in model.unet.modules():
            if isinstance(module, nn.Conv2d) and not bool(module.weight.detach().any()):
                nn.init.normal_(module.weight, std=0.05)
    return model.eval()


def tiny_shots(k: int = 5, seed: int = 85) -> torch.Tensor:
    """``k`` images (k, 1, 28, 28) in [0, 1] of one made-up glyph: a bar, a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(k, 1, 28, 28)
    x[:, :, 6:22, 12:16] = 1
    x[:, :, 6:9, 8:20] = 1
    return (x + 0.15 * torch.rand(x.shape, generator=g)).clamp(0, 1)


def fixed_loss(unet, schedule, x0: torch.Tensor, seed: int = 86, repeats: int = 8) -> float:
    """The noise-prediction loss of ``unet`` on ``x0`` (in [-1, 1]) repeated ``repeats`` times, at timesteps and noise
    fixed by ``seed``: the same draws before and after adaptation."""
    g = torch.Generator().manual_seed(seed)
    xs = x0.repeat(repeats, 1, 1, 1)
    t = torch.randint(schedule.num_steps, (len(xs),), generator=g)
    eps = torch.randn(xs.shape, generator=g, dtype=xs.dtype)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(unet(schedule.q_sample(xs, t, eps), t), eps).item()


def linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    """The plain nn.Linear layers of ``module`` by qualified name."""
    return {name: sub for name, sub in module.named_modules() if type(sub) is nn.Linear}


def expected_losses(unet, schedule, x0: torch.Tensor, steps: int, seed: int) -> list[float]:
    """``steps`` noise-prediction losses of the (unchanged) ``unet`` on the batch ``x0`` with one generator."""
    from fsl_course.diffusion import noise_prediction_loss

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [noise_prediction_loss(unet, x0, schedule, g).item() for _ in range(steps)]


@visible_check
@_rng_neutral
def lora_adapt(lora_adapt, expect):
    original, shots = tiny_ddpm(), tiny_shots()
    shots_before = shots.clone()
    names = linear_layers(original.unet)
    weights = {name: value.detach().clone() for name, value in original.state_dict().items()}
    model = copy.deepcopy(original)
    with bound_in_globals_of(lora_adapt, {"LoRALinear": LoRALinearOfPartA}), torch.random.fork_rng(devices=[]):
        torch.manual_seed(87)
        losses = lora_adapt(model, shots, 2, 3, 0.0, torch.Generator().manual_seed(7))
    expect(isinstance(losses, list) and len(losses) == 3 and all(isinstance(v, float) for v in losses),
           f"steps = 3 gives a list of 3 Python floats, one loss per step, got "
           f"{type(losses).__name__ if not isinstance(losses, list) else [type(v).__name__ for v in losses]}. hint: "
           "losses.append(loss.item())")
    wrapped = {name: model.unet.get_submodule(name) if _has(model.unet, name) else None for name in names}
    missed = [name for name, sub in wrapped.items() if not isinstance(sub, LoRALinearOfPartA)]
    expect(not missed, f"every nn.Linear of model.unet is wrapped in your LoRALinear ({len(names)} here: "
                       f"{', '.join(names)}), these are not: {', '.join(missed)}. hint: collect them first, "
                       "layers = [(n, m) for n, m in model.unet.named_modules() if type(m) is nn.Linear], then "
                       "setattr(model.unet.get_submodule(parent), child, LoRALinear(m, rank)) for each")
    twice = [name for name, sub in wrapped.items() if type(sub.base) is not nn.Linear or sub.rank != 2]
    expect(not twice, f"each linear layer is wrapped once, with the rank given (2): {', '.join(twice)} are not. hint: "
                      "collect the layers in a list before replacing any, so that a LoRA layer's own base is not wrapped again")
    convs = [name for name, sub in model.unet.named_modules() if isinstance(sub, nn.Conv2d)]
    expect(len(convs) == sum(isinstance(sub, nn.Conv2d) for sub in original.unet.modules()),
           "the convolutions stay as they are (plain nn.Conv2d, frozen): wrap the nn.Linear layers only")
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    want = sum(2 * (layer.in_features + layer.out_features) for layer in names.values())
    expect(count == want,
           f"only A and B train: r (in + out) summed over the {len(names)} linear layers = {want} trainable numbers, got "
           f"{count}. hint: first freeze every parameter of the model (requires_grad_(False)), then wrap")
    after = model.state_dict()
    changed = [name for name, value in weights.items() if not torch.equal(_base_value(after, name), value)]
    expect(not changed, f"the pre-trained weights are untouched; these changed: {', '.join(changed[:4])}. hint: Adam on "
                        "the LoRA parameters only")
    mapped = expected_losses(original.unet, original.schedule, 2 * shots - 1, 3, 7)
    raw = expected_losses(original.unet, original.schedule, shots, 3, 7)
    hint = ("each step: noise_prediction_loss(model.unet, x0, model.schedule, generator) with x0 = 2 support_x - 1, "
            "all K shots, the generator you were given")
    if all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(losses, raw)):
        hint = "map the shots from [0, 1] to the model's [-1, 1] first: x0 = 2 * support_x - 1"
    elif len(losses) > 1 and len(set(losses)) == 1:
        hint = ("one generator for all the steps (the one passed in): your steps all drew the same t and noise; "
                "noise_prediction_loss(..., generator) draws them afresh at each step")
    elif losses and math.isclose(losses[0], mapped[0], rel_tol=1e-4):
        hint = "one generator for all the steps (the one passed in), drawing t and the noise afresh at each step"
    expect(all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(losses, mapped)),
           f"with lr = 0 nothing moves (B stays 0), so the losses are the pre-trained U-Net's on the batch of the 5 shots "
           f"for this generator, {[round(v, 5) for v in mapped]}; got {[round(v, 5) for v in losses]}. hint: {hint}")
    expect(torch.equal(shots, shots_before), "do not modify support_x in place")

    model = copy.deepcopy(original)
    before = fixed_loss(original.unet, original.schedule, 2 * shots - 1)
    with bound_in_globals_of(lora_adapt, {"LoRALinear": LoRALinearOfPartA}), torch.random.fork_rng(devices=[]):
        torch.manual_seed(88)
        losses = lora_adapt(model, shots, 2, 40, 1e-2, torch.Generator().manual_seed(8))
    moved = [name for name, sub in model.unet.named_modules() if isinstance(sub, LoRALinearOfPartA) and bool(sub.B.detach().any())]
    expect(moved, "40 Adam steps with lr = 0.01 change B. hint: torch.optim.Adam over the parameters that require grad, "
                  "zero_grad, loss.backward(), step")
    now = fixed_loss(model.unet, model.schedule, 2 * shots - 1)
    expect(now < 0.98 * before,
           f"after 40 steps with lr = 0.01 the loss on the shots at fixed timesteps and noise goes down: {before:.4f} "
           f"before, {now:.4f} after. hint: Adam on the LoRA parameters, with the loss of the stated batch")
    after = model.state_dict()
    changed = [name for name, value in weights.items() if not torch.equal(_base_value(after, name), value)]
    expect(not changed, f"training leaves the pre-trained weights untouched; these changed: {', '.join(changed[:4])}")


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _base_value(state: dict, name: str) -> torch.Tensor:
    """The value of the original parameter ``name`` in the adapted model's state dict: ``a.b.weight`` of a
    wrapped layer ``a.b`` lives at ``a.b.base.weight``."""
    if name in state:
        return state[name]
    module, _, leaf = name.rpartition(".")
    return state.get(f"{module}.base.{leaf}", torch.tensor(float("nan")))
