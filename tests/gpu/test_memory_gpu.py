"""The memory report's estimate (``--dry-run``) against a real training step's memory on one
GPU, with and without recomputation (bench/bench_memory.py at a reduced croc-1b: 4 LLM layers,
CLIP-L/336, bf16). On the CPU, tests/parallel/test_memory_report.py checks the model-state part
against the live tensors of a run; the activation part needs the GPU's fused kernels.

Tolerances: the model state is counted exactly by the report (weights, fp32 gradient buffer,
Adam's moments and fp32 master weights) up to small buffers: within 5%. Activations are an
estimate from the layer structure; the measured peak also holds what the report leaves out
(kernel workspaces, the frozen encoder's transient outputs, the allocator's rounding): within
35%, and recomputation must lower both the same way. Whatever the first run on a GPU measures
goes into docs/PERFORMANCE.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]


def test_report_matches_a_measured_step(tmp_path):
    out = tmp_path / "memory.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_memory.py"), "--device", "cuda", "--num-layers", "4",
         "--seq-length", "1024", "--micro-batch-size", "2", "--num-microbatches", "2", "--json-out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for name, row in rows.items():
        report, measured = row["report"], row["measured"]
        assert abs(measured["state"] / report["state"] - 1) < 0.05, (name, row)
        assert abs(measured["activations"] / report["activations"] - 1) < 0.35, (name, row)
    # recomputation lowers the peak as the report says it does
    by_report = sorted(rows, key=lambda name: rows[name]["report"]["activations"])
    assert sorted(rows, key=lambda name: rows[name]["measured"]["activations"]) == by_report
    assert by_report[-1] == "none"
