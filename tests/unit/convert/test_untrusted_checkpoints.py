"""What the conversion tool does not trust: pickles in weight files and checkpoints are never
unpickled into code, and code shipped with an input folder (``auto_map``) never runs."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import tiny_hf as T

from megatron_croc.convert.hf import ConvertError, hf_to_megatron, megatron_to_hf
from megatron_croc.convert.sources import TensorSource

REPO = Path(__file__).resolve().parents[3]


class _Payload:
    """Unpickling this runs ``Path(marker).write_text(...)``: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _evil_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"model.norm.weight": _Payload(marker)}, f)


def test_pickled_weight_files_are_not_executed(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "llm"
    folder.mkdir()
    _evil_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(ConvertError, match="cannot read PyTorch weights"):
        TensorSource(folder, "llm")
    assert not marker.exists()


def test_a_checkpoint_with_a_pickle_payload_does_not_run_it(tmp_path, megatron_world):
    hf = T.make_hf_models(tmp_path / "hf")
    ckpt = hf_to_megatron(tmp_path / "mg", model="from-hf", progress=False, llm=hf["llm"], vision=hf["vision"],
                          projector=hf["projector"])
    marker = tmp_path / "ran"
    _evil_pickle(ckpt / "iter_0000000" / "common.pt", marker)
    try:
        megatron_to_hf(ckpt, tmp_path / "out", progress=False)
    except Exception:
        pass  # refusing the checkpoint is fine; running its payload is not
    assert not marker.exists()


def test_code_shipped_with_an_input_folder_never_runs(tmp_path, megatron_world):
    marker = tmp_path / "ran"
    hf = T.make_hf_models(tmp_path / "hf")
    for part in ("llm", "vision"):
        folder = hf[part]
        (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('pwned')\n"
                                        "from transformers import PretrainedConfig as EvilConfig\n")
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoTokenizer": ["evil.EvilConfig", None]}
        (folder / "config.json").write_text(json.dumps(config))
    hf_to_megatron(tmp_path / "mg", model="from-hf", progress=False, llm=hf["llm"], vision=hf["vision"])
    assert not marker.exists()


def test_the_package_never_asks_transformers_to_trust_remote_code():
    offenders = []
    for path in (REPO / "megatron_croc").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    offenders.append(f"{path.relative_to(REPO)}:{node.value.lineno}")
    assert not offenders, offenders


def test_broken_safetensors_headers_are_refused_before_reading(tmp_path):
    folder = tmp_path / "llm"
    folder.mkdir()
    huge = (2**40).to_bytes(8, "little") + b"{}"  # claims a 1 TiB header
    (folder / "model.safetensors").write_bytes(huge)
    with pytest.raises(ConvertError, match=r"not a readable safetensors file \(header length 1099511627776\)"):
        TensorSource(folder, "llm")
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    source = TensorSource(folder, "llm")
    with pytest.raises(ConvertError, match="truncated file"):
        source.get("model.language_model.norm.weight")
