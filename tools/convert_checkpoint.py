#!/usr/bin/env python
"""HuggingFace <-> megatron-core checkpoints of the Croc model.

Thin command-line face of ``megatron_croc.convert`` (see docs/CONVERT.md):

    python tools/convert_checkpoint.py hf-to-megatron --model vicuna-7b --hf-llm LLM --hf-vision CLIP --save OUT
    python tools/convert_checkpoint.py megatron-to-hf --load RUN --save HF_OUT --hf-llm LLM --hf-vision CLIP

Runs on the CPU; starts its own TP x PP gloo processes (or runs as those processes under
``torchrun --nproc-per-node TP*PP``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_croc.convert.cli import main  # noqa: E402

if __name__ == "__main__":  # the guard matters: conversion ranks are spawned from this process
    sys.exit(main())
