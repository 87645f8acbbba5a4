#!/usr/bin/env python
"""Build (or find in the cache) the bundled demo dataset and print its prefix and tokenizer.

Thin face of ``megatron_croc.data.demo.ensure_demo_dataset``: rendered shapes + detailed captions
in LLaVA format, a small SentencePiece tokenizer, and the preprocessed 32x32 indexed dataset.

    python tools/make_demo_data.py --output-dir demo_data
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_croc.data.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
