"""Every objective, unfused (logits) and fused (hidden states + output weight), against a float64
reference written from its definition: values and gradients, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kd_dist import losses
from kd_dist.losses import (
    CPU_CHUNK_MEMORY_MB,
    GPU_FREE_MEMORY_FRACTION,
    GPU_MIN_CHUNK_ROWS,
    IGNORE_INDEX,
    MAX_CHUNK_ROWS,
    OBJECTIVES,
    LogitTransform,
    LossOutput,
    LossSpec,
    OutputHead,
    auto_chunk_rows,
    chunk_entry_bytes,
    distillation_loss,
    free_memory,
    fused_distillation_loss,
    valid_mask,
    valid_rows,
)

# (objective, extra spec fields): the jsd endpoints are their own cases (the KL limits).
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"jsd_beta": 0.5}),
    ("jsd", {"jsd_beta": 0.1}),
    ("jsd", {"jsd_beta": 0.0}),
    ("jsd", {"jsd_beta": 1.0}),
    ("skew_forward_kl", {"skew_alpha": 0.1}),
    ("skew_reverse_kl", {"skew_alpha": 0.3}),
    ("tvd", {}),
]


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a / b).log()).sum(-1)


def reference_divergence(student_logits, teacher_logits, spec: LossSpec) -> torch.Tensor:
    """T^2 * D(p, q) per row, straight from the definitions, in float64."""
    q = torch.softmax(student_logits.double() / spec.temperature, -1)
    p = torch.softmax(teacher_logits.double() / spec.temperature, -1)
    beta, skew = spec.jsd_beta, spec.skew_alpha
    objective = spec.objective
    if objective == "forward_kl" or (objective == "jsd" and beta == 0):
        value = kl(p, q)
    elif objective == "reverse_kl" or (objective == "jsd" and beta == 1):
        value = kl(q, p)
    elif objective == "jsd":
        m = beta * p + (1 - beta) * q
        value = beta * kl(p, m) + (1 - beta) * kl(q, m)
    elif objective == "skew_forward_kl":
        value = kl(p, skew * p + (1 - skew) * q)
    elif objective == "skew_reverse_kl":
        value = kl(q, skew * q + (1 - skew) * p)
    else:
        value = 0.5 * (p - q).abs().sum(-1)
    return value * spec.temperature**2


def reference_loss(student_logits, teacher_logits, labels, spec, num_tokens):
    ce = torch.nn.functional.cross_entropy(student_logits.double(), labels, reduction="none")
    kd = reference_divergence(student_logits, teacher_logits, spec)
    return ((1 - spec.alpha) * kd.sum() + spec.alpha * ce.sum()) / max(num_tokens, 1)


def random_problem(rows=19, vocab=53, hidden=(12, 20), pads=(5, 11), dtype=torch.float32, seed=0):
    """Hidden states, heads (with padded vocabulary rows and a bias) and labels."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    student_hidden = randn(rows, hidden[0]).requires_grad_(True)
    teacher_hidden = randn(rows, hidden[1])
    student_head = OutputHead(
        randn(vocab + pads[0], hidden[0], scale=0.7).requires_grad_(True),
        randn(vocab + pads[0]).requires_grad_(True),
    )
    teacher_head = OutputHead(randn(vocab + pads[1], hidden[1], scale=0.7), randn(vocab + pads[1]))
    labels = torch.randint(0, vocab, (rows,), generator=g)
    return student_hidden, student_head, teacher_hidden, teacher_head, labels


def logits_of(hidden, head: OutputHead, vocab: int) -> torch.Tensor:
    logits, _ = head.transform.apply(hidden @ head.weight.t() + head.bias)
    return logits[:, :vocab]


def fused_reference(s_hidden, s_head, t_hidden, t_head, labels, spec, vocab, num_tokens):
    """The float64 loss of a fused problem from its definition, and its student leaves
    (hidden, weight, bias) to differentiate it by."""
    hidden = s_hidden.detach().double().requires_grad_(True)
    weight = s_head.weight.detach().double().requires_grad_(True)
    bias = s_head.bias.detach().double().requires_grad_(True)
    student_logits = logits_of(hidden, OutputHead(weight, bias, s_head.transform), vocab)
    teacher64 = OutputHead(t_head.weight.double(), t_head.bias.double(), t_head.transform)
    teacher_logits = logits_of(t_hidden.double(), teacher64, vocab)
    loss = reference_loss(student_logits, teacher_logits, labels, spec, num_tokens)
    return loss, (hidden, weight, bias)


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def assert_exact_zeros(fused: LossOutput, unfused: LossOutput, inputs: tuple) -> None:
    """An all-masked batch: both entry points give an exact 0 loss over 0 tokens, and exact
    zero gradients (no NaN) w.r.t. ``inputs``."""
    for out in (fused, unfused):
        assert out.loss.item() == 0.0 and out.num_tokens == 0
    for grad in torch.autograd.grad(fused.loss + unfused.loss, inputs):
        assert torch.isfinite(grad).all() and torch.all(grad == 0)


