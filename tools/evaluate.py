#!/usr/bin/env python
"""Evaluate a Croc checkpoint on a preprocessed evaluation set: validation LM loss and greedy
answers scored per question type.

Thin command-line face of ``megatron_croc.evaluation``:

    python tools/evaluate.py --load RUN/checkpoints --model tiny --data-path EVAL_PREFIX --output-dir OUT
    python tools/evaluate.py --hf HF_EXPORT --data-path EVAL_PREFIX --output-dir OUT

See ``python tools/evaluate.py --help`` for how answers are scored.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_croc.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
