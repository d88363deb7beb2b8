"""Held-out metrics of a student against its teacher, computed chunk by chunk without gradients.

All metrics are sums over valid label positions first (so they can be added across batches and
ranks), then turned into means at the end:

- student / teacher cross-entropy on the ground-truth tokens, and their perplexities;
- KL(teacher || student) at temperature 1;
- top-1 agreement: how often the student's most likely token is the teacher's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from kd_dist.losses import valid_rows
from kd_dist.models import forward_logits

METRIC_SUMS = ("student_ce", "teacher_ce", "kl", "agreement", "tokens")


def _chunk_sums(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[5] float64 sums of one chunk of logit rows ([C, V] x 2, [C]), in METRIC_SUMS order."""
    log_q = F.log_softmax(student.float(), dim=-1)
    log_p = F.log_softmax(teacher.float(), dim=-1)
    return torch.stack(
        [
            F.nll_loss(log_q, labels, reduction="sum"),
            F.nll_loss(log_p, labels, reduction="sum"),
            (log_p.exp() * (log_p - log_q)).sum(),
            (student.argmax(-1) == teacher.argmax(-1)).sum(),
            torch.tensor(labels.numel(), device=labels.device),
        ]
    ).double()


@torch.no_grad()
def evaluate(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    task_type: str,
    vocab_size: int,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums,
) -> dict[str, float]:
    """Student-vs-teacher metrics over ``batches`` (means over all valid tokens of all ranks)."""
    was_training = student.training
    student.eval()
    sums = torch.zeros(len(METRIC_SUMS), dtype=torch.float64, device=device)
    causal = task_type == "causal"
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        student_logits = forward_logits(student, student, batch, task_type)
        teacher_logits = forward_logits(teacher, teacher, batch, task_type)
        s, t, labels = valid_rows(student_logits, teacher_logits, batch["labels"], causal)
        s, t = s[:, :vocab_size], t[:, :vocab_size]
        for start in range(0, labels.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            sums += _chunk_sums(s[rows], t[rows], labels[rows])
    student.train(was_training)
    totals = dict(zip(METRIC_SUMS, sum_across_ranks(sums).tolist(), strict=True))
    tokens = max(totals["tokens"], 1.0)
    student_ce, teacher_ce = totals["student_ce"] / tokens, totals["teacher_ce"] / tokens
    return {
        "student_ce": student_ce,
        "student_ppl": math.exp(min(student_ce, 50.0)),
        "teacher_ce": teacher_ce,
        "teacher_ppl": math.exp(min(teacher_ce, 50.0)),
        "kl_to_teacher": totals["kl"] / tokens,
        "top1_agreement": totals["agreement"] / tokens,
        "eval_tokens": int(totals["tokens"]),
    }
