"""Command line of ``tools/evaluate.py``: validation LM loss and greedy answers of a checkpoint on a
preprocessed evaluation set."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from megatron_croc.config import MODEL_PRESETS

DESCRIPTION = """\
Evaluate a trained Croc checkpoint on a preprocessed evaluation set (tools/preprocess_data.py):
the validation LM loss (mean cross-entropy per supervised token, labels aligned as in training)
and a greedy answer per sample, scored against the sample's reference answer.

The model is the HuggingFace export: --hf takes one (tools/convert_checkpoint.py megatron-to-hf),
--load a megatron checkpoint (any TP/PP layout), exported to a temporary folder first with the
eval set's tokenizer.

Evaluation records are single-turn LLaVA records (a question with <image>, a reference answer);
the tool reads two optional fields from them, matched by id (the set's source files, or
--references): "question_type" (default "all") and "facts" (a list of strings, for caption-like
questions). A multi-turn sample is scored on its first round.

Scoring: answers and references are normalised (lowercase; punctuation removed, apostrophes
joining and other marks separating words; the articles a/an/the dropped; whitespace collapsed).
A record is correct when the normalised answer equals the normalised reference (exact match);
for a record with facts, each fact counts as present when it occurs in the normalised answer as
whole words ("red" does not match "redder"), its fact recall is the fraction present, and it is
correct when all are. Printed per question type and overall: n, accuracy %, mean fact recall %
(fact-scored records only).

Writes to --output-dir: answers.jsonl (id, question_type, question, reference, answer, correct,
and fact_recall/facts for fact-scored records) and summary.json (loss, per-type table,
checkpoint, data path, counts, wall time). Exits 2 on inputs it cannot use."""

EXAMPLES = """\
examples:
  # a training run's checkpoint (latest iteration) on the recipe's held-out split
  python tools/make_demo_data.py --recipe --output-dir demo_data --seed 1   # prints EVAL_DATA=...
  python tools/evaluate.py --load outputs/croc_recipe/seed1/instruct-croc --model tiny \\
      --data-path EVAL_DATA --output-dir eval/croc
  # an HF export, the first 100 samples, on the CPU
  python tools/evaluate.py --hf hf/croc-demo --data-path data/eval --limit 100 --device cpu --output-dir eval/
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/evaluate.py", description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ckpt = p.add_argument_group("checkpoint (one of --load, --hf)")
    which = ckpt.add_mutually_exclusive_group(required=True)
    which.add_argument("--load", help="a training --save folder (latest iteration; any TP/PP layout) or one "
                       "iter_XXXXXXX folder; exported to a temporary HF folder first")
    which.add_argument("--hf", help="an HF export (tools/convert_checkpoint.py megatron-to-hf --save)")
    ckpt.add_argument("--model", choices=sorted(MODEL_PRESETS), default=None,
                      help="--load: the model preset (default: the checkpoint's conversion record)")
    ckpt.add_argument("--vocab-size", type=int, default=None,
                      help="--load: the LLM vocabulary (default: the eval set's tokenizer's)")
    ckpt.add_argument("--iteration", type=int, default=None, help="--load: this iteration instead of the latest")
    ckpt.add_argument("--save-hf", default=None, metavar="DIR",
                      help="--load: keep the export in this new folder (reuse it with --hf); default: a temporary "
                      "folder, removed at the end")
    data = p.add_argument_group("evaluation set")
    data.add_argument("--data-path", required=True, help="prefix of a preprocessed set (<prefix>.bin/.idx/.meta.json)")
    data.add_argument("--references", nargs="+", default=None, metavar="FILE",
                      help="LLaVA JSON/JSONL files with the records (question_type, facts), matched by id "
                      "(default: the source files listed in the set's sidecar)")
    data.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N samples only")
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", default=None, help="write answers.jsonl and summary.json here")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the answers.jsonl and summary.json an earlier evaluation left in --output-dir")
    run.add_argument("--batch-size", type=int, default=16, help="samples per forward / generate call (default: 16)")
    run.add_argument("--max-new-tokens", type=int, default=64, help="greedy answer length limit (default: 64)")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available, else cpu)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_croc.quiet import quiet_known_warnings

    quiet_known_warnings()  # the export goes through megatron-core
    from megatron_croc.config import ConfigError
    from megatron_croc.convert.hf import ConvertError
    from megatron_croc.evaluation.engine import EvalConfig, EvalError, evaluate

    config = EvalConfig(
        data_path=args.data_path, hf_dir=args.hf, load=args.load, model=args.model, vocab_size=args.vocab_size,
        iteration=args.iteration, save_hf=args.save_hf, references=args.references, output_dir=args.output_dir,
        overwrite=args.overwrite,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit, device=args.device,
        progress=not args.no_progress,
    )
    # SIGTERM (an operator, a scheduler) ends the run as Ctrl-C does: the temporary export is removed
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = evaluate(config)
    except (EvalError, ConvertError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(result.table())
    where = f"; answers and summary in {result.output_dir}" if result.output_dir else ""
    print(f"{result.num_samples} samples in {result.seconds:.1f} s{where}")
    return 0
