"""``kd-dist tokenize``: build the tokenized dataset cache in a CPU job, before the GPU job.

It takes the train flags and goes through the same steps as ``kd-dist train`` up to the data
(lengths resolved from the model configs, the tokenizers loaded and checked; no weights), so the
``datasets`` map cache it writes is the one a later ``kd-dist train`` with the same flags finds
and reads instead of tokenizing again: ``datasets`` names each cache file by a fingerprint of the
raw data and of the map function with its arguments (the tokenizer included), the same in any
process for the same flags, and reuses files written with any --num_proc.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.compute

from kd_dist.config import TrainConfig
from kd_dist.data import DataSplits, build_datasets
from kd_dist.data.sources import cache_dir
from kd_dist.models import check_models, load_tokenizer, resolve_lengths


@dataclass
class TokenizeResult:
    data: DataSplits
    seconds: float
    cache_files_written: int  # 0: everything came from an earlier run's cache
    cache_dir: Path


def input_tokens(split: datasets.Dataset | None) -> int:
    if split is None:
        return 0
    # The arrow format applies the split's indices (the filtered-out examples are not counted).
    lengths = pyarrow.compute.list_value_length(split.with_format("arrow")["input_ids"])
    return int(pyarrow.compute.sum(lengths).as_py() or 0)


def cache_files(directory: Path) -> set[Path]:
    """The map/filter results ``datasets`` has cached under ``directory``."""
    return set(directory.rglob("cache-*.arrow"))


def pretokenize(cfg: TrainConfig) -> TokenizeResult:
    cfg.validate()
    cfg = resolve_lengths(cfg)
    tokenizer = load_tokenizer(cfg)
    check_models(cfg, tokenizer)
    directory = cache_dir(cfg)
    before = cache_files(directory)
    started = time.perf_counter()
    data = build_datasets(cfg, tokenizer)
    seconds = time.perf_counter() - started
    return TokenizeResult(data, seconds, len(cache_files(directory) - before), directory)


def describe(result: TokenizeResult, cfg: TrainConfig) -> str:
    """What ``kd-dist tokenize`` built, for the terminal."""
    data, stats = result.data, result.data.stats
    rows = stats["train_rows"] + stats["eval_rows"]
    files = data.train.cache_files
    where = Path(files[0]["filename"]).parent if files else result.cache_dir
    if result.cache_files_written:
        cache = (f"{result.cache_files_written} file(s) written in {where}; `kd-dist train` with "
                 "the same flags reads them")  # fmt: skip
    else:
        cache = f"already built in {where}: nothing was tokenized again"
    lines = [
        f"Tokenized {cfg.dataset} for {cfg.task_type} training ({data.format}, {data.layout}):",
        f"  train  {stats['train_examples']:,} examples, {input_tokens(data.train):,} tokens "
        f"(from {stats['train_rows']:,} rows)",
        f"  eval   {stats['eval_examples']:,} examples, {input_tokens(data.eval):,} tokens "
        f"(from {stats['eval_rows']:,} rows)"
        if data.eval is not None
        else "  eval   none",
        f"  time   {result.seconds:.1f} s, {rows / max(result.seconds, 1e-9):,.0f} rows/s",
        f"  cache  {cache}",
    ]
    return "\n".join(lines)
