"""Data for megatron_croc: LLaVA-format conversations -> megatron-core indexed datasets -> batches.

Layout (this package never imports ``megatron_croc.models``, ``megatron_croc.training`` or
``megatron_croc.config``):

- ``templates``   conversation templates (plain, vicuna_v1, llama3, chatml) and loss masks
- ``tokenizers``  SentencePiece and HuggingFace tokenizers behind one interface
- ``images``      the image folder (paths contained, regular files only), decoding any image to RGB,
                  pad-to-square / resize+crop, CLIP constants
- ``records``     validation of LLaVA-format records (turn order, ``<image>`` placement, ...)
- ``inputs``      JSON/JSONL input files: bounded, indexed reading and decoding with line/byte errors
- ``locking``     one run per output prefix: file locks that name their holder
- ``indexed``     our sample layout inside megatron-core's ``IndexedDataset`` (.bin/.idx + sidecar)
- ``preprocess``  the parallel, partitioned, resumable preprocessing run behind tools/preprocess_data.py
- ``dataset``     blending, packing and the collate function producing the training batch
- ``sampler``     deterministic, resumable global-batch sampler and the resumable loader
- ``demo``        the bundled, regenerable shape/colour demo set

Submodules are imported lazily on purpose: ``import megatron.core`` costs seconds, and only the
modules that touch the indexed format need it.
"""

from megatron_croc.data.constants import IMAGE_TOKEN, IMAGE_TOKEN_ID

__all__ = ["IMAGE_TOKEN", "IMAGE_TOKEN_ID"]
