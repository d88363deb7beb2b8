"""``kd-dist cache-teacher``: run the teacher once over the data and store its top-k distributions.

It takes the train flags and tokenizes exactly as ``kd-dist train`` with the same flags would
(format, masks, truncation, packing, the eval split), runs the frozen teacher over every split in
inference mode, and writes what ``teacher_cache`` describes. Under ``accelerate launch`` each
process takes its share of the shards (shard r, r + W, r + 2W ... of the pending ones), with the
teacher replicated or sharded by ZeRO-3 (--teacher_placement), in --teacher_dtype. A killed job
continues from its last complete shard when run again with the same command.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from deepspeed.runtime.zero import GatheredParameters
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_dist.checkpoint import check_writable_folder
from kd_dist.config import ConfigError, TrainConfig
from kd_dist.data import build_datasets, content_fingerprint, example_lengths, make_collator
from kd_dist.data.parallel import tokenize_first
from kd_dist.engine import (
    accelerator_session,
    agree_on_minimum,
    choose_teacher_placement,
    partitioned_loading,
    place_teacher,
)
from kd_dist.losses import TopKTeacher, logit_chunks, top_k_teacher, valid_mask, valid_rows
from kd_dist.models import (
    check_models,
    forward_outputs,
    load_teacher,
    load_tokenizer,
    output_head,
    resolve_lengths,
    teacher_bytes,
    teacher_dtype,
)
from kd_dist.teacher_cache import (
    MANIFEST_FILE,
    TOKENIZER_DIR,
    Shard,
    bytes_per_token,
    cache_manifest,
    example_rows,
    missing_shards,
    read_manifest,
    shard_names,
    split_shards,
    write_manifest,
    write_shard,
)

logger = logging.getLogger("kd_dist")

# Manifest entries that may differ between the job that started a cache and the one resuming it
# (the data flags are compared through the examples they make: the splits' fingerprints).
RESUMABLE_DIFFERENCES = ("versions", "complete", "data")
# Below this mean share of the teacher's mass in its top-k, the summary suggests keeping more.
LOW_TOP_K_MASS = 0.8


@dataclass
class CacheResult:
    folder: Path
    manifest: dict[str, Any]
    tokens: int  # trained positions cached over all splits
    bytes: int  # the shard files' size on disk
    top_k_mass: float  # the mean share of the teacher's distribution its top-k hold


def cache_teacher(cfg: TrainConfig) -> CacheResult:
    """Write the teacher cache of ``cfg``'s data to ``cfg.output_dir`` (or finish one)."""
    cfg.validate("cache-teacher")
    # --alpha weighs the training's losses: whatever a shared run file says, the cache runs the
    # teacher (an --alpha of 1 would make the launch and the placement plan for none).
    cfg = replace(resolve_lengths(cfg), alpha=0.0)
    folder = Path(cfg.output_dir)
    check_writable_folder(folder)  # before the data is read
    with accelerator_session(cfg) as accelerator:
        manifest = fill_cache(cfg, accelerator, folder)
    shard_files = [folder / shard for shard in shard_names(manifest)]
    tails = np.concatenate([stored_tails(path) for path in shard_files])
    return CacheResult(
        folder, manifest, len(tails), sum(path.stat().st_size for path in shard_files),
        top_k_mass=float((1.0 - np.exp(tails)).mean()) if len(tails) else 1.0,
    )  # fmt: skip


def fill_cache(cfg: TrainConfig, accelerator: Accelerator, folder: Path) -> dict[str, Any]:
    """Check the data and the folder, run the teacher over the shards not yet written, and mark
    the cache complete; returns its manifest. (A function of its own: its teacher is freed when
    it returns, before the session ends.)"""
    tokenizer = load_tokenizer(cfg)
    if cfg.top_k > len(tokenizer):
        raise ConfigError(
            f"--top_k {cfg.top_k} is more than the tokenizer's {len(tokenizer)} tokens: pass "
            f"--top_k {len(tokenizer)} or less (all of them: the full distribution)."
        )
    check_models(cfg, tokenizer)
    data = build_datasets(cfg, tokenizer, main_process_first=tokenize_first(cfg, accelerator))
    splits = {"train": data.train, "eval": data.eval}
    splits = {name: examples for name, examples in splits.items() if examples is not None}
    manifest = cache_manifest(
        cfg,
        tokenizer,
        teacher_dtype(cfg),
        {name: content_fingerprint(examples) for name, examples in splits.items()},
        {name: len(examples) for name, examples in splits.items()},
    )
    check_cache_folder(folder, manifest, cfg.overwrite_output_dir)
    accelerator.wait_for_everyone()  # every rank checked the folder before it changes
    if accelerator.is_main_process:
        start_cache(folder, manifest, tokenizer, cfg.overwrite_output_dir)
    accelerator.wait_for_everyone()
    # Planned once, before any rank writes: the ranks agree on who writes which shard.
    pending = {
        name: [shard for shard in split_shards(name, len(examples), cfg.cache_shard_size)
               if not (folder / shard.name).is_file()]
        for name, examples in splits.items()
    }  # fmt: skip
    if any(pending.values()):
        placement = choose_teacher_placement(cfg, accelerator, lambda: teacher_bytes(cfg))
        teacher = load_teacher(
            cfg, tokenizer, lambda role: partitioned_loading(accelerator, role, placement)
        )
        teacher = place_teacher(accelerator, teacher, placement)
        run = TeacherRun(cfg, accelerator, teacher, len(tokenizer), placement)
        for name, examples in splits.items():
            run.cache_split(examples, pending[name], folder, make_collator(tokenizer))
        accelerator.wait_for_everyone()  # every rank's shards are written
    else:
        logger.info("%s already holds the complete cache: nothing to run.", folder)
    missing = missing_shards(folder, manifest)
    if missing:  # a rank died without raising, or the folder is not shared by the ranks
        raise RuntimeError(f"shards missing after caching: {', '.join(missing[:5])}")
    if accelerator.is_main_process and not manifest["complete"]:
        manifest["complete"] = True
        write_manifest(folder, manifest)
    accelerator.wait_for_everyone()
    return manifest


