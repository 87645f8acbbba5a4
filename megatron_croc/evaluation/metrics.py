"""How ``tools/evaluate.py`` scores a greedy answer against its reference (pure functions).

Normalisation (SQuAD / VQA style), :func:`normalize_answer`:
  1. lowercase;
  2. punctuation is removed: apostrophes join the word (``it's`` -> ``its``), any other
     punctuation mark (ASCII punctuation or a Unicode ``P*`` character) separates words
     (``top-left.`` -> ``top left``);
  3. the articles ``a``, ``an``, ``the`` are dropped;
  4. whitespace is collapsed to single spaces, none at the ends.

Scores of one answer:
  * exact match (:func:`exact_match`): the normalised answer equals the normalised reference;
  * for a record with ``facts`` (caption-like questions), each fact is scored separately
    (:func:`fact_hits`): a fact is present when its normalisation occurs in the normalised
    answer as a whole-word substring (``red`` does not match ``redder``; ``top left`` matches
    ``... at the top left.``). Fact recall = the fraction of facts present; the answer is
    correct when all of them are present (the exact match is not used).

Summary (:func:`summarize`), one row per question type and an ``overall`` row: ``n``,
``accuracy`` (the fraction correct: exact match, or all facts for fact-scored records) and
``fact_recall`` (the mean over the fact-scored records of the row; None when it has none).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

OVERALL = "overall"
DEFAULT_QUESTION_TYPE = "all"

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_APOSTROPHES = "'\u2019\u2018`"


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation removed (apostrophes join, other marks separate words), articles
    a/an/the dropped, whitespace collapsed (see the module docstring)."""
    text = text.lower()
    out = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        out.append(" " if _is_punctuation(ch) else ch)
    text = _ARTICLES.sub(" ", "".join(out))
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> bool:
    """Whether the normalised answer equals the normalised reference."""
    return normalize_answer(answer) == normalize_answer(reference)


def fact_hits(answer: str, facts: Sequence[str]) -> list[bool]:
    """For each fact: whether its normalisation occurs in the normalised answer as whole words.

    A fact that normalises to nothing (e.g. ``"the"``) cannot be checked and raises ValueError.
    """
    words = f" {normalize_answer(answer)} "
    hits = []
    for fact in facts:
        norm = normalize_answer(fact)
        if not norm:
            raise ValueError(f"fact {fact!r} is empty once normalised (articles and punctuation are dropped)")
        hits.append(f" {norm} " in words)
    return hits


@dataclass(kw_only=True, frozen=True)
class Score:
    correct: bool
    fact_recall: float | None = None  # None unless the record has facts


def score_answer(answer: str, reference: str, facts: Sequence[str] | None = None) -> Score:
    """Exact match, or (with ``facts``) all facts present and the fact recall (the fraction of
    facts present; 1.0 for an empty list)."""
    if facts is None:
        return Score(correct=exact_match(answer, reference))
    hits = fact_hits(answer, facts)
    recall = sum(hits) / len(hits) if hits else 1.0
    return Score(correct=all(hits), fact_recall=recall)


@dataclass(kw_only=True, frozen=True)
class TypeSummary:
    n: int
    accuracy: float  # fraction correct, 0..1
    fact_recall: float | None = None  # mean over the fact-scored records, None without any
    fact_scored: int = 0  # how many of the n are fact-scored


def summarize(rows: Iterable[tuple[str, Score]]) -> dict[str, TypeSummary]:
    """(question type, score) pairs -> a row per question type (sorted) plus ``overall`` (last)."""
    groups: dict[str, list[Score]] = {}
    everything: list[Score] = []
    for qtype, s in rows:
        groups.setdefault(qtype, []).append(s)
        everything.append(s)

    def row(scores: list[Score]) -> TypeSummary:
        recalls = [s.fact_recall for s in scores if s.fact_recall is not None]
        return TypeSummary(
            n=len(scores),
            accuracy=sum(s.correct for s in scores) / len(scores) if scores else 0.0,
            fact_recall=sum(recalls) / len(recalls) if recalls else None,
            fact_scored=len(recalls),
        )

    out = {t: row(groups[t]) for t in sorted(groups) if t != OVERALL}
    if OVERALL in groups:  # a record that calls its own type "overall" still gets a row
        out[f"{OVERALL} (type)"] = row(groups[OVERALL])
    out[OVERALL] = row(everything)
    return out


def format_table(summary: dict[str, TypeSummary], *, loss: float | None = None,
                 supervised_tokens: int | None = None) -> str:
    """The summary as the fixed-width table the command prints."""
    width = max([len("question type")] + [len(t) for t in summary])
    lines = [f"{'question type':<{width}}  {'n':>6}  {'accuracy':>8}  {'fact recall':>11}"]
    for qtype, s in summary.items():
        recall = f"{100 * s.fact_recall:10.1f}%" if s.fact_recall is not None else f"{'-':>11}"
        lines.append(f"{qtype:<{width}}  {s.n:>6}  {100 * s.accuracy:7.1f}%  {recall}")
    if loss is not None:
        tokens = f" over {supervised_tokens} supervised tokens" if supervised_tokens is not None else ""
        lines.append(f"validation lm loss: {loss:.4f}{tokens}")
    return "\n".join(lines)
