"""LLaVA record validation: every malformed shape gets its reason; valid variants are accepted."""

from __future__ import annotations

import pytest

from megatron_croc.data.constants import SkipReason, SkipSample
from megatron_croc.data.records import parse_record
from megatron_croc.data.templates import Turn


def rec(*turns: tuple[str, object], image: object = "a.jpg", **extra) -> dict:
    r = {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns], **extra}
    if image is not None:
        r["image"] = image
    return r


def test_valid_record_normalises_image_to_front():
    c = parse_record(rec(("human", "What is this?\n<image>"), ("gpt", "A cat.")), fallback_id="f:1")
    assert c.sample_id == "x" and c.image == "a.jpg"
    assert c.turns == [Turn(role="user", text="What is this?", image=True), Turn(role="assistant", text="A cat.")]


def test_aliases_system_turn_list_image_and_fallback_id():
    r = rec(("system", "Sys."), ("user", "<image>Hi"), ("assistant", "Yo."), image=["a.jpg"])
    del r["id"]
    c = parse_record(r, fallback_id="data.jsonl:7")
    assert c.sample_id == "data.jsonl:7" and c.image == "a.jpg"
    assert [t.role for t in c.turns] == ["system", "user", "assistant"]
    text_only = parse_record(rec(("human", "Hi"), ("gpt", "Yo."), image=None), fallback_id="f")
    assert text_only.image is None and not any(t.image for t in text_only.turns)


@pytest.mark.parametrize(
    "record,reason",
    [
        ([1, 2], SkipReason.MALFORMED_SAMPLE),
        ({"id": "x"}, SkipReason.MALFORMED_SAMPLE),
        (rec(("human", "<image>"), ("robot", "x")), SkipReason.MALFORMED_SAMPLE),
        (rec(("human", "<image>"), ("gpt", None)), SkipReason.MALFORMED_SAMPLE),
        (rec(("human", "<image>"), ("gpt", "x"), image=["a.jpg", "b.jpg"]), SkipReason.MALFORMED_SAMPLE),
        (rec(("human", "<image>"), ("gpt", "x"), image=""), SkipReason.MALFORMED_SAMPLE),
        (rec(("human", "Hi"), ("gpt", "<image> x")), SkipReason.MALFORMED_SAMPLE),
        (rec(("gpt", "x"), ("human", "<image>")), SkipReason.TURN_ORDER),
        (rec(("human", "<image>"), ("human", "x"), ("gpt", "y"), ("gpt", "z")), SkipReason.TURN_ORDER),
        (rec(("human", "<image>")), SkipReason.TURN_ORDER),
        (rec(("human", "<image>"), ("gpt", "x"), ("system", "s"), ("gpt", "y")), SkipReason.TURN_ORDER),
        (rec(("human", "<image>"), ("gpt", "")), SkipReason.EMPTY_ANSWER),
        (rec(("human", "<image>"), ("gpt", "ok"), ("human", "q"), ("gpt", " \n")), SkipReason.EMPTY_ANSWER),
        (rec(("human", "Hi"), ("gpt", "x")), SkipReason.NO_IMAGE_TOKEN),
        (rec(("human", "<image><image>"), ("gpt", "x")), SkipReason.MULTIPLE_IMAGE_TOKENS),
        (rec(("human", "<image>"), ("gpt", "x"), ("human", "<image>"), ("gpt", "y")), SkipReason.MULTIPLE_IMAGE_TOKENS),
        (rec(("human", "<image>"), ("gpt", "x"), image=None), SkipReason.IMAGE_TOKEN_WITHOUT_IMAGE),
    ],
)
def test_bad_records(record, reason):
    with pytest.raises(SkipSample) as exc:
        parse_record(record, fallback_id="f")
    assert exc.value.reason == reason and exc.value.detail


def test_prepend_missing_image_token():
    c = parse_record(rec(("human", "Describe."), ("gpt", "x")), fallback_id="f", prepend_missing_image_token=True)
    assert c.turns[0] == Turn(role="user", text="Describe.", image=True)
