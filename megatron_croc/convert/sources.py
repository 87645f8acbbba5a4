"""HuggingFace weights on disk, read one tensor at a time.

A :class:`TensorSource` indexes the tensors of one input (a model folder with safetensors or
``pytorch_model*.bin`` shards, or a single weights file) from the files' headers only, renames
them to the canonical LLaVA names of :mod:`megatron_croc.convert.mappings`, and reads a tensor
only when asked. safetensors tensors are read straight into a new tensor (no memory map, so the
process holds exactly the tensors in use); ``.bin`` files are memory-mapped
(``torch.load(mmap=True)``): nothing is loaded up front, pages come in as tensors are used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_croc.convert.mappings import ConvertError, canonical_hf_name

__all__ = ["ConvertError", "TensorSource", "HFInputs", "weight_files"]


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Entry:
    file: Path
    name: str  # the name inside the file
    shape: tuple[int, ...]
    dtype: torch.dtype


def weight_files(path: Path) -> list[Path]:
    """The weight files of a model folder (or the file itself), in index order when indexed."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConvertError(f"{path}: no such file or folder")
    for index_name, suffix in (("model.safetensors.index.json", ".safetensors"), ("pytorch_model.bin.index.json", ".bin")):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConvertError(f"{index}: not a valid weight index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise ConvertError(
                    f"{index} lists {missing[0]}, which is missing from {path}"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; download the complete model"
                )
            return [path / f for f in files]
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.bin"):
        files = sorted(p for p in path.glob(pattern) if not p.name.startswith("croc_extras"))
        if files:
            return files
    raise ConvertError(f"{path}: no weights found (expected *.safetensors or pytorch_model*.bin files)")


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """(the JSON header, where the data starts) of a safetensors file."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 * 2**20:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as e:
        raise ConvertError(f"{file}: not a readable safetensors file ({e}); download it again") from None
    return header, 8 + n


class TensorSource:
    """The tensors of one HF input, under canonical LLaVA names."""

    def __init__(self, path: str | os.PathLike, kind: str, *, files: list[Path] | None = None):
        self.path = Path(path)
        self.kind = kind
        self.entries: dict[str, Entry] = {}
        self.unknown: list[str] = []
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._st_offsets: dict[tuple[Path, str], tuple[int, int]] = {}
        for file in files if files is not None else weight_files(self.path):
            for name, shape, dtype in self._header(file):
                canonical = canonical_hf_name(name, kind) if kind != "raw" else name
                if canonical is None:
                    continue
                if canonical == "":
                    self.unknown.append(f"{file.name}:{name}")
                    continue
                if canonical in self.entries:
                    raise ConvertError(f"{file}: tensor {name} appears twice in {self.path}")
                self.entries[canonical] = Entry(file, name, shape, dtype)

    def _header(self, file: Path):
        if file.suffix == ".safetensors":
            header, data_start = _safetensors_header(file)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype = _ST_DTYPES.get(info.get("dtype"))
                if dtype is None:
                    raise ConvertError(f"{file}: tensor {name} has dtype {info.get('dtype')!r}, which is not supported")
                begin, end = info["data_offsets"]
                self._st_offsets[(file, name)] = (data_start + begin, data_start + end)
                yield name, tuple(info["shape"]), dtype
        else:
            for name, t in self._bin(file).items():
                if isinstance(t, torch.Tensor):
                    yield name, tuple(t.shape), t.dtype

    def _bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bin_cache:
            try:
                sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise ConvertError(f"{file}: cannot read PyTorch weights ({e})") from None
            self._bin_cache[file] = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        return self._bin_cache[file]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        if e.file.suffix == ".safetensors":
            # Read into a fresh tensor (no memory map: the process holds this tensor and nothing
            # else of the file, and what it held is freed with the tensor).
            begin, end = self._st_offsets[(e.file, e.name)]
            out = torch.empty(e.shape, dtype=e.dtype)
            raw = out.reshape(-1).view(torch.uint8).numpy()
            if raw.nbytes != end - begin:
                raise ConvertError(f"{e.file}: tensor {e.name} has {end - begin} bytes for shape {e.shape} {e.dtype}")
            with open(e.file, "rb", buffering=0) as f:
                f.seek(begin)
                view, done = memoryview(raw), 0
                while done < raw.nbytes:
                    n = f.readinto(view[done:])
                    if not n:
                        raise ConvertError(f"{e.file}: truncated file, tensor {e.name} ends past the end; download it again")
                    done += n
            return out
        return self._bin(e.file)[e.name]

    def close(self) -> None:
        self._bin_cache.clear()


class HFInputs:
    """Several inputs merged into one canonical namespace."""

    def __init__(self, sources: list[TensorSource]):
        self.sources = sources
        self.owner: dict[str, TensorSource] = {}
        for s in sources:
            for name in s.entries:
                if name in self.owner:
                    raise ConvertError(
                        f"{name} is in both {self.owner[name].path} and {s.path}; give each part once"
                    )
                self.owner[name] = s

    def __contains__(self, name: str) -> bool:
        return name in self.owner

    def entry(self, name: str) -> Entry:
        return self.owner[name].entries[name]

    def where(self, name: str) -> str:
        e = self.entry(name)
        return f"{e.file}: {e.name}"

    def get(self, name: str) -> torch.Tensor:
        if name not in self.owner:
            raise ConvertError(f"tensor {name} is missing from the HF inputs ({', '.join(str(s.path) for s in self.sources)})")
        return self.owner[name].get(name)

    def unknown(self) -> list[str]:
        return [f"{s.path}/{u}" for s in self.sources for u in s.unknown]

    def main_dtype(self) -> torch.dtype:
        """The dtype most of the (floating) parameters are stored in."""
        counts: dict[torch.dtype, int] = {}
        for s in self.sources:
            for e in s.entries.values():
                if e.dtype.is_floating_point:
                    n = 1
                    for d in e.shape:
                        n *= d
                    counts[e.dtype] = counts.get(e.dtype, 0) + n
        return max(counts, key=counts.get) if counts else torch.float32

    def close(self) -> None:
        for s in self.sources:
            s.close()
