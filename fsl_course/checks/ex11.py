r"""Visible checks of exercise 11 (model-based meta-learning): the labels of a MANN-style sequence shifted by
one step, the input sequence of its recurrent network, and the classifier that a hypernetwork generates
from the prototypes.

The expected values are worked out by hand or from the stated formulas, so the checks do not depend on
the package's reference implementations (:mod:`fsl_course.meta.mann`, :mod:`fsl_course.meta.hypernet`):

* the label shift (Santoro et al. 2016, arXiv:1605.06065): the labels ``[2, 0, 1, 2]`` with 4 slots give
  the rows ``0, e_2, e_0, e_1`` (``e_c`` the one-hot vector of ``c``): row ``t`` is the label of step
  ``t - 1``, row 0 has none; longer sequences against rows of the identity matrix, ``eye[labels[t - 1]]``;
* the input sequence: three 2-d feature vectors ``[1, 2], [3, 4], [5, 6]`` with the labels ``[1, 0, 1]``
  and 3 slots give the rows ``[1, 2, 0, 0, 0], [3, 4, 0, 1, 0], [5, 6, 1, 0, 0]``; and the input of step
  ``t`` must not change when the label of step ``t`` does (for the last step: when ``labels[-1]`` does);
* the generated classifier: prototypes ``p = [[1, 2], [3, -1]]`` (``||p_c||^2 = 5, 10``) and the MLP's output
  ``delta = [[0.5, -1, 2], [0, 1, -0.5]]`` give ``W = p + delta[:, :2] = [[1.5, 1], [3, 0]]`` and
  ``b = -||p_c||^2 / 2 + delta[:, 2] = [-0.5, -5.5]``; with ``delta = 0`` the logits ``W f + b`` are
  ``-||f - p_c||^2 / 2 + ||f||^2 / 2`` (half the Prototypical Network's, up to a constant per query); the
  gradient of ``sum(W) + sum(b)`` is ``1 - p`` for the prototypes and 1 for ``delta``.

Part B is checked on its own: while its check runs, the name ``shift_labels`` that the learner's
``mann_inputs`` looks up in its notebook is bound to a right answer for Part A (and restored afterwards),
so a mistake in Part A fails only Part A. The hidden tests do the same.
"""

from __future__ import annotations

import torch

from fsl_course.checks import (
    bound_in_globals_of,
    close64,
    dtype_name as _dtype,
    first_line as _first_line,
    fmt_values as _fmt,
    Misuse as _Misuse,
    visible_check,
)
from fsl_course.checks.losses import shape_of as _shape

F64 = torch.float64
HAND_LABELS = (2, 0, 1, 2)  # Part A, 4 slots
HAND_FEATURES = ((1.0, 2.0), (3.0, 4.0), (5.0, 6.0))  # Part B, with the labels below and 3 slots
HAND_STEP_LABELS = (1, 0, 1)
HAND_PROTOS = ((1.0, 2.0), (3.0, -1.0))  # Part C: ||p_c||^2 = 5, 10
HAND_DELTA = ((0.5, -1.0, 2.0), (0.0, 1.0, -0.5))


def _close(value, target: torch.Tensor, rtol: float = 1e-6, atol: float = 1e-6) -> bool:
    return close64(value, target, rtol, atol)


