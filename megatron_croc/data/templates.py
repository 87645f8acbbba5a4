"""Conversation templates and their loss masks.

A template turns a validated conversation into a list of *pieces*: text (supervised or not),
special tokens (by name), and the image. Rendering tokenizes each run of text between two
non-text pieces in one call, with character offsets, and marks a token as supervised when it
covers any supervised character. So the tokens are exactly those of tokenizing the whole prompt
text (no per-segment boundary artefacts), and the loss mask follows the answer text exactly.

Loss: answer tokens and the end-of-turn token that closes each answer (SPEC §1.5); never the
system prompt, the user turns, role headers or the image.

Supported: ``plain`` (stage 1), ``vicuna_v1`` (stages 1.5 and 2), ``llama3``, ``chatml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_croc.data.constants import IMAGE_TOKEN_ID
from megatron_croc.data.tokenizers import Tokenizer, TokenizerError


@dataclass(kw_only=True, frozen=True)
class Turn:
    """One validated turn. ``role`` is "system", "user" or "assistant".

    For a user turn with the image, ``text`` is the turn without the ``<image>`` placeholder and
    ``image`` is True: templates put the image first, then a newline, then the text (LLaVA's
    normalisation).
    """

    role: str
    text: str
    image: bool = False


@dataclass(kw_only=True, frozen=True)
class Text:
    text: str
    supervised: bool = False


@dataclass(kw_only=True, frozen=True)
class Special:
    """A special token: "<bos>"/"<eos>" mean the tokenizer's own; anything else is looked up."""

    token: str
    supervised: bool = False


@dataclass(kw_only=True, frozen=True)
class Image:
    pass


Piece = Text | Special | Image

BOS = "<bos>"
EOS = "<eos>"


@dataclass(kw_only=True)
class Rendered:
    tokens: np.ndarray  # int32 [L], image = IMAGE_TOKEN_ID
    loss_mask: np.ndarray  # uint8 [L], 1 = supervised token

    @property
    def num_images(self) -> int:
        return int(np.count_nonzero(self.tokens == IMAGE_TOKEN_ID))


class TemplateError(ValueError):
    """The conversation does not fit the template (e.g. several rounds for ``plain``)."""


