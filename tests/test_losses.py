"""The chunked KD loss against a float64 reference written from the definition."""

import pytest
import torch

from kd_dist.losses import (
    IGNORE_INDEX,
    count_valid_tokens,
    distillation_loss,
    select_valid_positions,
)


def reference_loss(student, teacher, labels, temperature, alpha, vocab_size, num_tokens):
    """[(1-alpha) * T^2 * sum KL(p_T || q_T) + alpha * sum CE] / num_tokens, in float64."""
    s = student[:, :vocab_size].double()
    t = teacher[:, :vocab_size].double()
    p = torch.softmax(t / temperature, dim=-1)
    log_q = torch.log_softmax(s / temperature, dim=-1)
    kl = (p * (p.log() - log_q)).sum(-1) * temperature**2
    ce = -torch.log_softmax(s, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    return ((1 - alpha) * kl.sum() + alpha * ce.sum()) / max(num_tokens, 1)


def random_inputs(rows, vocab, student_pad=0, teacher_pad=0, dtype=torch.float32, seed=None):
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    student = (torch.randn(rows, vocab + student_pad, generator=generator) * 3).to(dtype)
    teacher = (torch.randn(rows, vocab + teacher_pad, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    return student.requires_grad_(True), teacher, labels


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_value_and_gradient_match_float64_reference(alpha, temperature):
    vocab = 97
    student, teacher, labels = random_inputs(23, vocab, student_pad=5, teacher_pad=11)
    out = distillation_loss(
        student,
        teacher,
        labels,
        temperature=temperature,
        alpha=alpha,
        num_tokens=40,
        vocab_size=vocab,
        chunk_size=7,
    )
    (grad,) = torch.autograd.grad(out.loss, student)

    student64 = student.detach().double().requires_grad_(True)
    expected = reference_loss(student64, teacher, labels, temperature, alpha, vocab, 40)
    (expected_grad,) = torch.autograd.grad(expected, student64)

    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-8)
    # Padded vocabulary columns are not real tokens: they get no gradient.
    assert torch.all(grad[:, vocab:] == 0)


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 1000])
def test_any_chunk_size_gives_the_unchunked_result(chunk_size):
    student, teacher, labels = random_inputs(37, 64, seed=1)
    kwargs = dict(temperature=2.0, alpha=0.3, vocab_size=64)
    whole = distillation_loss(student, teacher, labels, chunk_size=37, **kwargs)
    chunked = distillation_loss(student, teacher, labels, chunk_size=chunk_size, **kwargs)
    (grad_whole,) = torch.autograd.grad(whole.loss, student)
    (grad_chunked,) = torch.autograd.grad(chunked.loss, student)
    torch.testing.assert_close(chunked.loss, whole.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-6, atol=1e-9)


def test_all_masked_batch_gives_zero_loss_zero_gradient_and_no_nan():
    student_logits = torch.randn(2, 5, 32, requires_grad=True)
    teacher_logits = torch.randn(2, 5, 32)
    labels = torch.full((2, 5), IGNORE_INDEX)
    s, t, y = select_valid_positions(student_logits, teacher_logits, labels, causal=True)
    out = distillation_loss(s, t, y, temperature=2.0, alpha=0.5)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.num_tokens == 0
    assert torch.isfinite(student_logits.grad).all() and torch.all(student_logits.grad == 0)


def test_bf16_logits_use_fp32_math_and_stay_close_to_reference():
    student, teacher, labels = random_inputs(64, 500, dtype=torch.bfloat16, seed=2)
    out = distillation_loss(student, teacher, labels, temperature=2.0, vocab_size=500)
    (grad,) = torch.autograd.grad(out.loss, student)
    student64 = student.detach().double().requires_grad_(True)
    expected = reference_loss(student64, teacher, labels, 2.0, 0.0, 500, 64)
    (expected_grad,) = torch.autograd.grad(expected, student64)
    assert out.loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-2, atol=0)
    relative = (grad.double() - expected_grad).norm() / expected_grad.norm()
    assert relative < 1e-2


def test_causal_positions_are_shifted_and_masked():
    student_logits = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX, 2], [0, 0, 1, IGNORE_INDEX]])
    s, _, y = select_valid_positions(student_logits, student_logits, labels, causal=True)
    # Position t predicts label t+1: rows (0,0)->1, (0,2)->2, (1,0)->0, (1,1)->1.
    torch.testing.assert_close(s, student_logits[[0, 0, 1, 1], [0, 2, 0, 1]])
    assert y.tolist() == [1, 2, 0, 1]
    assert count_valid_tokens(labels, causal=True) == 4
    assert count_valid_tokens(labels, causal=False) == 5


def test_normaliser_makes_split_batches_sum_to_the_whole():
    """Two halves normalised by the total token count add up to the whole batch's loss."""
    student, teacher, labels = random_inputs(20, 50, seed=3)
    kwargs = dict(temperature=2.0, alpha=0.5, vocab_size=50)
    whole = distillation_loss(student, teacher, labels, **kwargs).loss
    halves = sum(
        distillation_loss(student[rows], teacher[rows], labels[rows], num_tokens=20, **kwargs).loss
        for rows in (slice(0, 8), slice(8, 20))
    )
    torch.testing.assert_close(halves, whole)


def test_vocabulary_smaller_than_tokenizer_is_refused():
    student, teacher, labels = random_inputs(4, 10, seed=4)
    with pytest.raises(ValueError, match="does not cover the tokenizer"):
        distillation_loss(student, teacher, labels, temperature=1.0, vocab_size=12)
