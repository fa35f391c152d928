"""Exercise 09 (metric-based meta-learning): the visible checks in fsl_course.checks.ex09 and the hidden tests of
solutions/09_metric_based.ipynb pass the solution and other right answers, and fail typical mistakes (the visible
checks with one line and a hint)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch

from fsl_course import exercises
from fsl_course.checks import CheckFailed, ex09
from solution_notebook import SolutionNotebook

ROOT = Path(__file__).resolve().parent.parent

# one wrong answer calls float() on a scale that requires grad, which torch warns about
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning")

PARTS = ("prototypes", "squared_euclidean_logits", "matching_log_probs", "relation_scores")

SOL09 = SolutionNotebook("09_metric_based.ipynb")
notebook_09, run_hidden_09 = SOL09.notebook, SOL09.run_hidden


@pytest.fixture(autouse=True)
def _own_random_state():
    """The hidden tests seed torch's global generator; keep that from leaking into tests that run later."""
    with torch.random.fork_rng(devices=[]):
        yield


# --------------------------------------------------------------------------- answers

PROTOTYPES = """
def prototypes(embeddings, labels, n_way):
    one_hot = F.one_hot(labels, n_way).{cast}
    return {body}
"""
PROTOTYPES_RIGHT = dict(cast="to(embeddings.dtype)", body="(one_hot.T @ embeddings) / one_hot.sum(dim=0)[:, None]")


def prototypes_variant(**changes) -> str:
    return PROTOTYPES.format(**{**PROTOTYPES_RIGHT, **changes})


LOGITS = """
def squared_euclidean_logits(query, protos):
    return {body}
"""

MATCHING = """
def matching_log_probs(query_f, support_f, support_y, n_way, scale):
    cos = {cos}
    log_a = ({scale} * cos).log_softmax(dim={dim})
    in_class = F.one_hot(support_y, n_way).T.bool()
    return {vote}
"""
MATCHING_RIGHT = dict(cos="F.normalize(query_f, dim=1) @ F.normalize(support_f, dim=1).T", scale="scale", dim="1",
                      vote="log_a[:, None, :].masked_fill(~in_class, -math.inf).logsumexp(dim=2)")


def matching_variant(**changes) -> str:
    return MATCHING.format(**{**MATCHING_RIGHT, **changes})


NAIVE_MATCHING = """
def matching_log_probs(query_f, support_f, support_y, n_way, scale):
    cos = F.normalize(query_f, dim=1) @ F.normalize(support_f, dim=1).T
    attention = {attention}
    probs = attention @ F.one_hot(support_y, n_way).to(attention.dtype)
    return {result}
"""

RELATION = """
def relation_scores(query_maps, class_maps, relation_module):
    n_query, n_way = len(query_maps), len(class_maps)
    q = {q}
    e = {e}
    scores = relation_module({pairs})
    return {result}
"""
RELATION_RIGHT = dict(q="query_maps.repeat_interleave(n_way, dim=0)", e="class_maps.repeat(n_query, 1, 1, 1)",
                      pairs="torch.cat([q, e], dim=1)", result="scores.reshape(n_query, n_way)")


def relation_variant(**changes) -> str:
    return RELATION.format(**{**RELATION_RIGHT, **changes})


