"""The training loop: teacher forward -> student forward -> loss -> backward -> step.

It reads top to bottom in ``train``; the helpers above it are small and pure where they can be.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from datasets import Dataset
from deepspeed.runtime.zero import GatheredParameters
from torch.nn import Parameter
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.optimization import Adafactor

from kd_dist import faults
from kd_dist.checkpoint import (
    EVAL_RESULTS_FILE,
    METRICS_FILE,
    TRACKER_DIR,
    TrainerState,
    check_output_dir,
    drop_metrics_after,
    evaluation_logged,
    export_student,
    load_checkpoint,
    prepare_output_dir,
    read_trainer_state,
    refuse_mismatch,
    save_checkpoint,
    set_aside_abandoned,
)
from kd_dist.config import ConfigError, TrainConfig
from kd_dist.data import (
    DataSplits,
    LengthGroupedSampler,
    build_datasets,
    content_fingerprint,
    example_lengths,
    make_collator,
)
from kd_dist.data.parallel import tokenize_first
from kd_dist.engine import (
    NonFiniteError,
    PreemptionWatch,
    TrainingPreempted,
    accelerator_session,
    agree_on_minimum,
    choose_teacher_placement,
    partitioned_loading,
    place_teacher,
)
from kd_dist.evaluation import eval_loader, held_out_metrics, json_safe
from kd_dist.generation import (
    DatasetResponses,
    GeneratedResponses,
    ResponseSource,
    VllmStudent,
    check_prompts,
    sampling_settings,
)
from kd_dist.losses import (
    IGNORE_INDEX,
    LossOutput,
    distillation_loss,
    fused_distillation_loss,
    hidden_distillation_loss,
    valid_mask,
    valid_rows,
)
from kd_dist.models import (
    check_models,
    forward_outputs,
    hidden_projections,
    load_models,
    load_tokenizer,
    output_head,
    precision_dtype,
    projection_input,
    resolve_lengths,
    stop_at_end_of_turn,
    teacher_bytes,
)
from kd_dist.run_log import MetricsLog, held_parameters, run_summary
from kd_dist.teacher_cache import (
    ExamplesWithTeacher,
    TeacherCache,
    cache_identity,
    open_cache,
    with_teacher_rows,
)
from kd_dist.teacher_signal import (
    CachedTeacher,
    LiveTeacher,
    StudentAsTeacher,
    TeacherSignal,
    teacher_rows_finite,
)

logger = logging.getLogger("kd_dist")


@dataclass
class TrainResult:
    output_dir: str
    global_step: int
    last_loss: float | None
    eval_metrics: dict[str, float | None] | None


def decay_split(model: torch.nn.Module) -> tuple[dict[str, Parameter], dict[str, Parameter]]:
    """The trainable parameters, by name: (weight-decayed, not decayed).

    Only the matrices of non-embedding layers are decayed. Biases and every norm's scales are
    vectors (whatever the norm's class: LayerNorm, T5LayerNorm, LlamaRMSNorm ...), and shrinking
    an embedding pulls rarely seen tokens' rows towards zero; a tied lm_head shares its
    embedding's parameter, so it is not decayed either. A shared parameter is listed once, under
    its first name. Under ZeRO-3's zero.Init a parameter is already partitioned here (its
    ``.shape`` is empty): DeepSpeed keeps the real shape in ``ds_shape``.
    """
    embeddings = {
        id(p)
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding)
        for p in module.parameters(recurse=False)
    }
    decayed, not_decayed = {}, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        matrix = len(getattr(p, "ds_shape", p.shape)) >= 2
        (decayed if matrix and id(p) not in embeddings else not_decayed)[name] = p
    return decayed, not_decayed


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """--optimizer over ``model``'s trainable parameters, --weight_decay on ``decay_split``'s."""
    decayed, not_decayed = decay_split(model)
    # Empty groups are left out, so that every group the optimizer sees holds parameters (ZeRO
    # flattens each group into one buffer).
    groups = [
        {"params": list(params.values()), "weight_decay": weight_decay}
        for params, weight_decay in ((decayed, cfg.weight_decay), (not_decayed, 0.0))
        if params
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.9)
    # Adafactor with an external learning rate, so the warm-up/decay schedule applies to it too.
    return Adafactor(
        groups,
        lr=cfg.learning_rate,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
    )


def learning_rate_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then the decay.

    A pure function of the step, so a resumed run needs no scheduler state to continue exactly.
    """
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup_steps:
        return cfg.learning_rate * (step + 1) / warmup_steps
    if cfg.lr_scheduler == "constant":
        return cfg.learning_rate
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if cfg.lr_scheduler == "cosine":
        return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.learning_rate * (1.0 - progress)


def accumulation_windows(batches: Iterator, size: int) -> Iterator[list]:
    """Group micro-batches into optimizer steps; the last window of an epoch may be shorter."""
    while window := list(itertools.islice(batches, size)):
        yield window


@contextlib.contextmanager
def micro_batch_context(accelerator: Accelerator, model: torch.nn.Module, last: bool):
    """Synchronise (all-reduce, DeepSpeed step boundary) only on a window's last micro-batch."""
    accelerator.sync_gradients = last
    with contextlib.nullcontext() if last else accelerator.no_sync(model):
        yield