def _matrix(value) -> str:
    """A small tensor written out row by row (``[[0, 1], [1, 0]]``), else its first values, for messages."""
    if not isinstance(value, torch.Tensor) or value.ndim > 2 or value.numel() > 30:
        return _fmt(value)

    def number(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    values = value.detach().cpu().tolist()
    if value.ndim < 2:
        return number(values) if value.ndim == 0 else "[" + ", ".join(number(v) for v in values) + "]"
    return "[" + ", ".join("[" + ", ".join(number(v) for v in row) + "]" for row in values) + "]"


def _rows(values, n_slots: int) -> torch.Tensor:
    """The rows ``eye[values]`` of the identity matrix (one-hot vectors), float64; ``None`` gives a row of zeros."""
    eye = torch.eye(n_slots, dtype=F64)
    return torch.stack([torch.zeros(n_slots, dtype=F64) if v is None else eye[v] for v in values])


def _stated_shift(labels: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Row t = eye[labels[t - 1]], row 0 = 0: the stated formula, written out (float64)."""
    return _rows([None] + labels.tolist()[:-1], n_slots)


# --------------------------------------------------------------------------- the right answer for Part A


def shift_labels_of_part_a(labels, n_slots):
    """Part A's answer, bound to the name ``shift_labels`` in the learner's notebook while Part B is checked
    (and graded): ``(T,)`` int64 labels -> ``(T, n_slots)`` float32, row ``t`` = one-hot of ``labels[t - 1]``, row 0 zeros."""
    signature = "shift_labels(labels, n_slots)"
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.ndim != 1 or len(labels) == 0:
        raise _Misuse(f"{signature}: labels is the (T,) int64 tensor of the steps' labels, got {_shape(labels)} ({_dtype(labels)})")
    if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
        raise _Misuse(f"{signature}: n_slots is a positive int (the width of the one-hot vectors), got {n_slots!r}")
    if int(labels.min()) < 0 or int(labels.max()) >= n_slots:
        raise _Misuse(f"{signature}: the labels must lie in 0..n_slots - 1 = 0..{n_slots - 1}, got {labels.tolist()}")
    one_hot = torch.nn.functional.one_hot(labels.long(), n_slots).float()
    return torch.cat([torch.zeros_like(one_hot[:1]), one_hot[:-1]])


def _call(expect, what: str, function, *args):
    """``function(*args)``, failing the check with a message (and a hint) when a stand-in was misused or torch
    cannot join the tensors (sizes that do not match, a dimension out of range); other errors, ``NotImplementedError``
    included, pass through unchanged."""
    try:
        return function(*args)
    except _Misuse as err:
        expect(False, f"{what}: {err}")
    except (RuntimeError, IndexError) as err:
        if isinstance(err, NotImplementedError) or not any(word in str(err) for word in ("size", "Size", "dimension")):
            raise
        expect(False, f"{what} raised {_first_line(err).rstrip('.')}. hint: per step, the features and the shifted labels sit side "
                      "by side: torch.cat([features, shift_labels(labels, n_slots)], dim=1), (T, D) and (T, n_slots)")


# --------------------------------------------------------------------------- Part A


@visible_check
def shift_labels(shift_labels, expect):
    labels = torch.tensor(HAND_LABELS)
    before = labels.clone()
    out = shift_labels(labels, 4)
    want = _rows([None, 2, 0, 1], 4)
    hint = "one row per step, T = 4 rows of n_slots = 4 one-hot entries"
    if isinstance(out, torch.Tensor) and tuple(out.shape) == (3, 4):
        hint = ("keep all T steps: step 0 has no previous label, so its row is zeros (pad at the front), it is not "
                "dropped: torch.cat([zeros (1, n_slots), one_hot[:-1]])")
    elif isinstance(out, torch.Tensor) and out.ndim == 2 and len(out) == 4 and out.shape[1] != 4:
        hint = ("the width is n_slots, not the largest label + 1: F.one_hot(labels, n_slots) (F.one_hot(labels) "
                "guesses the width from the labels, so it changes from episode to episode)")
    expect(isinstance(out, torch.Tensor) and tuple(out.shape) == (4, 4),
           f"labels [2, 0, 1, 2] with n_slots = 4 give a (T, n_slots) = (4, 4) tensor, got {_shape(out)}. hint: {hint}")
    hint = "F.one_hot gives int64: F.one_hot(labels, n_slots).float()"
    if out.is_floating_point():
        hint = "float32, the dtype of the network's weights: .float() (not .double() or .half())"
    expect(out.dtype == torch.float32,
           f"the label input is float32, like the image features it is joined with, got {out.dtype}. hint: {hint}")
    hint = "row t is the one-hot vector of labels[t - 1]; row 0 is zeros"
    if _close(out, _rows(HAND_LABELS, 4)):
        hint = ("this is the one-hot of the step's *own* label, unshifted: the label to predict would be in the input "
                "and the network could copy it instead of learning; shift by one step: row t = one-hot of labels[t - 1]")
    elif _close(out, _rows([0, 1, 2, None], 4)):
        hint = ("shifted the wrong way: row t holds labels[t + 1], the *next* step's label; the label arrives one step "
                "late, row t = one-hot of labels[t - 1], and row 0 (not the last row) is zeros")
    elif _close(out, _rows([2, 2, 0, 1], 4)):
        hint = ("torch.roll wraps around: row 0 got the last label, labels[T - 1], which is the answer of the last step; "
                "step 0 has no previous label: zeros")
    expect(_close(out, want), f"labels [2, 0, 1, 2] give the rows 0, e_2, e_0, e_1 (e_c: the one-hot vector of c), "
                              f"{_matrix(want.long())}, got {_matrix(out)}. hint: {hint}")
    expect(torch.equal(labels, before), "do not modify labels in place")
    changed = labels.clone()
    changed[-1] = 3
    expect(_close(shift_labels(changed, 4), want),
           "changing the last step's label changes nothing: no row holds it (the last label is only ever a target)")
    one = shift_labels(torch.tensor([3]), 5)
    expect(isinstance(one, torch.Tensor) and tuple(one.shape) == (1, 5) and _close(one, torch.zeros(1, 5, dtype=F64), 0, 0),
           f"a single step (T = 1) has no previous label: one row of zeros, (1, 5), got {_shape(one)} {_matrix(one)}")
    g = torch.Generator().manual_seed(110)
    labels = torch.randint(20, (12,), generator=g)
    labels[3] = 19  # the last slot
    out = shift_labels(labels, 20)
    expect(_close(out, _stated_shift(labels, 20), 0, 0),
           f"12 steps, 20 slots, labels {labels.tolist()}: row t = eye(20)[labels[t - 1]], row 0 zeros; got another "
           f"{_shape(out)} tensor")


# --------------------------------------------------------------------------- Part B


def _stated_inputs(features: torch.Tensor, labels: torch.Tensor, n_slots: int) -> torch.Tensor:
    return torch.cat([features.detach().to(F64), _stated_shift(labels, n_slots)], dim=1)


@visible_check
def mann_inputs(mann_inputs, expect):
    with bound_in_globals_of(mann_inputs, {"shift_labels": shift_labels_of_part_a}):
        _mann_inputs(mann_inputs, expect)


def _mann_inputs(mann_inputs, expect):
    features, labels = torch.tensor(HAND_FEATURES), torch.tensor(HAND_STEP_LABELS)
    before = features.clone(), labels.clone()
    what = "mann_inputs(features (3, 2), labels [1, 0, 1], 3)"
    out = _call(expect, what, mann_inputs, features, labels, 3)
    want = _stated_inputs(features, labels, 3)
    hint = "(T, D + n_slots): the D features of each step, then its n_slots label entries, along dim=1"
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == 3 and out.shape[1] < 5:
        hint = "the label part has n_slots = 3 columns: shift_labels(labels, n_slots), with n_slots given"
    expect(isinstance(out, torch.Tensor) and tuple(out.shape) == (3, 5),
           f"{what} is (T, D + n_slots) = (3, 5), got {_shape(out)}. hint: {hint}")
    hint = "torch.cat([features, shift_labels(labels, n_slots)], dim=1)"
    unshifted = torch.cat([features.to(F64), _rows(HAND_STEP_LABELS, 3)], dim=1)
    if _close(out, unshifted):
        hint = ("the label columns hold each step's own label: then the input at step t contains y_t, the answer; use "
                "shift_labels(labels, n_slots), the label of the previous step")
    elif _close(out, torch.cat([want[:, 2:], want[:, :2]], dim=1)):
        hint = "the features come first, then the labels: columns :D are the features, D: the label slots"
    expect(_close(out, want), f"the rows are [1, 2, 0, 0, 0], [3, 4, 0, 1, 0], [5, 6, 1, 0, 0]: each step's features, then "
                              f"the one-hot of the previous step's label (none at step 0); got {_matrix(out)}. "
                              f"hint: {hint}")
    expect(all(torch.equal(a, b) for a, b in zip((features, labels), before)), "do not modify features or labels in place")
    changed = labels.clone()
    changed[-1] = 2
    again = _call(expect, what, mann_inputs, features, changed, 3)
    expect(_close(again, want), "the input of the last step must not change when its own label does (labels[-1] = 2 "
                                "instead of 1): the network would read the answer. hint: use shift_labels(labels, n_slots)")
    double = torch.tensor(HAND_FEATURES, dtype=F64)
    out = _call(expect, "mann_inputs on float64 features", mann_inputs, double, labels, 3)
    expect(isinstance(out, torch.Tensor) and out.dtype == F64,
           f"float64 features give a float64 input sequence, got {_dtype(out)}. hint: no .float() on the result: "
           "torch.cat promotes the float32 labels to the features' dtype")
    leaf = torch.tensor(HAND_FEATURES, requires_grad=True)
    out = _call(expect, what, mann_inputs, leaf, labels, 3)
    grad = None
    if isinstance(out, torch.Tensor) and out.requires_grad:
        (grad,) = torch.autograd.grad(out.sum(), [leaf])
    expect(grad is not None and _close(grad, torch.ones(3, 2, dtype=F64), 0, 0),
           "the gradient flows back to the features (the backbone learns through them): d sum(inputs) / d features "
           f"= 1, got {None if grad is None else _fmt(grad)}. hint: no .detach(), torch.tensor(...) or numpy on the features")
    g = torch.Generator().manual_seed(111)
    features, labels = torch.randn(10, 64, generator=g), torch.randint(20, (10,), generator=g)
    out = _call(expect, "mann_inputs(features (10, 64), labels, 20)", mann_inputs, features, labels, 20)
    expect(_close(out, _stated_inputs(features, labels, 20)),
           f"10 steps, D = 64, 20 slots, labels {labels.tolist()}: [features | eye(20)[labels[t - 1]]] (zeros at step 0), "
           f"(10, 84), got {_shape(out)}")


# --------------------------------------------------------------------------- Part C


def _unpack(expect, out, n: int, d: int):
    expect(isinstance(out, tuple) and len(out) == 2 and all(isinstance(v, torch.Tensor) for v in out),
           f"generate_classifier returns a pair of tensors (W, b), got {type(out).__name__}"
           f"{'' if not isinstance(out, (tuple, list)) else f' of {len(out)} ' + ', '.join(type(v).__name__ for v in out)}. "
           "hint: return weight, bias")
    weight, bias = out
    hint = f"W is (N, D) = ({n}, {d}), one weight vector per class; b is (N,) = ({n},), one number per class"
    if bias.ndim == 2 and len(bias) == n and bias.shape[1] in (1, n):
        hint = ("b is (N,): delta[:, D] (an int index drops the dimension), not delta[:, D:], which is (N, 1) and "
                "broadcasts against the (N,) norms to (N, N)")
    elif tuple(weight.shape) == (n, d + 1):
        hint = "W takes the first D columns of delta, delta[:, :D] (or delta[:, :-1]); the last column is the bias correction"
    expect(tuple(weight.shape) == (n, d) and tuple(bias.shape) == (n,),
           f"prototypes ({n}, {d}) give W ({n}, {d}) and b ({n},), got {_shape(weight)} and {_shape(bias)}. hint: {hint}")
    return weight, bias


@visible_check
def generate_classifier(generate_classifier, expect):
    protos, delta = torch.tensor(HAND_PROTOS), torch.tensor(HAND_DELTA)
    before = protos.clone(), delta.clone()
    weight, bias = _unpack(expect, generate_classifier(protos, delta), 2, 2)
    p, dl = protos.to(F64), delta.to(F64)
    want_w, want_b = torch.tensor([[1.5, 1.0], [3.0, 0.0]], dtype=F64), torch.tensor([-0.5, -5.5], dtype=F64)
    hint = "W = p + delta[:, :D]: the prototype plus the MLP's correction"
    if _close(weight, dl[:, :2]):
        hint = ("residual on the prototype: W = p + delta[:, :D], not the MLP's output alone; with delta = 0 the classifier "
                "is then the Prototypical Network's, and the MLP learns only a correction")
    elif _close(weight, 2 * p + dl[:, :2]):
        hint = "W = p + dW, not 2 p: the weights of half the ProtoNet logits, w_c = p_c with b_c = -||p_c||^2 / 2"
    elif _close(weight, p):
        hint = "add the MLP's correction: W = p + delta[:, :D]"
    elif _close(weight, p + dl[:, 1:]):
        hint = "the first D columns of delta are dW, the last one is db: delta[:, :D] and delta[:, D]"
    expect(_close(weight, want_w), f"p = [[1, 2], [3, -1]], delta = [[0.5, -1, 2], [0, 1, -0.5]] give W = p + delta[:, :2] "
                                   f"= [[1.5, 1], [3, 0]], got {_matrix(weight)}. hint: {hint}")
    norms = p.pow(2).sum(1)
    hint = "b_c = -||p_c||^2 / 2 + delta[c, D]: minus half the squared norm of each prototype, plus the last column"
    if _close(bias, dl[:, 2]):
        hint = ("the -||p_c||^2 / 2 term is missing: with w_c = p_c alone, classes with long prototypes win every query; "
                "b_c = -||p_c||^2 / 2 + delta[c, D]")
    elif _close(bias, norms / 2 + dl[:, 2]):
        hint = "the sign: b_c = -||p_c||^2 / 2 + delta[c, D] (from -||f - p_c||^2 / 2 = p_c.f - ||p_c||^2 / 2 - ||f||^2 / 2)"
    elif _close(bias, -norms + dl[:, 2]):
        hint = "half: with w_c = p_c the bias is -||p_c||^2 / 2 (-||p_c||^2 goes with the ProtoNet's w_c = 2 p_c)"
    elif _close(bias, -norms.sqrt() / 2 + dl[:, 2]):
        hint = "the squared norm: protos.pow(2).sum(dim=1), not the norm"
    elif _close(bias, -norms / 2 + dl[:, 0]):
        hint = "the bias correction is the last column of delta, delta[:, D] (delta[:, -1]), not the first"
    elif _close(bias, -p.pow(2).sum(0) / 2 + dl[:, 2]):
        hint = "sum the squares over the features, dim=1 (one ||p_c||^2 per class), not over the classes"
    expect(_close(bias, want_b), f"||p_c||^2 = 5 and 10, so b = -||p_c||^2 / 2 + delta[:, 2] = [-2.5 + 2, -5 - 0.5] = "
                                 f"[-0.5, -5.5], got {_matrix(bias)}. hint: {hint}")
    expect(all(torch.equal(a, b) for a, b in zip((protos, delta), before)), "do not modify protos or delta in place")
    # delta = 0: half the ProtoNet logits, up to a constant per query
    weight, bias = _unpack(expect, generate_classifier(protos, torch.zeros(2, 3)), 2, 2)
    f = torch.tensor([[0.0, 0.0], [2.0, 1.0], [-1.0, 3.0]], dtype=F64)
    logits = f @ weight.detach().to(F64).T + bias.detach().to(F64)
    proto_half = -0.5 * torch.cdist(f, p).pow(2) + 0.5 * f.pow(2).sum(1, keepdim=True)
    expect(_close(logits, proto_half, 1e-6, 1e-5),
           f"with delta = 0 the logits W f + b are -||f - p_c||^2 / 2 + ||f||^2 / 2 (half the ProtoNet logits, up to a "
           f"constant per query): for f = [0, 0], [2, 1], [-1, 3] that is {_matrix(proto_half)}, got {_matrix(logits)}")
    g = torch.Generator().manual_seed(112)
    protos, delta = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 5, generator=g, dtype=F64)
    weight, bias = _unpack(expect, generate_classifier(protos, delta), 3, 4)
    expect(weight.dtype == F64 and bias.dtype == F64,
           f"float64 prototypes and delta give float64 W and b, got {weight.dtype} and {bias.dtype}")
    expect(_close(weight, protos + delta[:, :4], 1e-12, 1e-12) and _close(bias, -0.5 * protos.pow(2).sum(1) + delta[:, 4], 1e-12, 1e-12),
           "N = 3 classes, D = 4 features: W = p + delta[:, :4] (3, 4), b = -||p_c||^2 / 2 + delta[:, 4] (3,)")
    leaves = protos.clone().requires_grad_(True), delta.clone().requires_grad_(True)
    weight, bias = _unpack(expect, generate_classifier(*leaves), 3, 4)
    grads = None
    if weight.requires_grad or bias.requires_grad:
        grads = torch.autograd.grad(weight.sum() + bias.sum(), leaves, allow_unused=True)
    hint = "keep the graph: no .detach(), .item() or numpy; the backbone learns through p_c (in W and b), the MLP through delta"
    if grads is not None and grads[0] is not None and _close(grads[0], torch.ones(3, 4, dtype=F64), 0, 0):
        hint = "the bias's -||p_c||^2 / 2 term must be differentiable in p_c too: no .detach() there"
    expect(grads is not None and all(v is not None for v in grads) and _close(grads[0], 1 - protos, 1e-12, 1e-12)
           and _close(grads[1], torch.ones(3, 5, dtype=F64), 0, 0),
           f"the gradient of sum(W) + sum(b) is 1 - p for the prototypes and 1 for delta, got "
           f"{'none' if grads is None else ', '.join('none' if v is None else _fmt(v) for v in grads)}. hint: {hint}")
    weight, bias = _unpack(expect, generate_classifier(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 1.0, 0.5]])), 1, 2)
    expect(_close(weight, torch.tensor([[4.0, 5.0]], dtype=F64)) and _close(bias, torch.tensor([-12.0], dtype=F64)),
           f"one class p = [3, 4], delta = [1, 1, 0.5]: W = [[4, 5]], b = [-25 / 2 + 0.5] = [-12], got {_matrix(weight)} and "
           f"{_matrix(bias)}")
