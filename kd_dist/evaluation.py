"""Held-out metrics of a student against its teacher, at temperature 1, without gradients.

- student and teacher cross-entropy on the ground-truth tokens (seq2seq: the target tokens), and
  their perplexities;
- KL(teacher || student) at temperature 1;
- top-1 agreement: how often the student's most likely token is the teacher's.

Against a teacher cache (``kd-dist train --teacher_cache`` without a --teacher_model) the KL is
over the cache's k + 1 outcomes (its top-k tokens and the rest) at the cache's temperature, the
agreement is with its most likely token, and the teacher's cross-entropy is None (not stored).

A run without a teacher (--alpha 1: plain fine-tuning, the teacher never loads) is measured on
the student's cross-entropy and perplexity alone; the teacher's metrics are None (null in JSON),
not values of the student against itself.

One function, ``evaluate``, computes them for the evaluation during training, ``kd-dist eval``
(``evaluate_saved``) and the demo's table.

Memory: like the training loss, the metrics never build a batch's [tokens x vocab] logits. Both
models return their final hidden states and each chunk of rows is projected to logits, measured
and freed (``logit_chunks``); a model family the fused path does not know (``output_head`` is
None) returns its logits, which are still measured chunk by chunk.

Distributed: the sums are kept per example, so that the duplicates accelerate adds to even out the
last batch across processes are dropped (``gather_for_metrics``) before anything is added up. The
metrics are sums over the real examples of all ranks divided by their token count, never an
average of per-rank averages.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from accelerate import Accelerator
from deepspeed.runtime.zero import GatheredParameters
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from kd_dist.config import ConfigError, TrainConfig
from kd_dist.data import build_datasets, make_collator
from kd_dist.data.parallel import tokenize_first
from kd_dist.engine import accelerator_session, deepspeed_launch
from kd_dist.generation import Sampling, check_prompts, generated_batches, sampling_settings
from kd_dist.lora import adapter_base, merged_adapter
from kd_dist.losses import (
    TopKTeacher,
    logit_chunks,
    plogx,
    softmax_and_log_softmax,
    top_k_outcomes,
    valid_mask,
    valid_rows,
)
from kd_dist.models import (
    check_models,
    forward_outputs,
    load_models,
    load_tokenizer,
    output_head,
    precision_dtype,
    projection_input,
    resolve_lengths,
)
from kd_dist.teacher_signal import CachedTeacher, LiveTeacher, TeacherSignal

logger = logging.getLogger("kd_dist")

# Per-example sums, in this order; the metrics are ratios of their totals. Without a teacher its
# three columns stay 0 (never computed) and its metrics are reported as None.
METRIC_SUMS = ("student_ce", "teacher_ce", "kl", "reverse_kl", "agreement", "tokens")
TEACHER_KEYS = (
    "teacher_ce",
    "teacher_ppl",
    "kl_to_teacher",
    "reverse_kl_to_teacher",
    "top1_agreement",
)
# The keys of ``evaluate``'s result.
METRIC_KEYS = (
    "student_ce",
    "student_ppl",
    "teacher_ce",
    "teacher_ppl",
    "kl_to_teacher",
    "reverse_kl_to_teacher",
    "top1_agreement",
    "tokens",
)
# ``evaluate_on_policy``'s keys (--eval_on_policy): the teacher's mean NLL of the student's own
# sampled completions of the held-out prompts, the reverse KL(student || teacher) on them, and
# their number of tokens.
ON_POLICY_KEYS = ("on_policy_teacher_nll", "on_policy_reverse_kl", "on_policy_tokens")


def row_metrics(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopKTeacher | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[C, V] fp32 student logits, the teacher's [C, V] fp32 logits (or its cached top-k rows)
    and [C] labels -> [C, 5]: student NLL, teacher NLL, KL(teacher || student), KL(student ||
    teacher) and top-1 agreement (0/1) of each row; no teacher (None) -> [C, 1], the student
    NLL alone.

    Against cached rows, the KL is over their k + 1 outcomes at the cache's ``temperature``
    (``top_k_outcomes``), the teacher's NLL is not known (0 here, None in the metrics), and its
    most likely token is its first stored one."""
    log_q = torch.log_softmax(student_logits, dim=-1)
    student_nll = -log_q.gather(-1, labels[:, None]).squeeze(-1)
    if teacher is None:
        return student_nll[:, None]
    if isinstance(teacher, TopKTeacher):
        log_q_bar, log_p_bar, _ = top_k_outcomes(
            torch.log_softmax(student_logits / temperature, dim=-1), teacher
        )
        return torch.stack(
            [
                student_nll,
                torch.zeros_like(student_nll),
                plogx(log_p_bar.exp(), log_p_bar - log_q_bar),
                plogx(log_q_bar.exp(), log_q_bar - log_p_bar),
                (student_logits.argmax(-1) == teacher.ids[:, 0]).float(),
            ],
            dim=-1,
        )
    p, log_p = softmax_and_log_softmax(teacher)
    return torch.stack(
        [
            student_nll,
            -log_p.gather(-1, labels[:, None]).squeeze(-1),
            plogx(p, log_p - log_q),
            plogx(log_q.exp(), log_q - log_p),
            (student_logits.argmax(-1) == teacher.argmax(-1)).float(),
        ],
        dim=-1,
    )


