"""Resumable checkpoints and the final student export.

Layout of ``output_dir``::

    kd_config.json              the resolved run configuration
    metrics.jsonl               one line per logged step and one per evaluation
    eval_results.json           held-out metrics at the end
    runs/                       TensorBoard / W&B files (--report_to)
    report/                     plots and summary written by `kd-dist report`
    checkpoints/step-00000040/  accelerator state (model safetensors, optimizer, RNG, sampler)
                                + trainer_state.json + kd_config.json
    checkpoints/latest          name of the newest complete checkpoint (written last, atomically)
    model.safetensors, config.json, tokenizer files, generation_config.json   the final student

Everything is read back safely: weights from safetensors, the rest with
``torch.load(weights_only=True)`` (accelerate's default) or as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_dist.config import ConfigError, TrainConfig

CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
EVAL_RESULTS_FILE = "eval_results.json"
TRACKER_DIR = "runs"  # --report_to tensorboard/wandb files
REPORT_DIR = "report"  # kd-dist report's plots and summary
# What a run writes besides the student's own files; --overwrite_output_dir clears these so a
# new run never mixes with an old one's metrics or resumes from its checkpoints.
RUN_RECORDS = (CHECKPOINTS_DIR, METRICS_FILE, EVAL_RESULTS_FILE, TRACKER_DIR, REPORT_DIR)


@dataclass
class TrainerState:
    """Where the loop is. ``batches_done`` counts micro-batches consumed in the current epoch."""

    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, state: TrainerState) -> Path:
    """Every rank writes its part; ``latest`` moves only after all ranks have finished."""
    root = Path(cfg.output_dir) / CHECKPOINTS_DIR
    path = root / f"step-{state.global_step:08d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / TRAINER_STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
        cfg.save(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_atomically(root / LATEST_POINTER, path.name + "\n")
        if cfg.save_total_limit is not None:
            prune_checkpoints(root, keep=cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return path


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names)."""
    latest = (root / LATEST_POINTER).read_text().strip()
    checkpoints = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != latest)
    for old in checkpoints[: max(0, len(checkpoints) - (keep - 1))]:
        shutil.rmtree(old)


def resolve_checkpoint(cfg: TrainConfig) -> Path | None:
    """The folder named by ``--resume_from_checkpoint``: 'latest' is output_dir's newest, 'auto'
    the same or None when there is none yet."""
    spec = cfg.resume_from_checkpoint
    assert spec is not None
    if spec in ("latest", "auto"):
        pointer = Path(cfg.output_dir) / CHECKPOINTS_DIR / LATEST_POINTER
        if not pointer.is_file() and spec == "auto":
            return None
        if not pointer.is_file():
            raise ConfigError(
                f"--resume_from_checkpoint latest: {pointer} does not exist, so {cfg.output_dir} "
                "holds no complete checkpoint. Drop the flag to start fresh, or pass a path."
            )
        path = pointer.parent / pointer.read_text().strip()
    else:
        path = Path(spec)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise ConfigError(
            f"--resume_from_checkpoint: {path} is not a complete kd_dist checkpoint "
            f"(no {TRAINER_STATE_FILE}). Pass a folder under {CHECKPOINTS_DIR}/ or 'latest'."
        )
    return path


def check_output_dir(cfg: TrainConfig) -> Path | None:
    """Read-only checks of output_dir (every rank, before anything loads).

    Returns the checkpoint to resume from, if any. A non-empty folder is refused unless the run
    resumes in it or --overwrite_output_dir is given, so nothing there is lost by accident.
    """
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output_dir {output_dir} is a file: pass a folder.")
    checkpoint = resolve_checkpoint(cfg) if cfg.resume_from_checkpoint else None
    if checkpoint is None and not cfg.overwrite_output_dir and output_dir.is_dir():
        entries = sorted(entry.name for entry in output_dir.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ConfigError(
                f"--output_dir {output_dir} is not empty ({shown}). Pass "
                "--resume_from_checkpoint latest to continue the run in it, "
                "--overwrite_output_dir to train into it anyway, or choose another folder."
            )
    return checkpoint


def prepare_output_dir(cfg: TrainConfig, resuming: bool) -> None:
    """Create output_dir and clear a previous run's records when overwriting (main process)."""
    output_dir = Path(cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output_dir {output_dir}: cannot create it ({error}).") from None
    if not os.access(output_dir, os.W_OK):
        raise ConfigError(f"--output_dir {output_dir} is not writable: choose another folder.")
    if cfg.overwrite_output_dir and not resuming:
        remove_entries(output_dir, RUN_RECORDS)


def remove_entries(folder: Path, names: tuple[str, ...]) -> None:
    """Delete the named files or folders in ``folder`` (and nothing else) where they exist."""
    for name in names:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def drop_metrics_after(output_dir: str, step: int) -> None:
    """On resume, forget logged steps past the checkpoint: they will be logged again."""
    path = Path(output_dir) / METRICS_FILE
    if path.is_file():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        _write_atomically(path, "".join(line + "\n" for line in kept))


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((path / TRAINER_STATE_FILE).read_text()))


def export_student(
    accelerator: Accelerator,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str,
) -> None:
    """Save the trained student as a plain Hugging Face model (safetensors) in ``output_dir``."""
    accelerator.wait_for_everyone()
    # get_state_dict gathers the full weights when they are sharded (ZeRO-3) on every rank.
    state_dict = accelerator.get_state_dict(student)
    model = accelerator.unwrap_model(student)
    if accelerator.is_main_process:
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
