"""The loss against a stored teacher (its top-k tokens + the tail's mass): every objective over
the k + 1 outcomes against a float64 reference written from the definition, unfused and fused
(values and gradients), the k = V case against the live teacher, the lower bound and where it is
exact, and ``top_k_teacher`` itself."""

from __future__ import annotations

import pytest
import torch

from kd_dist import losses
from kd_dist.losses import (
    IGNORE_INDEX,
    OBJECTIVES,
    LogitTransform,
    LossSpec,
    OutputHead,
    TopKTeacher,
    chunk_entry_bytes,
    chunk_loss_and_grad,
    distillation_loss,
    fused_distillation_loss,
    top_k_teacher,
    valid_rows,
)
from tests.test_losses import (
    LiveTensorBytes,
    assert_exact_zeros,
    assert_matches_reference,
    fresh_seed,
    logits_of,
    random_problem,
)

VOCAB, K = 53, 7
# (objective, extra spec fields), one per objective, off their KL endpoints.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"jsd_beta": 0.3}),
    ("skew_forward_kl", {"skew_alpha": 0.1}),
    ("skew_reverse_kl", {"skew_alpha": 0.1}),
    ("tvd", {}),
]


def divergence(p: torch.Tensor, q: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """D(p, q) per row of two distributions over the same outcomes, from the definitions."""

    def kl(a, b):
        return torch.xlogy(a, a / b).sum(-1)  # 0 log 0 = 0

    beta, skew = spec.jsd_beta, spec.skew_alpha
    if spec.objective == "forward_kl":
        return kl(p, q)
    if spec.objective == "reverse_kl":
        return kl(q, p)
    if spec.objective == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if spec.objective == "skew_forward_kl":
        return kl(p, skew * p + (1 - skew) * q)
    if spec.objective == "skew_reverse_kl":
        return kl(q, skew * q + (1 - skew) * p)
    return 0.5 * (p - q).abs().sum(-1)


def merged(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[C, V] distributions -> [C, k + 1]: the k tokens of ``ids``, then the rest's total."""
    rest = probs.scatter(-1, ids, 0.0).sum(-1, keepdim=True)
    return torch.cat([probs.gather(-1, ids), rest], -1)


def reference_loss(student_logits, teacher_logits, ids, labels, spec, num_tokens):
    """The float64 loss over the k + 1 outcomes from full softmaxes (``ids``: the teacher's top-k)
    plus alpha times the full cross-entropy at T = 1."""
    temperature = spec.temperature
    q = merged(torch.softmax(student_logits.double() / temperature, -1), ids)
    p = merged(torch.softmax(teacher_logits.double() / temperature, -1), ids)
    kd = divergence(p, q, spec) * temperature**2
    ce = torch.nn.functional.cross_entropy(student_logits.double(), labels, reduction="none")
    return ((1 - spec.alpha) * kd.sum() + spec.alpha * ce.sum()) / max(num_tokens, 1)


@pytest.mark.parametrize(("objective", "extra"), CASES)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_unfused_top_k_matches_float64_reference(objective, extra, alpha, temperature):
    spec = LossSpec(objective, temperature=temperature, alpha=alpha, **extra)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(vocab=VOCAB, seed=fresh_seed())
    student_logits = (s_hidden @ s_head.weight.t()).detach().requires_grad_(True)  # padded
    teacher_logits = (t_hidden @ t_head.weight.t())[:, :VOCAB]
    teacher = top_k_teacher(teacher_logits, K, temperature)
    out = distillation_loss(
        student_logits, teacher, labels, spec, num_tokens=30, vocab_size=VOCAB, chunk_rows=4
    )
    (grad,) = torch.autograd.grad(out.loss, student_logits)

    reference_logits = student_logits.detach().double().requires_grad_(True)
    expected = reference_loss(
        reference_logits[:, :VOCAB], teacher_logits, teacher.ids, labels, spec, 30
    )
    expected_grads = torch.autograd.grad(expected, reference_logits)
    assert_matches_reference(out.loss, {"logits": grad}, expected, expected_grads, VOCAB)


@pytest.mark.parametrize(("objective", "extra"), CASES)
@pytest.mark.parametrize(
    ("alpha", "temperature", "transform"),
    [
        (0.0, 1.0, LogitTransform()),
        (0.3, 2.0, LogitTransform()),
        (0.3, 1.0, LogitTransform(scale=0.6, softcap=3.0)),
        (0.0, 2.0, LogitTransform(softcap=3.0)),
    ],
    ids=["a0-T1", "a.3-T2", "a.3-T1-capped", "a0-T2-capped"],
)
def test_fused_top_k_matches_float64_reference(objective, extra, alpha, temperature, transform):
    spec = LossSpec(objective, temperature=temperature, alpha=alpha, **extra)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(vocab=VOCAB, seed=fresh_seed())
    s_head.transform = transform
    teacher_logits = logits_of(t_hidden, t_head, VOCAB)
    teacher = top_k_teacher(teacher_logits, K, temperature)
    out = fused_distillation_loss(
        s_hidden, s_head, teacher, None, labels, spec, vocab_size=VOCAB, num_tokens=25,
        chunk_rows=6,
    )  # fmt: skip
    grads = torch.autograd.grad(out.loss, (s_hidden, s_head.weight, s_head.bias))

    leaves = [t.detach().double().requires_grad_(True) for t in (s_hidden, s_head.weight)]
    leaves.append(s_head.bias.detach().double().requires_grad_(True))
    student_logits = logits_of(leaves[0], OutputHead(leaves[1], leaves[2], transform), VOCAB)
    expected = reference_loss(student_logits, teacher_logits, teacher.ids, labels, spec, 25)
    expected_grads = torch.autograd.grad(expected, leaves)

    named = dict(zip(("hidden", "weight", "bias"), grads, strict=True))
    assert_matches_reference(out.loss, named, expected, expected_grads, VOCAB, atol=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_k_equal_to_the_vocabulary_is_the_live_teacher_loss(objective):
    """fp32, both entry points: the cache's full distribution (k = V, tail -inf) gives the live
    teacher's loss and gradients."""
    spec = LossSpec(objective, temperature=2.0, alpha=0.3)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(vocab=VOCAB, seed=fresh_seed())
    s_head.transform = LogitTransform(softcap=4.0)
    teacher = top_k_teacher(logits_of(t_hidden, t_head, VOCAB), VOCAB, spec.temperature)
    assert torch.all(teacher.tail_logprob == float("-inf"))
    leaves = (s_hidden, s_head.weight, s_head.bias)

    def fused(teacher, head):
        out = fused_distillation_loss(s_hidden, s_head, teacher, head, labels, spec,
                                      vocab_size=VOCAB, chunk_rows=5)  # fmt: skip
        return out.loss, *torch.autograd.grad(out.loss, leaves)

    student_logits = (s_hidden @ s_head.weight.t()).detach().requires_grad_(True)

    def unfused(teacher):
        out = distillation_loss(student_logits, teacher, labels, spec, vocab_size=VOCAB,
                                chunk_rows=5)  # fmt: skip
        return out.loss, *torch.autograd.grad(out.loss, student_logits)

    live_logits = t_hidden @ t_head.weight.t() + t_head.bias
    for cached, live in (
        (fused(teacher, None), fused(t_hidden, t_head)),
        (unfused(teacher), unfused(live_logits)),
    ):
        for actual, expected in zip(cached, live, strict=True):
            assert torch.isfinite(actual).all()
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def per_row_kd(student_logits, teacher, spec) -> torch.Tensor:
    """T^2 * D per row (one-row chunks of the kernel)."""
    labels = torch.zeros(1, dtype=torch.long)
    return torch.stack(
        [chunk_loss_and_grad(student_logits[i : i + 1], teacher[i : i + 1], labels, spec)[1]
         for i in range(student_logits.shape[0])]
    )  # fmt: skip


@pytest.mark.parametrize(("objective", "extra"), CASES)
def test_k_plus_one_loss_is_a_lower_bound_exact_when_the_teacher_has_no_tail(objective, extra):
    """The data-processing inequality row by row on random pairs (strict: a random student is
    not proportional to the teacher on the tail); equality where the teacher's logits are -inf
    off k tokens, for every objective but reverse KL, which is infinite there both ways."""
    spec = LossSpec(objective, temperature=2.0, **extra)
    g = torch.Generator().manual_seed(fresh_seed())
    student, teacher = (torch.randn(16, VOCAB, generator=g) * 2 for _ in range(2))
    full = per_row_kd(student, teacher, spec)
    top_k = per_row_kd(student, top_k_teacher(teacher, K, spec.temperature), spec)
    assert torch.all(top_k < full), (top_k, full)

    off_support = torch.rand(16, VOCAB, generator=g).argsort(-1)[:, K:]  # all but K per row
    teacher = teacher.scatter(-1, off_support, float("-inf"))
    full = per_row_kd(student, teacher, spec)
    top_k = per_row_kd(student, top_k_teacher(teacher, K, spec.temperature), spec)
    if objective == "reverse_kl":
        assert torch.all(full == float("inf")) and torch.all(top_k == float("inf"))
    else:
        torch.testing.assert_close(top_k, full, rtol=1e-5, atol=1e-6)


def test_top_k_teacher_is_the_true_top_k_and_a_distribution():
    g = torch.Generator().manual_seed(fresh_seed())
    logits = torch.randn(9, VOCAB, generator=g) * 3
    # Row 0: a tail of e^-60 relative mass, far below fp32's resolution of 1 - sum p.
    logits[0] = -60.0
    logits[0, :K] = torch.randn(K, generator=g)
    teacher = top_k_teacher(logits, K, temperature=2.0)
    exact = torch.log_softmax(logits.double() / 2.0, -1)
    top, ids = exact.topk(K, -1)
    assert torch.equal(teacher.ids, ids)
    torch.testing.assert_close(teacher.logprobs.double(), top, rtol=0, atol=1e-6)
    exact_tail = exact.scatter(-1, ids, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(teacher.tail_logprob.double(), exact_tail, rtol=1e-6, atol=1e-5)
    assert teacher.tail_logprob[0] < -25  # e^-30 x (V - K): accurate though tiny
    outcomes = torch.cat([teacher.logprobs, teacher.tail_logprob[:, None]], -1)
    torch.testing.assert_close(outcomes.logsumexp(-1), torch.zeros(9), rtol=0, atol=1e-6)
    assert torch.all(top_k_teacher(logits, VOCAB, 2.0).tail_logprob == float("-inf"))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_all_masked_batch_gives_zero_loss_and_zero_gradients(objective):
    spec = LossSpec(objective, temperature=2.0, alpha=0.5)
    s_hidden, s_head, *_ = random_problem(rows=6, vocab=VOCAB, seed=2)
    hidden_rows, _, label_rows = valid_rows(
        s_hidden.view(2, 3, -1), None, torch.full((2, 3), IGNORE_INDEX), causal=True
    )
    teacher = top_k_teacher(torch.empty(0, VOCAB), K, 2.0)  # a cache's rows of no position
    fused = fused_distillation_loss(hidden_rows, s_head, teacher, None, label_rows, spec,
                                    vocab_size=VOCAB)  # fmt: skip
    logits = (s_hidden @ s_head.weight.t())[:0]
    unfused = distillation_loss(logits, teacher, label_rows, spec, vocab_size=VOCAB)
    assert_exact_zeros(fused, unfused, (s_hidden, s_head.weight, s_head.bias))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_minus_infinity_logits_off_the_top_k_are_zero_probabilities_not_nan(objective):
    """Both models mask tokens (-inf logits) and the teacher's top-k are the others: the tail is
    empty on both sides, and the loss is the live teacher's on the unmasked tokens."""
    spec = LossSpec(objective, temperature=2.0, alpha=0.2)
    g = torch.Generator().manual_seed(fresh_seed())
    student, teacher = torch.randn(6, 20, generator=g), torch.randn(6, 20, generator=g)
    labels = torch.randint(0, 15, (6,), generator=g)
    student[:, 15:] = teacher[:, 15:] = float("-inf")
    student.requires_grad_(True)
    cached = distillation_loss(student, top_k_teacher(teacher, 15, 2.0), labels, spec)
    (grad,) = torch.autograd.grad(cached.loss, student)
    kept = student.detach()[:, :15].requires_grad_(True)
    live = distillation_loss(kept, teacher[:, :15], labels, spec)
    (live_grad,) = torch.autograd.grad(live.loss, kept)
    torch.testing.assert_close(cached.loss, live.loss)
    torch.testing.assert_close(grad[:, :15], live_grad)
    assert torch.all(grad[:, 15:] == 0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_cache_s_dtypes_and_bf16_hidden_states_stay_close(objective):
    """int32 ids and fp16 log-probs (as a cache stores them) give the fp32 rows' loss within fp16
    rounding; bf16 student hidden states give it within bf16's (as in tests/test_losses.py)."""
    vocab = 500
    spec = LossSpec(objective, temperature=2.0, alpha=0.1)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(
        rows=64, vocab=vocab, hidden=(32, 48), seed=fresh_seed()
    )
    exact = top_k_teacher(logits_of(t_hidden, t_head, vocab), 64, spec.temperature)
    stored = TopKTeacher(exact.ids.int(), exact.logprobs.half(), exact.tail_logprob)

    def run(hidden, teacher):
        out = fused_distillation_loss(hidden, s_head, teacher, None, labels, spec,
                                      vocab_size=vocab, chunk_rows=16)  # fmt: skip
        (grad,) = torch.autograd.grad(out.loss, s_head.weight)
        return out.loss, grad.float()

    def relative(actual, expected):
        return ((actual - expected).norm() / expected.norm()).item()

    loss, grad = run(s_hidden, exact)
    for hidden, teacher, tolerance in (
        (s_hidden, stored, 2e-3),
        (s_hidden.bfloat16(), exact, 2e-2),
    ):
        other_loss, other_grad = run(hidden, teacher)
        assert relative(other_loss, loss) < tolerance
        # tvd's gradient, 1/2 sign(q - p), flips under any rounding where q ~ p: its loss alone.
        assert objective == "tvd" or relative(other_grad, grad) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_k_chunk_memory_is_the_documented_formula(dtype, monkeypatch):
    """The forward's peak against a TopKTeacher: the kept gradients, the weight copy and one
    chunk of chunk_entry_bytes(teacher_logits=False) per entry (whole chunks, as on a GPU),
    tightly over every objective; nothing [C x V] of the teacher's."""
    monkeypatch.setattr(losses, "_CPU_BLOCK_BYTES", 2**40)  # the math on whole chunks
    rows, hidden, vocab, vocab_rows, chunk = 32, 64, 3000, 3008, 16
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(
        rows=rows, vocab=vocab, hidden=(hidden, hidden), pads=(8, 8), seed=10
    )
    exact = top_k_teacher(logits_of(t_hidden, t_head, vocab), 64, 2.0)
    teacher = TopKTeacher(exact.ids.int(), exact.logprobs.half(), exact.tail_logprob)
    s_hidden = s_hidden.detach().to(dtype)
    kept = vocab_rows * hidden * 4 + rows * hidden * losses.gradient_dtype(dtype).itemsize
    weight_copy = 0 if dtype == torch.float32 else vocab * hidden * dtype.itemsize
    entry_bytes = chunk_entry_bytes(dtype, "cuda", teacher_logits=False)
    assert entry_bytes < chunk_entry_bytes(dtype, "cuda")
    peaks = []
    for objective in OBJECTIVES:
        hidden_states = s_hidden.clone().requires_grad_(True)
        weight = s_head.weight.detach().clone().requires_grad_(True)
        memory = LiveTensorBytes(hidden_states, weight, labels, *vars(teacher).values())
        with memory:
            fused_distillation_loss(
                hidden_states, OutputHead(weight), teacher, None, labels,
                LossSpec(objective, temperature=2.0, alpha=0.3), vocab_size=vocab,
                chunk_rows=chunk,
            )  # fmt: skip
        peaks.append(memory.peak)
    forward_peak = kept + weight_copy + chunk * vocab * entry_bytes
    outcome_rows = chunk * 65 * 4  # [C, k + 1] fp32: negligible beside [C, V]
    assert max(peaks) <= forward_peak + outcome_rows <= 1.05 * max(peaks), peaks


def test_compiled_top_k_kernel_equals_eager():
    torch._dynamo.reset()  # a graph of its own, whatever compiled before (the recompile limit)
    spec = LossSpec("jsd", temperature=2.0, alpha=0.3, jsd_beta=0.3)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(rows=21, vocab=VOCAB, seed=7)
    s_head.transform = LogitTransform(softcap=4.0)
    exact = top_k_teacher(logits_of(t_hidden, t_head, VOCAB), K, spec.temperature)
    teacher = TopKTeacher(exact.ids.int(), exact.logprobs.half(), exact.tail_logprob)
    results = []
    for compiled in (False, True):
        out = fused_distillation_loss(
            s_hidden, s_head, teacher, None, labels, spec, vocab_size=VOCAB, chunk_rows=8,
            compiled=compiled,
        )  # fmt: skip
        grads = torch.autograd.grad(out.loss, (s_hidden, s_head.weight, s_head.bias))
        results.append((out.loss, *grads))
    assert not losses._COMPILED.get("failed")
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_mismatched_top_k_inputs_are_refused():
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(vocab=VOCAB, seed=0)
    teacher = top_k_teacher(logits_of(t_hidden, t_head, VOCAB), K, 1.0)
    with pytest.raises(ValueError, match="TopKTeacher with teacher_head=None"):
        fused_distillation_loss(s_hidden, s_head, teacher, t_head, labels, LossSpec(),
                                vocab_size=VOCAB)  # fmt: skip
    with pytest.raises(ValueError, match="rows for the student's"):
        fused_distillation_loss(s_hidden, s_head, teacher[:5], None, labels, LossSpec(),
                                vocab_size=VOCAB)  # fmt: skip
    with pytest.raises(ValueError, match="tail_logprob"):
        TopKTeacher(teacher.ids, teacher.logprobs[:, :3], teacher.tail_logprob)
