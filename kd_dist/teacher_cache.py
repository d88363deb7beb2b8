"""A stored teacher: its top-k distribution at every trained position, computed once.

``kd-dist cache-teacher`` writes one (``cache_teacher.py``); ``kd-dist train --teacher_cache``
reads it instead of running a teacher. A cache folder holds:

    manifest.json                  what the cache holds and what made it: the teacher, its dtype,
                                   --top_k, --temperature, the tokenizer's and each split's
                                   fingerprints, the data flags, the library versions;
                                   ``complete`` once every shard is written
    tokenizer/                     the run's tokenizer (a student must share it)
    train-00000-of-00012.arrow     Arrow stream files, the format ``datasets`` writes and
    eval-00000-of-00001.arrow      memory-maps: ``datasets.Dataset.from_file`` reads one, and
                                   ``load_dataset("arrow", data_files=...)`` a glob of them

Shard i of a split holds examples [i * cache_shard_size, (i + 1) * cache_shard_size) of the
tokenized split, one row per example, in order. A row's columns, for its n trained positions (in
``valid_mask`` order) and k = --top_k:

    top_ids        n * k int32     the teacher's k most likely tokens at each position
    top_logprobs   n * k float16   their log-probabilities at the cache's temperature
    tail_logprob   n     float32   the log of the mass of all other tokens

so a trained token costs 6k + 4 bytes (388 at k = 64). A shard is written to a temporary name
and renamed when complete: a killed job leaves no half-written shard under a shard's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

from kd_dist import faults
from kd_dist.config import ConfigError, TrainConfig
from kd_dist.data import DataSplits, content_fingerprint
from kd_dist.losses import TopKTeacher, valid_mask

logger = logging.getLogger("kd_dist")

MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
CACHE_FORMAT = "kd_dist teacher cache"
CACHE_VERSION = 1
SPLITS = ("train", "eval")
FEATURES = datasets.Features(
    {
        "top_ids": datasets.Sequence(datasets.Value("int32")),
        "top_logprobs": datasets.Sequence(datasets.Value("float16")),
        "tail_logprob": datasets.Sequence(datasets.Value("float32")),
    }
)
# The batch keys the collator adds: per position [B, L, k], [B, L, k] and [B, L].
BATCH_KEYS = ("teacher_top_ids", "teacher_top_logprobs", "teacher_tail_logprob")
# The flags that decide the tokenized examples (named when a run's data differs from a cache's).
DATA_FLAGS = (
    "task_type", "dataset", "dataset_config", "dataset_split", "eval_split", "eval_ratio",
    "dataset_format", "text_column", "messages_column", "prompt_column", "response_column",
    "max_length", "max_target_length", "train_on_prompt", "packing", "max_train_samples",
    "max_eval_samples", "seed",
)  # fmt: skip
BYTES_PER_STORED_ID, BYTES_PER_STORED_LOGPROB, BYTES_PER_STORED_TAIL = 4, 2, 4


def bytes_per_token(k: int) -> int:
    """What the cache stores per trained token at --top_k k (before Arrow's offsets)."""
    return k * (BYTES_PER_STORED_ID + BYTES_PER_STORED_LOGPROB) + BYTES_PER_STORED_TAIL


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what token ids mean (the vocabulary) and of the settings that shape tokenized
    examples beyond it: the special tokens and the chat template."""
    described = [sorted(tokenizer.get_vocab().items()), tokenizer.special_tokens_map,
                 tokenizer.chat_template]  # fmt: skip
    return hashlib.blake2b(json.dumps(described).encode(), digest_size=16).hexdigest()


def cache_identity(manifest: dict[str, Any]) -> str:
    """What a training run distils from, for the resume check: the manifest without what may
    change with the files staying the same (library versions, the data flags' paths)."""
    kept = {k: v for k, v in manifest.items() if k not in ("versions", "data", "complete")}
    return hashlib.blake2b(json.dumps(kept, sort_keys=True).encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Shard:
    split: str
    index: int
    count: int  # the split's shards
    examples: range  # positions in the tokenized split

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}.arrow"


def split_shards(split: str, examples: int, shard_size: int) -> list[Shard]:
    """The shards of a split of ``examples`` examples (the last one may be shorter)."""
    starts = range(0, examples, shard_size)
    return [
        Shard(split, index, len(starts), range(start, min(start + shard_size, examples)))
        for index, start in enumerate(starts)
    ]


def cache_manifest(
    cfg: TrainConfig,
    tokenizer: Any,
    teacher_dtype: torch.dtype,
    fingerprints: dict[str, str],
    sizes: dict[str, int],
) -> dict[str, Any]:
    """The manifest of a cache made with ``cfg`` (``complete`` False until every shard is in)."""
    packages = ("kd_dist", "torch", "transformers", "datasets")
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "teacher_model": cfg.teacher_model,
        "teacher_dtype": str(teacher_dtype).removeprefix("torch."),
        "top_k": cfg.top_k,
        "temperature": cfg.temperature,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "size": len(tokenizer)},
        "data": {name: getattr(cfg, name) for name in DATA_FLAGS},
        "splits": {
            split: {
                "examples": sizes[split],
                "fingerprint": fingerprints[split],
                "shard_size": cfg.cache_shard_size,
                "shards": len(split_shards(split, sizes[split], cfg.cache_shard_size)),
            }
            for split in fingerprints
        },
        "versions": {name: version(name) for name in packages},
        "complete": False,
    }


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path} is not valid JSON ({error}): make the cache again (`kd-dist cache-teacher "
            "--overwrite_output_dir`)."
        ) from None
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        raise ConfigError(
            f"{path} is not a kd_dist teacher cache of version {CACHE_VERSION}: make the cache "
            "again with this kd_dist's `kd-dist cache-teacher`."
        )
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Written aside and renamed: a reader never sees half a manifest."""
    temporary = folder / (MANIFEST_FILE + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, folder / MANIFEST_FILE)


def shard_names(manifest: dict[str, Any], splits: Sequence[str] | None = None) -> list[str]:
    """The shard files of the manifest's splits (or of ``splits``), in order."""
    return [
        shard.name
        for split, info in manifest["splits"].items()
        if splits is None or split in splits
        for shard in split_shards(split, info["examples"], info["shard_size"])
    ]


