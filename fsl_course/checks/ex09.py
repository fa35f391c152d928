"""Visible checks of exercise 09 (metric-based meta-learning): the prototypes of a Prototypical Network,
its logits (negative squared Euclidean distances), the attention of a Matching Network as class
log-probabilities, and the (query, class) pairs that a Relation Network scores.

The expected values are worked out by hand or from the stated formulas (written out here, in float64,
with explicit loops where that is clearer), so the checks do not depend on the package's reference
implementations in :mod:`fsl_course.meta`:

* prototypes (Snell et al. 2017, arXiv:1703.05175), ``p_c = (1 / |S_c|) sum_{i: y_i = c} e_i``: six
  embeddings in 2-D from three classes with 3, 2 and 1 shots, **not** sorted by class;
* the logits ``-||f(x_q) - p_c||^2`` on points whose distances are whole numbers (a 3-4-5 triangle);
* the Matching Network's ``log P(y = c | x_q) = log sum_{i: y_i = c} softmax_i(s cos(f(x_q), f(x_i)))``
  (Vinyals et al. 2016, arXiv:1606.04080) with ``s = ln 2``, so that ``exp(s cos) = 2^cos`` and the
  attention is a ratio of small integers for cosines 0 and 1; ``s = 0`` (uniform attention: the class
  frequencies); and ``s = 100`` in float32, where ``exp`` overflows and a class's probability underflows
  to 0 unless the log-probabilities are computed with log-sum-exp;
* the Relation Network's pairs (Sung et al. 2018, arXiv:1711.06025) with a stand-in relation module,
  ``r = 100 * (query part) + (class part)`` on 1x1 maps, so that the position of each number in the
  ``(Q, N)`` result shows which pair it came from; then a random linear stand-in on 3x3 maps against
  a loop over the pairs.

The four parts are independent: no part calls another, so each is checked (and graded) on its own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fsl_course.checks import (
    Misuse as _Misuse,
    close64,
    dtype_name as _dtype,
    first_line as _first_line,
    fmt_values as _fmt,
    visible_check,
)
from fsl_course.checks.losses import shape_of as _shape

F64 = torch.float64
LN2 = math.log(2.0)

# Part A: 6 embeddings (D = 2) of 3 classes with 3, 2 and 1 shots, in no particular order
HAND_EMBEDDINGS = ((1.0, 2.0), (0.0, 0.0), (5.0, 5.0), (2.0, 4.0), (3.0, 6.0), (4.0, -1.0))
HAND_LABELS = (1, 0, 2, 0, 1, 0)
HAND_PROTOTYPES = ((2.0, 1.0), (2.0, 4.0), (5.0, 5.0))

# Part B: squared distances 0, 2, 13, 25
HAND_QUERY = ((0.0, 0.0), (1.0, 1.0), (3.0, 4.0))
HAND_PROTOS = ((0.0, 0.0), (3.0, 4.0))
HAND_LOGITS = ((0.0, -25.0), (-2.0, -13.0), (-25.0, 0.0))

# Part C: cosines 0, 1 and 1/sqrt(2); support labels [0, 1, 0]
HAND_SUPPORT_F = ((1.0, 0.0), (0.0, 1.0), (2.0, 0.0))
HAND_SUPPORT_Y = (0, 1, 0)
HAND_QUERY_F = ((1.0, 0.0), (0.0, 3.0), (1.0, 1.0))
HAND_PROBS = ((0.8, 0.2), (0.5, 0.5), (2 / 3, 1 / 3))  # with scale ln 2

# the errors of shapes and dtypes that a learner's function raises inside torch: a failed check with a hint
_SHAPE_WORDS = ("size", "shape", "dimension", "dtype", "scalar type", "mat1", "mat2", "must match", "broadcast",
                "out of range", "out of bounds")


def _close(value, target, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """``value`` is a floating tensor of ``target``'s shape, close to it (float64, this bank's tolerances)."""
    return close64(value, torch.as_tensor(target, dtype=F64), rtol, atol)


def _call(expect, what: str, function, *args, hint: str):
    """``function(*args)``: a misused stand-in (:class:`Misuse`), or a torch error about shapes or dtypes raised
    inside the learner's function, fails the check with ``hint`` instead of a traceback. Other errors
    (``NotImplementedError``, the unsolved exercise's stub, first of all) pass through unchanged."""
    try:
        return function(*args)
    except NotImplementedError:  # a RuntimeError, but the exercise's stub: its task is the message to show
        raise
    except _Misuse as err:
        expect(False, f"{what}: {err}")
    except IndexError as err:
        expect(False, f"{what} raised {_first_line(err)}. hint: {hint}")
    except RuntimeError as err:
        if not any(word in str(err) for word in _SHAPE_WORDS):
            raise
        expect(False, f"{what} raised {_first_line(err)}. hint: {hint}")


def _unchanged(expect, before, after) -> None:
    expect(all(torch.equal(a, b) for a, b in zip(before, after)),
           "do not modify the inputs in place. hint: no +=, /=, out= or in-place methods (ending in _) on them")


def _differentiable(expect, out, what: str) -> None:
    expect(isinstance(out, torch.Tensor) and out.requires_grad,
           f"{what}: with inputs that require grad, the result must too (the backbone learns through it), got a "
           "result without a gradient. hint: stay in torch on the inputs: no .detach(), .item(), .tolist(), .numpy() "
           "or torch.tensor(...) of their values, and no torch.no_grad()")


# --------------------------------------------------------------------------- Part A

A_HINT = ("one_hot = F.one_hot(labels, n_way).to(embeddings.dtype) is (n, N); one_hot.T @ embeddings (N, D) are the "
          "per-class sums, one_hot.sum(dim=0) (N,) the per-class counts")


@visible_check
def prototypes(prototypes, expect):
    embeddings, labels = torch.tensor(HAND_EMBEDDINGS), torch.tensor(HAND_LABELS)
    before = embeddings.clone(), labels.clone()
    what = "prototypes(embeddings (6, 2), labels [1, 0, 2, 0, 1, 0], 3)"
    out = _call(expect, what, prototypes, embeddings, labels, 3, hint=A_HINT)
    hint = "one row per class, p_c of dimension D: (n_way, D)"
    if _shape(out) == "(2, 3)":
        hint = "rows are classes: (n_way, D) = (3, 2), e.g. one_hot.T @ embeddings, not embeddings.T @ one_hot"
    expect(isinstance(out, torch.Tensor) and _shape(out) == "(3, 2)",
           f"6 embeddings of dimension D = 2 and n_way = 3 give (n_way, D) = (3, 2), got {_shape(out)}. hint: {hint}")
    sums = torch.tensor(((6.0, 3.0), (4.0, 8.0), (5.0, 5.0)))
    hint = "p_c = the sum of class c's embeddings divided by the number of class c's shots"
    if _close(out, sums):
        hint = "divide each class's sum by its number of shots: a mean, not a sum"
    elif _close(out, sums / 2):
        hint = ("divide by each class's own number of shots (here 3, 2 and 1), not by n / n_way: the classes need not "
                "have the same number of shots")
    elif _close(out, sums / 6):
        hint = "divide by each class's number of shots, not by the number of embeddings"
    elif _close(out, embeddings.reshape(3, 2, 2).mean(dim=1)):
        hint = ("the support set is not sorted by class: select each class's rows by its labels (labels == c, or a "
                "one-hot matrix), do not reshape")
    elif _close(out, torch.tensor(((2.0, 4.0), (2.0, 1.0), (5.0, 5.0)))):
        hint = "row c is class c: go through c = 0, ..., n_way - 1, not through the classes in the order they appear"
    elif _close(out, embeddings.mean(dim=0).expand(3, 2)):
        hint = "average each class's shots separately, not all the embeddings"
    expect(_close(out, HAND_PROTOTYPES),
           f"class 0 has the shots [0, 0], [2, 4], [4, -1] (mean [2, 1]), class 1 has [1, 2], [3, 6] (mean [2, 4]) and "
           f"class 2 has [5, 5]: prototypes [[2, 1], [2, 4], [5, 5]], got {_fmt(out)}. hint: {hint}")
    _unchanged(expect, before, (embeddings, labels))

    # a 1-shot episode in float64: the prototypes are the shots themselves, in the order of their labels
    g = torch.Generator().manual_seed(90)
    shots = torch.randn(5, 4, generator=g, dtype=F64)
    labels = torch.tensor([3, 0, 4, 1, 2])
    hint = ("make the one-hot matrix (or the counts) in embeddings' dtype: F.one_hot(labels, n_way).to(embeddings.dtype), "
            "not .float()")
    out = _call(expect, "prototypes of 5 float64 embeddings, one shot per class", prototypes, shots, labels, 5, hint=hint)
    expect(isinstance(out, torch.Tensor) and out.dtype == F64,
           f"float64 embeddings give float64 prototypes, got {_dtype(out)}. hint: {hint}")
    want = shots[torch.argsort(labels)]
    expect(_close(out, want, 1e-12, 1e-12),
           f"one shot per class, labels [3, 0, 4, 1, 2]: p_c is the one embedding of class c, rows 1, 3, 4, 0, 2 of the "
           f"embeddings, {_fmt(want)}, got {_fmt(out)}. hint: row c of the result is class c")

    # the gradient: d sum_c <w_c, p_c> / d e_i = w_{y_i} / |S_{y_i}|
    embeddings = torch.randn(7, 3, generator=g, dtype=F64).requires_grad_(True)
    labels = torch.tensor([2, 0, 1, 1, 2, 1, 1])
    weights = torch.randn(3, 3, generator=g, dtype=F64)
    out = _call(expect, "prototypes of 7 embeddings that require grad", prototypes, embeddings, labels, 3, hint=A_HINT)
    _differentiable(expect, out, "prototypes")
    (grad,) = torch.autograd.grad((out * weights).sum(), [embeddings])
    counts = torch.tensor([1.0, 4.0, 2.0], dtype=F64)
    want = weights[labels] / counts[labels, None]
    expect(_close(grad, want, 1e-10, 1e-12),
           f"the gradient of sum_c <w_c, p_c> with respect to e_i is w_(y_i) / |S_(y_i)|, got {_fmt(grad)}, expected "
           f"{_fmt(want)}. hint: a mean over each class's shots: every shot of class c gets 1 / |S_c| of p_c's gradient")


# --------------------------------------------------------------------------- Part B

B_HINT = ("query[:, None, :] - protos[None, :, :] is (Q, N, D): square it, sum over the last dimension D and negate; "
          "or torch.cdist(query, protos) ** 2")


def _loop_logits(query: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """-||query_q - protos_c||^2 written out with two loops, in float64."""
    q, p = query.detach().to(F64), protos.detach().to(F64)
    return torch.tensor([[-float(((q[i] - p[c]) ** 2).sum()) for c in range(len(p))] for i in range(len(q))], dtype=F64)


@visible_check
def squared_euclidean_logits(squared_euclidean_logits, expect):
    query, protos = torch.tensor(HAND_QUERY), torch.tensor(HAND_PROTOS)
    before = query.clone(), protos.clone()
    what = "squared_euclidean_logits(query (3, 2), protos (2, 2))"
    out = _call(expect, what, squared_euclidean_logits, query, protos, hint=B_HINT)
    hint = B_HINT
    if _shape(out) == "(2, 3)":
        hint = "rows are queries, columns classes: (Q, N) = (3, 2); query[:, None, :] - protos[None, :, :], not the other way"
    elif _shape(out) in ("(3, 2, 2)", "(3,)", "(2,)"):
        hint = "sum the squared differences over the last dimension, D: .pow(2).sum(dim=-1)"
    expect(isinstance(out, torch.Tensor) and _shape(out) == "(3, 2)",
           f"3 queries and 2 prototypes give (Q, N) = (3, 2) logits, got {_shape(out)}. hint: {hint}")
    want = torch.tensor(HAND_LOGITS, dtype=F64)
    distances = -want
    hint = B_HINT
    if _close(out, distances):
        hint = "the sign: logit_c = -||f(x) - p_c||^2, so that the nearest prototype has the largest logit"
    elif _close(out, -distances.sqrt()) or _close(out, distances.sqrt()):
        hint = ("square the distance: -||f(x) - p_c||^2, not -||f(x) - p_c||; the squared distance (a Bregman divergence) is "
                "what makes the class mean the best prototype and the classifier linear in f(x)")
    elif _close(out, want / 2):
        hint = "sum the squared differences over the D coordinates, do not average them"
    elif _close(out, torch.tensor(((0.0, -25.0), (0.0, -11.0), (0.0, 25.0)))):
        hint = ("that is the linear-classifier form 2 p_c^T f(x) - ||p_c||^2, which drops -||f(x)||^2: it gives the same "
                "softmax (the term is the same for every class), but this function returns the whole -||f(x) - p_c||^2: "
                "subtract ||f(x)||^2 too")
    elif _close(out, -(query[:, None, :] - protos[None, :, :]).pow(2).sum(dim=1)):
        hint = ("sum the squared differences over the last dimension, D (dim=-1 of the (Q, N, D) differences), not over "
                "the classes: here N = D = 2, so the shape alone does not show it")
    expect(_close(out, want),
           f"queries [0, 0], [1, 1], [3, 4] and prototypes [0, 0], [3, 4] (a 3-4-5 triangle) have squared distances "
           f"[[0, 25], [2, 13], [25, 0]]: logits [[0, -25], [-2, -13], [-25, 0]], got {_fmt(out)}. hint: {hint}")
    _unchanged(expect, before, (query, protos))

    # as many queries as classes (Q = N = 4), float64: against two loops
    g = torch.Generator().manual_seed(91)
    query, protos = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    what = "squared_euclidean_logits of float64 query (4, 3) and protos (4, 3)"
    out = _call(expect, what, squared_euclidean_logits, query, protos, hint=B_HINT)
    expect(isinstance(out, torch.Tensor) and out.dtype == F64,
           f"float64 inputs give float64 logits, got {_dtype(out)}. hint: no .float(), and no float32 constants")
    want = _loop_logits(query, protos)
    hint = B_HINT
    if _close(out, want.T, 1e-9, 1e-9):
        hint = ("out[q, c] is query q against prototype c: rows are queries. With Q = N the transposed result has the "
                "right shape, so the mistake shows only in the values")
    expect(_close(out, want, 1e-9, 1e-9),
           f"4 queries and 4 prototypes in float64: out[q, c] = -||query_q - protos_c||^2 = {_fmt(want)}, got "
           f"{_fmt(out)}. hint: {hint}")

    # the gradients: d logit_qc / d f_q = -2 (f_q - p_c), d logit_qc / d p_c = 2 (f_q - p_c)
    query = torch.randn(5, 3, generator=g, dtype=F64).requires_grad_(True)
    protos = torch.randn(2, 3, generator=g, dtype=F64).requires_grad_(True)
    weights = torch.randn(5, 2, generator=g, dtype=F64)
    out = _call(expect, "squared_euclidean_logits of inputs that require grad", squared_euclidean_logits, query, protos,
                hint=B_HINT)
    _differentiable(expect, out, "squared_euclidean_logits")
    grads = torch.autograd.grad((out * weights).sum(), [query, protos], allow_unused=True)
    diff = query.detach()[:, None, :] - protos.detach()[None, :, :]  # (Q, N, D)
    want = (-2 * (weights[..., None] * diff).sum(dim=1), 2 * (weights[..., None] * diff).sum(dim=0))
    expect(all(isinstance(g_, torch.Tensor) for g_ in grads) and _close(grads[0], want[0], 1e-9, 1e-9)
           and _close(grads[1], want[1], 1e-9, 1e-9),
           "the gradients are d logit_qc / d f(x_q) = -2 (f(x_q) - p_c) and d logit_qc / d p_c = 2 (f(x_q) - p_c), got "
           f"{_fmt(grads[0]) if grads[0] is not None else None} for the queries. hint: both the queries and the "
           "prototypes must stay in the graph (the prototypes come from the same backbone)")


# --------------------------------------------------------------------------- Part C

C_HINT = ("cos = F.normalize(query_f, dim=1) @ F.normalize(support_f, dim=1).T is (Q, S); log_a = (scale * cos)"
          ".log_softmax(dim=1); then for each class c the logsumexp of log_a over its shots (i with support_y == c)")


def _matching_formula(query_f, support_f, support_y, n_way: int, scale, normalise=(True, True), dim: int = 1):
    """log sum_{i: y_i = c} softmax_i(scale cos(f_q, f_i)) written out in float64 (or the variant asked for:
    ``normalise`` says which side is normalised, ``dim`` the axis of the softmax)."""
    q, s = query_f.detach().to(F64), support_f.detach().to(F64)
    if normalise[0]:
        q = q / q.norm(dim=1, keepdim=True)
    if normalise[1]:
        s = s / s.norm(dim=1, keepdim=True)
    log_a = (float(scale) * q @ s.T).log_softmax(dim=dim)
    return torch.stack([log_a[:, support_y == c].logsumexp(dim=1) for c in range(n_way)], dim=1)


def _hand_c():
    return torch.tensor(HAND_QUERY_F), torch.tensor(HAND_SUPPORT_F), torch.tensor(HAND_SUPPORT_Y)


@visible_check
def matching_log_probs(matching_log_probs, expect):
    query_f, support_f, support_y = _hand_c()
    before = query_f.clone(), support_f.clone(), support_y.clone()
    what = "matching_log_probs(query_f (3, 2), support_f (3, 2), support_y [0, 1, 0], 2, scale=ln 2)"
    out = _call(expect, what, matching_log_probs, query_f, support_f, support_y, 2, LN2, hint=C_HINT)
    hint = "one row per query, one column per class: (Q, N)"
    if _shape(out) in ("(3, 3)", "(3, 3, 3)"):
        hint = ("add up the attention of each class's shots: (Q, S) attention -> (Q, N), e.g. a @ F.one_hot(support_y, "
                "n_way).to(a.dtype), or a logsumexp over each class's shots")
    elif _shape(out) == "(2, 3)":
        hint = "rows are queries: (Q, N) = (3, 2)"
    expect(isinstance(out, torch.Tensor) and _shape(out) == "(3, 2)",
           f"3 queries, 3 support embeddings and n_way = 2 give (Q, N) = (3, 2) log-probabilities, got {_shape(out)}. "
           f"hint: {hint}")
    probs = torch.tensor(HAND_PROBS, dtype=F64)
    want = probs.log()
    hint = C_HINT
    if _close(out, probs):
        hint = "return log-probabilities, log P(y = c | x), not the probabilities: the training loss is their negative mean"
    elif _close(out, _matching_formula(query_f, support_f, support_y, 2, LN2, (False, False))):
        hint = ("normalise both sides: cos(u, v) = u^T v / (||u|| ||v||), F.normalize(query_f, dim=1) @ "
                "F.normalize(support_f, dim=1).T; the plain dot product favours the long support vectors")
    elif _close(out, _matching_formula(query_f, support_f, support_y, 2, LN2, (True, False))):
        hint = "normalise the support embeddings too: cos(u, v) = u^T v / (||u|| ||v||)"
    elif _close(out, _matching_formula(query_f, support_f, support_y, 2, LN2, (False, True))):
        hint = "normalise the query embeddings too: cos(u, v) = u^T v / (||u|| ||v||)"
    elif _close(out, _matching_formula(query_f, support_f, support_y, 2, 1.0)):
        hint = "multiply the cosines by scale before the softmax: a = softmax_i(scale * cos_i)"
    elif _close(out, _matching_formula(query_f, support_f, support_y, 2, LN2, dim=0)):
        hint = ("the softmax runs over the support set, dim=1 of the (Q, S) scores: each query's attention sums to 1 over "
                "the S shots, not over the queries")
    elif _close(out, torch.log(probs / torch.tensor([2.0, 1.0], dtype=F64))):
        hint = "sum the attention of a class's shots, do not average it: P(y = c | x) = sum_{i: y_i = c} a_i"
    expect(_close(out, want),
           f"scale = ln 2, so exp(scale cos) = 2^cos: the cosines [1, 0, 1], [0, 1, 0] and [0.71, 0.71, 0.71] give the "
           f"attention [0.4, 0.2, 0.4], [0.25, 0.5, 0.25] and [1/3, 1/3, 1/3], so P(y | x) = [0.8, 0.2], [0.5, 0.5], "
           f"[2/3, 1/3]; the logs are {_fmt(want)}, got {_fmt(out)}. hint: {hint}")
    _unchanged(expect, before, (query_f, support_f, support_y))

    # scale 0: uniform attention, P(y = c | x) is the fraction of the support set in class c
    out = _call(expect, "matching_log_probs with scale = 0", matching_log_probs, query_f, support_f, support_y, 2, 0.0,
                hint=C_HINT)
    want = torch.tensor([[2 / 3, 1 / 3]] * 3, dtype=F64).log()
    expect(_close(out, want),
           f"scale = 0: every shot gets attention 1/3, so P(y | x) = [2/3, 1/3] (2 of the 3 shots are class 0) for every "
           f"query, logs {_fmt(want)}, got {_fmt(out)}. hint: sum the attention of each class's shots")

    # scale 100 in float32: exp(100) overflows and P = e^-200 underflows, unless it is all done in log space
    query_f, support_f = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [-3.0, 0.0]])
    support_y = torch.tensor([0, 1, 2])
    out = _call(expect, "matching_log_probs with scale = 100 (float32)", matching_log_probs, query_f, support_f, support_y,
                3, 100.0, hint=C_HINT)
    want = _matching_formula(query_f, support_f, support_y, 3, 100.0)
    finite = isinstance(out, torch.Tensor) and bool(torch.isfinite(out).all())
    hint = ("stay in log space: log_a = (scale * cos).log_softmax(dim=1), then for each class the logsumexp of log_a "
            "over its shots (mask the other shots with -inf). exp(100) overflows float32 (inf / inf = nan), "
            "e^-200 underflows to 0 and log(0) = -inf")
    if finite and isinstance(out, torch.Tensor) and bool((out > -50).all()):
        hint = "log(p + eps) caps every log-probability at log(eps): use log_softmax and logsumexp, no eps"
    expect(_close(out, want, 1e-5, 1e-3),
           f"scale = 100 in float32, query [1, 0] against shots [1, 0], [0, 1], [-3, 0] of classes 0, 1, 2: cosines 1, 0, "
           f"-1, so log P(y | x) = [-log(1 + e^-100 + e^-200), -100 - ..., -200 - ...] = {_fmt(want[0])}, got "
           f"{_fmt(out[0]) if isinstance(out, torch.Tensor) and out.ndim == 2 else _shape(out)}. hint: {hint}")
    expect(out.dtype == torch.float32, f"float32 embeddings give float32 log-probabilities, got {_dtype(out)}")

    # float64, several shots per class, gradients to the embeddings and to a learnable scale
    g = torch.Generator().manual_seed(92)
    query_f = torch.randn(4, 5, generator=g, dtype=F64).requires_grad_(True)
    support_f = torch.randn(6, 5, generator=g, dtype=F64).requires_grad_(True)
    support_y = torch.tensor([1, 0, 2, 1, 1, 0])
    scale = torch.tensor(3.0, dtype=F64, requires_grad=True)
    hint = ("make the one-hot matrix or mask in the embeddings' dtype (F.one_hot(support_y, n_way).to(cos.dtype)), or use "
            "a boolean mask")
    out = _call(expect, "matching_log_probs of float64 embeddings with a learnable scale (a 0-dim tensor)", matching_log_probs,
                query_f, support_f, support_y, 3, scale, hint=hint)
    expect(isinstance(out, torch.Tensor) and out.dtype == F64,
           f"float64 embeddings (and a float64 scale) give float64 log-probabilities, got {_dtype(out)}. hint: {hint}")
    leaves = (query_f.detach().requires_grad_(True), support_f.detach().requires_grad_(True),
              scale.detach().requires_grad_(True))
    formula = _matching_formula_graph(*leaves, support_y, 3)
    expect(_close(out, formula, 1e-9, 1e-9),
           f"4 queries, 6 shots of 3 classes (2, 3 and 1 shots), scale 3, float64: expected {_fmt(formula)}, got "
           f"{_fmt(out)}. hint: {C_HINT}")
    expect(_close(out.exp().sum(dim=1), torch.ones(4, dtype=F64), 1e-9, 1e-9),
           "exp of each row sums to 1: the classes' probabilities add up to 1")
    _differentiable(expect, out, "matching_log_probs")
    weights = torch.randn(4, 3, generator=g, dtype=F64)
    grads = torch.autograd.grad((out * weights).sum(), [query_f, support_f, scale], allow_unused=True)
    want = torch.autograd.grad((formula * weights).sum(), list(leaves))
    expect(grads[2] is not None and _close(grads[2], want[2], 1e-8, 1e-9),
           f"a learnable scale (a tensor that requires grad, as in the cells below) gets its gradient, "
           f"{want[2].item():.6g}, got {None if grads[2] is None else _fmt(grads[2])}. hint: multiply the cosines by "
           "scale itself: no float(scale) or scale.item()")
    expect(all(a is not None and _close(a, b, 1e-8, 1e-9) for a, b in zip(grads[:2], want[:2])),
           "the gradients with respect to the query and support embeddings follow the formula. hint: no .detach(), and "
           "F.normalize rather than an in-place division")


