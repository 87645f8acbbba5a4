"""Reading for training: blending, the per-epoch shuffle, packing, and the collated batch.

Order of the data (everything deterministic from the seed):

- ``BlendedDataset`` maps a global position ``g = 0, 1, 2, ...`` to (dataset, sample). Positions
  come in *blend epochs* of ``E = sum of dataset sizes``; inside one, megatron-core's
  ``build_blending_indices`` interleaves the datasets by weight (Megatron's ``--data-path w1 p1 w2
  p2``). Each dataset is drawn through its own per-epoch permutation seeded by (seed, dataset,
  epoch), so one dataset alone gives a plain shuffled epoch per blend epoch, and an up-weighted
  dataset just starts its next epoch early.
- Rows: one position per row, or ``PackedRows`` packing consecutive positions first-fit into
  rows of at most ``seq_length`` expanded positions.
- ``sampler.GlobalBatchSampler`` cuts rows into global batches and DP slices.
- ``BatchCollator`` expands each image placeholder to ``num_image_tokens`` positions and builds
  the batch dict (see its docstring: that dict is the contract with the training loop).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_croc.data.constants import IMAGE_TOKEN_ID
from megatron_croc.data.indexed import MultimodalIndexedDataset, Sample
from megatron_croc.data.sampler import GlobalBatchSampler, ResumableDataLoader, RowSource, SingleRows


def expand_image_placeholder(tokens: np.ndarray, loss_mask: np.ndarray, *, num_image_tokens: int,
                             fill_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """A stored sample's tokens with its (at most one) ``IMAGE_TOKEN_ID`` placeholder widened to
    ``num_image_tokens`` positions holding ``fill_id`` (the pad id for training, where the visual
    tokens are spliced in; an export's ``<image>`` id for transformers). Returns (ids int64,
    supervised uint8, the first visual position or -1); visual positions are never supervised."""
    tokens = np.asarray(tokens)
    where = np.flatnonzero(tokens == IMAGE_TOKEN_ID)
    if len(where) == 0:
        return tokens.astype(np.int64), np.asarray(loss_mask, dtype=np.uint8), -1
    p, K = int(where[0]), num_image_tokens
    ids = np.empty(len(tokens) - 1 + K, dtype=np.int64)
    ids[:p] = tokens[:p]
    ids[p : p + K] = fill_id
    ids[p + K :] = tokens[p + 1 :]
    mask = np.zeros(len(ids), dtype=np.uint8)
    mask[:p] = loss_mask[:p]
    mask[p + K :] = loss_mask[p + 1 :]
    return ids, mask, p


def parse_data_path(data_path: Sequence[str] | str) -> list[tuple[float | None, str]]:
    """Megatron's ``--data-path``: ``[prefix]``, ``[p1, p2, ...]`` or ``[w1, p1, w2, p2, ...]``."""
    items = data_path.split() if isinstance(data_path, str) else list(data_path)
    if not items:
        raise ValueError("--data-path is empty; give a dataset prefix, or 'w1 prefix1 w2 prefix2 ...'")

    def as_float(x: str) -> float | None:
        try:
            return float(x)
        except ValueError:
            return None

    if len(items) % 2 == 0 and all(as_float(x) is not None for x in items[0::2]) and \
            not any(as_float(x) is not None for x in items[1::2]):
        out = [(float(w), p) for w, p in zip(items[0::2], items[1::2])]
        bad = [w for w, _ in out if not (w > 0 and math.isfinite(w))]
        if bad:
            raise ValueError(f"--data-path weights must be positive, got {bad}")
        return out
    if any(as_float(x) is not None for x in items):
        raise ValueError(f"--data-path {items}: expected 'prefix ...' or pairs 'weight prefix ...'")
    return [(None, p) for p in items]