def missing_shards(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """The shard files of the manifest's splits that are not (yet) in ``folder``."""
    return [name for name in shard_names(manifest) if not (folder / name).is_file()]


def example_rows(teacher: TopKTeacher, counts: Sequence[int]) -> dict[str, list[np.ndarray]]:
    """A batch's valid rows ([N, k], [N, k], [N], in ``valid_rows`` order) cut into its
    examples' rows (``counts``: each example's trained positions), in the stored dtypes."""
    columns = {
        "top_ids": teacher.ids.to(torch.int32),
        "top_logprobs": teacher.logprobs.to(torch.float16),
        "tail_logprob": teacher.tail_logprob.to(torch.float32),
    }
    return {
        name: [part.reshape(-1).numpy() for part in values.cpu().split(list(counts))]
        for name, values in columns.items()
    }


def write_shard(path: Path, rows: dict[str, list[np.ndarray]], sequence: int = 0) -> None:
    """One shard, atomically: under a temporary name, flushed to disk, then renamed.
    ``sequence``: how many shards this process has written before, plus one (for the
    ``kill_save_shard`` fault)."""
    table = datasets.Dataset.from_dict(rows, features=FEATURES).data.table
    temporary = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
        out.write_table(table)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    faults.kill_in_save("shard", sequence)
    os.replace(temporary, path)


def load_split(folder: Path, split: str, manifest: dict[str, Any]) -> datasets.Dataset:
    """A cached split as one memory-mapped dataset (no copy), its rows the split's examples."""
    names = shard_names(manifest, [split])
    files = [datasets.Dataset.from_file(str(folder / name)) for name in names]
    return datasets.concatenate_datasets(files).with_format("numpy")


@dataclass
class TeacherCache:
    """A complete cache, checked against a run: its splits line up with the run's examples."""

    folder: Path
    manifest: dict[str, Any]
    train: datasets.Dataset
    eval: datasets.Dataset | None  # None when the cache holds no eval split

    @property
    def temperature(self) -> float:
        return self.manifest["temperature"]

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]


