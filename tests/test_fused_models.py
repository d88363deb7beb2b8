"""The fused loss on real (tiny) models equals the plain loss on the models' own logits."""

from __future__ import annotations

import pytest
import torch

from kd_dist.losses import LossSpec, distillation_loss, fused_distillation_loss, valid_rows
from kd_dist.models import forward_hidden, forward_logits, output_head
from kd_dist.tiny import SEQ2SEQ_FAMILIES, build_model

# family -> config overrides that exercise its head's specifics
FAMILIES = {
    "gpt2": {},
    "opt": {},
    "llama": {},
    "qwen2": {},
    "t5": {},  # tied embeddings: the decoder output is scaled by d_model**-0.5 before lm_head
    "bart": {},  # final_logits_bias after lm_head
    "gemma2": {"final_logit_softcapping": 2.0},
    "cohere": {"logit_scale": 0.5},
}


def batch_for(tokenizer, seq2seq: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    input_ids = torch.randint(3, vocab, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # a padded row
    labels = input_ids.clone() if not seq2seq else torch.randint(3, vocab, (3, 7), generator=g)
    labels[:, :2] = -100  # a masked prompt
    if not seq2seq:
        labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_path_equals_the_logits_path(family, tokenizer):
    torch.manual_seed(0)
    overrides = FAMILIES[family]
    teacher = build_model(family, tokenizer, "small", pad_vocab_to=128, **overrides).eval()
    student = build_model(family, tokenizer, "tiny", pad_vocab_to=32, **overrides).eval()
    seq2seq = family in SEQ2SEQ_FAMILIES
    task = "seq2seq" if seq2seq else "causal"
    batch = batch_for(tokenizer, seq2seq)
    spec = LossSpec("jsd", temperature=2.0, alpha=0.3, jsd_beta=0.3)
    params = [p for p in student.parameters() if p.requires_grad]
    vocab = len(tokenizer)

    with torch.no_grad():
        teacher_logits = forward_logits(teacher, batch, task, teacher.config)
    student_logits = forward_logits(student, batch, task, teacher.config)
    rows = valid_rows(student_logits, teacher_logits, batch["labels"], causal=not seq2seq)
    plain = distillation_loss(*rows, spec, vocab_size=vocab)
    plain_grads = torch.autograd.grad(plain.loss, params, allow_unused=True)

    student_head, teacher_head = output_head(student), output_head(teacher)
    assert student_head is not None and teacher_head is not None
    with torch.no_grad():
        teacher_hidden = forward_hidden(
            teacher, teacher.get_output_embeddings(), batch, task, teacher.config
        )
    student_hidden = forward_hidden(
        student, student.get_output_embeddings(), batch, task, teacher.config
    )
    s_rows, t_rows, labels = valid_rows(
        student_hidden, teacher_hidden, batch["labels"], causal=not seq2seq
    )
    fused = fused_distillation_loss(
        s_rows, student_head, t_rows, teacher_head, labels, spec, vocab_size=vocab, chunk_rows=5
    )
    fused_grads = torch.autograd.grad(fused.loss, params, allow_unused=True)

    assert fused.num_tokens == plain.num_tokens > 0
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for param, expected, actual in zip(params, plain_grads, fused_grads, strict=True):
        if expected is None:
            assert actual is None or torch.all(actual == 0)
            continue
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=str(param.shape))


def test_unknown_model_family_has_no_fused_head(tokenizer):
    model = build_model("llama", tokenizer, "tiny")
    model.config.model_type = "some_new_model"
    assert output_head(model) is None