def assert_matches_reference(
    loss: torch.Tensor,
    grads: dict[str, torch.Tensor],
    expected: torch.Tensor,
    expected_grads: tuple[torch.Tensor, ...],
    vocab: int,
    atol: float = 1e-7,
) -> None:
    """A loss and its gradients (by name; the first dimension of a weight's or bias's, the
    last of logits', past ``vocab`` are padding) equal the float64 reference's."""
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    for (name, actual), wanted in zip(grads.items(), expected_grads, strict=True):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-5, atol=atol, msg=name)
    for name, grad in grads.items():  # padded rows and columns are not tokens
        if name == "logits":
            assert torch.all(grad[:, vocab:] == 0)
        elif name in ("weight", "bias"):
            assert torch.all(grad[vocab:] == 0)


@pytest.mark.parametrize(("objective", "extra"), CASES)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_unfused_matches_float64_reference(objective, extra, alpha):
    vocab = 53
    spec = LossSpec(objective, temperature=2.0, alpha=alpha, **extra)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(vocab=vocab, seed=fresh_seed())
    student_logits = (s_hidden @ s_head.weight.t()).detach().requires_grad_(True)
    teacher_logits = t_hidden @ t_head.weight.t()
    out = distillation_loss(
        student_logits, teacher_logits, labels, spec, num_tokens=30, vocab_size=vocab, chunk_rows=4
    )
    (grad,) = torch.autograd.grad(out.loss, student_logits)

    reference_logits = student_logits.detach().double().requires_grad_(True)
    expected = reference_loss(
        reference_logits[:, :vocab], teacher_logits[:, :vocab], labels, spec, 30
    )
    expected_grads = torch.autograd.grad(expected, reference_logits)
    assert_matches_reference(out.loss, {"logits": grad}, expected, expected_grads, vocab)


@pytest.mark.parametrize(("objective", "extra"), CASES)
@pytest.mark.parametrize(
    "transform", [LogitTransform(), LogitTransform(scale=0.6, softcap=3.0)], ids=["plain", "capped"]
)
def test_fused_matches_float64_reference(objective, extra, transform):
    vocab = 53
    spec = LossSpec(objective, temperature=1.5, alpha=0.2, **extra)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(vocab=vocab, seed=fresh_seed())
    s_head.transform = transform
    t_head.transform = LogitTransform(softcap=5.0) if transform.softcap else transform
    out = fused_distillation_loss(
        s_hidden, s_head, t_hidden, t_head, labels, spec, vocab_size=vocab, num_tokens=25,
        chunk_rows=6,
    )  # fmt: skip
    grads = torch.autograd.grad(out.loss, (s_hidden, s_head.weight, s_head.bias))

    expected, leaves = fused_reference(s_hidden, s_head, t_hidden, t_head, labels, spec, vocab, 25)
    expected_grads = torch.autograd.grad(expected, leaves)

    named = dict(zip(("hidden", "weight", "bias"), grads, strict=True))
    assert_matches_reference(out.loss, named, expected, expected_grads, vocab, atol=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 1000])
