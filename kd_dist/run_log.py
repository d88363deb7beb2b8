"""What a run reports while it trains: metrics.jsonl lines, the trackers (--report_to), the
progress bar's numbers, and the start-up summary (main process only)."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from kd_dist.config import TrainConfig
from kd_dist.data import DataSplits
from kd_dist.evaluation import format_metric, has_teacher, json_safe
from kd_dist.teacher_cache import TeacherCache

logger = logging.getLogger("kd_dist")


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far: allocated on its GPU, or resident in RAM on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class MetricsLog:
    """metrics.jsonl lines, the trackers (--report_to) and the progress bar (main process only).

    ``tokens_per_s`` counts the tokens that enter the loss and ``samples_per_s`` the sequences,
    of all processes, over the training time since the last line (evaluation time excluded).
    """

    def __init__(self, path: Path, progress: tqdm, accelerator: Accelerator) -> None:
        self.path, self.progress, self.accelerator = path, progress, accelerator
        self.enabled = accelerator.is_main_process
        self.tokens, self.samples, self.since = 0, 0, time.perf_counter()
        self.evaluated_at = -1  # the step of the last evaluation logged (-1: none)

    def count(self, tokens: int, samples: int) -> None:
        self.tokens += tokens
        self.samples += samples

    def log(self, **record: float | int | None) -> None:
        now = time.perf_counter()
        record["tokens_per_s"] = self.tokens / max(now - self.since, 1e-9)
        record["samples_per_s"] = self.samples / max(now - self.since, 1e-9)
        record["peak_memory_mb"] = peak_memory_mb(self.accelerator.device)
        self.tokens, self.samples, self.since = 0, 0, now
        generation = {}
        if "generation_tokens_per_s" in record:  # --lmbda / --seq_kd
            generation["gen_tok_s"] = f"{record['generation_tokens_per_s']:.0f}"
        self.progress.set_postfix(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            **generation,
        )
        self._write(record)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluating, saving a checkpoint) is not training throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.since += time.perf_counter() - start

    def log_eval(self, step: int, epoch: int, run: Callable[[], dict[str, float | None]]) -> dict:
        """Run an evaluation (on every rank) and log its metrics, prefixed ``eval_``."""
        start = time.perf_counter()
        with self.paused():
            metrics = run()
        seconds = time.perf_counter() - start
        record = {"step": step, "epoch": epoch, **{f"eval_{k}": v for k, v in metrics.items()}}
        record["eval_seconds"] = seconds
        self.evaluated_at = step
        if self.enabled:
            logger.info("Evaluation at step %d: %s", step, _format_metrics(metrics))
        self._write(record)
        return metrics

    def _write(self, record: dict) -> None:
        if self.enabled:
            finite = json_safe(record)
            with self.path.open("a") as handle:
                handle.write(json.dumps(finite) + "\n")
            numbers = {k: v for k, v in finite.items() if isinstance(v, (int, float))}
            self.accelerator.log(numbers, step=record["step"])


def _format_metrics(metrics: dict[str, float | None]) -> str:
    tokens = f"over {metrics['tokens']} tokens"
    if not has_teacher(metrics):  # --alpha 1: no teacher was loaded to compare with
        return f"student ppl {metrics['student_ppl']:.3f} {tokens} (no teacher to compare with)"
    # A teacher cache keeps no teacher perplexity (format_metric shows n/a).
    line = (
        f"student ppl {metrics['student_ppl']:.3f} (teacher "
        f"{format_metric(metrics['teacher_ppl'], '.3f')}), "
        f"KL to teacher {metrics['kl_to_teacher']:.4f}, "
        f"top-1 agreement {metrics['top1_agreement']:.1%} {tokens}"
    )
    if "on_policy_teacher_nll" in metrics:  # --eval_on_policy
        line += (
            f"; on the student's own completions: teacher NLL "
            f"{metrics['on_policy_teacher_nll']:.4f}, reverse KL "
            f"{metrics['on_policy_reverse_kl']:.4f} over {metrics['on_policy_tokens']} tokens"
        )
    return line


def parameter_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``model``, ZeRO-3 shards counted at their full size."""
    return sum(
        getattr(p, "ds_numel", p.numel())
        for p in model.parameters()
        if p.requires_grad or not trainable_only
    )


