"""``kd-dist`` followed by a record of the threads still running in the process when it is done,
just before the interpreter exits: what would be left for the interpreter's finalization.

Run it like ``python -m kd_dist`` (under ``accelerate launch`` or ``torchrun`` for several
ranks), with EXIT_THREADS=PATH: every rank writes PATH.rank<RANK>, JSON: the exit code ``main``
returned and the names of the native threads (``/proc/self/task/*/comm``: gloo names its own
``gloo_tcp_loop`` and ``pt_gloo_runloop``). (A test helper, not a test module: see
test_shutdown.py.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kd_dist.cli import main


def native_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir())


if __name__ == "__main__":
    code = main(sys.argv[1:])
    record = Path(f"{os.environ['EXIT_THREADS']}.rank{os.environ.get('RANK', '0')}")
    record.write_text(json.dumps({"exit_code": code, "threads": native_threads()}))
    sys.exit(code)
