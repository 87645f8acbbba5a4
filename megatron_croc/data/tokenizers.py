"""SentencePiece and HuggingFace tokenizers behind one small interface.

The templates need two things a plain ``encode`` does not give: character offsets (so the loss
mask follows the answer text exactly, whatever the merges) and control over SentencePiece's
dummy whitespace prefix (text that continues after the image or after a special token must not
get a fresh "▁" the way the start of the prompt does).

The image placeholder is never tokenized: templates emit ``IMAGE_TOKEN_ID`` (-200) directly.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_croc.data.constants import IMAGE_TOKEN, IMAGE_TOKEN_ID

Offsets = list[tuple[int, int]]


class TokenizerError(ValueError):
    """A tokenizer could not be built or lacks something a template needs."""


class Tokenizer(ABC):
    """What data, training and evaluation need from a tokenizer."""

    kind: str
    path: str

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the embedding must cover (added/special tokens included)."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int:
        """A valid id used at padding and visual positions (always masked out of the loss)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS/EOS added, special-token strings are not parsed."""

    @abstractmethod
    def encode_with_offsets(self, text: str, *, continuation: bool) -> tuple[list[int], Offsets]:
        """Ids plus each token's [start, end) character span in ``text``.

        ``continuation=True`` means the text directly follows something else of the same sample
        (the image, a special token), so no whitespace prefix is invented in front of it.
        """

    @abstractmethod
    def _decode_real(self, ids: list[int]) -> str: ...

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a special token given by its string (e.g. ``<|eot_id|>``), None if absent."""

    @abstractmethod
    def _fingerprint_files(self) -> list[Path]: ...

    @property
    @abstractmethod
    def max_chars_per_token(self) -> int | None:
        """A guaranteed upper bound on the characters of normalized text one token covers, or None
        when the tokenizer has none (an unknown token that swallows a whole run or word, a
        pre-tokenizer that drops characters). Gives :meth:`min_tokens`."""

    @abstractmethod
    def normalized_length(self, text: str) -> int:
        """Length of ``text`` after the tokenizer's normalizer (which may collapse or drop
        characters), without tokenizing it."""

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))``, without tokenizing: used to skip records that
        cannot fit the sequence length in milliseconds instead of tokenizing megabytes. 0 when
        the tokenizer gives no bound (see :attr:`max_chars_per_token`)."""
        per_token = self.max_chars_per_token
        if per_token is None or not text:
            return 0
        return -(-self.normalized_length(text) // per_token)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; the image placeholder decodes to ``<image>``."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i == IMAGE_TOKEN_ID:
                if run:
                    out.append(self._decode_real(run))
                    run = []
                out.append(IMAGE_TOKEN)
            else:
                run.append(i)
        if run:
            out.append(self._decode_real(run))
        return "".join(out)

    def fingerprint(self) -> str:
        """SHA-256 over the tokenizer files: datasets may only be blended if these agree."""
        digest = hashlib.sha256()
        for f in self._fingerprint_files():
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        """What the dataset sidecar records about the tokenizer."""
        return {
            "type": self.kind,
            "path": os.path.abspath(self.path),
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "sha256": self.fingerprint(),
        }


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file (Llama-2 / Vicuna, the demo tokenizer)."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise TokenizerError(
                f"SentencePiece model {str(path)!r} does not exist or is not a file; pass the "
                "tokenizer.model file of the LLM (e.g. vicuna-7b-v1.5/tokenizer.model)."
            )
        self.path = str(path)
        proto = path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError on bad files
            raise TokenizerError(f"{str(path)!r} is not a SentencePiece model: {err}") from err
        # A second processor without the dummy "▁" prefix, for text that continues a sample.
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(proto)
        if model.normalizer_spec.add_dummy_prefix:
            model.normalizer_spec.add_dummy_prefix = False
            self._sp_cont = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
        else:
            self._sp_cont = self._sp
        self._proto_type = "proto"
        spec = model.normalizer_spec
        self._normalizes = not (spec.name == "identity" and not spec.precompiled_charsmap
                                and not spec.remove_extra_whitespaces)
        piece_chars = [1 if p.type == p.BYTE else len(p.piece) for p in model.pieces
                       if p.type in (p.NORMAL, p.USER_DEFINED, p.BYTE)]
        # Without byte fallback SentencePiece turns a whole run of unknown characters into one <unk>.
        self._max_chars = max(piece_chars, default=1) if model.trainer_spec.byte_fallback else None
        pad = self._sp.pad_id()
        # Llama-2 has no pad piece; LLaVA pads with <unk> (id 0), which is always masked.
        self._pad = pad if pad >= 0 else max(self._sp.unk_id(), 0)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def bos_id(self) -> int | None:
        bos = self._sp.bos_id()
        return bos if bos >= 0 else None

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self._pad)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_with_offsets(self, text: str, *, continuation: bool) -> tuple[list[int], Offsets]:
        proc = self._sp_cont if continuation else self._sp
        try:
            proto = proc.encode(text, out_type=self._proto_type)
        except ValueError:
            # sentencepiece <= 0.2.0 calls it "immutable_proto"; newer releases only "proto".
            self._proto_type = "immutable_proto" if self._proto_type == "proto" else "proto"
            proto = proc.encode(text, out_type=self._proto_type)
        ids = [p.id for p in proto.pieces]
        # SentencePiece reports UTF-8 byte offsets; convert to character offsets.
        raw = text.encode("utf-8")
        if len(raw) == len(text):
            return ids, [(p.begin, p.end) for p in proto.pieces]
        byte_to_char = [0] * len(raw)
        pos = 0
        for ci, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            byte_to_char[pos : pos + n] = [ci] * n
            pos += n
        offsets = []
        for p in proto.pieces:
            if p.end == p.begin:  # zero-width (dummy prefix, leading byte-fallback piece)
                start = byte_to_char[p.begin] if p.begin < len(raw) else len(text)
                offsets.append((start, start))
            else:
                # A piece ending mid-character (byte fallback) still covers that character.
                offsets.append((byte_to_char[p.begin], byte_to_char[p.end - 1] + 1))
        return ids, offsets

    def _decode_real(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    @property
    def max_chars_per_token(self) -> int | None:
        return self._max_chars

    def normalized_length(self, text: str) -> int:
        return len(self._sp.normalize(text)) if self._normalizes else len(text)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        if i == self._sp.unk_id() and token != self._sp.id_to_piece(i):
            return None
        return int(i)

    def _fingerprint_files(self) -> list[Path]:
        return [Path(self.path)]


class HuggingFaceTokenizer(Tokenizer):
    """A HuggingFace tokenizer folder (Llama-3, Qwen, ...), loaded with ``AutoTokenizer``."""

    kind = "huggingface"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(
                f"HuggingFace tokenizer folder {str(folder)!r} does not exist; pass the model "
                "folder that holds tokenizer.json / tokenizer_config.json."
            )
        # Workers are forked after loading; the Rust thread pool must not be live then.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as err:
            raise TokenizerError(f"cannot load a HuggingFace tokenizer from {str(folder)!r}: {err}") from err
        if not getattr(self._tok, "is_fast", False):
            raise TokenizerError(
                f"{str(folder)!r} gives a slow (Python) tokenizer; offsets for the loss mask need a "
                "fast tokenizer: provide tokenizer.json."
            )
        self.path = str(folder)
        eos = self._tok.eos_token_id
        if eos is None:
            raise TokenizerError(f"tokenizer in {str(folder)!r} defines no eos_token")
        self._eos = int(eos)
        pad = self._tok.pad_token_id
        # Llama-3 has no pad token; any valid id works since padding is always masked.
        self._pad = int(pad) if pad is not None else self._eos
        self._max_chars = _hf_max_chars_per_token(self._tok)
        self._normalizer = self._tok.backend_tokenizer.normalizer

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def bos_id(self) -> int | None:
        bos = self._tok.bos_token_id
        return int(bos) if bos is not None else None

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text, continuation=False)[0]

    def encode_with_offsets(self, text: str, *, continuation: bool) -> tuple[list[int], Offsets]:
        # split_special_tokens: user text such as "<|im_end|>" must stay text; special tokens
        # come only from the template.
        enc = self._tok(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            split_special_tokens=True,
        )
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _decode_real(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    @property
    def max_chars_per_token(self) -> int | None:
        return self._max_chars

    def normalized_length(self, text: str) -> int:
        return len(self._normalizer.normalize_str(text)) if self._normalizer is not None else len(text)

    def token_to_id(self, token: str) -> int | None:
        i = self._tok.convert_tokens_to_ids(token)
        if i is None or (self._tok.unk_token_id is not None and i == self._tok.unk_token_id
                         and token != self._tok.unk_token):
            return None
        return int(i)

    def _fingerprint_files(self) -> list[Path]:
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "tokenizer.model")
        return [Path(self.path) / n for n in names if (Path(self.path) / n).is_file()]


# Pre-tokenizers that keep every character (each lands in some token); others (Whitespace,
# BertPreTokenizer, a Split that removes its matches) drop characters, so no bound holds.
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split", "Sequence"}


def _hf_max_chars_per_token(tok: Any) -> int | None:
    """Characters one token of a fast tokenizer can cover at most, or None (see
    ``Tokenizer.max_chars_per_token``): bounded for byte-level BPE (Llama-3, Qwen: a token is a
    fixed byte string) and BPE with byte fallback (Llama-2/Mistral conversions), as long as the
    pre-tokenizer drops nothing."""
    import json

    spec = json.loads(tok.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")

    def types(node: Any) -> list[dict]:
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [node] + [t for child in node.get("pretokenizers", []) for t in types(child)]
        return [node]

    pre_types = types(pre)
    if any(p.get("type") not in _KEEPING_PRE_TOKENIZERS or str(p.get("behavior", "")).lower() == "removed"
           for p in pre_types):
        return None
    byte_level = any(p.get("type") == "ByteLevel" for p in pre_types)
    if model.get("type") != "BPE" or not (byte_level or (model.get("byte_fallback") and not model.get("fuse_unk"))):
        return None  # WordLevel/WordPiece/Unigram or BPE without fallback: <unk> covers a whole run
    # A token string spells each byte (byte-level) or character as at least one character;
    # byte-fallback tokens ("<0x41>") are longer than the one byte they cover.
    lengths = [len(t) for t in tok.get_vocab()]
    return max(lengths, default=1)


# Megatron's --tokenizer-type names map onto the two implementations.
_KINDS: dict[str, type[Tokenizer]] = {
    "sentencepiece": SentencePieceTokenizer,
    "sentencepiecetokenizer": SentencePieceTokenizer,
    "gptsentencepiecetokenizer": SentencePieceTokenizer,
    "llama2tokenizer": SentencePieceTokenizer,
    "huggingface": HuggingFaceTokenizer,
    "huggingfacetokenizer": HuggingFaceTokenizer,
    "hf": HuggingFaceTokenizer,
}

TOKENIZER_TYPES = ("SentencePieceTokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer")


def build_tokenizer(kind: str, path: str | os.PathLike[str]) -> Tokenizer:
    """Build a tokenizer from Megatron's ``--tokenizer-type`` and ``--tokenizer-model``."""
    cls = _KINDS.get(kind.lower())
    if cls is None:
        raise TokenizerError(
            f"unknown tokenizer type {kind!r}; use one of {', '.join(TOKENIZER_TYPES)} "
            "(a SentencePiece .model file, or a HuggingFace tokenizer folder)"
        )
    return cls(path)


def tokenizer_from_meta(meta: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a dataset sidecar describes (for decoding and checks)."""
    return build_tokenizer(meta["type"], meta["path"])