class Template:
    """Base class: subclasses define ``pieces``; rendering is shared."""

    name: str = ""
    special_tokens: tuple[str, ...] = ()
    default_system: str | None = None

    def pieces(self, turns: Sequence[Turn]) -> list[Piece]:
        raise NotImplementedError

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raise TokenizerError if the tokenizer lacks a special token this template emits."""
        missing = [t for t in self.special_tokens if tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(
                f"template {self.name!r} needs the special tokens {missing} which tokenizer "
                f"{tokenizer.path!r} does not have; pick the template that matches the LLM "
                "(vicuna_v1/plain for Llama-2/Vicuna, llama3 for Llama-3, chatml for Qwen)"
            )

    def _special_id(self, tokenizer: Tokenizer, token: str) -> int:
        if token == BOS:
            assert tokenizer.bos_id is not None
            return tokenizer.bos_id
        if token == EOS:
            return tokenizer.eos_id
        tid = tokenizer.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"tokenizer {tokenizer.path!r} has no special token {token!r}")
        return tid

    def render(self, turns: Sequence[Turn], tokenizer: Tokenizer) -> Rendered:
        return render_pieces(self.pieces(turns), tokenizer, self)

    def min_length(self, turns: Sequence[Turn], tokenizer: Tokenizer) -> int:
        """A lower bound on ``len(render(turns, tokenizer).tokens)`` found without tokenizing
        (:meth:`Tokenizer.min_tokens` per run of text, one per special token and image): lets a
        record that cannot fit the sequence length be skipped before it costs anything."""
        length, run = 0, []
        for piece in self.pieces(turns) + [None]:
            if isinstance(piece, Text):
                run.append(piece.text)
                continue
            if run:
                length += tokenizer.min_tokens("".join(run))
                run = []
            if piece is None or (isinstance(piece, Special) and piece.token == BOS and tokenizer.bos_id is None):
                continue
            length += 1
        return length

    @staticmethod
    def _split_system(turns: Sequence[Turn], default: str | None) -> tuple[str | None, list[Turn]]:
        if turns and turns[0].role == "system":
            return turns[0].text, list(turns[1:])
        return default, list(turns)

    @staticmethod
    def _rounds(turns: Sequence[Turn]) -> list[tuple[Turn, Turn]]:
        if len(turns) % 2 or not turns:
            raise TemplateError("conversation must alternate user/assistant and end with assistant")
        rounds = []
        for i in range(0, len(turns), 2):
            u, a = turns[i], turns[i + 1]
            if u.role != "user" or a.role != "assistant":
                raise TemplateError("conversation must alternate user/assistant")
            rounds.append((u, a))
        return rounds

    @staticmethod
    def _user_content(turn: Turn) -> list[Piece]:
        if turn.image:
            return [Image(), Text(text="\n" + turn.text)]
        return [Text(text=turn.text)]


class PlainTemplate(Template):
    """Stage-1 alignment: ``<image>{caption}\\n``; the user prompt is dropped (as LLaVA does)."""

    name = "plain"

    def pieces(self, turns: Sequence[Turn]) -> list[Piece]:
        _, turns = self._split_system(turns, None)
        rounds = self._rounds(turns)
        if len(rounds) != 1:
            raise TemplateError(f"plain template takes one user/assistant pair, got {len(rounds)}")
        user, answer = rounds[0]
        out: list[Piece] = [Special(token=BOS)]
        if user.image:
            out.append(Image())
        out += [Text(text=answer.text, supervised=True), Text(text="\n", supervised=True)]
        return out


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class VicunaV1Template(Template):
    """``{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ... ASSISTANT: ...</s>``."""

    name = "vicuna_v1"
    default_system = VICUNA_SYSTEM

    def pieces(self, turns: Sequence[Turn]) -> list[Piece]:
        system, turns = self._split_system(turns, self.default_system)
        out: list[Piece] = [Special(token=BOS), Text(text=(system or "") + " ")]
        for user, answer in self._rounds(turns):
            out.append(Text(text="USER: "))
            out += self._user_content(user)
            out.append(Text(text=" ASSISTANT: "))
            out.append(Text(text=answer.text, supervised=True))
            out.append(Special(token=EOS, supervised=True))
        return out


LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)


class Llama3Template(Template):
    """Llama-3 chat format; each answer ends with ``<|eot_id|>``, which is supervised."""

    name = "llama3"
    default_system = LLAMA3_SYSTEM
    special_tokens = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def _header(self, role: str) -> list[Piece]:
        return [Special(token="<|start_header_id|>"), Text(text=role),
                Special(token="<|end_header_id|>"), Text(text="\n\n")]

    def pieces(self, turns: Sequence[Turn]) -> list[Piece]:
        system, turns = self._split_system(turns, self.default_system)
        out: list[Piece] = [Special(token=BOS)]
        if system:
            out += self._header("system") + [Text(text=system), Special(token="<|eot_id|>")]
        for user, answer in self._rounds(turns):
            out += self._header("user") + self._user_content(user) + [Special(token="<|eot_id|>")]
            out += self._header("assistant")
            out += [Text(text=answer.text, supervised=True),
                    Special(token="<|eot_id|>", supervised=True)]
        return out


class ChatMLTemplate(Template):
    """ChatML (Qwen); each answer ends with ``<|im_end|>``, which is supervised."""

    name = "chatml"
    default_system = "You are a helpful assistant."
    special_tokens = ("<|im_start|>", "<|im_end|>")

    def pieces(self, turns: Sequence[Turn]) -> list[Piece]:
        system, turns = self._split_system(turns, self.default_system)
        out: list[Piece] = []
        if system:
            out += [Special(token="<|im_start|>"), Text(text="system\n" + system),
                    Special(token="<|im_end|>"), Text(text="\n")]
        for user, answer in self._rounds(turns):
            out += [Special(token="<|im_start|>"), Text(text="user\n")]
            out += self._user_content(user)
            out += [Special(token="<|im_end|>"), Text(text="\n")]
            out += [Special(token="<|im_start|>"), Text(text="assistant\n"),
                    Text(text=answer.text, supervised=True),
                    Special(token="<|im_end|>", supervised=True), Text(text="\n")]
        return out


def render_pieces(pieces: Sequence[Piece], tokenizer: Tokenizer, template: Template) -> Rendered:
    """Tokenize pieces: runs of text in one call each, supervision from character spans."""
    ids: list[int] = []
    mask: list[int] = []
    run: list[Text] = []
    # The first text of a sample gets SentencePiece's dummy prefix (even after BOS), exactly as
    # tokenizing the whole prompt would; text after the image or a special token continues.
    continuation = False

    def flush() -> None:
        nonlocal continuation
        texts = list(run)
        run.clear()
        text = "".join(p.text for p in texts)
        if not text:
            return
        sup = bytearray(len(text) + 1)
        pos = 0
        for p in texts:
            if p.supervised:
                sup[pos : pos + len(p.text)] = b"\x01" * len(p.text)
            pos += len(p.text)
        run_ids, offsets = tokenizer.encode_with_offsets(text, continuation=continuation)
        for tid, (s, e) in zip(run_ids, offsets):
            ids.append(tid)
            # Zero-width tokens (a leading byte-fallback piece) count at their start position.
            mask.append(1 if any(sup[s : max(e, s + 1)]) else 0)
        continuation = True

    for piece in pieces:
        if isinstance(piece, Text):
            run.append(piece)
            continue
        if run:
            flush()
        if isinstance(piece, Image):
            ids.append(IMAGE_TOKEN_ID)
            mask.append(0)
            continuation = True
        elif piece.token == BOS and tokenizer.bos_id is None:
            continue  # tokenizers without BOS (Qwen) simply start with the text
        else:
            ids.append(template._special_id(tokenizer, piece.token))
            mask.append(1 if piece.supervised else 0)
            if piece.token != BOS:
                continuation = True
    if run:
        flush()
    return Rendered(tokens=np.asarray(ids, dtype=np.int32), loss_mask=np.asarray(mask, dtype=np.uint8))


TEMPLATES: dict[str, Template] = {
    t.name: t for t in (PlainTemplate(), VicunaV1Template(), Llama3Template(), ChatMLTemplate())
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)} "
            "(plain for stage 1, vicuna_v1 for stages 1.5 and 2 with Vicuna)"
        ) from None