def stored_tails(shard: Path) -> np.ndarray:
    """The log tail masses a shard holds, one per trained position: [positions] float32."""
    tails = datasets.Dataset.from_file(str(shard)).data.column("tail_logprob").combine_chunks()
    return tails.flatten().to_numpy()


def check_cache_folder(folder: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Read-only (every rank): the folder is empty, or holds the start of this very cache (which
    the job continues), or --overwrite_output_dir says to replace its files. A cache of the
    same examples continues from another --dataset path (a copy of the data on node-local
    disk): the data flags only explain a difference of the examples."""
    if overwrite or not folder.is_dir() or not any(folder.iterdir()):
        return
    existing = read_manifest(folder)
    if existing is None:
        raise ConfigError(
            f"--output_dir {folder} is not empty and holds no teacher cache: pass an empty or new "
            "folder, or --overwrite_output_dir to replace its files."
        )
    differences = [
        f"{key}: {existing.get(key)!r} -> {value!r}"
        for key, value in manifest.items()
        if key not in RESUMABLE_DIFFERENCES and existing.get(key) != value
    ]
    if existing["splits"] != manifest["splits"]:
        differences += [f"--{name} {existing['data'].get(name)!r} -> {value!r}"
                        for name, value in manifest["data"].items()
                        if existing["data"].get(name) != value]  # fmt: skip
    if differences:
        raise ConfigError(
            f"--output_dir {folder} holds a teacher cache made with other settings "
            f"({'; '.join(differences)}): pass another --output_dir, the same flags to finish "
            "that cache, or --overwrite_output_dir to replace it."
        )


def start_cache(
    folder: Path, manifest: dict[str, Any], tokenizer: PreTrainedTokenizerBase, overwrite: bool
) -> None:
    """The folder with this cache's manifest and tokenizer (main process); an overwritten
    folder loses its earlier shards and manifest first."""
    existing = None
    if overwrite and folder.is_dir():
        for path in [*folder.glob("*.arrow"), *folder.glob("*.arrow.tmp")]:
            path.unlink()
        shutil.rmtree(folder / TOKENIZER_DIR, ignore_errors=True)
        (folder / MANIFEST_FILE).unlink(missing_ok=True)
    elif folder.is_dir():
        existing = read_manifest(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    if existing is not None:
        manifest["complete"] = existing["complete"]
        logger.info("Continuing the teacher cache in %s: %d shard(s) to go.", folder,
                    len(missing_shards(folder, manifest)))  # fmt: skip
    write_manifest(folder, manifest)


class TeacherRun:
    """The teacher over a split's pending shards, a shard per rank per round.

    A ZeRO-3 teacher gathers each layer's shards from every rank in its forward, so under ZeRO-3
    every rank runs the same number of forwards in each round: a rank with fewer batches (a
    shorter last shard, or none left) runs its first batch again and discards it."""

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator: Accelerator,
        teacher: PreTrainedModel,
        vocab_size: int,
        placement: str,
    ) -> None:
        self.cfg, self.accelerator, self.teacher = cfg, accelerator, teacher
        self.vocab_size, self.lockstep = vocab_size, placement.startswith("zero3")
        self.causal = cfg.task_type == "causal"
        (chunk_rows,) = agree_on_minimum(
            accelerator, [cfg.chunk_rows(vocab_size, accelerator.device, torch.float32)]
        )
        self.chunk_rows = int(chunk_rows)
        self.fused = cfg.fused_loss and output_head(teacher) is not None
        self.written = 0  # shards this process has written

    def cache_split(
        self, examples: datasets.Dataset, pending: list[Shard], folder: Path, collate: Callable
    ) -> None:
        """Write a split's ``pending`` shards: the same list on every rank (planned before any
        rank writes), so that each shard has exactly one writer."""
        ranks, rank = self.accelerator.num_processes, self.accelerator.process_index
        lengths = np.asarray(example_lengths(examples)) if pending else np.zeros(0)
        batches_of = {shard.index: self.batch_order(shard, lengths) for shard in pending}
        total = sum(int(lengths[shard.examples.start : shard.examples.stop].sum())
                    for shard in pending)  # fmt: skip
        progress = tqdm(
            total=total, unit="tok", unit_scale=True, disable=not self.accelerator.is_main_process,
            desc=f"teacher over {pending[0].split if pending else ''} (input tokens, all "
            "processes, estimated from this one's)",
        )  # fmt: skip
        for start in range(0, len(pending), ranks):
            round_shards = pending[start : start + ranks]
            mine = round_shards[rank] if rank < len(round_shards) else None
            own = batches_of[mine.index] if mine is not None else []
            forwards = len(own)
            if self.lockstep:
                forwards = max(len(batches_of[shard.index]) for shard in round_shards)
            rows: dict[int, dict[str, np.ndarray]] = {}
            for step in range(forwards):
                batch = own[step] if step < len(own) else (own or batches_of[pending[0].index])[0]
                cached = self.teacher_rows(collate(examples.__getitems__(batch.tolist())))
                if step >= len(own):
                    continue  # a lockstep forward: its rows are another rank's
                for example, values in zip(batch, cached, strict=True):
                    rows[int(example)] = values
                progress.update(int(lengths[batch].sum()) * ranks)
            if mine is not None:
                ordered = [rows[example] for example in mine.examples]
                columns = {name: [row[name] for row in ordered] for name in ordered[0]}
                self.written += 1
                write_shard(folder / mine.name, columns, sequence=self.written)
        progress.close()

    def batch_order(self, shard: Shard, lengths: np.ndarray) -> list[np.ndarray]:
        """The shard's examples in batches of --batch_size, longest first: similar lengths
        share a batch (less padding), and the largest batch runs first (memory shows at once)."""
        order = shard.examples.start + np.argsort(
            -lengths[shard.examples.start : shard.examples.stop], kind="stable"
        )
        size = self.cfg.batch_size
        return [order[start : start + size] for start in range(0, len(order), size)]

    @torch.no_grad()
    def teacher_rows(self, batch: dict[str, torch.Tensor]) -> list[dict[str, np.ndarray]]:
        """The teacher's top-k rows of each example of a collated batch, in the stored dtypes."""
        batch = {key: value.to(self.accelerator.device) for key, value in batch.items()}
        with self.accelerator.autocast():
            outputs = forward_outputs(
                self.teacher, self.teacher, batch, self.cfg.task_type, self.fused
            ).outputs
        rows, _, _ = valid_rows(outputs, None, batch["labels"], self.causal)
        counts = valid_mask(batch["labels"], self.causal).sum(1).tolist()
        layer = self.teacher.get_output_embeddings()
        weights = list(layer.parameters()) if self.fused else []
        with GatheredParameters(weights):  # a ZeRO-3 teacher's output layer, for the chunks
            head = output_head(self.teacher) if self.fused else None
            chunks = logit_chunks(rows, None, vocab_size=self.vocab_size,
                                  chunk_rows=self.chunk_rows, student_head=head)  # fmt: skip
            parts = [top_k_teacher(logits, self.cfg.top_k, self.cfg.temperature)
                     for _, logits, _ in chunks]  # fmt: skip
        stored = example_rows(concatenated(parts, self.cfg.top_k), counts)
        return [{name: stored[name][i] for name in stored} for i in range(len(counts))]


