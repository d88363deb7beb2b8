"""Build the Accelerator for a run and place the frozen teacher beside the student."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

from kd_dist.config import ConfigError, TrainConfig


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
    launched_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched_distributed and not torch.cuda.is_available():
        # Without an explicit gloo backend, accelerate on a CUDA-less host reports one process per
        # rank while the launcher started several, so data would silently not be sharded.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # A seedable sampler makes each epoch's order a function of (seed, epoch): a resumed run
        # replays exactly the order the interrupted one would have seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
    )


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


def place_teacher(accelerator: Accelerator, teacher: torch.nn.Module) -> torch.nn.Module:
    """A replicated, frozen copy of the teacher on this rank's device, in inference mode."""
    return teacher.to(accelerator.device)
