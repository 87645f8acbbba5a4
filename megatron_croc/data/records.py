"""Validation of LLaVA-format records into ``Conversation`` objects.

A LLaVA record is ``{"id": ..., "image": "path/rel/to/folder.jpg", "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``.
Everything that does not fit our contract (one image at most, alternating turns, a non-empty
answer per round) raises ``SkipSample`` with a reason for the skip report; nothing is altered
silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from megatron_croc.data.constants import IMAGE_TOKEN, SkipReason, SkipSample
from megatron_croc.data.templates import Turn

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(kw_only=True)
class Conversation:
    sample_id: str
    image: str | None  # path relative to the image folder, None for text-only samples
    turns: list[Turn]


# JSON may spell a lone UTF-16 surrogate ("\\ud800"); Python decodes it into a str that cannot be
# encoded as UTF-8 (not tokenized, not stored), so such text is refused up front.
_SURROGATE = re.compile("[\ud800-\udfff]")


def record_id(record: Any) -> str | None:
    """The id a record gives itself, printable and UTF-8-safe (lone surrogates escaped), or None."""
    if not isinstance(record, dict):
        return None
    raw = record.get("id")
    if raw is None or isinstance(raw, (dict, list)):
        return None
    text = str(raw)
    if not text:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if _SURROGATE.search(text) else text


def _check_text(text: str, what: str) -> None:
    m = _SURROGATE.search(text)
    if m:
        raise SkipSample(
            SkipReason.MALFORMED_SAMPLE,
            f"{what} holds a lone UTF-16 surrogate \\u{ord(m.group()):04x} at character {m.start()} (a JSON "
            "\\uXXXX escape without its pair): it is not valid Unicode text; fix the record",
        )


def parse_record(record: Any, *, fallback_id: str, prepend_missing_image_token: bool = False) -> Conversation:
    """Validate one decoded JSON record; raise ``SkipSample`` on anything we cannot train on."""
    if not isinstance(record, dict):
        raise SkipSample(SkipReason.MALFORMED_SAMPLE, f"record is a {type(record).__name__}, not an object")
    raw_id = record.get("id")
    if isinstance(raw_id, (dict, list)):
        raise SkipSample(SkipReason.MALFORMED_SAMPLE, f"'id' must be a string or a number, got a {type(raw_id).__name__}")
    if raw_id is not None:
        _check_text(str(raw_id), "'id'")
    sample_id = record_id(record) or fallback_id

    image = record.get("image")
    if isinstance(image, list):  # some LLaVA variants wrap the single image in a list
        if len(image) > 1:
            raise SkipSample(SkipReason.MALFORMED_SAMPLE, f"{len(image)} images; one image per sample is supported")
        image = image[0] if image else None
    if image is not None and not (isinstance(image, str) and image.strip()):
        raise SkipSample(SkipReason.MALFORMED_SAMPLE, f"'image' must be a non-empty path string, got {image!r}")
    if image is not None:
        _check_text(image, "'image'")

    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise SkipSample(SkipReason.MALFORMED_SAMPLE, "'conversations' missing or not a non-empty list")
    roles: list[str] = []
    values: list[str] = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SkipSample(SkipReason.MALFORMED_SAMPLE, f"turn {i} is not {{'from': str, 'value': str}}")
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise SkipSample(SkipReason.MALFORMED_SAMPLE, f"turn {i} has unknown role {turn.get('from')!r}")
        _check_text(turn["value"], f"turn {i} 'value'")
        roles.append(role)
        values.append(turn["value"])

    # Order: optional system, then user/assistant pairs, ending with an assistant turn.
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or len(body) % 2 or body != expected[: len(body)] or "system" in body:
        raise SkipSample(SkipReason.TURN_ORDER, "turns must be [system,] human, gpt, human, gpt, ... ending with gpt; "
                         f"got {[r for r in roles]}")
    offset = len(roles) - len(body)
    for j in range(1, len(body), 2):
        if not values[offset + j].strip():
            raise SkipSample(SkipReason.EMPTY_ANSWER, f"answer of round {j // 2 + 1} is empty")

    counts = [v.count(IMAGE_TOKEN) for v in values]
    total = sum(counts)
    for r, c in zip(roles, counts):
        if c and r != "user":
            raise SkipSample(SkipReason.MALFORMED_SAMPLE, f"{IMAGE_TOKEN} inside a {r} turn")
    if total > 1:
        raise SkipSample(SkipReason.MULTIPLE_IMAGE_TOKENS, f"{total} {IMAGE_TOKEN} placeholders; one image per sample")
    if total == 1 and image is None:
        raise SkipSample(SkipReason.IMAGE_TOKEN_WITHOUT_IMAGE, f"{IMAGE_TOKEN} in text but no 'image' field")
    image_turn = counts.index(1) if total == 1 else None
    if image is not None and total == 0:
        if not prepend_missing_image_token:
            raise SkipSample(SkipReason.NO_IMAGE_TOKEN, f"'image' is set but no turn contains {IMAGE_TOKEN}")
        image_turn = offset  # the first user turn

    turns = []
    for i, (r, v) in enumerate(zip(roles, values)):
        if i == image_turn:
            # LLaVA's normalisation: the image moves to the front of its turn, then "\n".
            turns.append(Turn(role=r, text=v.replace(IMAGE_TOKEN, "").strip(), image=True))
        else:
            turns.append(Turn(role=r, text=v))
    return Conversation(sample_id=sample_id, image=image, turns=turns)
