#!/usr/bin/env python
"""LLaVA-format JSON/JSONL + images -> megatron-core indexed multimodal dataset.

Thin command-line face of ``megatron_croc.data.preprocess``; run with ``--help`` for every option
and see docs/DATA.md for the format and the stage-by-stage commands.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_croc.data.preprocess import main  # noqa: E402

if __name__ == "__main__":  # the guard matters: worker processes are forked from this one
    sys.exit(main())
