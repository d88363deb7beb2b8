"""Distillation losses: pure torch, no accelerate.

Shapes: N = valid (non-masked) token positions, V = vocabulary size.

The KD term is the temperature-scaled forward KL(teacher || student) multiplied by T^2 (so its
gradient magnitude does not shrink with T, Hinton et al. 2015), optionally mixed with the
ordinary cross-entropy on the ground-truth tokens:

    loss = [(1 - alpha) * T^2 * sum_tokens KL(p_T || q_T) + alpha * sum_tokens CE] / num_tokens

``num_tokens`` is passed by the caller so the training loop can normalise by the valid tokens of
a whole optimizer step (all accumulation micro-batches, all ranks); a plain mean over one batch is
the special case ``num_tokens = N``.

Memory: a naive implementation keeps several fp32 [N x V] tensors alive for backward (softmax,
log-softmax of both models). ``distillation_loss`` instead walks the tokens in chunks of
``chunk_size`` rows, computes each chunk's loss and its gradient with respect to the student's
logits right away (fp32 math, whatever the logits' dtype), and keeps only that gradient, in the
logits' own dtype, for the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def forward_kl_per_token(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) for each row: [N, V] x 2 -> [N] (fp32)."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    return kl * temperature**2


def cross_entropy_per_token(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the ground-truth token for each row: [N, V], [N] -> [N] (fp32)."""
    return F.cross_entropy(student_logits.float(), labels, reduction="none")


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable: what to call backward on
    kd_sum: torch.Tensor  # scalar, detached: sum of T^2 * KL over the valid tokens
    ce_sum: torch.Tensor  # scalar, detached: sum of cross-entropy over the valid tokens
    num_tokens: int  # valid tokens in this call


def _chunk_loss_sums(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted loss sum, KD sum, CE sum) of one chunk of rows, all fp32 scalars."""
    kd = forward_kl_per_token(student, teacher, temperature).sum()
    ce = cross_entropy_per_token(student, labels).sum() if alpha > 0 else kd.new_zeros(())
    return (1.0 - alpha) * kd + alpha * ce, kd, ce


class _ChunkedDistillation(torch.autograd.Function):
    """Loss sum over rows, computed chunk by chunk with the student-logit gradient made in place."""

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, alpha, chunk_size):
        grad_student = torch.zeros_like(student)
        totals = torch.zeros(3, dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            with torch.enable_grad():
                chunk = student[rows].detach().float().requires_grad_(True)
                weighted, kd, ce = _chunk_loss_sums(
                    chunk, teacher[rows], labels[rows], temperature, alpha
                )
                (grad_chunk,) = torch.autograd.grad(weighted, chunk)
            grad_student[rows] = grad_chunk.to(grad_student.dtype)
            totals += torch.stack([weighted.detach(), kd.detach(), ce.detach()])
        ctx.save_for_backward(grad_student)
        ctx.mark_non_differentiable(totals)
        return totals[0].clone(), totals

    @staticmethod
    def backward(ctx, grad_loss, _grad_totals):
        (grad_student,) = ctx.saved_tensors
        return grad_student * grad_loss.to(grad_student.dtype), None, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float = 0.0,
    num_tokens: int | float | torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> LossOutput:
    """KD (+ CE) loss over the rows of ``student_logits`` / ``teacher_logits`` ([N, V_s], [N, V_t]).

    ``labels`` [N] are the ground-truth ids of the same rows (used only when ``alpha > 0``);
    callers pass only valid rows (see ``select_valid_positions``). ``vocab_size`` is the
    tokenizer's real vocabulary: both logit tensors are cut to it, because models often pad their
    embedding matrices to a multiple of 64/128 and the padded columns are not real tokens.
    ``num_tokens`` is the normaliser (default: N, at least 1).
    """
    vocab_size = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
    for name, logits in (("student", student_logits), ("teacher", teacher_logits)):
        if logits.shape[-1] < vocab_size:
            raise ValueError(
                f"{name} logits have {logits.shape[-1]} columns, fewer than the tokenizer's "
                f"{vocab_size} tokens: the model's vocabulary does not cover the tokenizer."
            )
    student_logits = student_logits[..., :vocab_size]
    teacher_logits = teacher_logits[..., :vocab_size].detach()
    num_rows = student_logits.shape[0]
    loss_sum, totals = _ChunkedDistillation.apply(
        student_logits, teacher_logits, labels, temperature, alpha, chunk_size
    )
    normaliser = num_rows if num_tokens is None else num_tokens
    if not torch.is_tensor(normaliser):
        normaliser = torch.tensor(float(normaliser), device=loss_sum.device)
    # An all-masked batch has nothing to normalise: its loss is an exact 0, never 0/0 = NaN.
    loss = loss_sum / normaliser.clamp(min=1).to(loss_sum.dtype)
    return LossOutput(loss=loss, kd_sum=totals[1], ce_sum=totals[2], num_tokens=num_rows)


def select_valid_positions(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of both logits that predict a non-masked label.

    [B, L, V] x 2 and [B, L] -> [N, V] x 2 and [N].

    Causal models predict token t+1 at position t, so the logits drop their last position and the
    labels their first; seq2seq decoders are already aligned with their labels.
    """
    if causal:
        student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
        labels = labels[:, 1:]
    valid = labels != IGNORE_INDEX
    return student_logits[valid], teacher_logits[valid], labels[valid]


def count_valid_tokens(labels: torch.Tensor, causal: bool) -> int:
    """How many positions of a [B, L] label batch enter the loss."""
    if causal:
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())
