"""Fixtures for the data tests: tiny tokenizers (SentencePiece, HF word-level)."""

from __future__ import annotations

import pytest
from data_helpers import HF_SPECIALS, HF_VOCAB

@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=HF_VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\s"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=HF_SPECIALS[2:7],
    )
    folder = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small BPE SentencePiece model (the demo tokenizer recipe) on demo text."""
    from megatron_croc.data.demo import generate_records, train_demo_tokenizer

    records = [r for r, _ in generate_records(300, seed=7)]
    path = tmp_path_factory.mktemp("sp_tok") / "tok.model"
    return train_demo_tokenizer(records, path, vocab_size=640)
