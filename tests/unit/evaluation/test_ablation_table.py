"""The recipe's ablation table (evaluation.table): mean ± sample std over the seeds that ran a
variant, rows in the comparison's order, the image-blind prior from the references, wall times."""

from __future__ import annotations

import json

from megatron_croc.evaluation.table import main


def _summary(acc_color: float, facts: float, loss: float) -> dict:
    return {"lm_loss": loss, "question_types": {
        "caption": {"n": 1, "accuracy": 0.0, "fact_recall": facts, "fact_scored": 1},
        "color": {"n": 4, "accuracy": acc_color, "fact_recall": None, "fact_scored": 0},
        "overall": {"n": 5, "accuracy": acc_color * 0.8, "fact_recall": facts, "fact_scored": 1}}}


def _write(out, seed: int, variant: str, summary: dict, colors: list[str]) -> None:
    folder = out / f"seed{seed}" / f"eval-{variant}"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [{"id": f"eval-{i}", "question_type": "color", "reference": c.capitalize() + "."} for i, c in enumerate(colors)]
    rows.append({"id": "eval-9", "question_type": "caption", "reference": "x", "facts": ["x"]})
    (folder / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_of_seeds_and_variants(tmp_path, capsys):
    out = tmp_path / "recipe"
    _write(out, 1, "croc", _summary(0.5, 0.4, 0.40), ["red", "red", "blue", "green"])
    _write(out, 2, "croc", _summary(0.7, 0.6, 0.44), ["red", "blue", "blue", "blue"])
    _write(out, 1, "none", _summary(0.25, 0.2, 0.50), ["red", "red", "blue", "green"])
    (out / "timings.tsv").write_text("1\tlm\t60\n1\talign\t60\n2\tlm\t90\n2\talign\t90\n"
                                     "1\ts15-croc\t60\n1\tinstruct-croc\t50\n1\teval-croc\t10\n"
                                     "2\ts15-croc\t90\n2\tinstruct-croc\t80\n2\teval-croc\t10\n1\tinstruct-none\t30\n")
    assert main([str(out), "--output", str(out / "table.md")]) == 0
    table = (out / "table.md").read_text()
    assert table == capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == ("| stage 1.5 | seeds | color acc. | caption facts | all questions acc. | eval LM loss | "
                       "minutes (1.5 + instruct + eval) |")
    assert rows[1] == "| no stage 1.5 | 1 | 25.0 | 20.0 | 20.0 | 0.500 | 0.5 |"
    # croc: colour 50 and 70 -> 60.0 ± 14.1; loss 0.40, 0.44 -> 0.420 ± 0.028; 2 and 3 minutes
    assert rows[2] == "| Croc stage 1.5 | 1,2 | 60.0 ± 14.1 | 50.0 ± 14.1 | 48.0 ± 11.3 | 0.420 ± 0.028 | 2.5 ± 0.7 |"
    # the image-blind prior: "red" 2 of 4 (seed 1), "blue" 3 of 4 (seed 2), normalised references
    assert rows[3] == ("| image-blind: the most frequent answer per type | 1,2 | 62.5 ± 17.7 | – | "
                       "62.5 ± 17.7 (short answers) | – | – |")
    assert "2.5 ± 0.7 minutes per seed" in table  # lm + align: 2 and 3 minutes


def test_no_summaries_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no evaluation summaries" in capsys.readouterr().err
