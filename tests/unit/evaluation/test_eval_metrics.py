"""The answer scoring of tools/evaluate.py: normalisation, exact match, whole-word fact recall,
the per-type summary (pure functions)."""

from __future__ import annotations

import pytest

from megatron_croc.evaluation.metrics import (
    OVERALL,
    Score,
    exact_match,
    fact_hits,
    format_table,
    normalize_answer,
    score_answer,
    summarize,
)


@pytest.mark.parametrize("text, expected", [
    ("The Red Circle.", "red circle"),
    ("  a   large\tblue\nsquare!  ", "large blue square"),
    ("An apple, the pear and a plum", "apple pear and plum"),
    ("top-left", "top left"),
    ("It's the cat's toy", "its cats toy"),
    ("Theory of the anthem", "theory of anthem"),  # articles only as whole words
    ("«Quoted» — text…", "quoted text"),  # Unicode punctuation
    ("", ""),
    ("The.", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The background is white.", "the background is white")
    assert exact_match("A square", "square")
    assert not exact_match("The background is black.", "The background is white.")
    assert not exact_match("two", "There are two shapes.")


def test_fact_recall_is_whole_word():
    answer = "There are two shapes: a large red circle at the top left and a small blue square."
    assert fact_hits(answer, ["red", "top left", "blue square", "green"]) == [True, True, True, False]
    assert score_answer(answer, "", ["red circle", "green"]).fact_recall == 0.5
    # substrings of words do not count
    assert fact_hits("a redder circle", ["red"]) == [False]
    assert fact_hits("the topleft corner", ["top left"]) == [False]
    assert fact_hits("red", ["red"]) == [True]  # at both ends of the answer
    assert fact_hits("at the Top-Left.", ["top left"]) == [True]  # normalised both sides
    assert score_answer("anything", "", []).fact_recall == 1.0
    with pytest.raises(ValueError, match="empty once normalised"):
        fact_hits("x", ["the"])


def test_score_answer():
    assert score_answer("Blue.", "blue") == Score(correct=True)
    assert score_answer("red", "blue") == Score(correct=False)
    # fact-scored: all facts needed, exact match ignored
    s = score_answer("a red circle", "There is one shape: a red circle.", ["red circle", "one shape"])
    assert s == Score(correct=False, fact_recall=0.5)
    s = score_answer("one shape, a red circle", "whatever", ["red circle", "one shape"])
    assert s == Score(correct=True, fact_recall=1.0)


def test_summarize():
    rows = [
        ("color", Score(correct=True)),
        ("color", Score(correct=False)),
        ("caption", Score(correct=False, fact_recall=0.5)),
        ("caption", Score(correct=True, fact_recall=1.0)),
        ("all", Score(correct=True)),
    ]
    s = summarize(rows)
    assert list(s) == ["all", "caption", "color", OVERALL]
    assert (s["color"].n, s["color"].accuracy, s["color"].fact_recall) == (2, 0.5, None)
    assert (s["caption"].n, s["caption"].accuracy, s["caption"].fact_recall) == (2, 0.5, 0.75)
    assert s["caption"].fact_scored == 2
    assert (s[OVERALL].n, s[OVERALL].accuracy, s[OVERALL].fact_recall) == (5, 0.6, 0.75)
    table = format_table(s, loss=1.25, supervised_tokens=40)
    lines = table.splitlines()
    assert lines[0].split() == ["question", "type", "n", "accuracy", "fact", "recall"]
    assert lines[2].split() == ["caption", "2", "50.0%", "75.0%"]
    assert lines[3].split() == ["color", "2", "50.0%", "-"]
    assert lines[4].split() == ["overall", "5", "60.0%", "75.0%"]
    assert lines[-1] == "validation lm loss: 1.2500 over 40 supervised tokens"
    # a question type literally called "overall" keeps its own row
    assert list(summarize([("overall", Score(correct=True))])) == ["overall (type)", OVERALL]
    assert summarize([]) == {OVERALL: summarize([])[OVERALL]} and summarize([])[OVERALL].n == 0