def test_any_chunk_size_gives_the_same_result(objective, chunk_rows):
    spec = LossSpec(objective, temperature=2.0, alpha=0.3)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(rows=23, seed=1)

    def run(rows):
        out = fused_distillation_loss(s_hidden, s_head, t_hidden, t_head, labels, spec,
                                      vocab_size=53, chunk_rows=rows)  # fmt: skip
        return out.loss, torch.autograd.grad(out.loss, (s_hidden, s_head.weight, s_head.bias))

    whole_loss, whole_grads = run(23)
    loss, grads = run(chunk_rows)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=1e-7)
    for actual, expected in zip(grads, whole_grads, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_all_masked_input_gives_zero_loss_zero_gradients_and_no_nan(objective):
    spec = LossSpec(objective, temperature=2.0, alpha=0.5)
    s_hidden, s_head, t_hidden, t_head, _ = random_problem(rows=6, seed=2)
    labels = torch.full((2, 3), IGNORE_INDEX)
    hidden_rows, teacher_rows, label_rows = valid_rows(
        s_hidden.view(2, 3, -1), t_hidden.view(2, 3, -1), labels, causal=True
    )
    fused = fused_distillation_loss(hidden_rows, s_head, teacher_rows, t_head, label_rows, spec,
                                    vocab_size=53)  # fmt: skip
    logits = s_hidden @ s_head.weight.t()
    unfused = distillation_loss(logits[:0], logits[:0].detach(), label_rows, spec, vocab_size=53)
    assert_exact_zeros(fused, unfused, (s_hidden, s_head.weight, s_head.bias))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_bf16_inputs_stay_close_to_the_float64_reference(objective):
    """bf16 in, fp32 softmax math: the loss is within 1e-2 of the fp64 reference.

    The gradients go through bf16 GEMMs (as under autocast), whose rounding alone costs about 1%
    on these shapes; they must be within 2e-2 and no worse than the plain autocast-style path
    (bf16 logits, fp32 log-softmax, autograd) measured on the same inputs.
    """
    vocab = 500
    spec = LossSpec(objective, temperature=2.0, alpha=0.1)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(
        rows=64, vocab=vocab, hidden=(32, 48), dtype=torch.bfloat16, seed=3
    )
    out = fused_distillation_loss(s_hidden, s_head, t_hidden, t_head, labels, spec,
                                  vocab_size=vocab, chunk_rows=16)  # fmt: skip
    grads = torch.autograd.grad(out.loss, (s_hidden, s_head.weight))
    assert out.loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]

    expected, leaves = fused_reference(s_hidden, s_head, t_hidden, t_head, labels, spec, vocab, 64)
    expected_grads = torch.autograd.grad(expected, leaves[:2])

    # The autocast-style baseline: bf16 logits, then the definition in float64 with autograd.
    baseline = reference_loss(
        logits_of(s_hidden, s_head, vocab).float(), logits_of(t_hidden, t_head, vocab).float(),
        labels, spec, 64,
    )  # fmt: skip
    baseline_grads = torch.autograd.grad(baseline, (s_hidden, s_head.weight))

    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-2, atol=0)
    for actual, base, wanted in zip(grads, baseline_grads, expected_grads, strict=True):
        error = (actual.double() - wanted).norm() / wanted.norm()
        baseline_error = (base.double() - wanted).norm() / wanted.norm()
        assert error < 2e-2 and error <= 1.25 * baseline_error


def test_causal_rows_are_shifted_and_masked():
    outputs = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX, 2], [0, 0, 1, IGNORE_INDEX]])
    rows, _, row_labels = valid_rows(outputs, outputs, labels, causal=True)
    # Position t predicts label t+1: rows (0,0)->1, (0,2)->2, (1,0)->0, (1,1)->1.
    torch.testing.assert_close(rows, outputs[[0, 0, 1, 1], [0, 2, 0, 1]])
    assert row_labels.tolist() == [1, 2, 0, 1]
    assert valid_mask(labels, causal=True).sum() == 4
    assert valid_mask(labels, causal=False).sum() == 5


def test_split_batches_normalised_by_the_total_add_up_to_the_whole():
    """Two micro-batches, each normalised by the step's token count, sum to the whole batch."""
    spec = LossSpec("jsd", temperature=2.0, alpha=0.5)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(rows=20, seed=4)

    def loss(rows, num_tokens=None):
        return fused_distillation_loss(
            s_hidden[rows], s_head, t_hidden[rows], t_head, labels[rows], spec, vocab_size=53,
            num_tokens=num_tokens,
        ).loss  # fmt: skip

    whole = loss(slice(0, 20))
    halves = loss(slice(0, 8), 20) + loss(slice(8, 20), 20)
    torch.testing.assert_close(halves, whole)
    whole_grad = torch.autograd.grad(whole, s_head.weight)[0]
    torch.testing.assert_close(torch.autograd.grad(halves, s_head.weight)[0], whole_grad)


def test_vocabulary_smaller_than_the_tokenizer_is_refused():
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(vocab=10, pads=(0, 0))
    with pytest.raises(ValueError, match="does not cover the tokenizer"):
        fused_distillation_loss(s_hidden, s_head, t_hidden, t_head, labels, LossSpec(),
                                vocab_size=12)  # fmt: skip


