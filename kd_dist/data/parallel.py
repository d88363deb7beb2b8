"""Tokenization at scale: how many worker processes map a split, and which ranks tokenize first.

Worker processes (``--num_proc``): by default one per CPU this process may use, capped at
``MAX_DEFAULT_NUM_PROC``, and none for a small split, where starting workers costs more than it
saves. ``datasets`` shards a split contiguously and concatenates the shards in order, so the
tokenized examples, their order and ``content_fingerprint`` are the same for any number.

Ranks (``--tokenize_on``): one process tokenizes into the ``datasets`` cache while the others
wait, then they read its cache. On one node, or on several nodes whose cache folder is one shared
filesystem, that is the global main process (``main``). When each node has its own (node-local)
cache folder, the other nodes would not find that cache and would tokenize too, each rank for
itself; there, each node's local main process tokenizes (``local_main``), once per node. ``auto``
finds out which: the main process writes a marker file with a fresh random name into the cache
folder, and the cache is shared when every process sees it.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kd_dist.config import TrainConfig
from kd_dist.data.sources import cache_dir

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("kd_dist")

MAX_DEFAULT_NUM_PROC = 16
# Splits with fewer rows are tokenized in this process by default. Starting workers costs about
# a second (fork, unpickling the tokenizer in each, one cache file per worker, concatenation),
# about the time one process takes for a few thousand chat rows; measured with
# bench/tokenize_bench.py, which prints both at several sizes.
PARALLEL_MIN_ROWS = 5_000


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a SLURM or cgroup share, not the host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_num_proc(requested: int | None, rows: int, cpus: int) -> tuple[int, str]:
    """(worker processes for a split of ``rows`` rows, why): ``--num_proc`` when given."""
    if requested is not None:
        return requested, "--num_proc"
    if rows < PARALLEL_MIN_ROWS:
        return 1, f"fewer than {PARALLEL_MIN_ROWS:,} rows: workers would cost more than they save"
    workers = max(1, min(cpus, MAX_DEFAULT_NUM_PROC))
    return workers, f"the {cpus} CPUs this process may use, at most {MAX_DEFAULT_NUM_PROC}"


def tokenizing_rank(choice: str, cache_shared: bool | None) -> str:
    """Which process tokenizes first: "main" (once overall) or "local_main" (once per node).

    ``choice`` is --tokenize_on; ``cache_shared`` (for "auto") whether every process sees the
    main process's cache folder."""
    if choice != "auto":
        return choice
    return "main" if cache_shared else "local_main"


def cache_is_shared(accelerator: Accelerator, directory: Path) -> bool:
    """Whether every process sees a file the main process writes in ``directory``.

    A collective: every rank calls it and all get the same answer. The name is fresh, so no
    earlier run's file (or a filesystem's cached "no such file") can answer for it. A process
    that can't see it (or a main process that can't write it) makes the answer "not shared": at
    worst each node then tokenizes for itself, which is slower but correct."""
    from accelerate.utils import broadcast_object_list

    name = [f".kd_dist_shared_{secrets.token_hex(8)}" if accelerator.is_main_process else None]
    broadcast_object_list(name, from_process=0)
    marker = directory / name[0]
    if accelerator.is_main_process:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            marker.write_text("written by kd_dist to check who shares this folder\n")
        except OSError as error:
            logger.warning("Could not write %s (%s): treating the cache as node-local.", marker,
                           error)  # fmt: skip
    accelerator.wait_for_everyone()  # written before anyone looks
    seen = torch.tensor([int(marker.is_file())], device=accelerator.device)
    everyone_saw = bool(accelerator.gather(seen).all())  # also a barrier: all have looked
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    return everyone_saw


def tokenize_first(
    cfg: TrainConfig, accelerator: Accelerator
) -> Callable[[], AbstractContextManager[Any]]:
    """The ``main_process_first`` of ``build_datasets`` for this launch (see the module notes)."""
    if accelerator.num_processes == 1:
        return accelerator.main_process_first
    directory = cache_dir(cfg)
    shared = cache_is_shared(accelerator, directory) if cfg.tokenize_on == "auto" else None
    rank = tokenizing_rank(cfg.tokenize_on, shared)
    how = f"--tokenize_on {cfg.tokenize_on}"
    if shared is not None:
        how += ": every process sees" if shared else ": not every process sees"
        how += " a file the main process writes there"
    if rank == "main":
        logger.info("Tokenizing once, on the main process, into %s; the other processes read "
                    "its cache (%s).", directory, how)  # fmt: skip
        return accelerator.main_process_first
    logger.info("Tokenizing once per node, on each node's local main process, into its own %s "
                "(%s).", directory, how)  # fmt: skip
    return accelerator.local_main_process_first