def cache_lengths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the lengths it leaves unset taken from --teacher_cache's (its examples were
    cut at those lengths; the models' own default could differ)."""
    manifest = opened_manifest(cfg)
    recorded = {name: manifest["data"][name] for name in ("max_length", "max_target_length")}
    unset = {name: value for name, value in recorded.items() if getattr(cfg, name) is None}
    if unset:
        logger.info("Lengths from the teacher cache: %s",
                    ", ".join(f"--{k} {v}" for k, v in unset.items()))  # fmt: skip
    return replace(cfg, **unset)


def opened_manifest(cfg: TrainConfig) -> dict[str, Any]:
    """--teacher_cache's manifest, refused when the folder holds no complete cache, or one made
    for another task or temperature (checked before the data is read)."""
    folder = Path(cfg.teacher_cache)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ConfigError(
            f"--teacher_cache {folder}: no {MANIFEST_FILE} there. Make the cache with "
            f"`kd-dist cache-teacher --output_dir {folder}` (same data flags) first."
        )
    missing = missing_shards(folder, manifest)
    if not manifest["complete"] or missing:
        raise ConfigError(
            f"--teacher_cache {folder} is incomplete ({len(missing)} shard(s) missing, e.g. "
            f"{', '.join(missing[:3]) or 'none'}): run the same `kd-dist cache-teacher` command "
            "again, it continues from the last complete shard."
        )
    problems = []
    if manifest["data"]["task_type"] != cfg.task_type:
        problems.append(
            f"the cache is of a {manifest['data']['task_type']} teacher, the run is "
            f"--task_type {cfg.task_type}"
        )
    if manifest["temperature"] != cfg.temperature:
        # The tail's mass at another temperature depends on the tail's shape, which the cache
        # does not keep: no loss at another temperature would be the teacher's.
        problems.append(
            f"the cache holds the teacher at --temperature {manifest['temperature']}, the run "
            f"asks for {cfg.temperature}: pass --temperature {manifest['temperature']}, or make "
            f"a cache at {cfg.temperature}"
        )
    refuse(folder, problems)
    return manifest


def refuse(folder: Path, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"--teacher_cache {folder} does not fit this run:\n  - "
                          + "\n  - ".join(problems))  # fmt: skip


def open_cache(
    cfg: TrainConfig, tokenizer: Any, data: DataSplits, train_fingerprint: str
) -> TeacherCache:
    """--teacher_cache, checked against this run before any model loads: the same task,
    temperature, tokenizer and tokenized examples (each split's content fingerprint;
    ``train_fingerprint``: the train split's, computed already)."""
    folder = Path(cfg.teacher_cache)
    manifest = opened_manifest(cfg)
    problems = []
    if manifest["tokenizer"]["fingerprint"] != tokenizer_fingerprint(tokenizer):
        problems.append(
            f"the student's tokenizer ({len(tokenizer)} tokens) is not the cache's "
            f"({manifest['tokenizer']['size']} tokens, saved in {folder / TOKENIZER_DIR}): "
            "the student must share the teacher's tokenizer, its special tokens and chat "
            "template (make the cache with the student named: `kd-dist cache-teacher "
            "--student_model ...` tokenizes with the student's tokenizer, as training does)"
        )
    eval_fingerprint = None if data.eval is None else content_fingerprint(data.eval)
    fingerprints = {"train": train_fingerprint, "eval": eval_fingerprint}
    for split, info in manifest["splits"].items():
        if fingerprints[split] is not None and fingerprints[split] != info["fingerprint"]:
            flags = [
                f"--{name} {value!r} (cache) vs {getattr(cfg, name)!r} (this run)"
                for name, value in manifest["data"].items()
                if getattr(cfg, name) != value
            ]
            why = "; ".join(flags) if flags else "the same data flags: the data changed"
            problems.append(
                f"its {split} examples are not this run's tokenized {split} examples ({why}): "
                "train with the data flags the cache was made with, or make the cache again"
            )
    refuse(folder, problems)
    train = load_split(folder, "train", manifest)
    cached_eval = data.eval is not None and "eval" in manifest["splits"]
    return TeacherCache(folder, manifest, train, load_split(folder, "eval", manifest)
                        if cached_eval else None)  # fmt: skip


