"""examples/croc_recipe_demo.sh at its smallest size: one seed, a few steps per stage (text LM ->
align -> Croc stage 1.5 -> instruct), the model as initialised beside it, and tools/evaluate.py
on a handful of held-out questions, all through the commands a user runs. The trained model must
beat the untrained one on the evaluation set, and the table must come out of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.parallel

ROOT = Path(__file__).resolve().parents[2]
EVAL_QUESTIONS = 14  # two of each question type (the eval split cycles through them)


def test_recipe_runs_end_to_end_and_the_trained_model_beats_the_untrained_one(tmp_path):
    out = tmp_path / "recipe"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), SEEDS="3", VARIANTS="untrained croc",
               EXTRA_VARIANTS="", JOBS="2", LM_ITERS="12", ALIGN_ITERS="4", STAGE15_ITERS="4", INSTRUCT_ITERS="12",
               TEXT_SAMPLES="200", CAPTION_SAMPLES="64", INSTRUCT_SAMPLES="200", EVAL_SAMPLES=str(EVAL_QUESTIONS))
    done = subprocess.run(["bash", "examples/croc_recipe_demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seed = out / "seed3"
    for log in [done.stdout + done.stderr, *(p.read_text() for p in seed.glob("*.log"))]:
        assert "Warning" not in log, log[-3000:]  # third-party noise stays out of every stage's log
    # each stage loaded the one before it (as the README documents) and ran its iterations
    for stage, loaded in [("align", "lm"), ("s15-croc", "align"), ("instruct-croc", "s15-croc")]:
        log = (seed / f"{stage}.log").read_text()
        assert f"loaded {seed / loaded}" in log, log[-2000:]
    assert "training croc stage" in (seed / "s15-croc.log").read_text()
    timings = [line.split("\t") for line in (out / "timings.tsv").read_text().splitlines()]
    assert {name for _, name, _ in timings} == {"lm", "align", "untrained", "eval-untrained", "s15-croc",
                                                "instruct-croc", "eval-croc"}

    summaries = {v: json.loads((seed / f"eval-{v}" / "summary.json").read_text()) for v in ("untrained", "croc")}
    for v, summary in summaries.items():
        assert summary["counts"]["evaluated"] == EVAL_QUESTIONS, (v, summary["counts"])
        answers = [json.loads(line) for line in (seed / f"eval-{v}" / "answers.jsonl").read_text().splitlines()]
        assert [a["id"] for a in answers] == [f"eval-{i:06d}" for i in range(EVAL_QUESTIONS)]
        types = {a["question_type"] for a in answers}
        assert types == {"count", "background", "color", "shape", "size", "position", "caption"}
        assert all(a["fact_recall"] is not None for a in answers if a["question_type"] == "caption")
    # a few steps per stage: the answers are not right yet, but the held-out loss has fallen far
    trained, untrained = summaries["croc"]["lm_loss"], summaries["untrained"]["lm_loss"]
    assert trained < untrained - 1.0, (trained, untrained)
    assert summaries["croc"]["question_types"]["overall"]["accuracy"] >= (
        summaries["untrained"]["question_types"]["overall"]["accuracy"])

    table = (out / "table.md").read_text()
    assert "| untrained (the model as initialised) | 3 |" in table and "| Croc stage 1.5 | 3 |" in table
    assert table in done.stdout
