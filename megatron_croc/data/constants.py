"""Constants shared by the writer, the reader and the collate function."""

from __future__ import annotations

import enum

# The text placeholder for the image in LLaVA-format conversations.
IMAGE_TOKEN = "<image>"

# Stored token id of the image placeholder. Negative, so it can never collide with a real
# vocabulary id of any tokenizer (LLaVA uses the same sentinel). It lives only on disk and in
# ``Sample.tokens``; the collated batch expands it to ``num_image_tokens`` visual positions.
IMAGE_TOKEN_ID = -200

# CLIP's pixel normalisation (OpenAI CLIP, as in LLaVA): the model's input normalisation and,
# scaled to 0..255, the pad colour of ``pad_to_square``.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Version of our sample layout inside the IndexedDataset (written to the sidecar).
FORMAT_NAME = "megatron_croc.multimodal_indexed"
FORMAT_VERSION = 1


class ItemMode(enum.IntEnum):
    """Mode tag of each item (sequence) of a sample's document in the multimodal IndexedDataset.

    One sample = one document = consecutive items, in this order:
    TOKENS, LOSS_MASK, SAMPLE_ID, then at most one of IMAGE_PIXELS / IMAGE_ENCODED.
    """

    TOKENS = 0  # int32 token ids, the image as a single IMAGE_TOKEN_ID
    LOSS_MASK = 1  # int32 0/1 per token: 1 where the token is a supervised answer token
    IMAGE_PIXELS = 2  # uint8 [3, H, W] pixels, bytes zero-padded to 4 and viewed as int32
    IMAGE_ENCODED = 3  # int32 byte count, then the original encoded file bytes (padded)
    SAMPLE_ID = 4  # int32 byte count, then the UTF-8 sample id from the source JSON (padded)


class SkipReason(enum.StrEnum):
    """Why preprocessing skipped a sample; the value is what the skip report says."""

    MALFORMED_JSON = "malformed_json"
    MALFORMED_SAMPLE = "malformed_sample"
    TURN_ORDER = "turn_order"
    EMPTY_ANSWER = "empty_answer"
    NO_IMAGE_TOKEN = "no_image_token"
    MULTIPLE_IMAGE_TOKENS = "multiple_image_tokens"
    IMAGE_TOKEN_WITHOUT_IMAGE = "image_token_without_image"
    IMAGE_OUTSIDE_FOLDER = "image_outside_folder"
    IMAGE_NOT_REGULAR_FILE = "image_not_regular_file"
    IMAGE_MISSING = "image_missing"
    IMAGE_EMPTY = "image_empty"
    IMAGE_TRUNCATED = "image_truncated"
    IMAGE_DECODE_ERROR = "image_decode_error"
    IMAGE_TOO_LARGE = "image_too_large"
    TOO_LONG = "too_long"
    RECORD_TOO_LARGE = "record_too_large"
    DUPLICATE_ID = "duplicate_id"
    INTERNAL_ERROR = "internal_error"


class SkipSample(Exception):
    """Raised by per-sample processing; the run records it in the skip report and goes on."""

    def __init__(self, reason: SkipReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