# (part, wrong source, a piece of the visible check's one-line message)
MISTAKES_09 = [
    # Part A
    ("prototypes", prototypes_variant(body="one_hot.T @ embeddings"), "hint: divide each class's sum by its number of shots"),
    ("prototypes", prototypes_variant(body="(one_hot.T @ embeddings) / (len(labels) / n_way)"),
     "hint: divide by each class's own number of shots"),
    ("prototypes", prototypes_variant(body="embeddings.reshape(n_way, -1, embeddings.shape[1]).mean(dim=1)"),
     "hint: the support set is not sorted by class"),
    ("prototypes", prototypes_variant(body="torch.stack([embeddings[labels == c].mean(dim=0) for c in dict.fromkeys(labels.tolist())])"),
     "hint: row c is class c"),
    ("prototypes", prototypes_variant(body="embeddings.mean(dim=0).expand(n_way, -1)"), "hint: average each class's shots separately"),
    ("prototypes", prototypes_variant(body="(embeddings.T @ one_hot) / one_hot.sum(dim=0)"), "hint: rows are classes"),
    ("prototypes", prototypes_variant(cast="float()"), "hint: make the one-hot matrix (or the counts) in embeddings' dtype"),
    ("prototypes", prototypes_variant(body="((one_hot.T @ embeddings) / one_hot.sum(dim=0)[:, None]).float()"),
     "float64 embeddings give float64 prototypes"),
    ("prototypes", prototypes_variant(body="(one_hot.T @ embeddings.detach()) / one_hot.sum(dim=0)[:, None]"),
     "the backbone learns through it"),
    ("prototypes", prototypes_variant(
        body="torch.tensor([embeddings[labels == c].mean(dim=0).tolist() for c in range(n_way)], dtype=embeddings.dtype)"),
     "the backbone learns through it"),
    # Part B
    ("squared_euclidean_logits", LOGITS.format(body="(query[:, None, :] - protos[None, :, :]).pow(2).sum(dim=-1)"), "hint: the sign"),
    ("squared_euclidean_logits", LOGITS.format(body="-torch.cdist(query, protos)"), "hint: square the distance"),
    ("squared_euclidean_logits", LOGITS.format(body="-(query[:, None, :] - protos[None, :, :]).pow(2).mean(dim=-1)"),
     "do not average them"),
    ("squared_euclidean_logits", LOGITS.format(body="2 * query @ protos.T - protos.pow(2).sum(dim=1)"),
     "hint: that is the linear-classifier form"),
    ("squared_euclidean_logits", LOGITS.format(body="-(query[None, :, :] - protos[:, None, :]).pow(2).sum(dim=-1)"),
     "hint: rows are queries, columns classes"),
    ("squared_euclidean_logits", LOGITS.format(body="-torch.cdist(query.float(), protos.float()) ** 2"),
     "float64 inputs give float64 logits"),
    ("squared_euclidean_logits", LOGITS.format(body="-(query[:, None, :] - protos.detach()[None, :, :]).pow(2).sum(dim=-1)"),
     "both the queries and the prototypes must stay in the graph"),
    ("squared_euclidean_logits", LOGITS.format(body="-(query[:, None, :] - protos[None, :, :]).pow(2).sum(dim=1)"),
     "hint: sum the squared differences over the last dimension"),
    # Part C
    ("matching_log_probs", matching_variant(vote="log_a[:, None, :].masked_fill(~in_class, -math.inf).logsumexp(dim=2).exp()"),
     "hint: return log-probabilities"),
    ("matching_log_probs", matching_variant(cos="query_f @ support_f.T"), "hint: normalise both sides"),
    ("matching_log_probs", matching_variant(cos="F.normalize(query_f, dim=1) @ support_f.T"),
     "hint: normalise the support embeddings too"),
    ("matching_log_probs", matching_variant(dim="0"), "hint: the softmax runs over the support set"),
    ("matching_log_probs", matching_variant(scale="1"), "hint: multiply the cosines by scale before the softmax"),
    ("matching_log_probs", matching_variant(
        vote="log_a[:, None, :].masked_fill(~in_class, -math.inf).logsumexp(dim=2) - in_class.sum(dim=1).log()"),
     "hint: sum the attention of a class's shots, do not average it"),
    ("matching_log_probs", matching_variant(vote="log_a[:, None, :].masked_fill(~in_class, -math.inf).logsumexp(dim=1)"),
     "hint: add up the attention of each class's shots"),
    ("matching_log_probs", NAIVE_MATCHING.format(attention="(scale * cos).softmax(dim=1)", result="probs.log()"),
     "hint: stay in log space"),
    ("matching_log_probs", NAIVE_MATCHING.format(attention="torch.exp(scale * cos) / torch.exp(scale * cos).sum(dim=1, keepdim=True)",
                                                 result="torch.log(probs)"), "hint: stay in log space"),
    ("matching_log_probs", NAIVE_MATCHING.format(attention="(scale * cos).softmax(dim=1)", result="torch.log(probs + 1e-8)"),
     "hint: log(p + eps) caps every log-probability"),
    ("matching_log_probs", matching_variant(scale="float(scale)"), "a learnable scale"),
    ("matching_log_probs", matching_variant(vote="log_a[:, None, :].masked_fill(~in_class, -math.inf).logsumexp(dim=2).float()"),
     "float64 embeddings (and a float64 scale) give float64 log-probabilities"),
    # Part D
    ("relation_scores", relation_variant(q="query_maps.repeat(n_way, 1, 1, 1)", e="class_maps.repeat_interleave(n_query, dim=0)"),
     "hint: the pairs are ordered class-major"),
    ("relation_scores", relation_variant(pairs="torch.cat([e, q], dim=1)"), "hint: the query's maps come first"),
    ("relation_scores", relation_variant(result="scores"), "hint: reshape the (Q * N,) scores to (Q, N)"),
    ("relation_scores", relation_variant(result="scores.reshape(n_way, n_query).T"), "not .reshape(N, Q).T"),
    ("relation_scores", relation_variant(pairs="torch.cat([q, e], dim=0)"), "relation_module takes a batch of pairs"),
    ("relation_scores", relation_variant(pairs="q + e"), "hint: concatenate each query's maps and a class's maps"),
    ("relation_scores", relation_variant(pairs="torch.cat([q, e], dim=1).detach()"), "the backbone learns through it"),
    ("relation_scores", """
        def relation_scores(query_maps, class_maps, relation_module):  # one call per pair
            return torch.stack([torch.stack([relation_module(torch.cat([q, e])[None])[0] for e in class_maps])
                                for q in query_maps])
     """, "the module is called once"),
]


