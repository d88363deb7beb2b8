"""A ZeRO-3-sharded teacher is never whole on one process: measured, not assumed.

bench/teacher_memory.py runs the same 2-process training with a randomly initialised ~540 MB
teacher replicated and sharded; each process's peak resident memory (loading included) must be
lower when sharded by at least a quarter of the teacher's size (on 2 processes each holds half
of its shards, plus the layer being gathered).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "teacher_memory.py"


@pytest.mark.distributed
def test_each_process_holds_less_than_a_replicated_teacher_by_a_quarter_of_it():
    result = subprocess.run([sys.executable, str(BENCH), "--placements", "replicate", "zero3",
                             "--json"], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["teacher_mb"] > 500
    saved = figures["saved_fraction"]["zero3"]
    assert len(saved) == 2 and min(saved) >= 0.25, result.stdout