GIB = 2**30


def test_cpu_chunk_is_what_fits_its_fixed_budget():
    """On a CPU the chunk stays what was measured fast there: 256 MiB of fp32 logits x 2."""
    assert auto_chunk_rows(32_000) == 1048 and auto_chunk_rows(128_256) == 261
    assert CPU_CHUNK_MEMORY_MB == 256 and free_memory(torch.device("cpu")) is None


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_an_explicit_budget_sizes_the_chunk_on_any_device(device_type):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        row_bytes = 128_256 * chunk_entry_bytes(dtype, device_type)
        rows = auto_chunk_rows(128_256, device_type, compute_dtype=dtype, free_bytes=80 * GIB,
                               memory_budget_mb=512)  # fmt: skip
        assert rows * row_bytes <= 512 * 2**20 < (rows + 1) * row_bytes
    assert auto_chunk_rows(10**9, device_type, memory_budget_mb=1) == 1


def test_gpu_chunk_takes_a_share_of_the_free_memory_within_its_bounds():
    vocab = 128_256
    row_bytes = vocab * chunk_entry_bytes(torch.bfloat16, "cuda")  # 56 bytes per entry in bf16
    assert row_bytes == vocab * (2 + 2 + 8 + losses.ELEMENTWISE_BYTES_PER_ENTRY)

    def rows(free_bytes: int | None) -> int:
        return auto_chunk_rows(vocab, "cuda", compute_dtype=torch.bfloat16, free_bytes=free_bytes)

    share = int(100 * GIB * GPU_FREE_MEMORY_FRACTION) // row_bytes
    assert GPU_MIN_CHUNK_ROWS < share < MAX_CHUNK_ROWS and rows(100 * GIB) == share  # 1868
    assert rows(10_000 * GIB) == MAX_CHUNK_ROWS
    # 40 GiB: its share (766 rows) is below the floor, which a quarter of it still holds.
    assert rows(40 * GIB) == GPU_MIN_CHUNK_ROWS
    # 4 GiB: the floor would take more than a quarter of it, so a quarter it is.
    assert rows(4 * GIB) == 4 * GIB // 4 // row_bytes < GPU_MIN_CHUNK_ROWS
    assert rows(None) == GPU_MIN_CHUNK_ROWS  # a device that cannot tell its free memory
    # fp16 keeps an fp32 gradient buffer of its own: 4 more bytes per entry, fewer rows.
    fp16 = auto_chunk_rows(vocab, "cuda", compute_dtype=torch.float16, free_bytes=100 * GIB)
    assert fp16 == int(100 * GIB * GPU_FREE_MEMORY_FRACTION) // (vocab * 60) < share