class BlendedDataset:
    """Global position -> sample, over one or more datasets; see the module docstring."""

    def __init__(
        self,
        datasets: Sequence[MultimodalIndexedDataset],
        weights: Sequence[float] | None = None,
        *,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if not datasets:
            raise ValueError("no datasets to blend")
        self.datasets = list(datasets)
        self.sizes = np.asarray([len(d) for d in self.datasets], dtype=np.int64)
        if (self.sizes == 0).any():
            raise ValueError(f"empty dataset(s): {[d.prefix for d, n in zip(self.datasets, self.sizes) if n == 0]}")
        _check_compatible(self.datasets)
        w = np.asarray(self.sizes if weights is None else weights, dtype=np.float64)
        if w.shape != (len(self.datasets),) or not (w > 0).all():
            raise ValueError(f"need one positive weight per dataset, got {list(w)}")
        self.weights = w / w.sum()
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch_size = int(self.sizes.sum())
        if len(self.datasets) == 1:
            self._ds_index = np.zeros(self.epoch_size, dtype=np.int16)
            self._ds_sample = np.arange(self.epoch_size, dtype=np.int64)
        else:
            from megatron.core.datasets import helpers

            self._ds_index = np.zeros(self.epoch_size, dtype=np.int16)
            self._ds_sample = np.zeros(self.epoch_size, dtype=np.int64)
            helpers.build_blending_indices(
                self._ds_index, self._ds_sample, self.weights, len(self.datasets), self.epoch_size, False
            )
        # Draws of each dataset per blend epoch: identical every blend epoch.
        self._draws = np.bincount(self._ds_index, minlength=len(self.datasets)).astype(np.int64)
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    @property
    def image_size(self) -> int:
        return self.datasets[0].image_size

    @property
    def pad_id(self) -> int:
        return self.datasets[0].pad_id

    def __len__(self) -> int:
        return self.epoch_size

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        perm = self._perms.get(key)
        if perm is None:
            n = int(self.sizes[d])
            if self.shuffle:
                perm = np.random.default_rng([self.seed, d, epoch]).permutation(n)
            else:
                perm = np.arange(n)
            self._perms[key] = perm
            while len(self._perms) > 2 * len(self.datasets) + 2:
                self._perms.popitem(last=False)
        return perm

    def locate(self, positions: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset ids, sample indices) of global positions (vectorised)."""
        g = np.asarray(positions, dtype=np.int64)
        if (g < 0).any():
            raise IndexError("global positions are >= 0")
        blend_epoch, j = np.divmod(g, self.epoch_size)
        d = self._ds_index[j].astype(np.int64)
        draw = blend_epoch * self._draws[d] + self._ds_sample[j]
        ds_epoch, within = np.divmod(draw, self.sizes[d])
        samples = np.empty_like(g)
        flat_d, flat_e, flat_w = d.reshape(-1), ds_epoch.reshape(-1), within.reshape(-1)
        flat_s = samples.reshape(-1)
        for dd, ee in set(zip(flat_d.tolist(), flat_e.tolist())):
            sel = (flat_d == dd) & (flat_e == ee)
            flat_s[sel] = self._perm(dd, ee)[flat_w[sel]]
        return d, samples

    def expanded_lengths(self, positions: np.ndarray, num_image_tokens: int) -> np.ndarray:
        d, s = self.locate(positions)
        out = np.empty(len(positions), dtype=np.int64)
        for k, ds in enumerate(self.datasets):
            sel = d == k
            if sel.any():
                out[sel] = ds.expanded_lengths(num_image_tokens)[s[sel]]
        return out

    def __getitem__(self, position: int) -> Sample:
        return self.samples([position])[0]

    def samples(self, positions: Sequence[int]) -> list[Sample]:
        """The samples at global ``positions``, located in one vectorised lookup (the loader
        reads a row's samples together)."""
        d, s = self.locate(np.asarray(positions))
        out = []
        for position, k, i in zip(positions, d.tolist(), s.tolist()):
            sample = self.datasets[k][i]
            sample.position = int(position)
            out.append(sample)
        return out


def _check_compatible(datasets: Sequence[MultimodalIndexedDataset]) -> None:
    """Blended datasets must share the tokenizer and the stored image size."""
    ref = datasets[0]
    for ds in datasets[1:]:
        if ds.meta["tokenizer"]["sha256"] != ref.meta["tokenizer"]["sha256"]:
            raise ValueError(f"{ds.prefix!r} and {ref.prefix!r} were tokenized with different tokenizers; "
                             "preprocess them with the same --tokenizer-model")
        if ds.image_size != ref.image_size:
            raise ValueError(f"{ds.prefix!r} stores {ds.image_size}px images, {ref.prefix!r} {ref.image_size}px; "
                             "preprocess both with the same --image-size")


class PackedRows:
    """Rows of several samples packed into ``seq_length`` positions, deterministic.

    Each blend epoch's positions are packed first-fit into at most ``open_rows`` open rows, in
    stream order; the oldest open row is closed when a new one is needed beyond that. Rows
    never span two blend epochs. A sample longer than ``seq_length`` gets a row of its own (and
    the collate function reports it).
    """

    def __init__(self, dataset: BlendedDataset, *, seq_length: int, num_image_tokens: int, open_rows: int = 8) -> None:
        self.dataset = dataset
        self.seq_length = seq_length
        self.num_image_tokens = num_image_tokens
        self.open_rows = open_rows
        self._rows_per_epoch: list[int] = []
        self._plan_cache: OrderedDict[int, list[tuple[int, ...]]] = OrderedDict()

    def plan(self, blend_epoch: int) -> list[tuple[int, ...]]:
        cached = self._plan_cache.get(blend_epoch)
        if cached is not None:
            return cached
        E = self.dataset.epoch_size
        positions = np.arange(blend_epoch * E, (blend_epoch + 1) * E, dtype=np.int64)
        lengths = self.dataset.expanded_lengths(positions, self.num_image_tokens).tolist()
        S = self.seq_length
        rows: list[tuple[int, ...]] = []
        open_: list[list[Any]] = []  # [remaining, members]
        base = int(positions[0])
        for i, L in enumerate(lengths):
            placed = -1
            for k, slot in enumerate(open_):
                if slot[0] >= L:
                    slot[0] -= L
                    slot[1].append(base + i)
                    placed = k
                    break
            if placed < 0:
                open_.append([S - L, [base + i]])
                placed = len(open_) - 1
            if open_[placed][0] <= 0:  # full (or an over-long sample alone): close it now
                rows.append(tuple(open_.pop(placed)[1]))
            elif len(open_) > self.open_rows:
                rows.append(tuple(open_.pop(0)[1]))
        rows.extend(tuple(s[1]) for s in open_)
        self._plan_cache[blend_epoch] = rows
        while len(self._plan_cache) > 2:
            self._plan_cache.popitem(last=False)
        return rows

    def rows(self, start: int) -> Iterator[tuple[int, ...]]:
        epoch, offset = 0, start
        while True:
            if epoch == len(self._rows_per_epoch):
                self._rows_per_epoch.append(len(self.plan(epoch)))
            n = self._rows_per_epoch[epoch]
            if offset < n:
                break
            offset -= n
            epoch += 1
        for e in itertools.count(epoch):
            plan = self.plan(e)
            if e == len(self._rows_per_epoch):
                self._rows_per_epoch.append(len(plan))
            yield from plan[offset:]
            offset = 0


class RowDataset(torch.utils.data.Dataset):
    """``dataset[row]`` with a row = tuple of global positions -> the row's samples."""

    def __init__(self, blended: BlendedDataset) -> None:
        self.blended = blended

    def __len__(self) -> int:
        return len(self.blended)

    def __getitem__(self, row: Sequence[int]) -> list[Sample]:
        return self.blended.samples(row)


class SampleTooLongError(ValueError):
    """A sample does not fit ``seq_length`` after expanding its image."""


class BatchCollator:
    """Rows of samples -> the batch dict the training loop consumes (padding on the right).

    ``tokens`` int64 [B,S]        input ids; ``pad_token_id`` at visual positions and padding
    ``labels`` int64 [B,S]        labels[t] = token t+1 of the same sample, else ``pad_token_id``
    ``loss_mask`` float32 [B,S]   1 where labels[t] is a supervised answer / end-of-turn token;
                                  never on padding, visual positions or across packed samples
    ``position_ids`` int64 [B,S]  restart at 0 for each sample (0 on padding)
    ``segment_ids`` int32 [B,S]   1, 2, ... per sample in the row, 0 on padding
    ``visual_mask`` bool [B,S]    True at the ``num_image_tokens`` positions of each image
    ``images`` uint8 [N,3,H,W]    one per visual span, row-major order of appearance (N may be 0)
    ``sample_ids`` int64 [M]      global position of every sample, row-major (= segments in order;
                                  [B] without packing)
    ``image_sample_ids`` int64 [N]  global position of the sample each image belongs to
    """

    def __init__(self, *, seq_length: int, num_image_tokens: int, pad_token_id: int, image_size: int) -> None:
        if seq_length < 1 or num_image_tokens < 1:
            raise ValueError("seq_length and num_image_tokens must be >= 1")
        self.seq_length = seq_length
        self.num_image_tokens = num_image_tokens
        self.pad_token_id = int(pad_token_id)
        self.image_size = image_size

    def expand(self, s: Sample) -> tuple[np.ndarray, np.ndarray, int]:
        """(ids int64 [L'], supervised uint8 [L'], visual start or -1) with the image expanded."""
        tokens = np.asarray(s.tokens)
        where = np.flatnonzero(tokens == IMAGE_TOKEN_ID)
        if len(where) > 1:
            raise ValueError(f"{s.describe()} has {len(where)} image placeholders; one image per sample")
        if len(where) == 1 and s.image is None:
            raise ValueError(f"{s.describe()} has an image placeholder but no stored image")
        if len(where) == 0 and s.image is not None:
            raise ValueError(f"{s.describe()} has an image but no placeholder")
        return expand_image_placeholder(tokens, s.loss_mask, num_image_tokens=self.num_image_tokens,
                                        fill_id=self.pad_token_id)

    def __call__(self, rows: Sequence[Sequence[Sample]]) -> dict[str, Any]:
        B, S, K = len(rows), self.seq_length, self.num_image_tokens
        tokens = np.full((B, S), self.pad_token_id, dtype=np.int64)
        labels = np.full((B, S), self.pad_token_id, dtype=np.int64)
        loss_mask = np.zeros((B, S), dtype=np.float32)
        position_ids = np.zeros((B, S), dtype=np.int64)
        segment_ids = np.zeros((B, S), dtype=np.int32)
        visual_mask = np.zeros((B, S), dtype=bool)
        images: list[np.ndarray] = []
        sample_ids: list[int] = []
        image_sample_ids: list[int] = []
        for b, row in enumerate(rows):
            o = 0
            for seg, s in enumerate(row, start=1):
                ids, sup, vis = self.expand(s)
                L = len(ids)
                if o + L > S:
                    raise SampleTooLongError(
                        f"{s.describe()} needs {L} positions (image expanded to {K} tokens)"
                        + (f" after {o} positions of packed samples" if o else "")
                        + f" but --seq-length is {S}; preprocess with --seq-length {S} to skip such samples"
                    )
                tokens[b, o : o + L] = ids
                labels[b, o : o + L - 1] = ids[1:]
                loss_mask[b, o : o + L - 1] = sup[1:]
                position_ids[b, o : o + L] = np.arange(L)
                segment_ids[b, o : o + L] = seg
                if vis >= 0:
                    if s.image is None or s.image.shape != (3, self.image_size, self.image_size):
                        raise ValueError(f"{s.describe()} image has shape {getattr(s.image, 'shape', None)}, "
                                         f"expected (3, {self.image_size}, {self.image_size})")
                    visual_mask[b, o + vis : o + vis + K] = True
                    images.append(s.image)
                    image_sample_ids.append(s.position)
                sample_ids.append(s.position)
                o += L
        img = (
            torch.from_numpy(np.stack(images))
            if images
            else torch.zeros((0, 3, self.image_size, self.image_size), dtype=torch.uint8)
        )
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "segment_ids": torch.from_numpy(segment_ids),
            "visual_mask": torch.from_numpy(visual_mask),
            "images": img,
            "sample_ids": torch.tensor(sample_ids, dtype=torch.int64),
            "image_sample_ids": torch.tensor(image_sample_ids, dtype=torch.int64),
        }


def open_blend(entries: Sequence[tuple[float | None, str]], *, seed: int, shuffle: bool = True) -> BlendedDataset:
    """Open and blend the ``(weight, prefix)`` pairs of a parsed ``--data-path``
    (:func:`parse_data_path`); without weights, in proportion to the datasets' sizes, as
    Megatron does."""
    datasets = [MultimodalIndexedDataset(p) for _, p in entries]
    weights = None if entries[0][0] is None else [w for w, _ in entries]
    return BlendedDataset(datasets, weights, seed=seed, shuffle=shuffle)


@dataclass(kw_only=True)
class DataLoaderConfig:
    # Megatron's --data-path as given (["0.7", "data/a", "0.3", "data/b"], ["data/a"], or one
    # string "0.7 data/a 0.3 data/b"), or parse_data_path's (weight, prefix) pairs; stored as pairs.
    data_path: Sequence[tuple[float | None, str]] | Sequence[str] | str
    seq_length: int
    num_image_tokens: int
    micro_batch_size: int
    global_batch_size: int
    seed: int = 1234
    packing: bool = False
    num_workers: int = 2
    pin_memory: bool = False
    total_samples: int | None = None  # stop after this many rows (whole global batches); None: endless
    shuffle: bool = True

    def __post_init__(self) -> None:
        entries = [self.data_path] if isinstance(self.data_path, str) else list(self.data_path)
        if not (entries and all(isinstance(e, tuple) for e in entries)):
            self.data_path = parse_data_path(self.data_path)  # type: ignore[arg-type]


def build_data_loader(
    config: DataLoaderConfig, *, dp_rank: int, dp_size: int, consumed_samples: int = 0
) -> ResumableDataLoader:
    """The training data iterator for one DP rank (``next()`` gives one micro-batch dict)."""
    blended = open_blend(config.data_path, seed=config.seed, shuffle=config.shuffle)
    rows: RowSource = (
        PackedRows(blended, seq_length=config.seq_length, num_image_tokens=config.num_image_tokens)
        if config.packing
        else SingleRows()
    )
    sampler = GlobalBatchSampler(
        micro_batch_size=config.micro_batch_size,
        global_batch_size=config.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        consumed_samples=consumed_samples,
        total_samples=config.total_samples,
        rows=rows,
    )
    collate = BatchCollator(
        seq_length=config.seq_length,
        num_image_tokens=config.num_image_tokens,
        pad_token_id=blended.pad_id,
        image_size=blended.image_size,
    )
    return ResumableDataLoader(RowDataset(blended), sampler, collate, num_workers=config.num_workers,
                               pin_memory=config.pin_memory)
