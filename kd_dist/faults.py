"""Test-only fault injection: put a kill, a signal, a hang or a NaN at an exact point of a run;
and a trace of which examples each step trained on.

The reliability tests need faults at moments no outside process can hit reliably (inside a
checkpoint save, at one optimizer step, on one rank). They set ``KD_DIST_FAULT``; without it
every call here is a no-op. Format: comma-separated ``NAME@STEP`` or ``NAME@STEP:RANK`` (STEP is
the 1-based optimizer step, RANK the global rank; no rank means every rank). Names:

- ``kill_save_<point>``: SIGKILL this process at ``<point>`` of the checkpoint save of STEP
  (points in ``checkpoint.save_checkpoint``); ``kill_save_shard``: in the STEP-th teacher-cache
  shard this process writes, between its temporary file and its rename;
- ``signal_<SIG>`` / ``signal_parent_<SIG>``: send signal SIG (e.g. SIGTERM) to this process /
  to its launcher, after STEP;
- ``hang``: stop responding after STEP (Python's signal handlers off, as in a process stuck in
  native code);
- ``nan_teacher``: fill the teacher's output with NaN in STEP;
- ``mask_labels``: mask every label of this rank's first micro-batch of STEP;
- ``overflow``: multiply STEP's backward by 1e30, so fp16 gradients overflow (the loss stays
  finite).

``KD_DIST_TRACE=PATH`` makes every rank append, for each micro-batch, one JSON line to
``PATH.rank<RANK>``: the step, the epoch and the token ids of each example that enters the loss.
"""

from __future__ import annotations

import json
import os
import signal
import time

import torch

from kd_dist.losses import valid_mask

FAULT_ENV = "KD_DIST_FAULT"
TRACE_ENV = "KD_DIST_TRACE"


def wants(name: str, step: int) -> bool:
    """Whether the fault ``name`` (e.g. ``nan_teacher``, ``kill_save_state``) is due at ``step``
    on this process."""
    rank = os.environ.get("RANK", "0")
    for entry in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        fault, _, where = entry.strip().partition("@")
        fault_step, _, fault_rank = where.partition(":")
        if fault == name and int(fault_step) == step and fault_rank in ("", rank):
            return True
    return False


def kill_in_save(point: str, step: int) -> None:
    if wants(f"kill_save_{point}", step):
        os.kill(os.getpid(), signal.SIGKILL)


def after_step(step: int) -> None:
    """Signals and hangs, at the boundary after optimizer step ``step``."""
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"):
        if wants(f"signal_{name}", step):
            os.kill(os.getpid(), getattr(signal, name))
        if wants(f"signal_parent_{name}", step):
            os.kill(os.getppid(), getattr(signal, name))
    if wants("hang", step):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        while True:
            time.sleep(60)


def trace_examples(step: int, epoch: int, window: list[dict[str, torch.Tensor]], causal: bool):
    """Record which examples the micro-batches of optimizer step ``step`` train on (their
    unpadded input ids), when KD_DIST_TRACE asks for it."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    with open(f"{path}.rank{os.environ.get('RANK', '0')}", "a") as handle:
        for batch in window:
            trained = valid_mask(batch["labels"], causal).any(1)
            ids, mask = batch["input_ids"][trained], batch["attention_mask"][trained].bool()
            examples = [row[keep].tolist() for row, keep in zip(ids, mask, strict=True)]
            handle.write(json.dumps({"step": step, "epoch": epoch, "examples": examples}) + "\n")