def test_the_automatic_chunks_give_what_small_chunks_give():
    """The default (CPU) chunk and a GPU-sized one (from an explicit free memory, here two
    chunks of 2500 rows) against chunks of 64 rows."""
    spec = LossSpec("jsd", temperature=2.0, alpha=0.3)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(rows=2500, hidden=(8, 8), seed=9)
    vocab = 53
    gpu_rows = auto_chunk_rows(vocab, "cuda", free_bytes=2500 * vocab * 56 * 2)
    assert 1000 < gpu_rows < 2500

    def run(chunk_rows):
        out = fused_distillation_loss(s_hidden, s_head, t_hidden, t_head, labels, spec,
                                      vocab_size=vocab, chunk_rows=chunk_rows)  # fmt: skip
        return out.loss, *torch.autograd.grad(out.loss, (s_hidden, s_head.weight, s_head.bias))

    small = run(64)
    for chunk_rows in (None, gpu_rows):
        for actual, expected in zip(run(chunk_rows), small, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of the tensors made under it that are still alive, and their peak: checked
    after every op (views share their storage; tensors that existed before are not counted)."""

    def __init__(self, *existing: torch.Tensor) -> None:
        super().__init__()
        self.existing = {StorageWeakRef(t.untyped_storage()).cdata for t in existing}
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def now(self) -> int:
        self.alive = {key: ref for key, ref in self.alive.items() if not ref[0].expired()}
        return sum(size for _, size in self.alive.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = StorageWeakRef(storage).cdata
                if key not in self.existing and key not in self.alive:
                    self.alive[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, self.now())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_loss_memory_is_the_documented_formula(dtype, monkeypatch):
    """Forward, then backward into an fp32 weight's .grad, against the module's formula: whole
    chunks (the GPU path: its elementwise bytes per entry bound every objective, tightly for the
    costliest), the weight copy for bf16/fp16, the fp32 accumulator; in backward no [V_r, H]
    copy at all."""
    monkeypatch.setattr(losses, "_CPU_BLOCK_BYTES", 2**40)  # the math on whole chunks
    rows, hidden, vocab, vocab_rows, chunk = 32, 64, 3000, 3008, 16
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(
        rows=rows, vocab=vocab, hidden=(hidden, hidden), pads=(8, 8), seed=10
    )
    s_hidden, t_hidden = s_hidden.detach().to(dtype), t_hidden.to(dtype)
    t_head = OutputHead(t_head.weight.to(dtype))
    size, grad_size = dtype.itemsize, losses.gradient_dtype(dtype).itemsize
    kept = vocab_rows * hidden * 4 + rows * hidden * grad_size  # grad_weight, grad_hidden
    weight_copy = 0 if dtype == torch.float32 else vocab * hidden * size  # cast to dtype
    product = vocab * hidden * size if grad_size != 4 else 0  # bf16: made in bf16 (no CUDA)
    # The weight-gradient product comes after the chunk's elementwise math is freed.
    chunk_peak = max(chunk * vocab * chunk_entry_bytes(dtype, "cuda"),
                     chunk * vocab * chunk_entry_bytes(dtype, "cpu") + product)  # fmt: skip
    forward_peak = kept + weight_copy + chunk_peak
    peaks = []
    for objective in OBJECTIVES:
        hidden_states = s_hidden.clone().requires_grad_(True)
        weight = s_head.weight.detach().clone().requires_grad_(True)  # an fp32 master weight
        spec = LossSpec(objective, temperature=2.0, alpha=0.3)
        memory = LiveTensorBytes(hidden_states, weight, t_hidden, t_head.weight, labels)
        with memory:
            out = fused_distillation_loss(
                hidden_states, OutputHead(weight), t_hidden, t_head, labels, spec,
                vocab_size=vocab, chunk_rows=chunk,
            )  # fmt: skip
            peaks.append(memory.peak)
            assert kept <= memory.now() <= kept + 64  # (+ the loss's scalars)
            memory.peak = memory.now()
            out.loss.backward()
        assert weight.grad.dtype == torch.float32 and weight.grad.shape == (vocab_rows, hidden)
        # The accumulator became .grad: backward added the hidden states' scaling alone.
        assert memory.peak <= kept + rows * hidden * (4 + 4 + grad_size) + 64, objective
        after = kept + rows * hidden * (size - grad_size)  # .grad, hidden_states.grad in dtype
        assert after <= memory.now() <= after + 64, objective
    assert max(peaks) <= forward_peak <= 1.1 * max(peaks), peaks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_weight_gradients_accumulate_in_fp32_matrix_products_on_cuda():
    assert losses._fp32_accumulating_addmm(torch.device("cuda"), torch.bfloat16)
    spec = LossSpec("jsd", temperature=2.0, alpha=0.1)
    problem = random_problem(rows=64, vocab=500, hidden=(32, 48), dtype=torch.bfloat16, seed=3)
    s_hidden, s_head, t_hidden, t_head, labels = (
        t.cuda() if torch.is_tensor(t) else OutputHead(t.weight.cuda(), t.bias.cuda())
        for t in problem
    )
    out = fused_distillation_loss(s_hidden, s_head, t_hidden, t_head, labels, spec,
                                  vocab_size=500, chunk_rows=16)  # fmt: skip
    (grad,) = torch.autograd.grad(out.loss, s_head.weight)
    cpu = fused_distillation_loss(*problem, spec, vocab_size=500, chunk_rows=16)
    (expected,) = torch.autograd.grad(cpu.loss, problem[1].weight)
    assert (grad.cpu().double() - expected.double()).norm() / expected.double().norm() < 2e-2


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_minus_infinity_logits_are_zero_probabilities_not_nan(objective):
    """Models may mask tokens with -inf logits: those tokens have probability 0 and contribute
    nothing (0 log 0 = 0) instead of turning the loss into NaN."""
    spec = LossSpec(objective, temperature=1.0, alpha=0.2)
    g = torch.Generator().manual_seed(5)
    student = torch.randn(6, 20, generator=g)
    teacher = torch.randn(6, 20, generator=g)
    labels = torch.randint(0, 15, (6,), generator=g)
    student[:, 15:] = teacher[:, 15:] = float("-inf")
    student.requires_grad_(True)
    masked = distillation_loss(student, teacher, labels, spec)
    (grad,) = torch.autograd.grad(masked.loss, student)
    assert torch.isfinite(masked.loss) and torch.isfinite(grad).all()
    # The same as leaving the masked columns out.
    kept = student.detach()[:, :15].requires_grad_(True)
    expected = distillation_loss(kept, teacher[:, :15], labels, spec)
    (expected_grad,) = torch.autograd.grad(expected.loss, kept)
    torch.testing.assert_close(masked.loss, expected.loss)
    torch.testing.assert_close(grad[:, :15], expected_grad)
    assert torch.all(grad[:, 15:] == 0)


def test_fp16_gradients_are_not_flushed_before_the_loss_scale_applies():
    """Under fp16 training GradScaler multiplies the loss in backward; gradients made in the
    forward pass must survive until then (they are kept in fp32)."""
    vocab = 4000
    spec = LossSpec("forward_kl", temperature=2.0)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(
        rows=32, vocab=vocab, hidden=(16, 16), dtype=torch.float16, seed=6
    )
    out = fused_distillation_loss(s_hidden, s_head, t_hidden, t_head, labels, spec,
                                  vocab_size=vocab)  # fmt: skip
    (grad_weight,) = torch.autograd.grad(out.loss * 2.0**16, s_head.weight)
    expected, leaves = fused_reference(s_hidden, s_head, t_hidden, t_head, labels, spec, vocab, 32)
    (expected_weight,) = torch.autograd.grad(expected * 2.0**16, leaves[1])
    real = expected_weight[:vocab].abs() > 2.0**-14  # representable once scaled
    flushed = (grad_weight[:vocab][real] == 0).float().mean()
    assert flushed < 0.01
    assert (grad_weight.double() - expected_weight).norm() / expected_weight.norm() < 2e-2


@pytest.mark.parametrize(("objective", "extra"), CASES)
def test_compiled_kernel_equals_eager(objective, extra):
    # Every spec compiles its own graph: start afresh so dynamo's recompile limit (8) never
    # silently turns a case into eager-vs-eager.
    torch._dynamo.reset()
    spec = LossSpec(objective, temperature=2.0, alpha=0.3, **extra)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(rows=21, seed=7)
    s_head.transform = LogitTransform(softcap=4.0)
    results = []
    for compiled in (False, True):
        out = fused_distillation_loss(s_hidden, s_head, t_hidden, t_head, labels, spec,
                                      vocab_size=53, chunk_rows=8, compiled=compiled)  # fmt: skip
        grads = torch.autograd.grad(out.loss, (s_hidden, s_head.weight, s_head.bias))
        results.append((out.loss, *grads))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_zero_is_the_plain_kl_even_where_probabilities_underflow(objective):
    plain = {"skew_forward_kl": "forward_kl", "skew_reverse_kl": "reverse_kl"}[objective]
    student = torch.tensor([[0.0, 1.0, -200.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[0.5, -150.0, 1.0, 2.0]])
    labels = torch.tensor([0])
    skewed = distillation_loss(student, teacher, labels, LossSpec(objective, skew_alpha=0.0))
    expected = distillation_loss(student, teacher, labels, LossSpec(plain))
    (grad,) = torch.autograd.grad(skewed.loss, student)
    (expected_grad,) = torch.autograd.grad(expected.loss, student)
    torch.testing.assert_close(skewed.loss, expected.loss)
    torch.testing.assert_close(grad, expected_grad)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_cache_sized_blocks_inside_a_chunk_give_the_same_result(objective, monkeypatch):
    """On a CPU the elementwise math runs on blocks of rows smaller than the chunk."""
    spec = LossSpec(objective, temperature=2.0, alpha=0.3)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(rows=23, seed=8)
    s_head.transform = LogitTransform(softcap=4.0)

    def run():
        out = fused_distillation_loss(s_hidden, s_head, t_hidden, t_head, labels, spec,
                                      vocab_size=53, chunk_rows=10)  # fmt: skip
        return out.loss, *torch.autograd.grad(out.loss, (s_hidden, s_head.weight, s_head.bias))

    whole = run()
    monkeypatch.setattr("kd_dist.losses._CPU_BLOCK_BYTES", 3 * 53 * 4)  # blocks of 3 rows
    for blocked, expected in zip(run(), whole, strict=True):
        torch.testing.assert_close(blocked, expected, rtol=1e-6, atol=1e-7)
