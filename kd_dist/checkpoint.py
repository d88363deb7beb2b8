"""Resumable checkpoints and the final student export.

Layout of ``output_dir``::

    kd_config.json              the resolved run configuration
    metrics.jsonl               one line per logged step and one per evaluation
    eval_results.json           held-out metrics at the end
    runs/                       TensorBoard / W&B files (--report_to)
    report/                     plots and summary written by `kd-dist report`
    checkpoints/step-00000040/  accelerator state (model safetensors, optimizer, RNG, sampler)
                                + trainer_state.json + kd_config.json
                                + checkpoint_complete.json (written last: files and sizes)
    checkpoints/latest          name of the newest complete checkpoint (written last, atomically)
    checkpoints/abandoned/      checkpoints newer than the one a run resumed from, set aside
    model.safetensors, config.json, tokenizer files, generation_config.json   the final student
    export_manifest.json        written after the student: versions, config, data, checksums

Checkpoints are crash-consistent: a save is written to a hidden staging folder, completed with
its marker and renamed into place before ``latest`` moves, so a kill at any moment leaves the
previous checkpoint intact and named by ``latest``. Nothing is unpickled on resume that could
run code: weights are safetensors, every pickle-based file is first read with
``torch.load(weights_only=True)`` (DeepSpeed itself loads its files with ``weights_only=False``),
the rest is JSON.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils.other import TORCH_SAFE_GLOBALS
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_dist import faults, lora
from kd_dist.config import CONFIG_FIELDS, CONFIG_FILE_NAME, ConfigError, TrainConfig
from kd_dist.models import is_hidden_projection_key, without_hidden_projections

logger = logging.getLogger("kd_dist")

CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest"
ABANDONED_DIR = "abandoned"  # never matches step-*: invisible to resuming and pruning
TRAINER_STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
EVAL_RESULTS_FILE = "eval_results.json"
EVAL_RECORD_KEY = "eval_kl_to_teacher"  # present in the evaluation lines of metrics.jsonl
COMPLETE_MARKER = "checkpoint_complete.json"
EXPORT_MANIFEST = "export_manifest.json"
TRACKER_DIR = "runs"  # --report_to tensorboard/wandb files
REPORT_DIR = "report"  # kd-dist report's plots and summary
# What a run writes besides the student's own files; --overwrite_output_dir clears these so a
# new run never mixes with an old one's metrics or resumes from its checkpoints.
RUN_RECORDS = (CHECKPOINTS_DIR, METRICS_FILE, EVAL_RESULTS_FILE, TRACKER_DIR, REPORT_DIR)


@dataclass
class TrainerState:
    """Where the loop is. ``batches_done`` counts micro-batches consumed in the current epoch.

    ``world_size``, ``data_fingerprint`` and ``teacher_cache`` identify what the checkpoint can
    be resumed with;
    the counters cover the whole run, resumes included.
    """

    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0
    world_size: int = 1
    data_fingerprint: str = ""
    teacher_cache: str | None = None  # the identity of the run's teacher cache (None: live)
    skipped_nonfinite: int = 0  # batches skipped by --skip_nonfinite
    overflow_steps: int = 0  # optimizer steps the fp16 loss scaler skipped


def _fsync(path: Path) -> None:
    """Force a file (or a folder's entries) to disk, so a node crash cannot reorder the writes
    the completion marker and ``latest`` vouch for."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str, step: int | None = None) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    _fsync(temporary)
    if step is not None:
        faults.kill_in_save("latest", step)
    os.replace(temporary, path)
    _fsync(path.parent)


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, state: TrainerState) -> Path:
    """Write a checkpoint so that a kill at any moment leaves the previous one as ``latest``.

    Every rank writes its part into a hidden staging folder; after all have finished, the main
    process writes the completion marker (every file and its size) last, renames the folder
    into place, and only then moves ``latest``.
    """
    root = Path(cfg.output_dir) / CHECKPOINTS_DIR
    path = root / checkpoint_name(state.global_step)
    staging = root / f".{path.name}.partial"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)  # left by a run that was killed while saving this step
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    faults.kill_in_save("state", state.global_step)
    if accelerator.is_main_process:
        (staging / TRAINER_STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
        cfg.save(staging)
    accelerator.wait_for_everyone()  # every rank's files are written
    if accelerator.is_main_process:
        _write_marker(staging, state.global_step)
        faults.kill_in_save("marker", state.global_step)
        _move_into_place(staging, path)
        faults.kill_in_save("rename", state.global_step)
        _write_atomically(root / LATEST_POINTER, path.name + "\n", step=state.global_step)
        if cfg.save_total_limit is not None:
            prune_checkpoints(root, keep=cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return path


def checkpoint_name(step: int) -> str:
    """The folder name of step ``step``'s checkpoint; names sort like steps."""
    return f"step-{step:08d}"


def _write_marker(folder: Path, step: int) -> None:
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync(file)
        files[file.relative_to(folder).as_posix()] = file.stat().st_size
    marker = {"step": step, "files": files}
    _write_atomically(folder / COMPLETE_MARKER, json.dumps(marker, indent=2) + "\n")


def _move_into_place(staging: Path, path: Path) -> None:
    """Rename ``staging`` to ``path``. A resumed run has set aside every checkpoint newer than
    its own (``set_aside_abandoned``), so ``path`` never exists: were it there, the rename
    fails rather than replace it."""
    os.replace(staging, path)
    _fsync(path.parent)


def incomplete_because(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is: the marker must exist and
    every file it lists must be there with its recorded size (a truncated copy is not)."""
    marker_path = path / COMPLETE_MARKER
    if not marker_path.is_file():
        return f"no {COMPLETE_MARKER}: its save did not finish"
    try:
        files = json.loads(marker_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE_MARKER} is unreadable"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes instead of {size}"
    return None


def _step_folders(root: Path) -> list[Path]:
    """Checkpoint folders, newest first (staging folders are hidden and never match)."""
    return sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names)."""
    latest = (root / LATEST_POINTER).read_text().strip()
    checkpoints = [p for p in _step_folders(root) if p.name != latest]
    for old in checkpoints[max(0, keep - 1) :]:
        shutil.rmtree(old)


def set_aside_abandoned(output_dir: str, checkpoint: Path, step: int) -> list[Path]:
    """After resuming from ``checkpoint`` (of step ``step``; main process): move the
    checkpoints newer than it, the line of the run it abandons, into ``checkpoints/abandoned/``
    and point ``latest`` at it. ``latest``, --save_total_limit's pruning (by name) and the
    fallback to the newest complete checkpoint then all follow the resumed run, and nothing is
    deleted. Returns where the moved folders went (oldest first).

    ``latest`` moves first: a kill during the moves leaves it naming ``checkpoint``, and the
    next resume from it moves the rest. A checkpoint outside ``checkpoints/`` cannot be named by
    ``latest``, which is left as it is.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    newer = [p for p in reversed(_step_folders(root)) if p.name > checkpoint_name(step)]
    if not newer:
        return []
    if checkpoint.parent.resolve() == root.resolve():
        _write_atomically(root / LATEST_POINTER, checkpoint.name + "\n")
    aside = root / ABANDONED_DIR
    aside.mkdir(exist_ok=True)
    moved = []
    for folder in newer:
        moved.append(_unused_path(aside, folder.name))
        os.replace(folder, moved[-1])
    _fsync(aside)
    _fsync(root)
    logger.warning(
        "Resumed from %s, older than the checkpoints the abandoned run saved after it: moved "
        "%s into %s, so that `latest`, --save_total_limit and the resume fallback follow this "
        "run. Nothing was deleted; delete them if you do not need them.",
        checkpoint, ", ".join(p.name for p in newer), aside,
    )  # fmt: skip
    return moved


def _unused_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/name.1``, ``.2``... when a run resumed from an older
    checkpoint again and set aside the same step twice."""
    candidates = (folder / (f"{name}.{n}" if n else name) for n in itertools.count())
    return next(path for path in candidates if not path.exists())


def resolve_checkpoint(cfg: TrainConfig) -> Path | None:
    """The complete checkpoint named by ``--resume_from_checkpoint``.

    'latest' is the one ``checkpoints/latest`` names; when that pointer is empty, truncated or
    names an incomplete folder, the newest complete checkpoint instead (with a warning). 'auto'
    is the same, or None when output_dir holds no checkpoint at all yet. Checkpoints that exist
    but are all incomplete are an error, never a silent fresh start.
    """
    spec = cfg.resume_from_checkpoint
    assert spec is not None
    if spec not in ("latest", "auto"):
        path = Path(spec)
        problem = incomplete_because(path)
        if problem is not None:
            raise ConfigError(
                f"--resume_from_checkpoint: {path} is not a complete kd_dist checkpoint "
                f"({problem}). Pass a folder under {CHECKPOINTS_DIR}/ or 'latest'."
            )
        return path
    root = Path(cfg.output_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_POINTER
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named:
        problem = incomplete_because(root / named)
        if problem is None:
            return root / named
        logger.warning("%s names %s, which is not usable (%s).", pointer, named, problem)
    elif named is not None:
        logger.warning("%s is empty (a save was interrupted while writing it).", pointer)
    complete = [p for p in _step_folders(root) if incomplete_because(p) is None]
    if complete:
        logger.warning("Resuming from the newest complete checkpoint instead: %s", complete[0])
        return complete[0]
    if named is not None or _step_folders(root):
        raise ConfigError(
            f"--resume_from_checkpoint {spec}: {root} holds checkpoints but none is complete. "
            "Pass a complete checkpoint folder, or --overwrite_output_dir without "
            "--resume_from_checkpoint to start over (move anything you want to keep first)."
        )
    if spec == "auto":
        return None
    raise ConfigError(
        f"--resume_from_checkpoint latest: {cfg.output_dir} holds no complete checkpoint. "
        "Drop the flag to start fresh, or pass a path."
    )


# Settings a checkpoint can only be resumed exactly with: they decide which examples each
# optimizer step sees, what the saved optimizer and RNG states mean, and which parameters (a
# LoRA student's adapters) the student trains. A setting a checkpoint predates ran at its default.
# The data itself is compared by the content of its tokenized examples (the data fingerprint),
# not by the --dataset path, so a copy of the same file elsewhere resumes.
RESUME_MUST_MATCH = (
    "teacher_model", "student_model", "task_type", "dataset_config", "dataset_split",
    "dataset_format", "text_column", "messages_column", "prompt_column", "response_column",
    "max_length", "max_target_length", "train_on_prompt", "packing", "group_by_length",
    "max_train_samples", "eval_ratio", "batch_size", "gradient_accumulation_steps", "seed",
    "optimizer", "fp16", "bf16", "hidden_layer_map", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "lora_modules_to_save", "load_in_4bit",
)  # fmt: skip


def resume_mismatches(
    saved: dict[str, Any], cfg: TrainConfig, state: TrainerState, world_size: int
) -> list[str]:
    """What differs between a checkpoint's run (config, trainer state) and this one."""
    differences = [
        f"--{name} {saved.get(name)!r} -> {getattr(cfg, name)!r}"
        for name in RESUME_MUST_MATCH
        if saved.get(name, CONFIG_FIELDS[name].default) != getattr(cfg, name)
    ]
    if state.world_size != world_size:
        differences.append(f"processes {state.world_size} -> {world_size}")
    # With the hidden-state loss the student holds projections (its saved state does too).
    hidden_before, hidden_now = saved.get("hidden_loss_weight", 0.0) > 0, cfg.hidden_loss_weight > 0
    if hidden_before != hidden_now:
        differences.append(
            f"--hidden_loss_weight {saved.get('hidden_loss_weight', 0.0)!r} -> "
            f"{cfg.hidden_loss_weight!r} (the hidden-state loss on or off)"
        )
    return differences


def refuse_mismatch(checkpoint: Path, differences: list[str], cfg: TrainConfig) -> None:
    if not differences:
        return
    listed = "; ".join(differences)
    if cfg.allow_resume_mismatch:
        logger.warning("Resuming %s with changed settings (%s): not an exact resume.", checkpoint,
                       listed)  # fmt: skip
        return
    raise ConfigError(
        f"--resume_from_checkpoint {checkpoint} was saved by a different run ({listed}), so it "
        "cannot be resumed exactly. Resume with the checkpoint's settings (its "
        f"{CONFIG_FILE_NAME}), or pass --allow_resume_mismatch to continue anyway."
    )


def read_trainer_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / TRAINER_STATE_FILE).read_text()))


def check_output_dir(cfg: TrainConfig, world_size: int) -> Path | None:
    """Read-only checks of output_dir (every rank, before anything loads).

    Returns the checkpoint to resume from, if any, after checking that it is safe to load and
    was saved by the same run. A non-empty folder is refused unless the run resumes in it or
    --overwrite_output_dir is given, so nothing there is lost by accident.
    """
    output_dir = Path(cfg.output_dir)
    check_writable_folder(output_dir)
    checkpoint = resolve_checkpoint(cfg) if cfg.resume_from_checkpoint else None
    if checkpoint is not None:
        check_safe_to_load(checkpoint)
        saved = json.loads((checkpoint / CONFIG_FILE_NAME).read_text())
        state = read_trainer_state(checkpoint)
        refuse_mismatch(checkpoint, resume_mismatches(saved, cfg, state, world_size), cfg)
    fresh = checkpoint is None and not cfg.overwrite_output_dir
    if fresh and output_dir.is_dir() and not restarts_own_run(cfg):
        entries = sorted(entry.name for entry in output_dir.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ConfigError(
                f"--output_dir {output_dir} is not empty ({shown}). Pass "
                "--resume_from_checkpoint latest to continue the run in it, "
                "--overwrite_output_dir to train into it anyway, or choose another folder."
            )
    return checkpoint


def restarts_own_run(cfg: TrainConfig) -> bool:
    """Whether ``--resume_from_checkpoint auto`` finds only what this very run wrote before it
    was stopped ahead of its first complete checkpoint: it then starts again from scratch."""
    output_dir = Path(cfg.output_dir)
    config = output_dir / CONFIG_FILE_NAME
    if cfg.resume_from_checkpoint != "auto" or not config.is_file():
        return False
    own = {*RUN_RECORDS, CONFIG_FILE_NAME}
    same_run = json.loads(config.read_text()) == json.loads(json.dumps(cfg.to_dict()))
    return same_run and all(entry.name in own for entry in output_dir.iterdir())


def check_writable_folder(output_dir: Path) -> None:
    """output_dir must be a folder or not exist yet, and it, or the folder it will be created
    in, must be writable: tried with a temporary file (permission bits alone miss read-only
    mounts and say nothing for root)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output_dir {output_dir} is a file: pass a folder.")
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(
            f"--output_dir {output_dir}: cannot write in {existing} ({error.strerror}). Choose "
            "a folder you can write to."
        ) from None


def prepare_output_dir(cfg: TrainConfig, resuming: bool) -> None:
    """Create output_dir and clear a previous run's records when overwriting (main process)."""
    output_dir = Path(cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output_dir {output_dir}: cannot create it ({error}).") from None
    if not resuming and (cfg.overwrite_output_dir or restarts_own_run(cfg)):
        remove_entries(output_dir, RUN_RECORDS)


def remove_entries(folder: Path, names: tuple[str, ...]) -> None:
    """Delete the named files or folders in ``folder`` (and nothing else) where they exist."""
    for name in names:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def read_metrics_records(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (none when it does not exist); a last line torn by a
    crash while it was appended is dropped with a warning."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines and not _is_json(lines[-1]):
        logger.warning("Ignoring an incomplete last line of %s.", path)
        lines = lines[:-1]
    return [json.loads(line) for line in lines]


def drop_metrics_after(output_dir: str, step: int) -> None:
    """On resume, forget logged steps past the checkpoint: they will be logged again."""
    path = Path(output_dir) / METRICS_FILE
    if path.is_file():
        kept = [r for r in read_metrics_records(output_dir) if r["step"] <= step]
        _write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))


def evaluation_logged(output_dir: str, step: int) -> bool:
    """Whether ``metrics.jsonl`` holds an evaluation at ``step`` (a resumed run that stopped
    after evaluating there, e.g. while exporting, must not log it twice)."""
    return any(r["step"] == step and EVAL_RECORD_KEY in r for r in read_metrics_records(output_dir))


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


# The only classes a checkpoint's pickle-based files may name, besides tensors and containers:
# accelerate's RNG states hold numpy arrays, DeepSpeed's optimizer states its loss scaler, ZeRO
# stage and (ZeRO-1/2) parameter slice addresses. All are plain data; none runs code when it is
# rebuilt.
SAFE_CHECKPOINT_GLOBALS = [
    *TORCH_SAFE_GLOBALS, LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
]  # fmt: skip
# Files a resume reads without unpickling: weights, JSON state, and DeepSpeed's tag file and
# conversion scripts (copied beside its shards, never executed by a resume). Every other file is
# read with torch.load(weights_only=True) before anything else loads it.
NOT_PICKLED_SUFFIXES = {".safetensors", ".json", ".py"}
NOT_PICKLED_NAMES = {"latest"}


def check_safe_to_load(path: Path) -> None:
    """Refuse a checkpoint holding a symbolic link, or any file that is neither plain text nor
    loadable with ``torch.load(weights_only=True)`` with only plain-data classes.

    accelerate reads its pickle-based files with ``weights_only=True`` but skips an RNG file it
    cannot read (a silent non-exact resume); DeepSpeed reads its files with
    ``weights_only=False``, which runs whatever code a planted pickle holds. Every file is
    checked here first (memory-mapped, so nothing large is read twice); a link could lead the
    loaders to a file outside the folder checked, so there may be none.
    """

    def refuse(file: Path, reason: str) -> None:
        raise ConfigError(
            f"Refusing to resume from {path}: {file.relative_to(path)} {reason}. Checkpoints "
            "are never unpickled with code; if you did not plant this file, the checkpoint is "
            "damaged: resume from an earlier one."
        )

    for folder, subfolders, names in os.walk(path):
        for name in sorted(subfolders + names):
            entry = Path(folder) / name
            if entry.is_symlink():
                refuse(entry, "is a symbolic link")
            if entry.is_dir() or entry.suffix in NOT_PICKLED_SUFFIXES or name in NOT_PICKLED_NAMES:
                continue
            try:
                with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
                    torch.load(entry, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # any failure means the file cannot be restored safely
                # torch's message opens with general advice; the line naming the class is the
                # one that says what was refused.
                lines = str(error).strip().splitlines() or [type(error).__name__]
                reason = next((line for line in lines if "GLOBAL" in line), lines[0])
                refuse(entry, f"is not a plain tensor/data file ({reason.strip()[:300]})")


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainerState:
    """Restore a checkpoint that ``check_output_dir`` found complete and safe to load."""
    accelerator.load_state(str(path))
    return read_trainer_state(path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    names = ("kd_dist", "torch", "transformers", "accelerate", "deepspeed", "datasets",
             "safetensors", "tokenizers")  # fmt: skip
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# Weight files Hugging Face models are saved as (single or sharded, with their index).
WEIGHT_FILE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json",
                        "pytorch_model*.bin", "pytorch_model.bin.index.json")  # fmt: skip


def previous_export(output_dir: Path) -> set[str]:
    """Names of the files a previous export left in ``output_dir``: those its manifest lists,
    and any weight files (an export killed before its manifest has none)."""
    names = {p.name for pattern in WEIGHT_FILE_PATTERNS for p in output_dir.glob(pattern)}
    manifest = output_dir / EXPORT_MANIFEST
    if manifest.is_file() and _is_json(text := manifest.read_text()):
        names |= set(json.loads(text).get("files", {}))
    return names


def export_student(
    accelerator: Accelerator,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TrainConfig,
    state: TrainerState,
) -> None:
    """Save the trained student as a plain Hugging Face model (safetensors) in ``output_dir``
    (a LoRA student: its adapter in peft's format, or merged under --merge_lora).

    It is written to a staging folder and each file renamed into place; the manifest (versions,
    config, data fingerprint, checksums) goes last and vouches for the files it lists, so an
    export interrupted half-way has no manifest.
    """
    accelerator.wait_for_everyone()
    # get_state_dict gathers the full weights when they are sharded (ZeRO-3) on every rank.
    if cfg.lora:
        adapter = lora.trained_adapter(accelerator, student)
    else:
        state_dict = accelerator.get_state_dict(student)
    model = accelerator.unwrap_model(student)
    if accelerator.is_main_process:
        output_dir = Path(cfg.output_dir)
        staging = output_dir / ".export.partial"
        previous = previous_export(output_dir)
        remove_entries(output_dir, (staging.name, EXPORT_MANIFEST))
        if cfg.lora:  # the adapter (peft's format), or the merged model under --merge_lora
            lora.save_student(cfg, model, adapter, staging)
        else:
            # The hidden-state loss's projections are training aids: the student is exported
            # without them, an ordinary Hugging Face model.
            weights = {k: v for k, v in state_dict.items() if not is_hidden_projection_key(k)}
            with without_hidden_projections(model):
                model.save_pretrained(staging, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        # A previous export's files that this one does not write again (shards of a differently
        # sharded model, an old chat template) would otherwise load with the new model.
        stale = previous - {file.name for file in staging.iterdir()}
        remove_entries(output_dir, tuple(sorted(stale)))
        files = {}
        for file in sorted(staging.iterdir()):
            _fsync(file)
            files[file.name] = {"sha256": sha256_of(file), "bytes": file.stat().st_size}
            os.replace(file, output_dir / file.name)
        staging.rmdir()
        manifest = {
            "global_step": state.global_step,
            "data_fingerprint": state.data_fingerprint,
            "skipped_nonfinite": state.skipped_nonfinite,
            "overflow_steps": state.overflow_steps,
            "versions": package_versions(),
            "config": cfg.to_dict(),
            "files": files,
        }
        _write_atomically(output_dir / EXPORT_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    accelerator.wait_for_everyone()