def without_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with every label masked: its loss and gradient are exactly zero, and its
    forward and backward run the same collectives as any other batch (ZeRO-3 included)."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


def mask_repeated_examples(
    batch: dict[str, torch.Tensor], first_position: int, dataset_size: int
) -> dict[str, torch.Tensor]:
    """The batch with the labels of the examples accelerate repeats masked out.

    accelerate evens out an epoch's last global batch across processes by repeating the epoch's
    first examples, so that every rank runs the same number of micro-batches (and collectives).
    A batch starting at global position ``first_position`` of the epoch holds positions
    first_position, first_position + 1, ...; those from ``dataset_size`` on are the repeats.
    Masked, they add no loss, tokens or samples, and every example counts once per epoch, while
    the rank still runs the same forward and backward as the others. (Decided from the positions
    alone, on the host: asking the device would wait for the work queued before.)
    """
    first_repeat = dataset_size - first_position  # the batch's first row that is a repeat
    if first_repeat >= len(batch["labels"]):
        return batch
    rows = torch.arange(len(batch["labels"]), device=batch["labels"].device)
    return {
        **batch,
        "labels": batch["labels"].masked_fill(rows[:, None] >= first_repeat, IGNORE_INDEX),
    }


def step_windows(
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    accelerator: Accelerator,
    first_batch: int,
    first_step: int,
    dataset_size: int,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The micro-batches of each optimizer step of an epoch, from this rank's batch
    ``first_batch`` of the epoch (optimizer step ``first_step``) on, with accelerate's repeated
    examples masked (and the ``mask_labels`` fault applied)."""
    ranks, rank = accelerator.num_processes, accelerator.process_index
    windows = accumulation_windows(batches, cfg.gradient_accumulation_steps)
    for offset, window in enumerate(windows):
        start = first_batch + offset * cfg.gradient_accumulation_steps
        # This rank's micro-batch b of the epoch is global batch b * ranks + rank.
        window = [
            mask_repeated_examples(
                batch, ((start + index) * ranks + rank) * cfg.batch_size, dataset_size
            )
            for index, batch in enumerate(window)
        ]
        if faults.wants("mask_labels", first_step + offset):
            window[0] = without_labels(window[0])
        yield window


def local_counts(
    window: list[dict[str, torch.Tensor]] | None, causal: bool, device: torch.device
) -> torch.Tensor:
    """[valid tokens, sequences with any] of this rank's micro-batches: [2] float64 on the device
    (exact to 2^53; zeros for no window). Counted on the device: nothing waits for it."""
    if window is None:
        return torch.zeros(2, dtype=torch.float64, device=device)
    valid = [valid_mask(batch["labels"], causal) for batch in window]  # [B, L'] each
    tokens = sum(mask.sum() for mask in valid)
    samples = sum(mask.any(1).sum() for mask in valid)
    return torch.stack([tokens, samples]).double()


def use_fused_loss(
    cfg: TrainConfig, student: PreTrainedModel, teacher: PreTrainedModel | None
) -> bool:
    """The fused path needs the models' output projections (``output_head``); a model family
    it does not know falls back to the logits path, with a warning."""
    models = [student] if teacher is None else [student, teacher]
    if cfg.fused_loss and any(output_head(model) is None for model in models):
        logger.warning(
            "The fused loss does not know %s; computing the loss from full logits instead.",
            "/".join(model.config.model_type for model in models),
        )
        return False
    return cfg.fused_loss


def make_micro_step(
    cfg: TrainConfig,
    accelerator: Accelerator,
    student: torch.nn.Module,
    teacher: TeacherSignal,
    vocab_size: int,
    chunk_rows: int,
    fused: bool,
    hidden_pairs: Sequence[tuple[int, int]] = (),
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """One micro-batch: the student's forward, the teacher's side (``teacher``: a live model,
    a cache, or the student itself under --alpha 1), the fused loss (or the logits loss), the
    hidden-state loss over ``hidden_pairs`` (student block, teacher block; the teacher signal
    gives its blocks' outputs), the backward. Every teacher source reads the same here.

    Returns ([kd_sum, ce_sum, hidden_sum], skipped) on the device, without waiting for them;
    the step's loss is [(1-alpha) * kd_sum + alpha * ce_sum + w * hidden_sum] / the step's
    tokens (w: --hidden_loss_weight). A micro-batch whose loss or teacher rows are not finite
    on this rank is skipped here: its backward still runs (the same collectives as on every
    other rank, and under DeepSpeed the optimizer step inside the window's last one) but
    carries an exact zero gradient, its sums are zero, and ``skipped`` is True; the step's
    collective (``agree_on_step``) then counts it on every rank. (A NaN in the student's own
    activations still shows, as a non-finite gradient norm.)
    """
    causal = cfg.task_type == "causal"
    spec = cfg.loss_spec
    student_module = accelerator.unwrap_model(student)
    # Under ZeRO-3 the fused loss uses the models' sharded output weights outside any module's
    # forward: they are gathered once for the loss *and* its backward, so that autograd hands
    # ZeRO the student's full gradient to reduce (GatheredParameters is a no-op without ZeRO-3).
    # That is their only gather: forward_hidden runs the models without their projections.
    layers = [student_module.get_output_embeddings(), *teacher.output_layers]
    output_weights = [p for layer in layers for p in layer.parameters()] if fused else []
    compute_dtype = precision_dtype(cfg)
    # The hidden-state loss's projections (student width -> teacher width; None where the
    # widths are equal) run outside any module's forward too: gathered with the output weights.
    student_blocks = [s for s, _ in hidden_pairs]
    projections = hidden_projections(student_module, len(hidden_pairs))
    gathered = output_weights + [p for layer in projections if layer for p in layer.parameters()]

    def loss(s, t, labels, num_tokens) -> LossOutput:
        if fused:
            return fused_distillation_loss(
                s, output_head(student_module), t, teacher.head(), labels, spec,
                vocab_size=vocab_size, num_tokens=num_tokens, chunk_rows=chunk_rows,
                compiled=cfg.compile_loss,
            )  # fmt: skip
        return distillation_loss(
            s, t, labels, spec, num_tokens=num_tokens, vocab_size=vocab_size,
            chunk_rows=chunk_rows, compiled=cfg.compile_loss,
        )  # fmt: skip

    def hidden_loss(
        student_states: list[torch.Tensor],
        teacher_states: list[torch.Tensor],
        labels: torch.Tensor,
        num_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden-state term (loss, sum) on the valid rows of each matched block pair."""
        # The K blocks side by side, [B, L, K * H], so one valid_rows selects them all.
        s, t, _ = valid_rows(torch.cat(student_states, -1), torch.cat(teacher_states, -1),
                             labels, causal)  # fmt: skip
        return hidden_distillation_loss(
            s.chunk(len(student_states), -1), t.chunk(len(teacher_states), -1),
            [None if layer is None else layer.weight for layer in projections],
            cfg.hidden_loss, num_tokens=num_tokens,
        )  # fmt: skip

    def micro_step(
        batch: dict[str, torch.Tensor], num_tokens: torch.Tensor, backward_scale: float, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        student_side = forward_outputs(
            student, student_module, batch, cfg.task_type, fused, student_blocks
        )  # [B, L, H or V], and [B, L, Hs] per matched block
        teacher_side = teacher.outputs(batch, student_side.outputs)  # likewise, no gradient
        teacher_out = teacher_side.outputs
        if faults.wants("nan_teacher", step) and isinstance(teacher, LiveTeacher):
            teacher_out = torch.full_like(teacher_out, math.nan)
        s, t, labels = valid_rows(student_side.outputs, teacher_out, batch["labels"], causal)
        if fused:
            s = projection_input(s, compute_dtype)
        with GatheredParameters(gathered):
            out = loss(s, t, labels, num_tokens)
            total, hidden_sum = out.loss, out.loss.new_zeros(())
            if hidden_pairs:
                hidden, hidden_sum = hidden_loss(
                    student_side.blocks, teacher_side.blocks, batch["labels"], num_tokens
                )
                total = total + cfg.hidden_loss_weight * hidden
            # The teacher's rows too: the divergences treat a NaN teacher probability like a
            # zero one (0 * log 0 = 0), so it would only surface later, in the gradient.
            finite = torch.isfinite(total) & teacher_rows_finite(t)
            # where() sends an exact zero upstream; the loss's backward keeps it exact (see
            # losses._scaled) even where the gradients it saved are NaN.
            kept = torch.where(finite, total, 0.0)
            overflow = 1e30 if faults.wants("overflow", step) else 1.0
            accelerator.backward(kept * (backward_scale * overflow))
        sums = torch.where(finite, torch.stack([out.kd_sum, out.ce_sum, hidden_sum]), 0.0)
        return sums, ~finite

    return micro_step


def count_nonfinite(cfg: TrainConfig, state: TrainerState, where: str) -> None:
    """Skip a non-finite batch or step (within --skip_nonfinite), else stop the run before
    anything more is saved (the last checkpoint stays the newest)."""
    state.skipped_nonfinite += 1
    if state.skipped_nonfinite > cfg.skip_nonfinite:
        raise NonFiniteError(
            f"{where} is not finite; stopped without saving (the last checkpoint is intact). "
            f"Skipped so far: {state.skipped_nonfinite - 1} (--skip_nonfinite "
            f"{cfg.skip_nonfinite}). Lower the learning rate, check the data, or pass a larger "
            "--skip_nonfinite, then resume with --resume_from_checkpoint latest."
        )
    logger.warning("%s is not finite: skipped (%d of at most %d).", where[0].upper() + where[1:],
                   state.skipped_nonfinite, cfg.skip_nonfinite)  # fmt: skip


def run_window(
    accelerator: Accelerator,
    student: torch.nn.Module,
    micro_step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    window: list[dict[str, torch.Tensor]],
    step_tokens: torch.Tensor,
    backward_scale: float,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's forward and backward passes, micro-batch by micro-batch, with no wait on the
    host: ([kd_sum, ce_sum, hidden_sum] over this rank's finite micro-batches, [micro-batches]
    bool: which were skipped here, see ``make_micro_step``)."""
    sums, skipped = [], []
    for index, batch in enumerate(window):
        with micro_batch_context(accelerator, student, last=index == len(window) - 1):
            batch_sums, batch_skipped = micro_step(batch, step_tokens, backward_scale, step)
        sums.append(batch_sums)
        skipped.append(batch_skipped)
    return torch.stack(sums).sum(0), torch.stack(skipped)


def gradient_norm(
    accelerator: Accelerator, student: torch.nn.Module, max_norm: float
) -> torch.Tensor | float | None:
    """The step's gradient norm, after clipping to ``max_norm`` (no clipping at infinity), kept
    on the device where it is a tensor. The same on every rank: DDP averages the gradients,
    DeepSpeed the norm. None where DeepSpeed does not compute it."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed clipped inside the window's last backward; accelerate's clip_grad_norm_
        # would hand its norm over with .item(), a wait: the engine's own value is read later.
        return student.get_global_grad_norm()
    return accelerator.clip_grad_norm_(student.parameters(), max_norm)


@dataclass
class StepReport:
    """An optimizer step as ``agree_on_step`` tells it: the same numbers on every rank."""

    tokens: int  # valid (loss) tokens of the step over all ranks: the loss's normaliser
    samples: int  # sequences with at least one of them
    kd_sum: float  # over every rank's finite micro-batches
    ce_sum: float
    hidden_sum: float
    nonfinite_ranks: list[list[int]]  # per micro-batch: the ranks that skipped it
    grad_norm: float | None
    preempted: bool  # some rank received a preemption signal
    next_counts: torch.Tensor  # [2] float64 on the device: the next step's [tokens, samples]


def agree_on_step(
    accelerator: Accelerator,
    step_counts: torch.Tensor,
    sums: torch.Tensor,
    skipped: torch.Tensor,
    next_counts: torch.Tensor,
    grad_norm: torch.Tensor | float | None,
    preempted: bool,
) -> StepReport:
    """The step's one collective and its one wait on the host, after its backward passes.

    Each rank sends [kd_sum, ce_sum, hidden_sum, next step's tokens, next step's samples,
    preempted, skipped per micro-batch]; the all-gather hands every rank all of them, so that
    each takes the same decisions (count a skip, stop, save) from the same numbers. The next
    step's counts stay on the device, as its normaliser. ``step_counts``: this step's [tokens,
    samples].
    """
    preempted_flag = sums.new_full((1,), float(preempted), dtype=torch.float64)  # no copy
    local = torch.cat([sums.double(), next_counts, preempted_flag, skipped.double()])
    gathered = accelerator.gather(local[None])  # [ranks, 6 + micro-batches]
    totals = gathered[:, :6].sum(0)
    norm = [] if grad_norm is None else [torch.as_tensor(grad_norm, device=sums.device)]
    host = torch.cat([
        step_counts, totals, *(n.double().reshape(1) for n in norm), gathered[:, 6:].t().flatten()
    ]).tolist()  # fmt: skip
    tokens, samples, kd_sum, ce_sum, hidden_sum, _, _, preempted_ranks = host[:8]
    flags = host[8 + len(norm) :]  # micro-batch by micro-batch, rank by rank
    ranks = len(gathered)
    return StepReport(
        tokens=int(tokens),
        samples=int(samples),
        kd_sum=kd_sum,
        ce_sum=ce_sum,
        hidden_sum=hidden_sum,
        nonfinite_ranks=[
            [rank for rank in range(ranks) if flags[start + rank]]
            for start in range(0, len(flags), ranks)
        ],
        grad_norm=host[8] if norm else None,
        preempted=preempted_ranks > 0,
        next_counts=totals[3:5],
    )


def take_step(
    cfg: TrainConfig,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    report: StepReport,
    step: int,
    micro_batches: int,
) -> None:
    """The non-finite policy, then the optimizer step, from the step's report: every rank has
    the same report, so all of them count, skip or stop alike."""
    for index, ranks in enumerate(report.nonfinite_ranks):
        if ranks:
            batch = state.batches_done + index
            where = f"the loss of step {step} (epoch {state.epoch}, batch {batch} of the epoch)"
            count_nonfinite(cfg, state, f"{where} on rank(s) {ranks}")
    finite_gradient = report.grad_norm is None or math.isfinite(report.grad_norm)
    if finite_gradient or cfg.fp16:  # fp16: the loss scaler skips an overflowing step
        optimizer.step()  # (under DeepSpeed its step already ran, or was discarded)
    optimizer.zero_grad(set_to_none=True)
    if cfg.fp16 and accelerator.optimizer_step_was_skipped:
        state.overflow_steps += 1
        logger.warning("fp16 overflow: step %d skipped by the loss scaler (%d so far).",
                       step, state.overflow_steps)  # fmt: skip
    elif not finite_gradient:
        batches = f"{state.batches_done}-{state.batches_done + micro_batches - 1}"
        count_nonfinite(cfg, state, f"the gradient norm ({report.grad_norm}) of step {step} "
                        f"(epoch {state.epoch}, batches {batches} of the epoch)")  # fmt: skip


def train_data_loader(
    cfg: TrainConfig, tokenized: Dataset, examples: torch.utils.data.Dataset, collate: Callable
) -> DataLoader:
    """The training batches of ``examples`` (the ``tokenized`` examples, or a view of them with
    their cached teacher rows), shuffled or (--group_by_length) length-grouped; either way the
    order is a function of (seed, epoch), which ``set_epoch`` selects.

    The loader draws its seeds from its own generator, not the global RNG that dropout uses: a
    resumed run starts an epoch's iterator mid-epoch, and must not shift dropout's stream.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.group_by_length:
        sampler = LengthGroupedSampler(example_lengths(tokenized), cfg.batch_size, cfg.seed)
        order = {"sampler": sampler}
    else:
        order = {"shuffle": True}
    return DataLoader(examples, cfg.batch_size, collate_fn=collate, generator=generator, **order)


def planned_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


def train(cfg: TrainConfig) -> TrainResult:
    """Distil ``cfg.teacher_model`` (or ``cfg.teacher_cache``) into ``cfg.student_model``; the
    student lands in output_dir."""
    cfg.validate()
    with (
        accelerator_session(cfg) as accelerator,
        PreemptionWatch(cfg.preemption_signal) as preemption,
        logging_redirect_tqdm(),  # log lines above the progress bar, not glued to it
    ):
        return run_training(cfg, accelerator, preemption)


def run_training(
    cfg: TrainConfig, accelerator: Accelerator, preemption: PreemptionWatch
) -> TrainResult:
    """The run, phase by phase: the checks and the data (no weights yet), the models, the
    evaluation, the state to start from, the optimizer steps, the export."""
    set_seed(cfg.seed)
    # Unset lengths are filled in first: the resume check compares them, and kd_config.json
    # records what ran.
    cfg = resolve_lengths(cfg)
    run = prepare_data(cfg, accelerator)
    models = prepare_models(cfg, accelerator, run)
    evaluate_now = make_evaluator(cfg, accelerator, run, models)
    state = restore_state(cfg, accelerator, run)
    if accelerator.is_main_process:
        logger.info(run_summary(cfg, accelerator, run.data, models.student, models.teacher,
                                models.total_steps, models.steps_per_epoch, models.fused,
                                run.cache))  # fmt: skip
        start_trackers(cfg, accelerator)
    metrics, last_loss, eval_metrics = train_steps(
        cfg, accelerator, preemption, run, models, state, evaluate_now
    )
    eval_metrics = finish(cfg, accelerator, run, models, state, metrics, eval_metrics,
                          evaluate_now)  # fmt: skip
    return TrainResult(cfg.output_dir, state.global_step, last_loss, eval_metrics)


@dataclass
class RunData:
    """What a run trains on, checked before any model loads."""

    tokenizer: PreTrainedTokenizerBase
    data: DataSplits
    cache: TeacherCache | None  # --teacher_cache, checked against the data
    cache_id: str | None  # its identity (``cache_identity``), which a resume must match
    train_examples: torch.utils.data.Dataset  # data.train, with the cache's rows if any
    collate: Callable  # batches train_examples
    checkpoint: Path | None  # the checkpoint to resume from
    fingerprint: str  # of the tokenized training examples


def prepare_data(cfg: TrainConfig, accelerator: Accelerator) -> RunData:
    """The output folder, tokenizer, data and teacher cache, cheapest checks first; then the
    output folder is prepared (main process)."""
    causal = cfg.task_type == "causal"
    checkpoint = check_output_dir(cfg, world_size=accelerator.num_processes)
    tokenizer = load_tokenizer(cfg)
    check_models(cfg, tokenizer)
    data = build_datasets(cfg, tokenizer, main_process_first=tokenize_first(cfg, accelerator))
    if accelerator.is_main_process:  # before the models load: mis-masked data shows at once
        logger.info(
            "%s\nFirst training example, [masked: ...] not trained on:\n%s",
            data.summary(),
            data.example,
        )
    check_prompts(cfg, data.format)
    fingerprint = content_fingerprint(data.train)
    cache = open_cache(cfg, tokenizer, data, fingerprint) if cfg.teacher_cache else None
    cache_id = None if cache is None else cache_identity(cache.manifest)
    if checkpoint is not None:
        saved = read_trainer_state(checkpoint)
        differences = []
        if saved.data_fingerprint != fingerprint:
            differences.append("the training data (its tokenized examples)")
        if saved.teacher_cache != cache_id:
            before, now = teacher_source(saved.teacher_cache), teacher_source(cache_id)
            differences.append(f"what the loss compares with ({before} -> {now})")
        refuse_mismatch(checkpoint, differences, cfg)
    if data.eval is None and (cfg.eval_steps or cfg.eval_before_training or cfg.eval_on_policy):
        raise ConfigError(
            "--eval_steps, --eval_before_training and --eval_on_policy need an eval split, and "
            "the dataset has none: pass --eval_ratio (e.g. 0.05) or --eval_split, or drop those "
            "flags."
        )
    accelerator.wait_for_everyone()  # every rank has checked output_dir before anything is written
    if accelerator.is_main_process:
        prepare_output_dir(cfg, resuming=checkpoint is not None)
    collate, examples = make_collator(tokenizer), data.train
    if cache is not None:
        collate = with_teacher_rows(collate, causal, cache.top_k)
        examples = ExamplesWithTeacher(data.train, cache.train)
    return RunData(tokenizer, data, cache, cache_id, examples, collate, checkpoint, fingerprint)


def teacher_source(cache_id: str | None) -> str:
    return "a live teacher" if cache_id is None else f"teacher cache {cache_id[:12]}"


@dataclass
class RunModels:
    """The prepared student, its optimizer and batches, its micro-step, and the plan."""

    student: torch.nn.Module  # as prepared (DDP/DeepSpeed wrapper)
    teacher: PreTrainedModel | None  # the live teacher, if one is loaded
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    micro_step: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    responses: ResponseSource  # the dataset's, or generated (--lmbda, --seq_kd)
    chunk_rows: int
    fused: bool
    steps_per_epoch: int
    total_steps: int


def prepare_models(cfg: TrainConfig, accelerator: Accelerator, run: RunData) -> RunModels:
    """Load the models (partitioned where ZeRO-3 shards them), prepare the student, its
    optimizer and batches, place the teacher, and agree on the loss's chunking."""
    placement = choose_teacher_placement(cfg, accelerator, lambda: teacher_bytes(cfg))
    models = load_models(
        cfg, run.tokenizer, loading=lambda role: partitioned_loading(accelerator, role, placement),
        with_teacher=placement != "none",
    )  # fmt: skip
    teacher = models.teacher
    if teacher is not None and placement.startswith("zero3"):
        logger.info("Teacher loaded partitioned: this process holds %d of its %d parameters",
                    *held_parameters(teacher))  # fmt: skip
    if accelerator.is_main_process:
        cfg.save(cfg.output_dir)

    loader = train_data_loader(cfg, run.data.train, run.train_examples, run.collate)
    optimizer = build_optimizer(cfg, models.student)
    student, optimizer, train_loader = accelerator.prepare(models.student, optimizer, loader)
    if any(hasattr(p, "ds_id") for p in student.parameters()):
        # ZeRO-3 (LoRA adapters, added after the partitioned loading, are partitioned by now).
        logger.info("Student partitioned: this process holds %d of its %d parameters, %d of its "
                    "%d trainable ones", *held_parameters(student),
                    *held_parameters(student, trainable_only=True))  # fmt: skip
    if cfg.group_by_length:
        # As accelerate does for its own seeded sampler: the sharded batch sampler holds it, so
        # that set_epoch reaches it on every process, through skip_first_batches too.
        train_loader.set_sampler(loader.sampler)
    # After prepare: the loader yields this process's share of each global batch.
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    if teacher is not None:
        teacher = place_teacher(accelerator, teacher, placement)
    vocab_size = len(run.tokenizer)
    # The same on every rank, whatever each one found (see agree_on_minimum).
    # With only a cache to compare with, no chunk (of the loss or the metrics) holds teacher logits.
    teacher_logits = teacher is not None or run.cache is None
    chunk_rows, fused = agree_on_minimum(accelerator, [
        cfg.chunk_rows(vocab_size, accelerator.device, precision_dtype(cfg), teacher_logits),
        use_fused_loss(cfg, accelerator.unwrap_model(student), teacher),
    ])  # fmt: skip
    chunk_rows, fused = int(chunk_rows), bool(fused)
    signal: TeacherSignal
    if run.cache is not None:
        signal = CachedTeacher(run.cache.temperature)
    elif teacher is not None:
        teacher_blocks = [t for _, t in models.hidden_pairs]
        signal = LiveTeacher(teacher, cfg.task_type, fused, accelerator.autocast, teacher_blocks)
    else:
        signal = StudentAsTeacher(accelerator.unwrap_model(student), fused)
    if models.hidden_pairs:
        logger.info("Hidden-state loss (%s, weight %g) on (student block, teacher block) %s",
                    cfg.hidden_loss, cfg.hidden_loss_weight, models.hidden_pairs)  # fmt: skip
    micro_step = make_micro_step(cfg, accelerator, student, signal, vocab_size, chunk_rows, fused,
                                 models.hidden_pairs)  # fmt: skip
    responses: ResponseSource = DatasetResponses()
    if cfg.generates:
        generators = [accelerator.unwrap_model(student), *([teacher] if cfg.seq_kd else [])]
        sampling = sampling_settings(cfg, run.tokenizer, run.data.end_of_turn_id, generators)
        use_vllm = cfg.generation_backend == "vllm" and cfg.lmbda > 0
        responses = GeneratedResponses(
            accelerator, student, teacher, sampling, lmbda=cfg.lmbda, seq_kd=cfg.seq_kd,
            seed=cfg.seed, causal=cfg.task_type == "causal",
            vllm=VllmStudent(cfg, accelerator, sampling) if use_vllm else None,
        )  # fmt: skip
    return RunModels(student, teacher, optimizer, train_loader, micro_step, responses,
                     chunk_rows, fused, steps_per_epoch,
                     planned_steps(cfg, steps_per_epoch))  # fmt: skip


def make_evaluator(
    cfg: TrainConfig, accelerator: Accelerator, run: RunData, models: RunModels
) -> Callable[[], dict[str, float | None]] | None:
    """The held-out evaluation (None without an eval split): against the live teacher when
    one is loaded, else against the cache's eval split, else the student's metrics alone."""
    if run.data.eval is None:
        return None
    examples, collate = run.data.eval, make_collator(run.tokenizer)
    signal: TeacherSignal | None = None
    if models.teacher is not None:
        signal = LiveTeacher(models.teacher, cfg.task_type, models.fused, accelerator.autocast)
    elif run.cache is not None and run.cache.eval is not None:
        signal = CachedTeacher(run.cache.temperature)
        examples = ExamplesWithTeacher(run.data.eval, run.cache.eval)
        collate = with_teacher_rows(collate, cfg.task_type == "causal", run.cache.top_k)
    elif run.cache is not None:
        logger.warning(
            "--teacher_cache %s holds no eval split and no --teacher_model is given: the "
            "evaluation measures the student alone.", run.cache.folder,
        )  # fmt: skip
    batches = eval_loader(accelerator, examples, cfg.batch_size, collate)
    options = dict(
        task_type=cfg.task_type, vocab_size=len(run.tokenizer), chunk_rows=models.chunk_rows,
        gather=accelerator.gather_for_metrics, fused=models.fused,
        compute_dtype=precision_dtype(cfg), autocast=accelerator.autocast,
    )  # fmt: skip
    on_policy = None
    if cfg.measures_on_policy:
        student = accelerator.unwrap_model(models.student)
        on_policy = sampling_settings(cfg, run.tokenizer, run.data.end_of_turn_id, [student])
    return functools.partial(
        held_out_metrics, accelerator, models.student, signal, models.teacher, batches,
        on_policy, cfg.seed, **options,
    )  # fmt: skip


def restore_state(cfg: TrainConfig, accelerator: Accelerator, run: RunData) -> TrainerState:
    """A fresh state, or the checkpoint's (student, optimizer, RNG, position in the data)."""
    state = TrainerState()
    if run.checkpoint is not None:
        state = load_checkpoint(accelerator, run.checkpoint)
    # What the next checkpoint records (after --allow_resume_mismatch: this run's values).
    state.world_size, state.data_fingerprint = accelerator.num_processes, run.fingerprint
    state.teacher_cache = run.cache_id
    if run.checkpoint is not None:
        if accelerator.is_main_process:
            drop_metrics_after(cfg.output_dir, state.global_step)
            set_aside_abandoned(cfg.output_dir, run.checkpoint, state.global_step)
        logger.info("Resumed from %s at step %d", run.checkpoint, state.global_step)
    return state


def start_trackers(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """--report_to's tracker (main process), writing under output_dir."""
    if cfg.report_to != "none":
        (Path(cfg.output_dir) / TRACKER_DIR).mkdir(exist_ok=True)
    accelerator.init_trackers(
        "kd_dist",
        config={k: v for k, v in cfg.to_dict().items() if v is not None},
        init_kwargs={"wandb": {"dir": str(Path(cfg.output_dir) / TRACKER_DIR)}},
    )


def train_steps(
    cfg: TrainConfig,
    accelerator: Accelerator,
    preemption: PreemptionWatch,
    run: RunData,
    models: RunModels,
    state: TrainerState,
    evaluate_now: Callable[[], dict[str, float | None]] | None,
) -> tuple[MetricsLog, float | None, dict[str, float | None] | None]:
    """The optimizer steps from ``state`` on, epoch by epoch, with logging, evaluation and
    checkpoints: (the metrics log, the last step's loss, the last evaluation's metrics)."""
    causal = cfg.task_type == "causal"
    total_steps, train_loader = models.total_steps, models.train_loader
    resumed = run.checkpoint is not None
    progress = tqdm(
        total=total_steps,
        initial=state.global_step,
        disable=not accelerator.is_main_process,
        desc="distilling",
    )
    metrics = MetricsLog(Path(cfg.output_dir) / METRICS_FILE, progress, accelerator)
    last_loss = None
    saved_at = state.global_step if resumed else -1  # never save a step twice
    eval_metrics = None
    if resumed and evaluation_logged(cfg.output_dir, state.global_step):
        metrics.evaluated_at = state.global_step
    if evaluate_now and cfg.eval_before_training and state.global_step == 0:
        eval_metrics = metrics.log_eval(0, state.epoch, evaluate_now)

    # An optimizer step waits on the host once and runs one small collective of its own, at its
    # end (agree_on_step): every decision that must be the same on every rank is taken there.
    # (A step that generates its responses also counts its tokens once they are written.)
    # accelerate divides each backward by the accumulation steps and DDP/ZeRO average over
    # ranks; this undoes both so the step's gradient is sum(loss) / the step's tokens.
    backward_scale = cfg.gradient_accumulation_steps * accelerator.num_processes
    while state.global_step < total_steps:
        # Each epoch's order is a function of (seed, epoch); a resumed epoch skips what was seen.
        epoch_loader = accelerator.skip_first_batches(train_loader, state.batches_done)
        epoch_loader.set_epoch(state.epoch)
        windows = step_windows(
            iter(epoch_loader), cfg, accelerator, first_batch=state.batches_done,
            first_step=state.global_step + 1, dataset_size=len(run.data.train),
        )  # fmt: skip
        # [tokens, samples] of the coming step over all ranks, on the device. The loss is
        # normalised by the valid tokens of the whole optimizer step, over every micro-batch and
        # rank, so the gradient does not depend on how the step's batch was split; each step's
        # collective counts the next one's (whose window is drawn a step ahead for it).
        step_counts = None
        for window, upcoming in itertools.pairwise(itertools.chain(windows, [None])):
            if state.global_step >= total_steps:  # --max_steps reached mid-epoch
                break
            step = state.global_step + 1  # 1-based, as logged
            faults.trace_examples(step, state.epoch, window, causal)
            # --lmbda / --seq_kd: generated responses replace the dataset's (on every rank the
            # same micro-batches), so this step's tokens are counted after them.
            window = models.responses.fill(window, step)
            count_ahead = not models.responses.generates  # else counted once generated
            if step_counts is None:  # an epoch's first step, or a generated window
                step_counts = accelerator.reduce(
                    local_counts(window, causal, accelerator.device), reduction="sum"
                )
            # Set before the backward passes: DeepSpeed steps inside the window's last one.
            learning_rate = learning_rate_at(state.global_step, cfg, total_steps)
            for group in models.optimizer.param_groups:
                group["lr"] = learning_rate
            sums, skipped = run_window(
                accelerator, models.student, models.micro_step, window, step_counts[0],
                backward_scale, step,
            )  # fmt: skip
            grad_norm = gradient_norm(accelerator, models.student, cfg.clip_grad_norm or math.inf)
            faults.after_step(step)  # injected signals and hangs land before the agreement
            report = agree_on_step(
                accelerator, step_counts, sums, skipped,
                next_counts=local_counts(upcoming if count_ahead else None, causal,
                                         accelerator.device),
                grad_norm=grad_norm, preempted=preemption.received is not None,
            )  # fmt: skip
            step_counts = report.next_counts if count_ahead else None
            take_step(cfg, accelerator, models.optimizer, state, report, step, len(window))
            progress.update(1)

            state.global_step += 1
            state.batches_done += len(window)
            kd, ce, hidden = (
                total / max(report.tokens, 1)
                for total in (report.kd_sum, report.ce_sum, report.hidden_sum)
            )
            last_loss = (1 - cfg.alpha) * kd + cfg.alpha * ce + cfg.hidden_loss_weight * hidden
            metrics.count(report.tokens, report.samples)
            if state.global_step % cfg.logging_steps == 0 or state.global_step == total_steps:
                metrics.log(
                    step=state.global_step, epoch=state.epoch, loss=last_loss, kd_loss=kd,
                    ce_loss=ce, hidden_loss=hidden, lr=learning_rate, grad_norm=report.grad_norm,
                    **models.responses.report(),
                )  # fmt: skip
            if evaluate_now and cfg.eval_steps and state.global_step % cfg.eval_steps == 0:
                eval_metrics = metrics.log_eval(state.global_step, state.epoch, evaluate_now)
            if cfg.save_steps and state.global_step % cfg.save_steps == 0:
                with metrics.paused():
                    save_checkpoint(accelerator, cfg, state)
                saved_at = state.global_step
            if report.preempted:
                if saved_at != state.global_step:
                    save_checkpoint(accelerator, cfg, state)
                raise TrainingPreempted(
                    f"stopped at step {state.global_step} on request, after saving a checkpoint. "
                    "Run the same command with --resume_from_checkpoint latest (or auto) to "
                    "continue."
                )
        else:  # the epoch ran to its end
            state.epoch += 1
            state.batches_done = 0
            epoch_save_due = cfg.save_every and state.epoch % cfg.save_every == 0
            if epoch_save_due and saved_at != state.global_step:
                with metrics.paused():
                    save_checkpoint(accelerator, cfg, state)
                saved_at = state.global_step
    progress.close()
    return metrics, last_loss, eval_metrics


def finish(
    cfg: TrainConfig,
    accelerator: Accelerator,
    run: RunData,
    models: RunModels,
    state: TrainerState,
    metrics: MetricsLog,
    eval_metrics: dict[str, float | None] | None,
    evaluate_now: Callable[[], dict[str, float | None]] | None,
) -> dict[str, float | None] | None:
    """The final evaluation (unless the last step had one) and the student's export."""
    if evaluate_now and metrics.evaluated_at != state.global_step:
        eval_metrics = metrics.log_eval(state.global_step, state.epoch, evaluate_now)
    # (None when a resumed run had already evaluated its last step: its file is written.)
    if eval_metrics is not None and accelerator.is_main_process:
        (Path(cfg.output_dir) / EVAL_RESULTS_FILE).write_text(
            json.dumps(json_safe(eval_metrics), indent=2) + "\n"
        )
    stop_at_end_of_turn(accelerator.unwrap_model(models.student), run.data.end_of_turn_id)
    export_student(accelerator, models.student, run.tokenizer, cfg, state)
    return eval_metrics
