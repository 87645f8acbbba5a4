"""Templates: tokens and loss masks against hand-written expectations."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_croc.data.constants import IMAGE_TOKEN_ID
from megatron_croc.data.templates import TemplateError, Turn, get_template
from megatron_croc.data.tokenizers import TokenizerError, build_tokenizer

from data_helpers import HF_VOCAB, supervised_runs

IMG = "<IMG>"

CONV = [
    Turn(role="system", text="Be brief."),
    Turn(role="user", text="What is it?", image=True),
    Turn(role="assistant", text="A red circle."),
    Turn(role="user", text="Count?"),
    Turn(role="assistant", text="Two."),
]


def _check(rendered, expected: list[tuple[str, int]]) -> None:
    ids = [IMAGE_TOKEN_ID if t == IMG else HF_VOCAB[t] for t, _ in expected]
    mask = [m for _, m in expected]
    inv = {v: k for k, v in HF_VOCAB.items()}
    got = [(IMG if i == IMAGE_TOKEN_ID else inv[int(i)], int(m)) for i, m in zip(rendered.tokens, rendered.loss_mask)]
    assert got == expected
    assert rendered.tokens.tolist() == ids and rendered.loss_mask.tolist() == mask
    assert rendered.tokens.dtype == np.int32


def words(text: str, m: int) -> list[tuple[str, int]]:
    """Split like the word-level test tokenizer: words, punctuation and single spaces/newlines."""
    import re

    return [(t, m) for t in re.findall(r"\w+|[^\w\s]|\s", text)]


@pytest.fixture(scope="module")
def hf(hf_tokenizer_dir):
    return build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)


def test_vicuna_v1_multi_turn(hf):
    expected = (
        [("<|begin_of_text|>", 0)]
        + words("Be brief. USER: ", 0)
        + [(IMG, 0)]
        + words("\nWhat is it? ASSISTANT: ", 0)
        + words("A red circle.", 1)
        + [("<|eot_id|>", 1)]  # the tokenizer's EOS closes each answer and is supervised
        + words("USER: Count? ASSISTANT: ", 0)
        + words("Two.", 1)
        + [("<|eot_id|>", 1)]
    )
    _check(get_template("vicuna_v1").render(CONV, hf), expected)


def test_vicuna_v1_default_system_prompt(sp_model_path):
    tok = build_tokenizer("sentencepiece", sp_model_path)
    out = get_template("vicuna_v1").render(CONV[1:3], tok)
    assert tok.decode(out.tokens) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT: A red circle."
    )
    assert out.tokens[0] == tok.bos_id and out.tokens[-1] == tok.eos_id


def test_llama3_multi_turn(hf):
    H = lambda role: [("<|start_header_id|>", 0), (role, 0), ("<|end_header_id|>", 0), ("\n", 0), ("\n", 0)]  # noqa: E731
    expected = (
        [("<|begin_of_text|>", 0)]
        + H("system") + words("Be brief.", 0) + [("<|eot_id|>", 0)]
        + H("user") + [(IMG, 0)] + words("\nWhat is it?", 0) + [("<|eot_id|>", 0)]
        + H("assistant") + words("A red circle.", 1) + [("<|eot_id|>", 1)]
        + H("user") + words("Count?", 0) + [("<|eot_id|>", 0)]
        + H("assistant") + words("Two.", 1) + [("<|eot_id|>", 1)]
    )
    _check(get_template("llama3").render(CONV, hf), expected)


def test_chatml_multi_turn(hf):
    S, E, NL = ("<|im_start|>", 0), ("<|im_end|>", 0), ("\n", 0)
    expected = (
        [S] + words("system\nBe brief.", 0) + [E, NL]
        + [S] + words("user\n", 0) + [(IMG, 0)] + words("\nWhat is it?", 0) + [E, NL]
        + [S] + words("assistant\n", 0) + words("A red circle.", 1) + [("<|im_end|>", 1), NL]
        + [S] + words("user\nCount?", 0) + [E, NL]
        + [S] + words("assistant\n", 0) + words("Two.", 1) + [("<|im_end|>", 1), NL]
    )
    _check(get_template("chatml").render(CONV, hf), expected)


def test_plain_drops_prompt_and_supervises_caption_and_newline(hf):
    turns = [Turn(role="user", text="Describe image", image=True), Turn(role="assistant", text="A red circle.")]
    expected = [("<|begin_of_text|>", 0), (IMG, 0)] + words("A red circle.\n", 1)
    _check(get_template("plain").render(turns, hf), expected)
    with pytest.raises(TemplateError):
        get_template("plain").render(CONV[1:], hf)  # two rounds


def test_text_only_sample(hf):
    turns = [Turn(role="user", text="Hi"), Turn(role="assistant", text="Hello.")]
    expected = [("<|begin_of_text|>", 0)] + words("Be brief. USER: Hi ASSISTANT: ", 0) + words("Hello.", 1) + [
        ("<|eot_id|>", 1)]
    _check(get_template("vicuna_v1").render([Turn(role="system", text="Be brief.")] + turns, hf), expected)


def test_special_token_text_in_user_data_stays_text(hf):
    # A caption that literally contains "<|im_end|>" must not become the special token.
    turns = [Turn(role="user", text="Hi"), Turn(role="assistant", text="<|im_end|>")]
    out = get_template("chatml").render(turns, hf)
    sup = out.tokens[out.loss_mask == 1].tolist()
    assert sup.count(HF_VOCAB["<|im_end|>"]) == 1 and sup[-1] == HF_VOCAB["<|im_end|>"]


def test_sentencepiece_vicuna_matches_whole_string_tokenization(sp_model_path):
    import sentencepiece as spm

    tok = build_tokenizer("SentencePieceTokenizer", sp_model_path)
    sp = spm.SentencePieceProcessor(model_file=sp_model_path)
    out = get_template("vicuna_v1").render(CONV, tok)
    t, m = out.tokens.tolist(), out.loss_mask.tolist()
    p = t.index(IMAGE_TOKEN_ID)
    assert t[0] == sp.bos_id() and m[0] == 0
    # Text before the image: exactly the whole-string tokenization (with the dummy prefix).
    assert t[1:p] == sp.encode("Be brief. USER: ")
    # Right after the image comes "\n", not an invented "▁" piece.
    assert sp.id_to_piece(t[p + 1]) in ("\n", "<0x0A>")
    assert tok.decode(t) == "Be brief. USER: <image>\nWhat is it? ASSISTANT: A red circle.USER: Count? ASSISTANT: Two."
    # Supervised runs: each answer plus its EOS, nothing else.
    runs = supervised_runs(t, m)
    assert [r[-1] for r in runs] == [sp.eos_id()] * 2
    assert [sp.decode(r[:-1]).strip() for r in runs] == ["A red circle.", "Two."]
    assert sum(m) == sum(len(r) for r in runs)


def test_sentencepiece_unicode_answer_fully_supervised(sp_model_path):
    tok = build_tokenizer("sentencepiece", sp_model_path)
    turns = [Turn(role="user", text="Describe"), Turn(role="assistant", text="Café ☕ ok.")]
    out = get_template("vicuna_v1").render(turns, tok)
    sup = out.tokens[out.loss_mask == 1].tolist()
    assert sup[-1] == tok.eos_id
    assert tok.decode(sup[:-1]).strip() == "Café ☕ ok."  # byte-fallback pieces of ☕ all supervised
    unsup = out.tokens[out.loss_mask == 0].tolist()
    assert "Café" not in tok.decode(unsup)


def test_template_requires_its_special_tokens(sp_model_path):
    tok = build_tokenizer("sentencepiece", sp_model_path)
    with pytest.raises(TokenizerError, match="<\\|start_header_id\\|>"):
        get_template("llama3").check_tokenizer(tok)
    get_template("vicuna_v1").check_tokenizer(tok)
    with pytest.raises(ValueError, match="unknown template"):
        get_template("vicuna_v2")


def test_tokenizer_interface(sp_model_path, hf_tokenizer_dir):
    sp = build_tokenizer("Llama2Tokenizer", sp_model_path)
    assert (sp.vocab_size, sp.bos_id, sp.eos_id, sp.pad_id) == (640, 1, 2, 3)
    assert sp.decode(sp.encode("a red circle")) == "a red circle"
    assert sp.decode([IMAGE_TOKEN_ID] + sp.encode("a red circle")) == "<image>a red circle"
    hf = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id) == (len(HF_VOCAB), 1, 2, HF_VOCAB["<pad>"])
    assert hf.decode(hf.encode("A red circle.")) == "A red circle."
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        build_tokenizer("GPT2BPETokenizer", sp_model_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        build_tokenizer("sentencepiece", sp_model_path + ".missing")