def held_parameters(model: torch.nn.Module, trainable_only: bool = False) -> tuple[int, int]:
    """(parameters this process holds, all of the model's): ZeRO-3 shards at their shard size."""
    held = sum(
        getattr(p, "ds_tensor", p).numel()
        for p in model.parameters()
        if p.requires_grad or not trainable_only
    )
    return held, parameter_count(model, trainable_only)


def weights(model: PreTrainedModel) -> str:
    """A model's family, parameters, weight dtype(s) and their size: "llama, 1,024 parameters,
    bfloat16, 0.00 GB" (a model keeping some modules in fp32 lists both dtypes)."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    size = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    return (
        f"{model.config.model_type}, {parameter_count(model):,} parameters, "
        f"{'/'.join(dtypes)}, {size / 1e9:.2f} GB"
    )


def run_summary(
    cfg: TrainConfig,
    accelerator: Accelerator,
    data: DataSplits,
    student: torch.nn.Module,
    teacher: PreTrainedModel | None,
    total_steps: int,
    steps_per_epoch: int,
    fused: bool,
    cache: TeacherCache | None = None,
) -> str:
    """The start-up summary: the models and where they run, the size of a step, the plan."""
    student = accelerator.unwrap_model(student)
    plugin = accelerator.state.deepspeed_plugin
    zero = f"ZeRO stage {plugin.zero_stage}" if plugin is not None else "no ZeRO"
    if teacher is None:
        teacher_line = f"  teacher  {cfg.teacher_model}: not loaded (--alpha 1: plain fine-tuning)"
    else:
        sharded = any(hasattr(p, "ds_id") for p in teacher.parameters())
        teacher_line = f"  teacher  {cfg.teacher_model} ({weights(teacher)}), " + (
            "sharded by its ZeRO-3 engine" if sharded else "replicated per process"
        )
    if cache is not None:
        manifest = cache.manifest
        teacher_line = (
            f"  teacher  cache {cache.folder} of {manifest['teacher_model']} (top-"
            f"{manifest['top_k']} + tail, temperature {manifest['temperature']}); "
            + ("evaluated against the live teacher" if teacher is not None else "not loaded")
        )
    sequences = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    label_length = cfg.max_target_length if cfg.task_type == "seq2seq" else cfg.max_length
    if data.eval is None:
        evaluation = "no eval split"
    else:
        every = f"every {plural(cfg.eval_steps, 'step')} and " if cfg.eval_steps else ""
        evaluation = f"evaluated {every}at the end" + (
            ", and before training" if cfg.eval_before_training else ""
        )
    return "\n".join(
        [
            "Run summary",
            teacher_line,
            f"  student  {cfg.student_model} ({weights(student)}, "
            f"{parameter_count(student, trainable_only=True):,} trainable"
            + (f": LoRA adapters of rank {cfg.lora_r}" if cfg.lora else "")
            + (" on a 4-bit base" if cfg.load_in_4bit else "")
            + (", activation checkpointing" if cfg.gradient_checkpointing else "")
            + ")",
            f"  launch   {accelerator.num_processes} process(es) ({accelerator.distributed_type}), "
            f"{zero}, precision {cfg.mixed_precision if cfg.mixed_precision != 'no' else 'fp32'}",
            f"  batch    {cfg.batch_size} per process x {cfg.gradient_accumulation_steps} "
            f"accumulation x {accelerator.num_processes} process(es) = {sequences} sequences "
            f"per optimizer step, at most {sequences * label_length:,} loss tokens per step",
            f"  data     {cfg.dataset}: {data.format} format, "
            f"{data.stats['train_examples']:,} train / {data.stats['eval_examples']:,} eval "
            "examples",
            f"  loss     {cfg.loss}, temperature {cfg.temperature}, alpha {cfg.alpha}, "
            + ("fused (no full logits)" if fused else "from full logits"),
            f"  plan     {plural(total_steps, 'optimizer step')} ({steps_per_epoch} per epoch; "
            + ("--max_steps" if cfg.max_steps is not None else plural(cfg.epochs, "epoch"))
            + f"), logged every "
            f"{plural(cfg.logging_steps, 'step')}, " + evaluation,
        ]
    )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
