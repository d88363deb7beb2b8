"""Build the Accelerator for a run and place the frozen teacher beside the student."""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

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
from kd_dist.models import teacher_dtype

logger = logging.getLogger("kd_dist")

STUDENT, TEACHER = "student", "teacher"  # DeepSpeed plugin names


def check_hardware_supports(cfg: TrainConfig) -> None:
    """fp16 autocast, flash-attention, vLLM and 4-bit students need a GPU (and the last three
    their packages); say so before anything loads. (Not in ``cfg.validate``: ``kd-dist
    tokenize`` takes the same flags in a CPU job.)"""
    problems = []
    if cfg.fp16 and not torch.cuda.is_available():
        problems.append(
            "--fp16 needs a CUDA GPU and none is available: use --bf16 (supported on CPU) or "
            "full precision (neither flag)."
        )
    # (asked for, flag, package, how to install it, what to do instead)
    gpu_features = [
        (cfg.attn_implementation == "flash_attention_2", "--attn_implementation "
         "flash_attention_2", "flash_attn", "pip install flash-attn --no-build-isolation",
         "pass sdpa or eager (or leave it at auto)"),
        (cfg.generation_backend == "vllm", "--generation_backend vllm", "vllm",
         "pip install 'kd_dist[vllm]'", "pass --generation_backend transformers"),
        (cfg.load_in_4bit, "--load_in_4bit", "bitsandbytes", "pip install 'kd_dist[qlora]'",
         "drop --load_in_4bit (LoRA on the full-precision student)"),
    ]  # fmt: skip
    for asked, flag, package, install, instead in gpu_features:
        if asked and importlib.util.find_spec(package) is None:
            problems.append(f"{flag} needs the {package} package: {install} (or {instead}).")
        if asked and not torch.cuda.is_available():
            problems.append(f"{flag} needs a CUDA GPU and none is available: {instead}.")
    if problems:
        raise ConfigError("\n".join(problems))


def _build_accelerator(cfg: TrainConfig) -> Accelerator:
    handlers = []
    distributed_on_cpu = (
        int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    )
    deepspeed = deepspeed_launch()
    if cfg.teacher_placement.startswith("zero3") and cfg.alpha < 1.0 and not deepspeed:
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
    if deepspeed:
        plugins = _deepspeed_plugins(cfg)  # checks the launch's DeepSpeed settings too
    else:
        plugins = None
        check_launch_agrees(cfg, deepspeed_config=None)
    check_hardware_supports(cfg)  # (after the launch's settings: those refusals hold anywhere)
    return Accelerator(
        cpu=distributed_on_cpu and not deepspeed,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # A seedable sampler makes each epoch's order a function of (seed, epoch): a resumed run
        # replays exactly the order the interrupted one would have seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
        deepspeed_plugins=plugins,
        # Trackers (TensorBoard, W&B) write under OUTPUT_DIR/runs; the main process logs to them.
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / TRACKER_DIR)
        ),
    )


def deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launch_conflicts(
    cfg: TrainConfig,
    launch_precision: str,
    deepspeed_config: dict[str, Any] | None,
    world_size: int = 1,
) -> list[str]:
    """Settings the launch (accelerate's config file, its flags, the DeepSpeed JSON) gives a
    value that disagrees with kd-dist's flags.

    kd-dist's flags decide batch size, accumulation, clipping and precision; the training loop
    is built on them. A launch may repeat them or leave them "auto", but accelerate would
    otherwise silently prefer some launch values (DeepSpeed's accumulation steps, say) and the
    run would train differently from what its flags say.
    """
    conflicts = []
    if launch_precision not in ("no", "") and launch_precision != cfg.mixed_precision:
        ours = cfg.mixed_precision if cfg.mixed_precision != "no" else "fp32"
        conflicts.append(
            f"mixed_precision: the launch asks for {launch_precision}, kd-dist runs {ours} "
            f"(pass --{launch_precision}, or mixed_precision: 'no' in the accelerate config)"
        )
    if deepspeed_config is None:
        return conflicts
    ours = {
        "train_micro_batch_size_per_gpu": ("--batch_size", cfg.batch_size),
        "gradient_accumulation_steps": ("--gradient_accumulation_steps",
                                        cfg.gradient_accumulation_steps),
        "gradient_clipping": ("--clip_grad_norm", cfg.clip_grad_norm),
    }  # fmt: skip
    for key, (flag, value) in ours.items():
        theirs = deepspeed_config.get(key, "auto")
        if theirs != "auto" and float(theirs) != float(value):
            left_out = key == "gradient_accumulation_steps" and theirs == 1
            default = " (accelerate's value when it is left out)" if left_out else ""
            conflicts.append(
                f"{key}: the DeepSpeed settings have {theirs}{default}, kd-dist {flag} {value}"
            )
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    theirs = deepspeed_config.get("train_batch_size", "auto")
    if theirs != "auto" and int(theirs) != global_batch:
        conflicts.append(
            f"train_batch_size: the DeepSpeed settings have {theirs}, kd-dist's --batch_size x "
            f"--gradient_accumulation_steps x {world_size} processes is {global_batch}"
        )
    for precision in ("bf16", "fp16"):
        enabled = deepspeed_config.get(precision, {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (cfg.mixed_precision == precision):
            conflicts.append(
                f"{precision}.enabled: the DeepSpeed settings have {enabled}, kd-dist "
                + ("passes" if cfg.mixed_precision == precision else "does not pass")
                + f" --{precision}"
            )
    return conflicts


def check_launch_agrees(cfg: TrainConfig, deepspeed_config: dict[str, Any] | None) -> None:
    conflicts = launch_conflicts(
        cfg,
        os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower(),
        deepspeed_config,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )
    if conflicts:
        raise ConfigError(
            "The launch configuration disagrees with kd-dist's flags, which decide these "
            "settings:\n  - " + "\n  - ".join(conflicts) + '\nSet them to "auto" (or '
            "leave them out) in the DeepSpeed JSON or the accelerate config's deepspeed_config, "
            "or pass kd-dist the launch's values."
        )


@contextlib.contextmanager
def _deepspeed_fields_hidden() -> Iterator[None]:
    """accelerate refuses a DeepSpeedPlugin built from a dict whenever the launch passed
    DeepSpeed settings as accelerate fields (the questionnaire's YAML: zero_stage, offload_...),
    a guard meant for a user's JSON file that would silently drop them. The teacher's dict is
    derived from the student's already-resolved settings, so nothing is dropped."""
    fields = os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    try:
        yield
    finally:
        if fields is not None:
            os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = fields


def _launch_json() -> dict[str, Any] | None:
    """The DeepSpeed JSON file the launch names, as written (None without one)."""
    path = Path(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none"))
    return json.loads(path.read_text()) if path.is_file() else None


def _deepspeed_plugins(cfg: TrainConfig) -> dict[str, DeepSpeedPlugin]:
    """The launch's DeepSpeed settings for the student (a JSON file, accelerate config fields or
    launch flags: accelerate reads them from the environment), completed from kd-dist's flags,
    and, unless the teacher is replicated, a ZeRO-3 inference config derived from them for the
    teacher (no optimizer, no accumulation)."""
    student = DeepSpeedPlugin()
    if cfg.load_in_4bit and student.zero_stage == 3:
        # (Whether or not the launch partitions models as they load, zero3_init_flag.)
        raise ConfigError(
            "--load_in_4bit: a 4-bit student cannot be partitioned by ZeRO-3; launch with "
            "DDP or ZeRO-2 (accelerate_configs/multi_gpu.yaml, deepspeed_zero2.yaml), or drop "
            "--load_in_4bit."
        )
    student_config = student.deepspeed_config
    written = _launch_json()
    if written is not None and "gradient_accumulation_steps" not in written:
        # accelerate writes 1 where the JSON says nothing; left out, it is kd-dist's to fill.
        student_config["gradient_accumulation_steps"] = "auto"
    check_launch_agrees(cfg, student_config)
    # "auto" or absent: DeepSpeed's own default would be no clipping, accelerate's 1.0.
    student_config["gradient_clipping"] = cfg.clip_grad_norm
    if student.zero_stage == 3:
        # The export gathers the sharded weights into one state dict; DeepSpeed refuses to
        # unless this is on (the questionnaire's default answer turns it off).
        student_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.teacher_placement == "replicate" or teacher_unneeded(cfg):
        return {STUDENT: student}
    teacher_config = {
        key: value
        for key, value in copy.deepcopy(student_config).items()
        if key not in ("optimizer", "scheduler", "train_batch_size", "gradient_clipping")
    }
    zero = teacher_config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    zero.pop("offload_param", None)  # the student's: the teacher's is --teacher_placement's
    # An inference-only engine: release each layer's gathered weights right after its forward
    # (a reuse distance of 0), so a process holds its shards plus the layers in flight, never
    # the whole teacher (the student's settings may keep every layer it will use again).
    zero["stage3_max_reuse_distance"] = 0
    zero["stage3_prefetch_bucket_size"] = 0
    if cfg.teacher_placement == "zero3_offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    # No optimizer, so accumulation means nothing to this engine; the run's value keeps
    # accelerate from "correcting" its own accumulation setting to the teacher's when preparing.
    teacher_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    teacher_config["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    # The teacher is kept in --teacher_dtype, which may differ from the run's precision:
    # zero.Init builds its shards in the dtype this config enables, and the engine casts to it.
    dtype = teacher_dtype(cfg)
    teacher_config["bf16"] = {"enabled": dtype == torch.bfloat16}
    teacher_config["fp16"] = {"enabled": dtype == torch.float16}
    with _deepspeed_fields_hidden():
        teacher = DeepSpeedPlugin(hf_ds_config=teacher_config, zero3_init_flag=True)
    return {STUDENT: student, TEACHER: teacher}


@contextlib.contextmanager
def accelerator_session(cfg: TrainConfig) -> Iterator[Accelerator]:
    """An Accelerator for one run (train, eval, cache-teacher), ended in order afterwards
    (``shut_down``), also when the run raises.

    accelerate keeps its state in process-wide singletons; resetting them lets one process (the
    demo, a notebook, the tests) run several trainings with different settings.
    """
    accelerator = _build_accelerator(cfg)
    try:
        yield accelerator
    except BaseException as error:
        if isinstance(error, RuntimeError):  # (a timed-out collective ends the process here)
            exit_on_collective_timeout(error, accelerator.process_index, cfg.dist_timeout)
        # The traceback's finished frames hold the run's models: cleared, so they can be freed.
        traceback.clear_frames(error.__traceback__)
        try:
            # Where every rank stops at the same point for the same reason, the engines are
            # released too; after any other error a rank's device may still wait on its peers
            # (DeepSpeed's destroy() synchronizes the device), so only the group is destroyed.
            shut_down(accelerator, release_models=isinstance(error, AGREED_STOPS))
        except Exception:  # the run's own error is the one to report
            logger.exception("While ending the run after an error, another one:")
        raise
    else:
        shut_down(accelerator)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# The DeepSpeed engines prepared outside accelerate's bookkeeping (the teacher's: see
# place_teacher), for ``shut_down`` to release.
_untracked_engines: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def shut_down(accelerator: Accelerator, release_models: bool = True) -> None:
    """End a session in order, so that no thread of a process group outlives the interpreter.

    gloo's (and NCCL's) threads are joined when the last reference to their group goes. Left
    running at interpreter exit, one aborts the process after the run has succeeded
    ("terminate called without an active exception", SIGABRT, now and then). The models are
    what keep the groups alive: ZeRO-3's hooks and DeepSpeed's stack of modules hold each model
    and its engine. So: each DeepSpeed engine removes its hooks (they still need the process
    group) and its modules leave that stack; accelerate drops its references and the collector
    frees the models; the trackers finish; the process group is destroyed last, together with
    DeepSpeed's own references to its groups, and their threads are joined then.
    """
    if release_models:
        release_engines(accelerator)
        accelerator.free_memory()
        gc.collect()
    for tracker in accelerator.trackers:
        tracker.finish()
    if not torch.distributed.is_initialized() or accelerator.state.fork_launched:
        return  # (a notebook_launcher's processes keep the launcher's group)
    import deepspeed.comm

    if deepspeed.comm.is_initialized():  # (it also drops DeepSpeed's references to its groups)
        deepspeed.comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()


def release_engines(accelerator: Accelerator) -> None:
    """Destroy the session's DeepSpeed engines: the student's (accelerate's) and the teacher's
    (without a student, as in cache-teacher, accelerate holds the teacher's: each once)."""
    engines = {id(engine): engine for engine in _untracked_engines}
    _untracked_engines.clear()
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is not None:
        engines[id(wrapped.engine)] = wrapped.engine
        accelerator.deepspeed_engine_wrapped = None  # (destroyed here, not by free_memory)
    if not engines:
        return
    for engine in engines.values():
        engine.destroy()
    forget_zero3_modules([engine.module for engine in engines.values()])


def forget_zero3_modules(models: list[torch.nn.Module]) -> None:
    """Drop the references ZeRO-3 (DeepSpeed 0.19) keeps to the modules of ``models`` after
    destroy(): on a module-level stack (each engine's model, and any module whose forward an
    error interrupted), and every (coordinator, module) pair in a class-level lru_cache. (Read
    defensively: private names, which a release may change; tests/test_shutdown.py shows
    whether anything is still held.)"""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator,
    )

    gone = {id(module) for model in models for module in model.modules()}
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
    stack[:] = [module for module in stack if id(module) not in gone]
    release = getattr(
        PartitionedParameterCoordinator,
        "_PartitionedParameterCoordinator__params_to_release",
        None,
    )
    # The cache, or DeepSpeed's NVTX wrapper around it (then the cache is in its closure).
    cells = [cell.cell_contents for cell in getattr(release, "__closure__", None) or ()]
    for cached in [release, *cells]:
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


@contextlib.contextmanager
def partitioned_loading(accelerator: Accelerator, role: str, placement: str) -> Iterator[None]:
    """Load the model of ``role`` partitioned (ZeRO-3's zero.Init) exactly when it will be
    sharded, so that no process ever holds more of it than its shard plus the layer being
    gathered.

    transformers partitions every model it loads while a ZeRO-3 config is registered with it
    (accelerate registers the selected plugin's). Registered here, for the one load: the
    teacher's own ZeRO-3 config when it is sharded (``zero3_offload``: its offload_param puts
    the shards straight into CPU memory), the student's when its config is ZeRO-3 with
    zero3_init_flag on, and none for a model that must load whole (a replicated teacher).
    """
    plugins = accelerator.state.deepspeed_plugins or {}
    plugin = None
    if role == TEACHER and placement.startswith("zero3"):
        plugin = plugins[TEACHER]
    elif role == STUDENT and STUDENT in plugins:
        student = plugins[STUDENT]
        if student.hf_ds_config.is_zero3() and student.is_zero3_init_enabled():
            plugin = student
    unset_hf_deepspeed_config()
    if plugin is not None:
        plugin.set_deepspeed_weakref()
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        if accelerator.state.deepspeed_plugin is not None:
            accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def agree_on_minimum(accelerator: Accelerator, values: list[float]) -> list[float]:
    """Each value's minimum over all processes (a collective: every rank must call it).

    A decision that changes which collectives run (where the teacher lives, the loss path, its
    chunk size) must be the same on every rank; taken from per-rank values (free GPU memory),
    ranks near a threshold could choose differently and then hang in mismatched collectives.
    """
    local = torch.tensor([values], dtype=torch.float64, device=accelerator.device)
    return accelerator.gather(local).min(dim=0).values.tolist()


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", which the SLURM scripts requeue on


class TrainingPreempted(Exception):
    """The run saved a complete checkpoint and stopped because it was asked to."""


class NonFiniteError(Exception):
    """A NaN or infinite loss or gradient norm, beyond what --skip_nonfinite allows."""


# Errors every rank raises at the same point, having agreed on them (at a step boundary, or in
# the checks before anything runs): the session ends in full order after them.
AGREED_STOPS = (TrainingPreempted, NonFiniteError, ConfigError)


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

    A signal can reach one rank or all of them at different moments; the trainer sends
    ``received`` with each step's collective (``trainer.agree_on_step``), so that every rank
    takes the same decision at the same step, and they all save and stop together.
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


def teacher_unneeded(cfg: TrainConfig) -> str | None:
    """Why the run loads no teacher, if it does not: --alpha 1, or a teacher cache and no
    teacher to evaluate against."""
    if cfg.alpha == 1.0:
        return "--alpha 1 trains on the labels alone: plain fine-tuning"
    if cfg.teacher_cache and not cfg.teacher_model:
        return "--teacher_cache holds its distributions"
    return None


def choose_teacher_placement(
    cfg: TrainConfig, accelerator: Accelerator, teacher_bytes: Callable[[], int]
) -> str:
    """Where the teacher goes: ``replicate``, ``zero3``, ``zero3_offload``, or ``none`` when the
    run needs no teacher (``teacher_unneeded``). Taken before any model loads (a sharded teacher
    is loaded partitioned), the same on every rank, and logged. ``teacher_bytes`` sizes the
    teacher without loading it (only ``auto`` on a GPU needs it)."""
    placement, why = cfg.teacher_placement, "asked for"
    unneeded = teacher_unneeded(cfg)
    if unneeded is not None:
        placement, why = "none", unneeded
    elif placement == "auto":
        placement, why = _auto_placement(accelerator, teacher_bytes)
    logger.info("Teacher placement: %s (%s)", placement, why)
    return placement


def _auto_placement(accelerator: Accelerator, teacher_bytes: Callable[[], int]) -> tuple[str, str]:
    if TEACHER not in (accelerator.state.deepspeed_plugins or {}):
        return "replicate", "no DeepSpeed launch to shard it with"
    if not torch.cuda.is_available():
        return "replicate", "no GPU memory to save"
    # The least free memory of any rank decides, so that every rank decides alike.
    (free_bytes,) = agree_on_minimum(accelerator, [torch.cuda.mem_get_info()[0]])
    with partitioned_loading(accelerator, TEACHER, "replicate"):  # sized as if loaded whole
        size = teacher_bytes()
    sizes = f"{size / 2**30:.1f} GiB, the least free on any process {free_bytes / 2**30:.1f} GiB"
    if size > free_bytes / 2:
        return "zero3", f"teacher {sizes}: over half"
    return "replicate", f"teacher {sizes}: fits beside the student"


def place_teacher(
    accelerator: Accelerator, teacher: torch.nn.Module, placement: str
) -> torch.nn.Module:
    """The frozen teacher, in inference mode: replicated on this rank's device, or handed to its
    own ZeRO-3 engine (it was loaded already partitioned). Call after the student is prepared:
    accelerate's DeepSpeed backward and step go to the first engine it prepared, which must be
    the student's."""
    if placement == "replicate":
        return teacher.to(accelerator.device)
    accelerator.state.select_deepspeed_plugin(TEACHER)
    engine = accelerator.prepare(teacher)
    accelerator.state.select_deepspeed_plugin(STUDENT)
    # Checkpoints and the export concern the student only: the teacher never changes, and
    # accelerate would otherwise try to save an optimizer-less engine, and read the ZeRO stage
    # of the export from the config it prepared last. (It keeps no public way to say either.)
    accelerator._models.remove(engine)
    _untracked_engines.add(engine)
    accelerator.deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
    # Calling the module (not the engine) still gathers each layer's shards: ZeRO-3's hooks
    # live on the module's layers.
    return engine.module.eval()
