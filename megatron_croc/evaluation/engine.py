"""The evaluation engine: a trained checkpoint + a preprocessed evaluation set -> validation LM
loss, greedy answers and their accuracy per question type.

The model is always the HuggingFace export (``tools/convert_checkpoint.py megatron-to-hf``): an
existing one (``hf_dir``), or one made from a megatron checkpoint (``load``, any TP/PP layout)
into a temporary folder first; the export generates exactly the tokens the megatron model picks
greedily (tests/unit/convert/test_demo_export.py), and runs on one CPU or GPU.

What it computes, for the first ``limit`` samples of the set (all by default):

* the validation LM loss: the mean cross-entropy over every supervised token of every sample
  (all rounds), aligned as training aligns it (data.dataset.BatchCollator): the logits at
  position t predict token t+1, and count where token t+1 is supervised; the sample's image
  placeholder becomes ``num_image_tokens`` copies of the export's ``<image>`` id;
* a greedy answer per sample: the prompt is the sample's tokens before its first supervised
  token (with ``vicuna_v1``: up to and including ``ASSISTANT:``), generated in batches with left
  padding until an end-of-turn token or ``max_new_tokens``; the reference is the first round's
  supervised tokens without the end-of-turn token. Multi-turn samples are scored on their
  first round only (said once in the log);
* scores (evaluation.metrics): exact match, or with the record's ``facts`` the fact recall and
  all-facts-present; per ``question_type`` (read from the source records by id, "all" when the
  record has none) and overall.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_croc.data.constants import IMAGE_TOKEN_ID
from megatron_croc.evaluation.metrics import (
    DEFAULT_QUESTION_TYPE,
    Score,
    TypeSummary,
    format_table,
    normalize_answer,
    score_answer,
    summarize,
)

ANSWERS_FILE = "answers.jsonl"
SUMMARY_FILE = "summary.json"
# end-of-turn tokens of the templates (data.templates) besides the tokenizer's EOS
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>")


class EvalError(ValueError):
    """The evaluation cannot run as asked; the message says what to fix (the CLI exits 2)."""


@dataclass(kw_only=True)
class EvalConfig:
    """What to evaluate and how. Exactly one of ``hf_dir`` and ``load``."""

    data_path: str  # prefix of a preprocessed set (tools/preprocess_data.py --output-prefix)
    hf_dir: str | None = None  # an HF export (tools/convert_checkpoint.py megatron-to-hf --save)
    load: str | None = None  # a training --save folder (any TP/PP) or one iter_XXXXXXX folder
    model: str | None = None  # --load: the model preset (default: the checkpoint's conversion record)
    vocab_size: int | None = None  # --load: the LLM vocabulary (default: the eval set's tokenizer's)
    iteration: int | None = None  # --load: this iteration instead of the latest
    save_hf: str | None = None  # --load: keep the export in this (new) folder instead of a temporary one
    references: list[str] | None = None  # LLaVA JSON/JSONL files with the records (default: the set's inputs)
    output_dir: str | None = None  # answers.jsonl and summary.json go here (nothing written when None)
    overwrite: bool = False  # replace an earlier evaluation's files in output_dir
    batch_size: int = 16
    max_new_tokens: int = 64
    limit: int | None = None  # evaluate the first N samples only
    device: str | None = None  # default: cuda when available, else cpu
    progress: bool = True  # tqdm bars on stderr


@dataclass(kw_only=True)
class AnswerRecord:
    """One line of answers.jsonl."""

    id: str
    question_type: str
    question: str
    reference: str
    answer: str
    correct: bool
    fact_recall: float | None = None  # only for records with facts
    facts: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.facts is None:
            del out["facts"], out["fact_recall"]
        return out


@dataclass(kw_only=True)
class EvalResult:
    loss: float  # mean cross-entropy per supervised token (nats)
    supervised_tokens: int
    answers: list[AnswerRecord]
    summary: dict[str, TypeSummary]  # per question type, then "overall"
    checkpoint: str  # the megatron checkpoint folder (--load) or the HF export (--hf)
    hf_dir: str | None  # the export that was evaluated (None when it was a temporary one)
    data_path: str
    num_samples: int  # evaluated
    dataset_samples: int  # in the set
    multi_turn_samples: int  # scored on their first round only
    seconds: float
    device: str
    dtype: str
    output_dir: str | None = None

    def summary_json(self) -> dict[str, Any]:
        return {
            "lm_loss": self.loss,
            "supervised_tokens": self.supervised_tokens,
            "question_types": {k: asdict(v) for k, v in self.summary.items()},
            "checkpoint": self.checkpoint,
            "hf_dir": self.hf_dir,
            "data_path": self.data_path,
            "counts": {
                "evaluated": self.num_samples,
                "dataset_samples": self.dataset_samples,
                "multi_turn_first_round_only": self.multi_turn_samples,
                "fact_scored": sum(a.facts is not None for a in self.answers),
            },
            "wall_time_s": round(self.seconds, 3),
            "device": self.device,
            "dtype": self.dtype,
        }

    def table(self) -> str:
        return format_table(self.summary, loss=self.loss, supervised_tokens=self.supervised_tokens)


def _stderr_log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def evaluate(config: EvalConfig | None = None, *, log: Callable[[str], None] | None = None, **fields: Any) -> EvalResult:
    """Evaluate a checkpoint on a preprocessed set: ``evaluate(EvalConfig(...))`` or
    ``evaluate(data_path=..., hf_dir=... | load=..., ...)`` with :class:`EvalConfig`'s fields.
    Raises :class:`EvalError` (and convert.hf.ConvertError / config.ConfigError from the export)
    on inputs it cannot use."""
    if config is None:
        config = EvalConfig(**fields)
    elif fields:
        raise TypeError("pass either an EvalConfig or its fields as keywords, not both")
    return _Evaluation(config, log or _stderr_log).run()


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Reference:
    question_type: str
    facts: list[str] | None
    question: str | None


def read_references(paths: Sequence[str], wanted: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """id -> record of LLaVA JSON/JSONL files, ids as preprocessing assigns them (the record's
    own ``id``, else ``file.json#INDEX`` / ``file.jsonl:LINE``); the first record of an id wins.
    With ``wanted``, only those ids are kept."""
    from megatron_croc.data.constants import SkipSample
    from megatron_croc.data.inputs import InputError, decode_line, load_source
    from megatron_croc.data.records import record_id

    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            source = load_source(path)
        except InputError as err:
            raise EvalError(f"references: {str(err).removeprefix('--input ')}") from None
        except OSError as err:
            raise EvalError(f"references {path!r}: cannot read it ({err})") from None
        limit = 2**62
        for local, raw in enumerate(source.iter_raw(0, len(source), max_record_bytes=limit)):
            if source.kind == "jsonl":
                try:
                    raw = decode_line(raw, line=int(source.line_numbers[local]), max_record_bytes=limit)
                except SkipSample:
                    continue  # preprocessing skipped it too: no sample can need it
            if not isinstance(raw, dict):
                continue
            rid = record_id(raw) or source.where(local)
            if wanted is None or rid in wanted:
                out.setdefault(rid, raw)
    return out


def _reference_fields(sample_id: str, record: dict[str, Any]) -> _Reference:
    qtype = record.get("question_type", DEFAULT_QUESTION_TYPE)
    if not isinstance(qtype, str) or not qtype.strip():
        raise EvalError(f"record {sample_id!r}: 'question_type' must be a non-empty string, got {qtype!r}")
    facts = record.get("facts")
    if facts is not None:
        if not isinstance(facts, list) or not facts or not all(isinstance(f, str) for f in facts):
            raise EvalError(f"record {sample_id!r}: 'facts' must be a non-empty list of strings, got {facts!r}")
        empty = [f for f in facts if not normalize_answer(f)]
        if empty:
            raise EvalError(f"record {sample_id!r}: facts {empty!r} are empty once normalised "
                            "(articles and punctuation are dropped); state them with content words")
    question = None
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") in ("human", "user") and isinstance(turn.get("value"), str):
            question = " ".join(turn["value"].replace("<image>", " ").split())
            break
    return _Reference(question_type=qtype.strip(), facts=facts, question=question)


@dataclass(kw_only=True)
class _Item:
    """One sample, ready for the model."""

    index: int
    sample_id: str
    full_ids: list[int]  # image expanded
    supervised: np.ndarray  # uint8, per full_ids position
    prompt_ids: list[int]  # image expanded, up to the first supervised token
    prompt_text_ids: list[int]  # the same without the image (a question for records that have none)
    has_image: bool  # the pixels are read from the set when the batch needs them
    reference_ids: list[int]
    multi_turn: bool
    ref: _Reference


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    padded = np.concatenate([[0], mask.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


class _Evaluation:
    def __init__(self, cfg: EvalConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.log = log

    def run(self) -> EvalResult:
        cfg = self.cfg
        start = time.time()
        if (cfg.hf_dir is None) == (cfg.load is None):
            raise EvalError("give exactly one checkpoint: --load (a megatron checkpoint) or --hf (an HF export)")
        if cfg.save_hf is not None and cfg.load is None:
            raise EvalError("--save-hf keeps the export that --load makes; with --hf there is none")
        if cfg.batch_size < 1 or cfg.max_new_tokens < 1 or (cfg.limit is not None and cfg.limit < 1):
            raise EvalError("--batch-size, --max-new-tokens and --limit must be >= 1")
        if cfg.output_dir is not None:
            _check_output_dir(Path(cfg.output_dir), overwrite=cfg.overwrite)

        device = self._device()
        dataset, meta = self._open_data()
        self.dataset = dataset
        n = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
        tok_meta = meta["tokenizer"]
        data_vocab = int(tok_meta["vocab_size"])
        if cfg.vocab_size is not None and cfg.vocab_size != data_vocab:
            raise EvalError(f"--vocab-size {cfg.vocab_size} does not match the eval set's tokenizer "
                            f"({tok_meta['path']}: {data_vocab} tokens)")
        ids = [dataset[i].sample_id for i in range(n)]
        refs = self._references(meta, ids)

        with contextlib.ExitStack() as stack:
            if cfg.load is not None:
                checkpoint = self._resolve_load()
                if cfg.save_hf is not None:
                    hf_dir = self._export(meta, Path(cfg.save_hf))
                else:
                    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="croc-eval-"))
                    hf_dir = self._export(meta, Path(tmp) / "hf")
            else:
                hf_dir = Path(cfg.hf_dir)  # type: ignore[arg-type]
                checkpoint = str(hf_dir.resolve())
            kept_export = None if cfg.load is not None and cfg.save_hf is None else str(hf_dir.resolve())
            model, processor = self._load_hf(hf_dir)
            image_id, k = self._check_model(model, meta, data_vocab)
            decode, stop_ids = self._decoder(meta, processor)
            model.to(device).eval()
            dtype = next(model.parameters()).dtype

            items = [self._item(dataset[i], refs[ids[i]], image_id, k, stop_ids) for i in range(n)]
            multi = sum(it.multi_turn for it in items)
            if multi:
                self.log(f"{multi} of {n} samples have several rounds: their first round is generated and scored "
                         "(the loss covers all rounds)")
            text_only = sum(not it.has_image for it in items)
            self.log(f"{n} samples of {cfg.data_path} ({text_only} text-only) on {device} in "
                     f"{str(dtype).removeprefix('torch.')}, batches of {cfg.batch_size}")

            pad_id = int(tok_meta["pad_id"])
            with torch.inference_mode():
                nll, count = self._loss(model, processor, items, pad_id, device, dtype)
                generated = self._generate(model, processor, items, pad_id, stop_ids, device, dtype)

        answers = []
        scores: list[tuple[str, Score]] = []
        for it, new in zip(items, generated):
            answer = decode(_cut(new, stop_ids)).strip()
            reference = decode(it.reference_ids).strip()
            s = score_answer(answer, reference, it.ref.facts)
            scores.append((it.ref.question_type, s))
            answers.append(AnswerRecord(
                id=it.sample_id, question_type=it.ref.question_type,
                question=it.ref.question if it.ref.question is not None else decode(it.prompt_text_ids).strip(),
                reference=reference, answer=answer, correct=s.correct, fact_recall=s.fact_recall,
                facts=it.ref.facts,
            ))
        result = EvalResult(
            loss=nll / count if count else float("nan"), supervised_tokens=count, answers=answers,
            summary=summarize(scores), checkpoint=checkpoint,
            hf_dir=kept_export,
            data_path=os.path.abspath(cfg.data_path), num_samples=n, dataset_samples=len(dataset),
            multi_turn_samples=multi, seconds=time.time() - start, device=str(device),
            dtype=str(dtype).removeprefix("torch."), output_dir=cfg.output_dir,
        )
        if cfg.output_dir is not None:
            write_outputs(result, cfg.output_dir)
        return result

    def _device(self) -> torch.device:
        try:
            device = torch.device(self.cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as err:
            raise EvalError(f"--device {self.cfg.device!r}: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EvalError(f"--device {self.cfg.device}: no CUDA GPU here (use --device cpu)")
        return device

    # -- inputs --

    def _open_data(self):
        from megatron_croc.data.indexed import MultimodalIndexedDataset, read_meta

        prefix = self.cfg.data_path
        try:
            meta = read_meta(prefix)
            dataset = MultimodalIndexedDataset(prefix)
        except (OSError, ValueError, KeyError) as err:
            raise EvalError(f"--data-path {prefix!r}: {err}") from None
        return dataset, meta

    def _references(self, meta: dict[str, Any], ids: list[str]) -> dict[str, _Reference]:
        paths = self.cfg.references or [inp["path"] for inp in meta.get("inputs") or []]
        if not paths:
            raise EvalError(f"{self.cfg.data_path}: the sidecar lists no input files; pass --references")
        try:
            records = read_references(paths, set(ids))
        except EvalError as err:
            if self.cfg.references:
                raise
            raise EvalError(f"{err} (a source file listed in the set's sidecar; pass the records with --references)") from None
        missing = [i for i in dict.fromkeys(ids) if i not in records]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise EvalError(f"sample id {missing[0]!r}{', ' if len(missing) > 1 else ''}"
                            f"{', '.join(repr(m) for m in missing[1:3])}{more} not found in the references "
                            f"{', '.join(paths)} (pass the records the set was made from with --references)")
        return {i: _reference_fields(i, records[i]) for i in dict.fromkeys(ids)}

    def _resolve_load(self) -> str:
        from megatron_croc.training.checkpoint import resolve_checkpoint_dir

        try:
            return str(resolve_checkpoint_dir(self.cfg.load, self.cfg.iteration).resolve())  # type: ignore[arg-type]
        except FileNotFoundError as err:
            raise EvalError(str(err)) from None

    def _export(self, meta: dict[str, Any], out: Path) -> Path:
        from megatron_croc.convert.hf import ConvertError, megatron_to_hf

        tok = meta["tokenizer"]
        if not Path(tok["path"]).exists():
            raise EvalError(f"the eval set's tokenizer {tok['path']} (from its sidecar) is missing; the export "
                            "needs it (or export with tools/convert_checkpoint.py and pass --hf)")
        self.log(f"exporting {self.cfg.load} to {'a temporary HF folder' if self.cfg.save_hf is None else out}")
        try:
            return megatron_to_hf(
                self.cfg.load, out, model=self.cfg.model, tokenizer=tok["path"],
                vocab_size=self.cfg.vocab_size or int(tok["vocab_size"]), iteration=self.cfg.iteration,
                progress=False,
            )
        except ConvertError as err:
            if "no conversion record" in str(err):  # its advice names the converter's flags
                raise EvalError(f"{str(err).split(';')[0]}; pass --model (one of the presets)") from None
            raise

    def _load_hf(self, hf_dir: Path):
        from transformers import AutoProcessor

        if not (hf_dir / "config.json").is_file():
            raise EvalError(f"--hf {hf_dir}: not a HuggingFace export (no config.json); make one with "
                            "tools/convert_checkpoint.py megatron-to-hf, or pass a megatron checkpoint with --load")
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        if not self.cfg.progress:
            hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
        try:
            model = _model_class(hf_dir).from_pretrained(str(hf_dir), dtype="auto")
            processor = AutoProcessor.from_pretrained(str(hf_dir))
        except Exception as err:  # transformers raises many kinds
            raise EvalError(f"--hf {hf_dir}: transformers cannot load it ({type(err).__name__}: {err})") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if not hasattr(processor, "image_processor"):
            raise EvalError(f"--hf {hf_dir}: no image processor in the export (AutoProcessor gave "
                            f"{type(processor).__name__})")
        return model, processor

    def _check_model(self, model, meta: dict[str, Any], data_vocab: int) -> tuple[int, int]:
        config = model.config
        image_id = getattr(config, "image_token_index", None)
        if image_id is None:
            raise EvalError(f"{config.name_or_path}: the model has no image_token_index (not a LLaVA export)")
        croc = getattr(config, "croc", None) or {}
        text_vocab = int(config.text_config.vocab_size)
        llm_vocab = croc.get("llm_vocab_size")
        if llm_vocab is not None:
            ok, model_vocab = data_vocab == int(llm_vocab), int(llm_vocab)
        else:  # another LLaVA export: its vocabulary may be padded beyond the tokenizer's
            ok, model_vocab = data_vocab <= text_vocab, text_vocab
        if not ok:
            raise EvalError(f"the eval set's tokenizer ({meta['tokenizer']['path']}: {data_vocab} tokens) does not "
                            f"match the model's vocabulary ({model_vocab}): evaluate with the set tokenized for this "
                            "model")
        k = int(meta["num_image_tokens"])
        vision = config.vision_config
        size = int(meta["image"]["size"])
        if size != int(vision.image_size):
            raise EvalError(f"the eval set's images are {size} px, the model's vision tower takes {vision.image_size} px")
        grid = (int(vision.image_size) // int(vision.patch_size)) ** 2
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            grid += 1
        if grid != k:
            raise EvalError(f"the eval set expands an image to {k} tokens, the model makes {grid}")
        return int(image_id), k

    def _decoder(self, meta: dict[str, Any], processor) -> tuple[Callable[[list[int]], str], set[int]]:
        """Decode with the eval set's tokenizer (the export's when that file is gone)."""
        from megatron_croc.data.tokenizers import tokenizer_from_meta

        tok_meta = meta["tokenizer"]
        stop = {int(tok_meta["eos_id"])}
        try:
            tok = tokenizer_from_meta(tok_meta)
        except (OSError, ValueError) as err:
            hf_tok = getattr(processor, "tokenizer", None)
            if hf_tok is None:
                raise EvalError(f"the eval set's tokenizer cannot be loaded ({err}) and the export has none") from None
            self.log(f"the eval set's tokenizer cannot be loaded ({err}); decoding with the export's")
            for name in _END_OF_TURN:
                tid = hf_tok.convert_tokens_to_ids(name)
                if isinstance(tid, int) and tid != hf_tok.unk_token_id:
                    stop.add(tid)
            return (lambda ids: hf_tok.decode(ids, skip_special_tokens=True)), stop
        for name in _END_OF_TURN:
            tid = tok.token_to_id(name)
            if tid is not None:
                stop.add(int(tid))
        vocab = tok.vocab_size
        return (lambda ids: tok.decode([i for i in ids if 0 <= i < vocab])), stop

    def _item(self, s, ref: _Reference, image_id: int, k: int, stop_ids: set[int]) -> _Item:
        tokens = np.asarray(s.tokens)
        mask = np.asarray(s.loss_mask)
        runs = _runs(mask)
        if not runs:
            raise EvalError(f"{s.describe()} has no supervised token: nothing to score")
        first, end = runs[0]
        if (tokens[:first] == IMAGE_TOKEN_ID).sum() != (tokens == IMAGE_TOKEN_ID).sum():
            raise EvalError(f"{s.describe()}: the image comes after the first answer; not a single-question sample")
        # imported here: data.dataset imports megatron-core, which warns before the CLI has
        # silenced its known warnings (megatron_croc.quiet)
        from megatron_croc.data.dataset import expand_image_placeholder

        full, sup, _ = expand_image_placeholder(tokens, mask, num_image_tokens=k, fill_id=image_id)
        prompt = full[: int(np.flatnonzero(sup)[0])]  # the image comes before the first answer (checked above)
        reference = tokens[first:end].tolist()
        while reference and reference[-1] in stop_ids:
            reference.pop()
        text_ids = [t for t in tokens[:first].tolist() if t != IMAGE_TOKEN_ID]
        return _Item(index=s.index, sample_id=s.sample_id, full_ids=full.tolist(), supervised=sup,
                     prompt_ids=prompt.tolist(), prompt_text_ids=text_ids, has_image=s.image is not None,
                     reference_ids=reference, multi_turn=len(runs) > 1, ref=ref)

    # -- the model --

    def _pixels(self, processor, items: Sequence[_Item], device, dtype) -> torch.Tensor | None:
        from PIL import Image

        images = [Image.fromarray(np.ascontiguousarray(self.dataset[it.index].image.transpose(1, 2, 0)))
                  for it in items if it.has_image]
        if not images:
            return None
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels.to(device=device, dtype=dtype)

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True, disable=not self.cfg.progress,
                    file=sys.stderr)

    def _loss(self, model, processor, items: list[_Item], pad_id: int, device, dtype) -> tuple[float, int]:
        """Sum of the cross-entropy over the supervised tokens, and their count. Right padding;
        only the supervised positions go through the LM head."""
        bs = self.cfg.batch_size
        nll, count = 0.0, 0
        lm_head = model.get_output_embeddings()
        order = sorted(range(len(items)), key=lambda i: len(items[i].full_ids))  # less padding
        with self._bar(len(items), "loss") as bar:
            for lo in range(0, len(items), bs):
                batch = [items[i] for i in order[lo:lo + bs]]
                width = max(len(it.full_ids) for it in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                labels_at = torch.zeros((len(batch), width), dtype=torch.bool)  # position t predicts t+1
                for b, it in enumerate(batch):
                    L = len(it.full_ids)
                    ids[b, :L] = torch.tensor(it.full_ids)
                    attn[b, :L] = 1
                    labels_at[b, : L - 1] = torch.from_numpy(it.supervised[1:].astype(bool))
                targets = torch.roll(ids, -1, dims=1)[labels_at]
                out = model.model(input_ids=ids.to(device), attention_mask=attn.to(device),
                                  pixel_values=self._pixels(processor, batch, device, dtype), use_cache=False)
                hidden = out.last_hidden_state[labels_at.to(device)]
                logits = lm_head(hidden).float()
                nll += float(torch.nn.functional.cross_entropy(logits, targets.to(device), reduction="sum"))
                count += int(labels_at.sum())
                bar.update(len(batch))
        return nll, count

    def _generate(self, model, processor, items: list[_Item], pad_id: int, stop_ids: set[int], device,
                  dtype) -> list[list[int]]:
        """Greedy continuations of each prompt, in batches of similar lengths, left padding."""
        bs = self.cfg.batch_size
        order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids))
        out: list[list[int]] = [[] for _ in items]
        with self._bar(len(items), "generating") as bar:
            for lo in range(0, len(order), bs):
                batch_idx = order[lo:lo + bs]
                batch = [items[i] for i in batch_idx]
                width = max(len(it.prompt_ids) for it in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                for b, it in enumerate(batch):
                    L = len(it.prompt_ids)
                    ids[b, width - L:] = torch.tensor(it.prompt_ids)
                    attn[b, width - L:] = 1
                kwargs = {}
                pixels = self._pixels(processor, batch, device, dtype)
                if pixels is not None:
                    kwargs["pixel_values"] = pixels
                generated = model.generate(
                    input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs, do_sample=False,
                    max_new_tokens=self.cfg.max_new_tokens, pad_token_id=pad_id, eos_token_id=sorted(stop_ids),
                )
                for b, i in enumerate(batch_idx):
                    out[i] = generated[b, width:].tolist()
                bar.update(len(batch))
        return out


def _model_class(hf_dir: Path):
    """Our exports' model class from this package, never from the folder: an export's
    ``modeling_croc.py`` would run with ``trust_remote_code=True``, and an --hf folder may come
    from anyone (docs/SECURITY.md). Any other LLaVA folder: transformers' own classes."""
    from transformers import AutoModelForImageTextToText

    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise EvalError(f"--hf {hf_dir}: cannot read config.json ({err})") from None
    if "croc" in config:
        from megatron_croc.convert.hf_modeling.modeling_croc import CrocLlavaForConditionalGeneration

        return CrocLlavaForConditionalGeneration
    return AutoModelForImageTextToText


def _cut(ids: list[int], stop_ids: set[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in stop_ids:
            return ids[:j]
    return ids


def _check_output_dir(out: Path, *, overwrite: bool) -> None:
    """Before any work: an earlier evaluation's files are replaced only when asked."""
    if out.exists() and not out.is_dir():
        raise EvalError(f"--output-dir {out} is a file, not a folder")
    held = [name for name in (ANSWERS_FILE, SUMMARY_FILE) if (out / name).exists()]
    if held and not overwrite:
        raise EvalError(f"--output-dir {out} already holds an evaluation ({', '.join(held)}); choose another folder, "
                        "or pass --overwrite to replace it")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(result: EvalResult, output_dir: str | os.PathLike) -> None:
    """answers.jsonl, then summary.json, each replaced in one step: a summary.json is only ever
    beside the answers it summarises."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    _write_atomically(out / ANSWERS_FILE, "".join(json.dumps(a.to_json(), ensure_ascii=False) + "\n"
                                                  for a in result.answers))
    summary = result.summary_json()
    if not math.isfinite(summary["lm_loss"]):
        summary["lm_loss"] = None
    _write_atomically(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
