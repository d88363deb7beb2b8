"""Build the Accelerator for a run and place the frozen teacher beside the student."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DataLoaderConfiguration,
    DeepSpeedPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)
from transformers.integrations import unset_hf_deepspeed_config

from kd_dist.checkpoint import TRACKER_DIR
from kd_dist.config import ConfigError, TrainConfig

logger = logging.getLogger("kd_dist")

STUDENT, TEACHER = "student", "teacher"  # DeepSpeed plugin names


def check_precision_supported(cfg: TrainConfig) -> None:
    """fp16 autocast needs a GPU; say so before anything loads."""
    if cfg.fp16 and not torch.cuda.is_available():
        raise ConfigError(
            "--fp16 needs a CUDA GPU and none is available: use --bf16 (supported on CPU) or "
            "full precision (neither flag)."
        )


def _build_accelerator(cfg: TrainConfig) -> Accelerator:
    check_precision_supported(cfg)
    handlers = []
    distributed_on_cpu = (
        int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    )
    deepspeed = deepspeed_launch()
    if cfg.teacher_placement.startswith("zero3") and not deepspeed:
        raise ConfigError(
            f"--teacher_placement {cfg.teacher_placement} shards the teacher with DeepSpeed: "
            "launch with `accelerate launch --config_file "
            "accelerate_configs/deepspeed_zero3.yaml ...`, or use --teacher_placement replicate."
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without an explicit gloo backend (DeepSpeed) or cpu=True (DDP), accelerate on a
        # CUDA-less host runs every launched process as if it were alone: data is not sharded
        # and gradients are not averaged, silently. The timeout turns a hung or dead process
        # into an error on the others instead of an endless wait.
        backend = "gloo" if distributed_on_cpu else "nccl"
        timeout = timedelta(seconds=cfg.dist_timeout)
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
    return Accelerator(
        cpu=distributed_on_cpu and not deepspeed,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # A seedable sampler makes each epoch's order a function of (seed, epoch): a resumed run
        # replays exactly the order the interrupted one would have seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
        deepspeed_plugins=_deepspeed_plugins(cfg) if deepspeed else None,
        # Trackers (TensorBoard, W&B) write under OUTPUT_DIR/runs; the main process logs to them.
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / TRACKER_DIR)
        ),
    )


def deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _deepspeed_plugins(cfg: TrainConfig) -> dict[str, DeepSpeedPlugin]:
    """The launch's DeepSpeed config for the student and, unless the teacher is replicated, a
    ZeRO-3 inference config derived from it for the teacher (no optimizer, no accumulation)."""
    student = DeepSpeedPlugin()  # from the config file `accelerate launch` was given
    if cfg.teacher_placement == "replicate":
        return {STUDENT: student}
    teacher_config = {
        key: value
        for key, value in copy.deepcopy(student.deepspeed_config).items()
        if key not in ("optimizer", "scheduler", "train_batch_size", "gradient_clipping")
    }
    zero = teacher_config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    if cfg.teacher_placement == "zero3_offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    teacher_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    teacher_config["gradient_accumulation_steps"] = 1
    return {STUDENT: student, TEACHER: DeepSpeedPlugin(hf_ds_config=teacher_config)}


@contextlib.contextmanager
def accelerator_session(cfg: TrainConfig) -> Iterator[Accelerator]:
    """An Accelerator for one run, released afterwards.

    accelerate keeps its state in process-wide singletons; resetting them lets one process (the
    demo, a notebook, the tests) run several trainings with different settings.
    """
    accelerator = _build_accelerator(cfg)
    try:
        yield accelerator
    finally:
        accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@contextlib.contextmanager
def zero3_partitioned_loading(accelerator: Accelerator, role: str) -> Iterator[None]:
    """Whether ``from_pretrained`` partitions the model it loads (ZeRO-3's zero.Init).

    accelerate registers a ZeRO-3 config with transformers for the whole run, and transformers
    then partitions *every* model it loads. Only the student is handed to DeepSpeed, so only it
    may be partitioned on load (when the config's zero3_init_flag asks for it); the teacher,
    replicated on each rank, must load whole.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not plugin.hf_ds_config.is_zero3():
        yield
        return
    partition = role == "student" and plugin.is_zero3_init_enabled()
    if partition:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def fill_deepspeed_config(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Fill the DeepSpeed JSON's "auto" values accelerate leaves to the script.

    accelerate fills batch size, accumulation and precision; clipping would default to 1.0.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("gradient_clipping") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = cfg.clip_grad_norm


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", which the SLURM scripts requeue on


class TrainingPreempted(Exception):
    """The run saved a complete checkpoint and stopped because it was asked to."""


class NonFiniteError(Exception):
    """A NaN or infinite loss or gradient norm, beyond what --skip_nonfinite allows."""


COLLECTIVE_TIMEOUT_EXIT_CODE = 1


def exit_on_collective_timeout(error: RuntimeError, rank: int, seconds: int) -> None:
    """After a collective timed out, say so and end the process at once (nothing else happens
    for other errors).

    The process group is broken: releasing it would wait for the missing process again (gloo's
    destructor joins its stuck worker thread), so no clean-up runs, as NCCL's watchdog does.
    """
    text = str(error).strip()
    # gloo: "Timed out waiting 10000ms for recv operation"; NCCL: "... operation timeout".
    if "timed out" not in text.lower() and "operation timeout" not in text.lower():
        return
    sys.stderr.write(
        f"kd-dist: error: rank {rank}: the other processes did not join a collective operation "
        f"within --dist_timeout {seconds} s: one of them hung or died (see its log). "
        f"({text.splitlines()[0][:200]})\n"
    )
    sys.stderr.flush()
    os._exit(COLLECTIVE_TIMEOUT_EXIT_CODE)


class PreemptionWatch:
    """Remembers SIGTERM, SIGUSR1 and ``--preemption_signal`` (SLURM's early warning) until the
    next step boundary. SIGUSR1 is always watched: the launch/ scripts forward SLURM's warning
    to the ranks as SIGUSR1 whatever signal SLURM sent.

    A signal can reach one rank or all of them at different moments; ``agreed`` makes every rank
    take the same decision at the same step, so they all save and stop together.
    """

    def __init__(self, early_warning: str = "SIGUSR1") -> None:
        self.signals = {signal.SIGTERM, signal.SIGUSR1, signal.Signals[early_warning]}
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._remember)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _remember(self, signum: int, _frame: object) -> None:
        self.received = signum

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any rank received a signal (a collective: every rank must call it)."""
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)


def choose_teacher_placement(
    cfg: TrainConfig, accelerator: Accelerator, teacher: torch.nn.Module
) -> tuple[str, str]:
    """(placement, why) for ``--teacher_placement`` (resolving ``auto``)."""
    if cfg.teacher_placement != "auto":
        return cfg.teacher_placement, "asked for"
    plugins = accelerator.state.deepspeed_plugins or {}
    if TEACHER not in plugins:
        return "replicate", "no DeepSpeed launch to shard it with"
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    if not torch.cuda.is_available():
        return "replicate", "no GPU memory to save"
    free_bytes, _ = torch.cuda.mem_get_info()
    if teacher_bytes > free_bytes / 2:
        return "zero3", f"{teacher_bytes / 2**30:.1f} GiB > half of {free_bytes / 2**30:.1f} free"
    return "replicate", f"{teacher_bytes / 2**30:.1f} GiB fits beside the student"


def place_teacher(
    cfg: TrainConfig, accelerator: Accelerator, teacher: torch.nn.Module
) -> torch.nn.Module:
    """The frozen teacher, in inference mode: replicated on this rank's device, or sharded by its
    own ZeRO-3 engine. Call after the student is prepared: accelerate's DeepSpeed backward and
    step go to the first engine it prepared, which must be the student's."""
    placement, why = choose_teacher_placement(cfg, accelerator, teacher)
    logger.info("Teacher placement: %s (%s)", placement, why)
    if placement == "replicate":
        return teacher.to(accelerator.device)
    accelerator.state.select_deepspeed_plugin(TEACHER)
    engine = accelerator.prepare(teacher)
    accelerator.state.select_deepspeed_plugin(STUDENT)
    # Checkpoints hold the student only: the teacher never changes, and accelerate would
    # otherwise try to save an optimizer-less engine. (accelerate keeps no public way to say so.)
    accelerator._models.remove(engine)
    held = sum(getattr(p, "ds_tensor", p).numel() for p in engine.module.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    logger.info("Teacher sharded: this process holds %d of its %d parameters", held, total)
    # Calling the module (not the engine) still gathers each layer's shards: ZeRO-3's hooks
    # live on the module's layers.
    return engine.module.eval()
