"""The ablation table of ``examples/croc_recipe_demo.sh``: each variant's evaluation summaries
(``OUT/seed<S>/eval-<variant>/summary.json``) as accuracy per question type, caption fact
recall and LM loss, mean ± sample standard deviation over the seeds that ran it, with the
wall time of its stages (``OUT/timings.tsv``).

    python -m megatron_croc.evaluation.table outputs/croc_recipe --output outputs/croc_recipe/table.md
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megatron_croc.evaluation.metrics import normalize_answer

# Row order: the main comparison, then the single-seed ablations of the comprehension stage.
VARIANT_ORDER = ("untrained", "none", "caption", "croc", "croc-novtr", "croc-nearest", "croc-prefix", "croc-normal")
VARIANT_LABELS = {
    "untrained": "untrained (the model as initialised)",
    "none": "no stage 1.5",
    "caption": "plain captioning stage 1.5",
    "croc": "Croc stage 1.5",
    "croc-novtr": "Croc, no VTR loss (`--croc-vtr-weight 0`)",
    "croc-nearest": "Croc, nearest matching (`--croc-matcher nearest`)",
    "croc-prefix": "Croc, prefix attention (`--croc-attention prefix`)",
    "croc-normal": "Croc, `normal` pool init (`--croc-pool-init normal`)",
}
_EVAL_DIR = re.compile(r"^eval-(?P<variant>.+)$")
_SEED_DIR = re.compile(r"^seed(?P<seed>\d+)$")


@dataclass(kw_only=True)
class VariantRuns:
    seeds: list[int] = field(default_factory=list)
    summaries: list[dict] = field(default_factory=list)
    stage_seconds: list[float] = field(default_factory=list)  # per seed: its stage 1.5 + instruct + eval


def collect(out: str | Path) -> tuple[dict[str, VariantRuns], dict[int, float]]:
    """Per variant, its seeds' summaries and wall times; per seed, the shared lm + align time."""
    out = Path(out)
    timings: dict[tuple[int, str], float] = {}
    tsv = out / "timings.tsv"
    if tsv.exists():
        for line in tsv.read_text().splitlines():
            seed, name, seconds = line.split("\t")
            timings[(int(seed), name)] = float(seconds)
    variants: dict[str, VariantRuns] = {}
    for seed_dir in sorted(out.glob("seed*")):
        m = _SEED_DIR.match(seed_dir.name)
        if not m:
            continue
        seed = int(m["seed"])
        for eval_dir in sorted(seed_dir.glob("eval-*")):
            v = _EVAL_DIR.match(eval_dir.name)
            summary = eval_dir / "summary.json"
            if not v or not summary.exists():
                continue
            name = v["variant"]
            runs = variants.setdefault(name, VariantRuns())
            runs.seeds.append(seed)
            runs.summaries.append(json.loads(summary.read_text()))
            runs.stage_seconds.append(sum(timings.get((seed, stage), 0.0)
                                          for stage in (f"s15-{name}", f"instruct-{name}", f"eval-{name}",
                                                        name)))  # "untrained": its own one-step stage
    shared = {seed: timings.get((seed, "lm"), 0.0) + timings.get((seed, "align"), 0.0)
              for seed in {s for runs in variants.values() for s in runs.seeds}}
    return variants, shared


def image_blind_prior(out: str | Path) -> VariantRuns | None:
    """Per seed and question type, the accuracy of always giving the type's most frequent
    reference answer: the best any answerer that ignores the image can score (read from the
    references in a seed's answers.jsonl)."""
    prior = VariantRuns()
    for seed_dir in sorted(Path(out).glob("seed*")):
        m = _SEED_DIR.match(seed_dir.name)
        answers = next(iter(sorted(seed_dir.glob("eval-*/answers.jsonl"))), None)
        if not m or answers is None:
            continue
        by_type: dict[str, list[str]] = {}
        for line in answers.read_text().splitlines():
            row = json.loads(line)
            if "facts" not in row:
                by_type.setdefault(row["question_type"], []).append(normalize_answer(row["reference"]))
        if not by_type:
            continue
        types = {t: {"accuracy": max(map(refs.count, set(refs))) / len(refs)} for t, refs in by_type.items()}
        hits = sum(t["accuracy"] * len(by_type[k]) for k, t in types.items())
        types["overall"] = {"accuracy": hits / sum(map(len, by_type.values()))}  # without the caption records
        prior.seeds.append(int(m["seed"]))
        prior.summaries.append({"question_types": types, "lm_loss": None})
    return prior if prior.seeds else None


def _cell(values: list[float], *, scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def render(variants: dict[str, VariantRuns], shared: dict[int, float], prior: VariantRuns | None = None) -> str:
    types = sorted({t for runs in variants.values() for s in runs.summaries for t in s["question_types"]}
                   - {"overall"})
    short = [t for t in types if not any(s["question_types"].get(t, {}).get("fact_scored")
                                         for runs in variants.values() for s in runs.summaries)]
    facts = [t for t in types if t not in short]
    head = (["stage 1.5", "seeds"] + [f"{t} acc." for t in short] + [f"{t} facts" for t in facts]
            + ["all questions acc.", "eval LM loss", "minutes (1.5 + instruct + eval)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = [v for v in VARIANT_ORDER if v in variants] + sorted(set(variants) - set(VARIANT_ORDER))
    for name in order:
        runs = variants[name]
        per_type = lambda t, key: [s["question_types"][t][key] for s in runs.summaries if t in s["question_types"]]  # noqa: E731
        row = [VARIANT_LABELS.get(name, name), ",".join(map(str, runs.seeds))]
        row += [_cell(per_type(t, "accuracy")) for t in short]
        row += [_cell(per_type(t, "fact_recall")) for t in facts]
        row += [_cell(per_type("overall", "accuracy")),
                _cell([s["lm_loss"] for s in runs.summaries if s["lm_loss"] is not None], scale=1.0, digits=3),
                _cell([t / 60 for t in runs.stage_seconds], scale=1.0)]
        lines.append("| " + " | ".join(row) + " |")
    if prior is not None:
        per_type = lambda t: [s["question_types"][t]["accuracy"] for s in prior.summaries if t in s["question_types"]]  # noqa: E731
        row = ["image-blind: the most frequent answer per type", ",".join(map(str, prior.seeds))]
        row += [_cell(per_type(t)) for t in short] + ["–" for _ in facts]
        row += [_cell(per_type("overall")) + " (short answers)", "–", "–"]
        lines.append("| " + " | ".join(row) + " |")
    if shared:
        lines.append("")
        lines.append(f"Shared by every variant of a seed (text LM stage + align): "
                     f"{_cell([t / 60 for t in shared.values()], scale=1.0)} minutes per seed.")
    lines.append("")
    lines.append("Accuracy: exact match after normalisation (tools/evaluate.py), in %; facts: the share of a "
                 "caption's facts its answer states, in %; mean ± sample standard deviation over the seeds.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="the recipe's OUT folder (examples/croc_recipe_demo.sh)")
    p.add_argument("--output", default=None, help="also write the table to this file")
    a = p.parse_args(argv)
    variants, shared = collect(a.out)
    if not variants:
        print(f"error: no evaluation summaries under {a.out}/seed*/eval-*/summary.json; run "
              "examples/croc_recipe_demo.sh first", file=sys.stderr)
        return 2
    text = render(variants, shared, image_blind_prior(a.out))
    print(text, end="")
    if a.output:
        Path(a.output).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