@pytest.mark.parametrize("name, source, message", MISTAKES_09, ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES_09)])
def test_ex09_a_typical_mistake_fails_the_visible_check_with_one_line_and_a_hint(name, source, message):
    wrong = notebook_09(source)[name]
    with pytest.raises(CheckFailed) as failed:
        getattr(ex09, name)(wrong)
    text = str(failed.value)
    assert text.startswith(f"{name}: check ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("name, source", [m[:2] for m in MISTAKES_09], ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES_09)])
def test_ex09_a_typical_mistake_fails_the_hidden_tests(name, source):
    namespace = notebook_09(source)
    with pytest.raises(Exception):  # an assertion, or the wrong answer's own error
        run_hidden_09(name, namespace)


RIGHT_09 = [  # other right answers: they pass the visible checks and the hidden tests
    ("prototypes", """
        def prototypes(embeddings, labels, n_way):  # a loop over the classes
            return torch.stack([embeddings[labels == c].mean(dim=0) for c in range(n_way)])
    """),
    ("prototypes", """
        def prototypes(embeddings, labels, n_way):  # index_add and bincount
            sums = torch.zeros(n_way, embeddings.shape[1], dtype=embeddings.dtype).index_add(0, labels, embeddings)
            return sums / torch.bincount(labels, minlength=n_way)[:, None].to(embeddings.dtype)
    """),
    ("prototypes", """
        def prototypes(embeddings, labels, n_way):  # scatter_reduce
            index = labels[:, None].expand_as(embeddings)
            out = torch.zeros(n_way, embeddings.shape[1], dtype=embeddings.dtype)
            return out.scatter_reduce(0, index, embeddings, reduce="mean", include_self=False)
    """),
    ("squared_euclidean_logits", LOGITS.format(body="-torch.cdist(query, protos) ** 2")),
    ("squared_euclidean_logits", LOGITS.format(
        body="-(query.pow(2).sum(dim=1, keepdim=True) - 2 * query @ protos.T + protos.pow(2).sum(dim=1))")),
    ("squared_euclidean_logits", LOGITS.format(body="torch.stack([-(query - p).pow(2).sum(dim=1) for p in protos], dim=1)")),
    ("matching_log_probs", """
        def matching_log_probs(query_f, support_f, support_y, n_way, scale):  # cosine_similarity, a loop over classes
            cos = F.cosine_similarity(query_f[:, None, :], support_f[None, :, :], dim=-1)
            log_a = torch.log_softmax(scale * cos, dim=1)
            return torch.stack([log_a[:, support_y == c].logsumexp(dim=1) for c in range(n_way)], dim=1)
    """),
    ("matching_log_probs", matching_variant(vote="(log_a[:, None, :] + F.one_hot(support_y, n_way).T.to(log_a.dtype).log()).logsumexp(dim=2)")),
    ("matching_log_probs", """
        def matching_log_probs(query_f, support_f, support_y, n_way, scale):  # logsumexp in class - logsumexp over all
            scores = scale * (query_f / query_f.norm(dim=1, keepdim=True)) @ (support_f / support_f.norm(dim=1, keepdim=True)).T
            mask = F.one_hot(support_y, n_way).T.bool()
            in_class = torch.where(mask, scores[:, None, :], torch.full_like(scores[:, None, :], -math.inf)).logsumexp(dim=2)
            return in_class - scores.logsumexp(dim=1, keepdim=True)
    """),
    ("relation_scores", relation_variant(q="query_maps.repeat(n_way, 1, 1, 1)", e="class_maps.repeat_interleave(n_query, dim=0)",
                                         result="scores.reshape(n_way, n_query).T")),
    ("relation_scores", relation_variant(q="query_maps[:, None].expand(-1, n_way, -1, -1, -1).flatten(0, 1)",
                                         e="class_maps[None].expand(n_query, -1, -1, -1, -1).flatten(0, 1)",
                                         result="scores.view(n_query, n_way)")),
]


@pytest.mark.parametrize("name, source", RIGHT_09, ids=[f"{r[0]}-{i}" for i, r in enumerate(RIGHT_09)])
def test_ex09_other_right_answers_pass_the_visible_checks_and_the_hidden_tests(name, source, capsys):
    namespace = notebook_09(source)
    getattr(ex09, name)(namespace[name])
    assert "visible checks passed" in capsys.readouterr().out
    run_hidden_09(name, namespace)


def test_the_solution_09_passes_its_checks_and_hidden_tests(capsys):
    namespace = notebook_09()
    for name in PARTS:
        getattr(ex09, name)(namespace[name])
        run_hidden_09(name, namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(PARTS) and all(line.startswith("✓ ") for line in printed), printed


@pytest.mark.parametrize("name", PARTS)
def test_ex09_an_unsolved_part_raises_its_task_not_a_check_failure(name):
    """The exercise's stub raises NotImplementedError with its task (which mentions shapes and dtypes); the check lets
    it through unchanged, so the learner sees the task, not a hint about a shape error."""
    exercise = nbformat.read(ROOT / "exercises" / "09_metric_based.ipynb", as_version=4)
    (stub,) = [c.source for c in exercise.cells if exercises.nbgrader_meta(c).get("grade_id") == name]
    namespace = notebook_09(stub)
    task = exercises.task_description(SOL09.cells[name].split("\n"), SOL09.cells[name].split("\n").index("    ### BEGIN SOLUTION"))
    with pytest.raises(NotImplementedError) as raised:
        getattr(ex09, name)(namespace[name])
    assert str(raised.value) == task


def test_ex09_the_package_reference_does_not_pass_for_the_prototypes():
    namespace = notebook_09("from fsl_course.meta.protonet import prototypes")
    with pytest.raises(AssertionError, match="write the function yourself"):
        run_hidden_09("prototypes", namespace)


def test_ex09_the_parts_are_independent():
    """A wrong answer to one part costs nothing in the others, visible and hidden."""
    namespace = notebook_09(prototypes_variant(body="one_hot.T @ embeddings") + LOGITS.format(body="-torch.cdist(query, protos)"))
    for name in ("matching_log_probs", "relation_scores"):
        getattr(ex09, name)(namespace[name])
        run_hidden_09(name, namespace)
