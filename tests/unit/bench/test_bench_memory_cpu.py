"""bench/bench_memory.py runs end to end at toy size on the CPU (the GPU runs it at the 0.89B
size, tests/gpu/test_memory_gpu.py), and its model-state row agrees with the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_bench_memory_runs_on_the_cpu(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_memory.py"), "--device", "cpu", "--tiny",
                           "--recompute", "none", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== memory table" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"].values()
    assert abs(row["measured"]["state"] / row["report"]["state"] - 1) < 0.01, row
    assert row["measured"]["activations"] is None  # measured on a GPU only