def concatenated(parts: list[TopKTeacher], k: int) -> TopKTeacher:
    """Chunks' rows as one TopKTeacher ([N, k], [N, k], [N]; N = 0 without chunks)."""
    if not parts:
        return TopKTeacher(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))
    return TopKTeacher(
        torch.cat([part.ids for part in parts]),
        torch.cat([part.logprobs for part in parts]),
        torch.cat([part.tail_logprob for part in parts]),
    )


def describe_result(result: CacheResult) -> str:
    """What ``kd-dist cache-teacher`` wrote, for the terminal."""
    manifest = result.manifest
    splits = ", ".join(f"{name} {info['examples']:,} examples"
                       for name, info in manifest["splits"].items())  # fmt: skip
    per_token = result.bytes / max(result.tokens, 1)
    k, temperature = manifest["top_k"], manifest["temperature"]
    lines = [
        f"Teacher cache of {manifest['teacher_model']} in {result.folder}:",
        f"  {splits}; {result.tokens:,} trained tokens",
        f"  top-{k} at temperature {temperature}: {result.bytes / 2**20:,.1f} MiB, "
        f"{per_token:,.0f} bytes per token ({bytes_per_token(k)} of them the rows themselves)",
        f"  the top-{k} hold {result.top_k_mass:.1%} of the teacher's mass on average",
        f"  train from it: kd-dist train --teacher_cache {result.folder} --student_model ... "
        "(the same data flags)",
    ]
    if result.top_k_mass < LOW_TOP_K_MASS:
        lines.append(
            f"  warning: the rest, which the cache keeps as one number, is "
            f"{1 - result.top_k_mass:.0%} of the teacher's distribution: a cache at a lower "
            "--temperature (1 keeps the teacher's own) or a larger --top_k keeps more of it "
            "(see the README's figures)."
        )
    return "\n".join(lines)
