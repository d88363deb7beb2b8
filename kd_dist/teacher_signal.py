"""Where the teacher's distribution comes from: one small interface that training and evaluation
read alike, whatever the source.

- ``LiveTeacher``: a frozen model run on each batch; its final hidden states and output head
  (the fused path), or its logits.
- ``CachedTeacher``: the top-k rows and tail mass a ``kd-dist cache-teacher`` run stored, which
  the collator laid out per position in the batch (``teacher_cache.with_teacher_rows``).
- ``StudentAsTeacher``: --alpha 1 (plain fine-tuning) loads no teacher; the KD term has zero
  weight, and the student's own detached outputs stand in for the teacher's, so it is an exact 0.

Each gives the teacher's side of a batch per position (a ``Forward`` of [B, L, ...], like the
student's outputs, so ``valid_rows`` selects both alike; a live teacher's includes the outputs
of the blocks the hidden-state loss matches, from the same forward), the head that projects it
(None when it is not hidden states), and the output layers the loss gathers under ZeRO-3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel

from kd_dist.losses import OutputHead, TopKTeacher
from kd_dist.models import Forward, forward_outputs, output_head
from kd_dist.teacher_cache import batch_teacher

TeacherOutputs = torch.Tensor | TopKTeacher


class TeacherSignal(Protocol):
    output_layers: Sequence[torch.nn.Module]  # gathered around the loss under ZeRO-3 (fused)

    def outputs(self, batch: dict[str, torch.Tensor], student: torch.Tensor) -> Forward:
        """The teacher's side of ``batch`` per position, without gradient: [B, L, Ht] hidden
        states (fused), [B, L, V] logits, or top-k rows ([B, L, k], [B, L, k], [B, L]); and
        the [B, L, Ht] outputs of the blocks the hidden-state loss matches (none but a live
        teacher's). ``student``: the student's outputs of the batch, in the same form."""
        ...

    def head(self) -> OutputHead | None:
        """The projection of hidden-state outputs (None for logits or top-k rows); called while
        ``output_layers`` are gathered."""
        ...


@dataclass
class LiveTeacher:
    model: PreTrainedModel  # frozen, eval mode; replicated or sharded by its ZeRO-3 engine
    task_type: str
    fused: bool  # hidden states + head, else logits
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    blocks: Sequence[int] = ()  # the blocks whose outputs the hidden-state loss matches

    @property
    def output_layers(self) -> list[torch.nn.Module]:
        return [self.model.get_output_embeddings()]

    def outputs(self, batch: dict[str, torch.Tensor], student: torch.Tensor) -> Forward:
        with torch.no_grad(), self.autocast():
            return forward_outputs(
                self.model, self.model, batch, self.task_type, self.fused, self.blocks
            )

    def head(self) -> OutputHead | None:
        return output_head(self.model) if self.fused else None


@dataclass
class CachedTeacher:
    temperature: float  # the cache's: its log-probabilities are at this temperature
    output_layers: Sequence[torch.nn.Module] = ()

    def outputs(self, batch: dict[str, torch.Tensor], student: torch.Tensor) -> Forward:
        return Forward(batch_teacher(batch), blocks=[])

    def head(self) -> None:
        return None


@dataclass
class StudentAsTeacher:
    student: PreTrainedModel  # the student itself (not a DDP/DeepSpeed wrapper)
    fused: bool
    output_layers: Sequence[torch.nn.Module] = ()  # the student's own is gathered already

    def outputs(self, batch: dict[str, torch.Tensor], student: torch.Tensor) -> Forward:
        return Forward(student.detach(), blocks=[])

    def head(self) -> OutputHead | None:
        return output_head(self.student) if self.fused else None


def teacher_rows_finite(rows: TeacherOutputs) -> torch.Tensor:
    """Whether a teacher's rows hold no NaN or infinity ([] bool on their device). Top-k rows
    may hold -inf log-probabilities (zero probabilities, a tail of nothing left) but no NaN."""
    if isinstance(rows, TopKTeacher):
        return ~(rows.logprobs.isnan().any() | rows.tail_logprob.isnan().any())
    return torch.isfinite(rows).all()