def _matching_formula_graph(query_f, support_f, scale, support_y, n_way: int) -> torch.Tensor:
    """The stated formula in float64 with the graph kept (for the expected gradients)."""
    q = query_f / query_f.norm(dim=1, keepdim=True)
    s = support_f / support_f.norm(dim=1, keepdim=True)
    log_a = (scale * q @ s.T).log_softmax(dim=1)
    return torch.stack([log_a[:, support_y == c].logsumexp(dim=1) for c in range(n_way)], dim=1)


# --------------------------------------------------------------------------- Part D

D_HINT = ("pairs = torch.cat([q, e], dim=1) with q = query_maps.repeat_interleave(N, dim=0) (each query N times) and "
          "e = class_maps.repeat(Q, 1, 1, 1) (the classes tiled Q times): pair q * N + c; then "
          "relation_module(pairs).reshape(Q, N)")


class LinearRelation(nn.Module):
    """A stand-in relation module: ``r = sum(weight * pair)`` over the channels and positions of each pair
    ``(2C, H, W)``, so each score says which query and which class went into it. Checks that it gets the pairs
    ``(B, 2C, H, W)`` and counts its calls."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight  # (2C, H, W)
        self.calls: list[tuple] = []

    def forward(self, pairs):
        shape = tuple(self.weight.shape)
        if not isinstance(pairs, torch.Tensor) or pairs.ndim != 4 or tuple(pairs.shape[1:]) != shape:
            raise _Misuse(f"relation_module takes a batch of pairs (B, 2C, H, W) = (B, {shape[0]}, {shape[1]}, "
                          f"{shape[2]}), got {_shape(pairs)}. hint: concatenate each query's maps and a class's maps "
                          "along the channels, torch.cat([q, e], dim=1), not along the batch or the width")
        self.calls.append(tuple(pairs.shape))
        return (pairs * self.weight.to(pairs.dtype)).sum(dim=(1, 2, 3))


def _loop_relation(query_maps, class_maps, weight) -> torch.Tensor:
    """r[q, c] = sum(weight * concat(query_maps[q], class_maps[c])), with two loops, in float64."""
    w = weight.to(F64)
    return torch.tensor([[float((w * torch.cat([q.to(F64), e.to(F64)])).sum()) for e in class_maps.detach()]
                         for q in query_maps.detach()], dtype=F64)


@visible_check
def relation_scores(relation_scores, expect):
    # 1x1 maps with one channel: r = 100 * (query part) + (class part)
    query_maps = torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1)
    class_maps = torch.tensor([10.0, 20.0]).reshape(2, 1, 1, 1)
    before = query_maps.clone(), class_maps.clone()
    module = LinearRelation(torch.tensor([100.0, 1.0]).reshape(2, 1, 1))
    what = "relation_scores(query_maps (3, 1, 1, 1), class_maps (2, 1, 1, 1), module)"
    out = _call(expect, what, relation_scores, query_maps, class_maps, module, hint=D_HINT)
    expect(len(module.calls) == 1 and module.calls[0][0] == 6,
           f"the module is called once, on all Q * N = 6 pairs, got {len(module.calls)} calls with batches "
           f"{[c[0] for c in module.calls]}. hint: build every pair first and call relation_module(pairs) once (a "
           "relation module with batch norm normalises over the whole batch of pairs)")
    hint = "reshape the (Q * N,) scores to (Q, N): rows are queries, columns classes"
    expect(isinstance(out, torch.Tensor) and _shape(out) == "(3, 2)",
           f"3 queries and 2 classes give (Q, N) = (3, 2) scores, got {_shape(out)}. hint: {hint}")
    want = torch.tensor([[110.0, 120.0], [210.0, 220.0], [310.0, 320.0]])
    hint = D_HINT
    if _close(out, torch.tensor([[110.0, 210.0], [310.0, 120.0], [220.0, 320.0]])):
        hint = ("the pairs are ordered class-major (pair c * Q + q) but read query-major: order them query-major, "
                "pair q * N + c (query_maps.repeat_interleave(N, dim=0), class_maps.repeat(Q, 1, 1, 1)), then "
                ".reshape(Q, N)")
    elif _close(out, torch.tensor([[1001.0, 2001.0], [1002.0, 2002.0], [1003.0, 2003.0]])):
        hint = "the query's maps come first in each pair, then the class's: torch.cat([q, e], dim=1)"
    elif _close(out, want.reshape(2, 3).T):
        hint = "the scores are query-major, pair q * N + c: .reshape(Q, N), not .reshape(N, Q).T"
    expect(_close(out, want),
           f"with the stand-in module r(pair) = 100 * (query part) + (class part), queries [1, 2, 3] and classes "
           f"[10, 20] give [[110, 120], [210, 220], [310, 320]] (row q, column c), got {_fmt(out)}. hint: {hint}")
    _unchanged(expect, before, (query_maps, class_maps))

    # C = 2 channels of 3x3 maps, 4 queries, 3 classes, float64 with gradients: against a loop over the pairs
    g = torch.Generator().manual_seed(93)
    query_maps = torch.randn(4, 2, 3, 3, generator=g, dtype=F64).requires_grad_(True)
    class_maps = torch.randn(3, 2, 3, 3, generator=g, dtype=F64).requires_grad_(True)
    module = LinearRelation(torch.randn(4, 3, 3, generator=g, dtype=F64))
    what = "relation_scores(query_maps (4, 2, 3, 3), class_maps (3, 2, 3, 3), module) in float64"
    out = _call(expect, what, relation_scores, query_maps, class_maps, module, hint=D_HINT)
    want = _loop_relation(query_maps, class_maps, module.weight)
    expect(isinstance(out, torch.Tensor) and _shape(out) == "(4, 3)" and out.dtype == F64,
           f"4 queries and 3 classes of float64 maps give (4, 3) float64 scores, got {_shape(out)} ({_dtype(out)})")
    expect(_close(out, want, 1e-9, 1e-9),
           f"2-channel 3x3 maps, 4 queries, 3 classes: r[q, c] = g(concat(query_maps[q], class_maps[c])) = {_fmt(want)}, "
           f"got {_fmt(out)}. hint: {D_HINT}")
    _differentiable(expect, out, "relation_scores")
    grads = torch.autograd.grad(out.sum(), [query_maps, class_maps], allow_unused=True)
    w = module.weight
    want = (w[:2].expand(4, 2, 3, 3) * 3, w[2:].expand(3, 2, 3, 3) * 4)
    expect(all(a is not None and _close(a, b, 1e-9, 1e-9) for a, b in zip(grads, want)),
           "the gradient of the sum of the scores reaches every query map (once per class) and every class map (once per "
           "query). hint: no .detach(); torch.cat, repeat and expand keep the graph")