class ExamplesWithTeacher(torch.utils.data.Dataset):
    """A split's tokenized examples, each with its cached teacher rows (the two align by
    position, which ``open_cache`` checked): a view, no copy of either."""

    def __init__(self, examples: datasets.Dataset, cached: datasets.Dataset) -> None:
        if len(examples) != len(cached):
            raise ConfigError(
                f"the teacher cache holds {len(cached)} examples, the run {len(examples)}"
            )
        self.examples, self.cached = examples, cached

    def __len__(self) -> int:
        return len(self.examples)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        rows, cached = self.examples[indices], self.cached[indices]
        return [
            {**{k: v[i] for k, v in rows.items()}, **{k: v[i] for k, v in cached.items()}}
            for i in range(len(indices))
        ]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]


def with_teacher_rows(collate: Callable, causal: bool, k: int) -> Callable:
    """A collate function that also lays each example's cached rows out per position:
    teacher_top_ids [B, L, k] int32, teacher_top_logprobs [B, L, k] float16 and
    teacher_tail_logprob [B, L] float32, at the output positions ``valid_mask`` marks (so
    ``valid_rows`` selects them like a live teacher's outputs; other positions hold zeros)."""

    def collate_with_teacher(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cached = [{name: example.pop(name) for name in FEATURES} for example in examples]
        batch = collate(examples)
        mask = valid_mask(batch["labels"], causal)  # [B, L']
        counts = mask.sum(1).tolist()
        shape = (*batch["labels"].shape, k)
        ids = torch.zeros(shape, dtype=torch.int32)
        logprobs = torch.zeros(shape, dtype=torch.float16)
        tails = torch.zeros(shape[:2], dtype=torch.float32)
        for row, (stored, count) in enumerate(zip(cached, counts, strict=True)):
            if len(stored["tail_logprob"]) != count:
                raise ValueError(
                    f"a cached example holds {len(stored['tail_logprob'])} teacher rows for "
                    f"{count} trained positions: the cache does not match the data"
                )
            positions = mask[row].nonzero()[:, 0]
            # The numpy format hands int32 and fp16 columns over as (read-only) int64 and fp32
            # arrays: copied into the stored dtypes.
            stored_ids = np.array(stored["top_ids"], dtype=np.int32)
            stored_logprobs = np.array(stored["top_logprobs"], dtype=np.float16)
            ids[row, positions] = torch.from_numpy(stored_ids).view(count, k)
            logprobs[row, positions] = torch.from_numpy(stored_logprobs).view(count, k)
            tails[row, positions] = torch.from_numpy(np.array(stored["tail_logprob"]))
        return {**batch, **dict(zip(BATCH_KEYS, (ids, logprobs, tails), strict=True))}

    return collate_with_teacher


def batch_teacher(batch: dict[str, torch.Tensor]) -> TopKTeacher:
    """The cached teacher of a collated batch, per position ([B, L, k], [B, L, k], [B, L])."""
    return TopKTeacher(*(batch[key] for key in BATCH_KEYS))
