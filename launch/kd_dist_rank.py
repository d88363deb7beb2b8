"""What every training process runs under the SLURM scripts: ``python -m kd_dist``, plus a note
of its exit status.

kd_dist exits with 75 when it was asked to stop (SIGTERM/SIGUSR1) and saved a complete
checkpoint: "run me again". ``accelerate launch`` and ``torchrun`` report any failing process as
exit status 1, so that 75 would never reach the batch script. launch/node_task.sh sets
``KD_DIST_EXIT_DIR``; each process writes its exit status into a file there, and node_task.sh
turns the launcher's 1 back into 75. Without ``KD_DIST_EXIT_DIR`` this is exactly
``python -m kd_dist``: same process, same arguments, same signal handling, same exit status.

    accelerate launch ... launch/kd_dist_rank.py train --teacher_model ... --output_dir ...
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from pathlib import Path

EXIT_DIR_ENV = "KD_DIST_EXIT_DIR"


def exit_status(code: object) -> int:
    """The process exit status that ``SystemExit(code)`` produces."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1  # sys.exit("message") prints the message and exits with 1


def record(status: int) -> None:
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    name = f"rank-{os.environ.get('RANK', '0')}.{os.getpid()}"
    try:
        Path(folder, name).write_text(f"{status}\n")
    except OSError as error:  # never let the bookkeeping change the run's own outcome
        print(f"kd_dist_rank: could not record exit status {status}: {error}", file=sys.stderr)


def main() -> None:
    if importlib.util.find_spec("kd_dist") is None:  # not installed: the repository's copy
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        runpy.run_module("kd_dist", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        record(exit_status(stop.code))
        raise
    record(0)  # an uncaught exception records nothing: the launcher's own failure stands


if __name__ == "__main__":
    main()