def batch_sums(
    student: PreTrainedModel,
    teacher: TeacherSignal | None,
    batch: dict[str, torch.Tensor],
    *,
    task_type: str,
    vocab_size: int,
    chunk_rows: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    fused: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[B, 6] float64 sums of one batch's examples, in METRIC_SUMS order. ``fused``: project
    hidden states chunk by chunk (--fused_loss; the teacher's signal was made alike), else chunk
    the models' own logits; the student's are projected in ``compute_dtype``, as in training
    (``projection_input``). The metrics' math is fp32 either way. No teacher (None): the
    student's forward alone, and its NLL; the teacher's columns stay 0."""
    causal = task_type == "causal"
    with autocast():
        # [B, L, H] (fused) or [B, L, V]
        student_out = forward_outputs(student, student, batch, task_type, fused).outputs
    teacher_out = None if teacher is None else teacher.outputs(batch, student_out).outputs
    mask = valid_mask(batch["labels"], causal)  # [B, L']
    example_of_row = mask.nonzero()[:, 0]  # [N]: which example each valid row belongs to
    s, t, labels = valid_rows(student_out, teacher_out, batch["labels"], causal)
    if fused:
        s = projection_input(s, compute_dtype)
    row_sums = torch.zeros(mask.shape[0], 5, dtype=torch.float64, device=mask.device)
    # Under ZeRO-3 the output weights are shards: gathered while the chunks are projected.
    layers = [student.get_output_embeddings(), *(teacher.output_layers if teacher else [])]
    weights = [p for layer in layers for p in layer.parameters()] if fused else []
    cached = t if isinstance(t, TopKTeacher) else None  # top-k rows: sliced, not projected
    temperature = teacher.temperature if isinstance(teacher, CachedTeacher) else 1.0
    with GatheredParameters(weights):
        chunks = logit_chunks(
            s, None if cached is not None else t, vocab_size=vocab_size, chunk_rows=chunk_rows,
            student_head=output_head(student) if fused else None,
            teacher_head=teacher.head() if teacher is not None else None,
        )  # fmt: skip
        # The metrics' math makes about 6 fp32 [rows x V] temporaries: on a quarter of a chunk
        # at a time they stay smaller than the chunk's own two [C x V] logits.
        block = max(1, chunk_rows // 4)
        for rows, student_logits, teacher_logits in chunks:
            for start in range(0, student_logits.shape[0], block):
                part = slice(start, start + block)
                teacher_part = cached[rows][part] if cached is not None else (
                    None if teacher_logits is None else teacher_logits[part]
                )  # fmt: skip
                values = row_metrics(
                    student_logits[part], teacher_part, labels[rows][part], temperature
                )
                # [B, 5], or its first column without a teacher (a view: added in place)
                row_sums[:, : values.shape[1]].index_add_(
                    0, example_of_row[rows][part], values.double()
                )
    return torch.cat([row_sums, mask.sum(1, keepdim=True).double()], dim=1)


def metrics_from_sums(
    sums: torch.Tensor, with_teacher: bool = True, teacher_ce: bool = True
) -> dict[str, float | None]:
    """Means over all valid tokens from the [6] totals (an empty set gives zeros, not NaN);
    ``with_teacher=False``: the teacher's metrics are None (there was none to measure);
    ``teacher_ce=False``: its cross-entropy and perplexity are (a cache does not keep them)."""
    totals = dict(zip(METRIC_SUMS, sums.tolist(), strict=True))
    tokens = max(totals["tokens"], 1.0)
    student_ce = totals["student_ce"] / tokens
    metrics = {
        "student_ce": student_ce,
        "student_ppl": perplexity(student_ce),
        **dict.fromkeys(TEACHER_KEYS),
        "tokens": int(totals["tokens"]),
    }
    if with_teacher:
        metrics.update(
            kl_to_teacher=totals["kl"] / tokens,
            reverse_kl_to_teacher=totals["reverse_kl"] / tokens,
            top1_agreement=totals["agreement"] / tokens,
        )
    if with_teacher and teacher_ce:
        teacher_ce_value = totals["teacher_ce"] / tokens
        metrics.update(teacher_ce=teacher_ce_value, teacher_ppl=perplexity(teacher_ce_value))
    return metrics


def has_teacher(metrics: dict[str, Any]) -> bool:
    """Whether ``metrics`` (``evaluate``'s keys) measured a teacher. Top-1 agreement is a
    fraction, always finite: None (null) only where there was no teacher (--alpha 1)."""
    return metrics["top1_agreement"] is not None


def perplexity(cross_entropy: float) -> float:
    return math.exp(cross_entropy) if cross_entropy < 700 else math.inf


@torch.no_grad()
def evaluate(
    student: PreTrainedModel,
    teacher: PreTrainedModel | TeacherSignal | None,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    task_type: str,
    vocab_size: int,
    chunk_rows: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums,
    fused: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, float | None]:
    """Student-vs-teacher metrics over ``batches`` (means over the valid tokens of all ranks).

    ``student`` and ``teacher`` are the models themselves (not DDP/DeepSpeed wrappers), or the
    teacher's signal (a ``CachedTeacher``: its batches carry the cached rows); no teacher (None,
    --alpha 1) gives the student's metrics and None for the teacher's;
    ``autocast`` is entered around their forwards; ``gather`` collects every rank's [B, 6]
    per-example sums and drops padding duplicates (``accelerator.gather_for_metrics``);
    ``compute_dtype`` is the run's mixed precision (``precision_dtype``), which the fused path
    projects the student's hidden states in.
    """
    if isinstance(teacher, torch.nn.Module):
        models = [student, teacher]
        fused = fused and all(output_head(model) is not None for model in models)
        teacher = LiveTeacher(teacher, task_type, fused, autocast)
    elif teacher is None:
        fused = fused and output_head(student) is not None
    was_training = student.training
    student.eval()
    totals = torch.zeros(len(METRIC_SUMS), dtype=torch.float64)
    try:
        for batch in batches:
            sums = batch_sums(
                student, teacher, batch, task_type=task_type, vocab_size=vocab_size,
                chunk_rows=chunk_rows, autocast=autocast, fused=fused, compute_dtype=compute_dtype,
            )  # fmt: skip
            totals += gather(sums).sum(0).cpu()
    finally:
        student.train(was_training)
    return metrics_from_sums(
        totals, with_teacher=teacher is not None, teacher_ce=not isinstance(teacher, CachedTeacher)
    )


def evaluate_on_policy(
    accelerator: Accelerator,
    student: torch.nn.Module,
    teacher: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    sampling: Sampling,
    seed: int,
    **options: Any,
) -> dict[str, float | None]:
    """--eval_on_policy: how the teacher judges what the student writes itself. The student
    (as prepared: under ZeRO-3 it is gathered for generation) samples a completion of each
    held-out prompt of ``batches`` (seeded by ``seed``, the batch and the rank, so every
    evaluation samples alike); the teacher scores those tokens: its mean NLL of them (lower: the
    teacher finds them likelier) and the reverse KL(student || teacher) at those positions, over
    every rank's completions. ``options``: ``evaluate``'s keyword arguments."""
    # Generating takes the time here: its progress is shown (main process).
    shown = tqdm(batches, desc="on-policy eval: generating", leave=False,
                 disable=not accelerator.is_main_process)  # fmt: skip
    generated = generated_batches(
        accelerator, student, shown, sampling, seed, options["task_type"] == "causal"
    )
    metrics = evaluate(accelerator.unwrap_model(student), teacher, generated, **options)
    values = (metrics["teacher_ce"], metrics["reverse_kl_to_teacher"], metrics["tokens"])
    return dict(zip(ON_POLICY_KEYS, values, strict=True))


def held_out_metrics(
    accelerator: Accelerator,
    student: torch.nn.Module,
    teacher: PreTrainedModel | TeacherSignal | None,
    teacher_model: PreTrainedModel | None,
    batches: Iterable[dict[str, torch.Tensor]],
    on_policy: Sampling | None,
    seed: int,
    **options: Any,
) -> dict[str, float | None]:
    """``evaluate``'s metrics of ``student`` (as prepared) against ``teacher`` (a model or its
    signal), and with ``on_policy`` sampling (--eval_on_policy) ``evaluate_on_policy``'s of its
    own completions, scored by ``teacher_model``. ``options``: ``evaluate``'s keyword arguments."""
    metrics = evaluate(accelerator.unwrap_model(student), teacher, batches, **options)
    if on_policy is not None:
        metrics |= evaluate_on_policy(
            accelerator, student, teacher_model, batches, on_policy, seed, **options
        )
    return metrics


def eval_loader(
    accelerator: Accelerator,
    examples: torch.utils.data.Dataset,
    batch_size: int,
    collate: Callable,
) -> DataLoader:
    """This process's share of ``examples``, in order. accelerate's ``even_batches`` pads the
    last batch with repeated examples, which ``gather_for_metrics`` drops before anything is
    summed. The loader has its own generator: one without draws a seed from the global RNG at
    each pass, which would shift dropout's stream and make evaluating mid-run change training."""
    loader = DataLoader(
        examples, batch_size=batch_size, collate_fn=collate, generator=torch.Generator()
    )
    return accelerator.prepare_data_loader(loader)


def evaluate_saved(cfg: TrainConfig) -> dict[str, float]:
    """``kd-dist eval``: the metrics of a saved student against its teacher on ``cfg.dataset``.

    The examples are the eval split a training run with the same flags would hold out (its
    --eval_split, a validation/test split, or the --eval_ratio share by --seed); a dataset with
    none of these is evaluated whole (its --dataset_split). Both models are replicated on every
    process; under a launcher, each process evaluates its share of the examples.
    """
    cfg.validate()
    if deepspeed_launch():
        raise ConfigError(
            "kd-dist eval replicates both models on every process and does not run under a "
            "DeepSpeed config: launch it with torchrun or accelerate launch --multi_gpu."
        )
    # A LoRA run's adapter folder: its base student is loaded, and the adapter merged into it.
    base, adapter = adapter_base(cfg.student_model), cfg.student_model
    if base is None:
        adapter = None
    else:
        cfg = replace(cfg, student_model=base)
    cfg = resolve_lengths(cfg)
    with accelerator_session(cfg) as accelerator:
        tokenizer = load_tokenizer(cfg)
        check_models(cfg, tokenizer)
        data = build_datasets(cfg, tokenizer, main_process_first=tokenize_first(cfg, accelerator))
        check_prompts(cfg, data.format)
        examples = data.eval
        if examples is None:
            logger.warning(
                "%s has no eval split: evaluating its --dataset_split %r whole, which may hold "
                "examples the student was trained on. Pass --eval_ratio or --eval_split as in "
                "training for held-out numbers.",
                cfg.dataset, cfg.dataset_split,
            )  # fmt: skip
            examples = data.train
            if cfg.max_eval_samples is not None and cfg.max_eval_samples < len(examples):
                examples = examples.select(range(cfg.max_eval_samples))
        logger.info(
            "Evaluating %s against %s on %d examples (%s format)",
            adapter or cfg.student_model, cfg.teacher_model, len(examples), data.format,
        )  # fmt: skip
        models = load_models(cfg, tokenizer)
        student = models.student if adapter is None else merged_adapter(models.student, adapter)
        student = student.to(accelerator.device)
        teacher = models.teacher.to(accelerator.device)
        batches = eval_loader(accelerator, examples, cfg.batch_size, make_collator(tokenizer))
        options = dict(
            task_type=cfg.task_type, vocab_size=len(tokenizer),
            chunk_rows=cfg.chunk_rows(len(tokenizer), accelerator.device, precision_dtype(cfg)),
            autocast=accelerator.autocast, gather=accelerator.gather_for_metrics,
            fused=cfg.fused_loss, compute_dtype=precision_dtype(cfg),
        )  # fmt: skip
        on_policy = None
        if cfg.measures_on_policy:
            on_policy = sampling_settings(cfg, tokenizer, data.end_of_turn_id, [student])
        return held_out_metrics(
            accelerator, student, teacher, teacher, batches, on_policy, cfg.seed, **options
        )


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with each NaN or infinity as None: JSON has neither (strict parsers reject
    ``Infinity``), and an untrained student's perplexity can overflow."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }


def format_metric(value: float | None, spec: str) -> str:
    """A metric for a table or a sentence; metrics.jsonl holds null for an infinite one."""
    return "n/a" if value is None else format(value, spec)


def metrics_table(results: dict[str, dict[str, float | None]], markdown: bool = False) -> str:
    """Students' metrics side by side, the teacher's perplexity as the last row (if any).

    ``results`` maps a name to ``evaluate``'s output; plain text for a console, or Markdown.
    """

    header = ["model", "cross-entropy", "perplexity", "KL to teacher", "top-1 agreement"]
    # --eval_on_policy: the teacher's judgement of what each student writes itself.
    on_policy = all(ON_POLICY_KEYS[0] in m for m in results.values())
    if on_policy:
        header += ["teacher NLL of own samples", "reverse KL on own samples"]
    rows = [
        [
            name,
            format_metric(m["student_ce"], ".4f"),
            format_metric(m["student_ppl"], ".3f"),
            format_metric(m["kl_to_teacher"], ".4f"),
            format_metric(m["top1_agreement"], ".1%"),
            *([format_metric(m[key], ".4f") for key in ON_POLICY_KEYS[:2]] if on_policy else []),
        ]
        for name, m in results.items()
    ]
    reference = next(iter(results.values()))
    if has_teacher(reference):  # a run without one (--alpha 1) has no teacher row to show
        teacher = [
            format_metric(reference["teacher_ce"], ".4f"),
            format_metric(reference["teacher_ppl"], ".3f"),
        ]
        rows.append(["teacher", *teacher, *["-"] * (len(header) - 3)])
    if markdown:
        lines = [header, ["---"] + ["---:"] * (len(header) - 1), *rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        for cells in [header, *rows]
    )
