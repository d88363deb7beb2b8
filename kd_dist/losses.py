"""Distillation losses: pure torch, no accelerate.

Shapes: N = valid (non-masked) token positions, V = the tokenizer's vocabulary, H = hidden size,
C = rows in one chunk.

Every objective D compares the teacher's p = softmax(z_t / T) with the student's
q = softmax(z_s / T) and is multiplied by T^2 (so the gradient's scale does not shrink with T,
Hinton et al. 2015); it can be mixed with the ordinary cross-entropy on the ground truth:

    loss = [(1 - alpha) * T^2 * sum_tokens D(p, q) + alpha * sum_tokens CE(z_s, label)] / num_tokens

``num_tokens`` is passed by the caller, so the training loop can normalise by the valid tokens of
a whole optimizer step (every accumulation micro-batch, every rank).

Objectives (p: teacher, q: student):

    forward_kl        KL(p || q)
    reverse_kl        KL(q || p)
    jsd               beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta p + (1 - beta) q;
                      beta = 0 is forward KL and beta = 1 reverse KL (the TRL/Liger convention)
    skew_forward_kl   KL(p || a p + (1 - a) q),  a = skew_alpha (DistiLLM)
    skew_reverse_kl   KL(q || a q + (1 - a) p)
    tvd               1/2 sum |p - q|

A stored teacher (``TopKTeacher``, from a teacher cache) keeps, per row, its k most likely
tokens S, their log p and the log of the rest's mass. Against it D compares two distributions
over k + 1 outcomes, the tokens of S and one "tail":

    p_bar = (p_S, 1 - sum p_S)    q_bar = (q_S, 1 - sum q_S)    loss term: T^2 * D(p_bar, q_bar)

p_bar is the stored rows as they are (renormalised over the k + 1 outcomes, which only undoes
their fp16 rounding), made at the cache's temperature: q_bar is at spec.temperature, so the
caller passes a cache made at that temperature. q_bar comes from the student's full logits
(still fused, chunk by chunk: log q_S gathered, the tail's log mass a logsumexp over the other
tokens), and the gradient reaches all V logits (the tail's share spread in proportion to the
student's q there). All six objectives are f-divergences, so on the merged outcomes each is a
lower bound of the full D(p, q) (the data-processing inequality), equal to it exactly when the
student's distribution within the tail is proportional to the teacher's: in particular when k =
V, and when the teacher has no mass outside its top-k, where every objective but reverse KL (and
its aliases jsd_beta = 1, skew_reverse_kl at skew_alpha = 0) is exact; reverse KL is infinite
there, in both forms (tests/test_topk_loss.py checks all three). alpha's cross-entropy is
unaffected by the cache: it is on the student's full logits at T = 1 against the ground-truth
label, mixed in as above.

Memory: nothing here keeps a [N x V] tensor for the backward pass. Both entry points walk the
rows in chunks and compute each chunk's loss *and* its gradient right away, in closed form and
in fp32 whatever the input dtype:

- ``distillation_loss`` takes logits; it keeps only the gradient w.r.t. the student's logits.
- ``fused_distillation_loss`` takes final hidden states and output-projection weights; each
  chunk's logits exist only inside the chunk, and it keeps only the gradients w.r.t. the
  student's hidden states, weight and bias.

What ``fused_distillation_loss`` allocates, with V_r >= V the weight's rows, d the hidden
states' dtype (bf16 under --bf16), g = gradient_dtype(d) (fp32 for fp16, else d), w the
weight's dtype and |x| the bytes of dtype x (measured against this in tests/test_losses.py):

    kept from forward to backward
      grad_weight    V_r x Hs x 4   the fp32 accumulator; scaled in place in backward, it is
                                    the weight's gradient itself (no copy when w is fp32)
      grad_hidden    N x Hs x |g|
      grad_bias      V_r x 4        (with a bias)
    during forward only
      weight copy    V x Hs x |d|   only when w is not d (fp32 master weights under bf16/fp16,
                                    as autocast would cast them for lm_head too)
      chunk          C x V x chunk_entry_bytes(d, device): both models' logits in d, the gradient
                                    overwriting the student's (an fp32 buffer of its own for
                                    fp16), and off a CPU the elementwise math's temporaries on
                                    whole chunks (ELEMENTWISE_BYTES_PER_ENTRY + 8 for
                                    upcasting d); on a CPU that math runs on cache-sized blocks
                                    of rows (about 13 x _CPU_BLOCK_BYTES). Against a TopKTeacher
                                    (teacher_logits=False) the student's logits alone, and
                                    TOP_K_ELEMENTWISE_BYTES + 4: no teacher buffer, nothing of
                                    the teacher projected, its [C, k] rows sliced
      fp32 weight    V x Hs x 4     under fp16 (g = fp32) when w is not fp32 (DeepSpeed's fp16
                                    weights): the hidden-state gradient's product runs in fp32
      weight-grad    V x Hs x |d|   after each chunk's elementwise math, when g is not fp32
      product                       and the device has no addmm with out_dtype=fp32 (a CPU:
                                    its bf16 GEMMs beat fp32 ones, so the product is made in d
                                    and added into fp32); none with it (CUDA bf16/fp16)
    during backward only
      grad_hidden    N x Hs x (4 + 4 + |g|)  the scaling, for a moment
      weight grad    V_r x Hs x |w| when w is not fp32 (DeepSpeed's bf16 weights)

The forward peak is the kept buffers + the weight copy + max(chunk, C x V x 2|d| + product).
Under bf16 with fp32 master weights the output layer thus costs the fp32 [V_r, Hs] gradient
that any training holds plus, during forward, one bf16 [V, Hs] copy (and on a CPU the bf16
product): 1.5 (CPU 2.1) fp32-[V_r, Hs] sizes at the peak, 1.0 in backward, where the earlier
version (a bf16 product cast to fp32 per chunk, the weight cut and cast under autograd) peaked at
3.1 in forward and 2.5 in backward. ``auto_chunk_rows`` sizes C.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

IGNORE_INDEX = -100

Objective = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
HiddenLoss = Literal["cosine", "mse"]

# Automatic chunk size (``auto_chunk_rows``). On a CPU the matrix products are efficient from a
# few hundred rows and the elementwise math runs on cache-sized blocks, so a fixed budget keeps
# what was measured fastest there. On a GPU the weight-gradient product [V, C] x [C, H] needs
# C in the thousands to run near peak, and each chunk also passes over the fp32 [V, H]
# accumulator once: the chunk takes a share of the free memory, within these rows.
CPU_CHUNK_MEMORY_MB = 256.0
GPU_FREE_MEMORY_FRACTION = 1 / 8  # measured before the first step: activations, gradients and
# lazily made optimizer states still need the rest
GPU_MIN_CHUNK_ROWS = 1024  # never at the cost of more than a quarter of the free memory
MAX_CHUNK_ROWS = 8192  # beyond this the products gain nothing measurable
# Bytes per [C x V] entry the elementwise math holds at its peak on fp32 logits (softmaxes, the
# divergence's terms, its gradient, a mask), plus 4 per model for upcasting logits in another
# dtype: at most 41 (49 from bf16), measured eagerly over every objective
# (tests/test_losses.py); torch.compile'd it holds fewer.
ELEMENTWISE_BYTES_PER_ENTRY = 44
# The same against a TopKTeacher (no teacher softmax; the tail's log q and softmax instead): 32
# measured eagerly over every objective, plus 4 for upcasting the student's logits
# (tests/test_topk_loss.py).
TOP_K_ELEMENTWISE_BYTES = 32
# Rows the elementwise math takes at once on a CPU: its handful of passes then stay in cache.
_CPU_BLOCK_BYTES = 2 * 2**20


@dataclass(frozen=True)
class LossSpec:
    objective: Objective = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the ground-truth cross-entropy
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; one of {OBJECTIVES}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError("jsd_beta must be in [0, 1]")
        if not 0.0 <= self.skew_alpha < 1.0:
            raise ValueError("skew_alpha must be in [0, 1)")


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``hidden @ weight.T + bias`` before its softmax.

    ``scale`` multiplies the logits (Cohere's logit_scale); ``softcap`` squashes them to
    softcap * tanh(logits / softcap) (Gemma 2/3's final_logit_softcapping).
    """

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(transformed logits, d transformed / d logits or None when it is the identity)."""
        if self.scale == 1.0 and self.softcap is None:
            return logits, None
        logits = logits * self.scale
        derivative = torch.full_like(logits[:1, :1], self.scale)
        if self.softcap is not None:
            squashed = torch.tanh(logits / self.softcap)
            logits = squashed * self.softcap
            derivative = derivative * (1.0 - squashed.square())
        return logits, derivative


IDENTITY = LogitTransform()


def softmax_and_log_softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax and log_softmax of [C, V] rows with one exp per element (shared by both)."""
    shifted = logits - logits.amax(-1, keepdim=True)
    exps = shifted.exp()
    total = exps.sum(-1, keepdim=True)
    return exps / total, shifted - total.log()


def plogx(probs: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """Row sums of probs * log_ratio, with 0 * log 0 = 0 (a -inf logit is a zero probability)."""
    return torch.where(probs > 0, probs * log_ratio, 0.0).sum(-1)


def _softmax_backward(q: torch.Tensor, grad_q: torch.Tensor) -> torch.Tensor:
    """d loss / d a for q = softmax(a), given d loss / d q: q * (g - sum_j q_j g_j)."""
    grad_q = torch.where(q > 0, grad_q, 0.0)
    return q * (grad_q - (q * grad_q).sum(-1, keepdim=True))


def _log_mixture(x: torch.Tensor, y: torch.Tensor, weight: float) -> tuple[torch.Tensor, ...]:
    """(m, log m) for m = weight * x + (1 - weight) * y; log m stays finite where m underflows."""
    mixture = torch.lerp(y, x, weight)
    return mixture, mixture.clamp_min(torch.finfo(mixture.dtype).tiny).log()


def divergence_and_grad(
    q: torch.Tensor,
    log_q: torch.Tensor,
    p: torch.Tensor,
    log_p: torch.Tensor,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """D(p, q) per row and dD/da where q = softmax(a): fp32 [C, V] x 4 -> [C], [C, V].

    Written to need no transcendental function beyond the two softmaxes and one log of the
    mixture, which is what bounds its speed once compiled.
    """
    objective, beta, skew = spec.objective, spec.jsd_beta, spec.skew_alpha
    # The endpoints are the plain KLs; computing them as mixtures would divide by zero where a
    # probability underflows.
    if (objective == "jsd" and beta == 0.0) or (objective == "skew_forward_kl" and skew == 0.0):
        objective = "forward_kl"
    elif (objective == "jsd" and beta == 1.0) or (objective == "skew_reverse_kl" and skew == 0.0):
        objective = "reverse_kl"

    if objective == "forward_kl":
        return plogx(p, log_p - log_q), q - p
    if objective == "reverse_kl":
        log_ratio = log_q - log_p
        value = plogx(q, log_ratio)
        return value, _softmax_backward(q, log_ratio)
    if objective == "jsd":
        _, log_m = _log_mixture(p, q, beta)
        value = beta * plogx(p, log_p - log_m) + (1 - beta) * plogx(q, log_q - log_m)
        return value, _softmax_backward(q, (1 - beta) * (log_q - log_m))
    if objective == "skew_forward_kl":
        m, log_m = _log_mixture(p, q, skew)
        return plogx(p, log_p - log_m), _softmax_backward(q, -(1 - skew) * p / m)
    if objective == "skew_reverse_kl":
        m, log_m = _log_mixture(q, p, skew)
        # d/dq_j = log q_j - log m_j + 1 - skew q_j / m_j; the constant 1 cancels in the softmax.
        grad_q = log_q - log_m - skew * q / m
        return plogx(q, log_q - log_m), _softmax_backward(q, grad_q)
    # tvd
    return 0.5 * (p - q).abs().sum(-1), _softmax_backward(q, 0.5 * torch.sign(q - p))


@dataclass(frozen=True)
class TopKTeacher:
    """The teacher's distribution on N rows as a cache stores it, at temperature T."""

    ids: torch.Tensor  # [N, k] integer token ids (int32 or int64), distinct within a row
    logprobs: torch.Tensor  # [N, k] log p_T of those tokens (any float dtype; fp16 in a cache)
    tail_logprob: torch.Tensor  # [N] log of the rest's mass, log(1 - sum_k p_T); -inf when k = V

    def __post_init__(self) -> None:
        # Leading dimensions may be any: a batch's rows per position are [B, L, k] and [B, L].
        if self.logprobs.shape != self.ids.shape or self.tail_logprob.shape != self.ids.shape[:-1]:
            raise ValueError(
                f"a top-k teacher needs ids [N, k], logprobs [N, k] and tail_logprob [N]; got "
                f"{tuple(self.ids.shape)}, {tuple(self.logprobs.shape)} and "
                f"{tuple(self.tail_logprob.shape)}"
            )

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows: slice | torch.Tensor | tuple[torch.Tensor, ...]) -> TopKTeacher:
        return TopKTeacher(self.ids[rows], self.logprobs[rows], self.tail_logprob[rows])


# What the loss compares the student with: the teacher's [C, V] logits, or its stored top-k.
Teacher = torch.Tensor | TopKTeacher


def top_k_teacher(logits: torch.Tensor, k: int, temperature: float) -> TopKTeacher:
    """The k most likely tokens of softmax(logits / T) per row, as a cache stores them.

    ``logits`` [C, V] (cut to the vocabulary, transformed) -> ids [C, k] int64, their fp32 log
    probabilities, and the tail's log mass in log space: logsumexp over the other tokens minus
    logsumexp over all (log(1 - sum p) would cancel to 0 or worse when the tail is tiny).
    """
    tempered = logits.float() / temperature
    log_total = tempered.logsumexp(-1)  # [C]
    top, ids = tempered.topk(k, dim=-1)  # [C, k]
    log_rest = tempered.scatter(-1, ids, float("-inf")).logsumexp(-1)  # [C]; -inf when k = V
    return TopKTeacher(ids, top - log_total[:, None], log_rest - log_total)


def top_k_outcomes(
    log_q: torch.Tensor, teacher: TopKTeacher
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k + 1 outcomes (the teacher's top-k tokens and the rest) of the student's log q
    [C, V] fp32 and of C stored teacher rows: (the student's log q_bar [C, k + 1], the
    teacher's log p_bar [C, k + 1], the student's log q over the rest [C, V], -inf on S).

    The rest's mass is a logsumexp in log space (no cancellation). Stored in fp16, the
    teacher's k + 1 masses sum to 1 only within its rounding: renormalised, so that a
    divergence compares two distributions (and is >= 0).
    """
    ids = teacher.ids.long()
    log_q_rest = log_q.scatter(-1, ids, float("-inf"))  # [C, V]: the tail's log q, -inf on S
    log_q_tail = log_q_rest.logsumexp(-1, keepdim=True)  # [C, 1]
    log_q_bar = torch.cat([log_q.gather(-1, ids), log_q_tail], -1)  # [C, k + 1]
    log_p_bar = torch.cat([teacher.logprobs.float(), teacher.tail_logprob.float()[:, None]], -1)
    return log_q_bar, log_p_bar - log_p_bar.logsumexp(-1, keepdim=True), log_q_rest


def _top_k_divergence_and_grad(
    q: torch.Tensor, log_q: torch.Tensor, teacher: TopKTeacher, spec: LossSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """D over k + 1 outcomes (the teacher's top-k tokens and the rest) and dD/da: q = softmax(a)
    and log q fp32 [C, V], a TopKTeacher of C rows -> [C], [C, V].

    The student's collapsed logits a_bar = (a_S, logsumexp of a over the tail) have softmax
    q_bar = (q_S, q_tail), so ``divergence_and_grad`` on the [C, k + 1] outcomes gives D and
    dD/da_bar; back to a: da_bar_i/da_j = delta_ij on S, and d a_bar_tail / da_j = q_j / q_tail,
    the tail's own softmax, for j outside S.
    """
    log_q_bar, log_p_bar, log_q_rest = top_k_outcomes(log_q, teacher)
    log_q_tail = log_q_bar[:, -1:]
    divergence, grad_bar = divergence_and_grad(
        log_q_bar.exp(), log_q_bar, log_p_bar.exp(), log_p_bar, spec
    )
    # q_j / q_tail over the tail (0 on S). Where the student has no mass there (its logits -inf
    # off S, as a model masking tokens makes them) log q_tail = -inf: the clamp keeps
    # -inf - (-inf) = NaN out, giving exp(-inf) = 0.
    tail_softmax = log_q_rest.sub_(log_q_tail.clamp_min(torch.finfo(log_q.dtype).min)).exp_()
    grad_a = tail_softmax.mul_(grad_bar[:, -1:]).scatter_(-1, teacher.ids.long(), grad_bar[:, :-1])
    return divergence, grad_a


def _kd_divergence_and_grad(
    q: torch.Tensor,
    log_q: torch.Tensor,
    teacher: Teacher,
    spec: LossSpec,
    teacher_transform: LogitTransform,
) -> tuple[torch.Tensor, torch.Tensor]:
    """D(p, q) per row and dD/da for the student's q = softmax(a) ([C, V] fp32 x 2): against the
    teacher's whole distribution (its raw [C, V] logits) or its stored top-k."""
    if isinstance(teacher, TopKTeacher):
        return _top_k_divergence_and_grad(q, log_q, teacher, spec)
    teacher_logits, _ = teacher_transform.apply(teacher.float())
    p, log_p = softmax_and_log_softmax(teacher_logits / spec.temperature)
    return divergence_and_grad(q, log_q, p, log_p, spec)


def chunk_loss_and_grad(
    student_logits: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    spec: LossSpec,
    student_transform: LogitTransform = IDENTITY,
    teacher_transform: LogitTransform = IDENTITY,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: (weighted loss sum, KD sum, CE sum, d loss / d raw student logits).

    [C, V] student logits (any float dtype, before its logit transform), the teacher's [C, V]
    logits (likewise) or a TopKTeacher of C rows, [C] labels -> fp32 scalars x 3 and a gradient
    [C, V] in ``gradient_dtype`` of the logits' dtype. All the math is fp32.
    """
    temperature, grad_dtype = spec.temperature, gradient_dtype(student_logits.dtype)
    student_logits, derivative = student_transform.apply(student_logits.float())
    q, log_q = softmax_and_log_softmax(student_logits / temperature)
    divergence, grad_a = _kd_divergence_and_grad(q, log_q, teacher, spec, teacher_transform)
    kd_sum = divergence.sum() * temperature**2
    # d(T^2 D)/dz_s = T^2 * dD/da * (1/T), with a = z_s / T.
    grad = grad_a * ((1.0 - spec.alpha) * temperature)
    ce_sum = kd_sum.new_zeros(())
    if spec.alpha > 0:
        probs, log_probs = (
            (q, log_q) if temperature == 1.0 else softmax_and_log_softmax(student_logits)
        )
        ce_sum = -log_probs.gather(-1, labels[:, None]).sum()
        grad = (grad + spec.alpha * probs).scatter_add(
            -1, labels[:, None], torch.full_like(probs[:, :1], -spec.alpha)
        )  # - alpha at each row's label: the one-hot part, without a [C x V] one-hot tensor
    if derivative is not None:
        grad = grad * derivative
    weighted = (1.0 - spec.alpha) * kd_sum + spec.alpha * ce_sum
    return weighted, kd_sum, ce_sum, grad.to(grad_dtype)


def gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients are kept in before the backward pass scales them.

    fp16 gradients made here would not yet carry the loss scale of fp16 training (GradScaler
    multiplies in backward), so small ones would flush to zero: they stay fp32 until then.
    """
    return torch.float32 if dtype == torch.float16 else dtype


_COMPILED: dict[str, object] = {}


def _chunk_kernel(compiled: bool):
    """``chunk_loss_and_grad``, torch.compile'd when asked and possible.

    Compiling fuses the chunk's ~20 elementwise passes over [C x V] into a few row-wise loops;
    where compilation is unavailable (no C++ compiler, an unsupported backend) it falls back to
    eager execution with a warning, once.
    """
    if not compiled or _COMPILED.get("failed"):
        return chunk_loss_and_grad
    if "kernel" not in _COMPILED:
        _COMPILED["kernel"] = torch.compile(chunk_loss_and_grad)

    def run(*args):
        if _COMPILED.get("failed"):
            return chunk_loss_and_grad(*args)
        try:
            return _COMPILED["kernel"](*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # compilation problems surface at the first call
            warnings.warn(
                f"torch.compile of the loss failed, running it eagerly: {error}", stacklevel=2
            )
            _COMPILED["failed"] = True
            return chunk_loss_and_grad(*args)

    return run


def chunk_entry_bytes(
    compute_dtype: torch.dtype, device_type: str, *, teacher_logits: bool = True
) -> int:
    """Bytes the fused loss holds per [C x V] entry of a chunk (see the module's docstring): both
    models' logits in ``compute_dtype``, the gradient's own buffer when it needs another dtype
    (fp16), and off a CPU the elementwise math's fp32 temporaries over the whole chunk (56 in
    bf16, 52 in fp32, 60 in fp16). ``teacher_logits=False``: a TopKTeacher, whose chunk holds the
    student's logits alone (its [C, k] rows are negligible) and fewer temporaries (38 in bf16,
    36 in fp32, 42 in fp16)."""
    models = 2 if teacher_logits else 1
    grad_dtype = gradient_dtype(compute_dtype)
    logits = models * compute_dtype.itemsize + (
        grad_dtype.itemsize if grad_dtype != compute_dtype else 0
    )
    if device_type == "cpu":
        return logits
    upcasts = 0 if compute_dtype == torch.float32 else models * 4
    temporaries = ELEMENTWISE_BYTES_PER_ENTRY if teacher_logits else TOP_K_ELEMENTWISE_BYTES
    return logits + upcasts + temporaries


def auto_chunk_rows(
    vocab_size: int,
    device_type: str = "cpu",
    *,
    compute_dtype: torch.dtype = torch.float32,
    free_bytes: int | None = None,
    memory_budget_mb: float | None = None,
    teacher_logits: bool = True,
) -> int:
    """Rows per chunk: a pure function of the shapes and the memory (``free_memory`` reads it).

    With ``memory_budget_mb`` (--loss_chunk_memory_mb): as many rows as fit in it. Otherwise on a
    CPU as many as fit ``CPU_CHUNK_MEMORY_MB``; on a GPU ``GPU_FREE_MEMORY_FRACTION`` of
    ``free_bytes``, within [GPU_MIN_CHUNK_ROWS, MAX_CHUNK_ROWS], the floor capped at a quarter
    of the free memory (and taken as it is when the free memory is unknown).
    ``teacher_logits=False`` sizes the chunks of a TopKTeacher (``chunk_entry_bytes``).
    """
    row_bytes = vocab_size * chunk_entry_bytes(
        compute_dtype, device_type, teacher_logits=teacher_logits
    )
    if memory_budget_mb is not None or device_type == "cpu":
        budget = CPU_CHUNK_MEMORY_MB if memory_budget_mb is None else memory_budget_mb
        return max(1, int(budget * 2**20) // row_bytes)
    if free_bytes is None:
        return GPU_MIN_CHUNK_ROWS
    rows = int(free_bytes * GPU_FREE_MEMORY_FRACTION) // row_bytes
    rows = min(MAX_CHUNK_ROWS, max(GPU_MIN_CHUNK_ROWS, rows))
    return max(1, min(rows, free_bytes // 4 // row_bytes))


def free_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator (None on a CPU, or where the backend cannot tell)."""
    if device.type == "cpu":
        return None
    try:
        return torch.accelerator.get_memory_info(device)[0]
    except (RuntimeError, ValueError):
        return None


def default_chunk_rows(vocab_size: int, like: torch.Tensor, teacher: Teacher) -> int:
    """``auto_chunk_rows`` for rows like ``like`` (its device's free memory, its dtype) against
    ``teacher`` (logits or hidden states, or a TopKTeacher)."""
    return auto_chunk_rows(
        vocab_size, like.device.type, compute_dtype=like.dtype, free_bytes=free_memory(like.device),
        teacher_logits=not isinstance(teacher, TopKTeacher),
    )  # fmt: skip


def _block_rows(chunk_rows: int, vocab_size: int, device: torch.device) -> int:
    """Rows the elementwise kernel takes at once: cache-sized on a CPU, the chunk elsewhere."""
    if device.type != "cpu":
        return chunk_rows
    return max(1, min(chunk_rows, _CPU_BLOCK_BYTES // (vocab_size * 4)))


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable: what to call backward on
    kd_sum: torch.Tensor  # scalar, detached: sum over the valid tokens of T^2 * D(p, q)
    ce_sum: torch.Tensor  # scalar, detached: sum of cross-entropy over the valid tokens
    num_tokens: int  # valid tokens in this call


class _ChunkedLogitsLoss(torch.autograd.Function):
    """Loss sum over rows of logits, chunk by chunk; keeps only the student-logit gradient.

    ``teacher``: the teacher's logits [N, V] or a TopKTeacher, sliced by rows alike."""

    @staticmethod
    def forward(ctx, student, teacher, labels, spec, chunk_rows, compiled):
        kernel = _chunk_kernel(compiled)
        grad_student = torch.empty_like(student, dtype=gradient_dtype(student.dtype))
        totals = torch.zeros(3, dtype=torch.float32, device=student.device)
        block_rows = _block_rows(chunk_rows, student.shape[-1], student.device)
        for start in range(0, student.shape[0], block_rows):
            rows = slice(start, start + block_rows)
            *sums, grad_student[rows] = kernel(student[rows], teacher[rows], labels[rows], spec)
            totals += torch.stack(sums)
        ctx.save_for_backward(grad_student)
        ctx.mark_non_differentiable(totals)
        return totals[0].clone(), totals

    @staticmethod
    def backward(ctx, grad_loss, _grad_totals):
        (grad_student,) = ctx.saved_tensors
        return _scaled(grad_student, grad_loss), None, None, None, None, None


class _FusedLinearLoss(torch.autograd.Function):
    """Loss sum over rows of hidden states: each chunk's logits are made, used and freed in turn.

    The weights come as the models hold them ([V_rows, H], any dtype) and are cut to the
    vocabulary and cast to the hidden states' dtype here, outside autograd: the student's
    gradient then leaves as the fp32 accumulator itself, rather than through the backward of a
    slice and a cast (an fp32 [V_rows, H] copy each).
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden,  # [N, Hs]
        student_weight,  # [V_rows, Hs], V_rows >= vocab_size
        student_bias,  # [V_rows] or None
        teacher_hidden,  # [N, Ht], or a TopKTeacher of N rows
        teacher_weight,  # [V_rows_t, Ht]; None for a TopKTeacher
        teacher_bias,  # [V_rows_t] or None
        labels,  # [N]
        spec,
        student_transform,
        teacher_transform,
        vocab_size,
        chunk_rows,
        compiled,
    ):
        kernel = _chunk_kernel(compiled)
        dtype = student_hidden.dtype
        vocab = slice(0, vocab_size)
        # [V, H] views, copied only where the dtype differs (fp32 master weights under bf16).
        weight, bias = _cut(student_weight, student_bias, vocab, dtype)
        if teacher_weight is not None:
            teacher_weight, teacher_bias = _cut(
                teacher_weight, teacher_bias, vocab, teacher_hidden.dtype
            )
        # The gradient GEMMs run in gradient_dtype (fp32 for fp16 inputs, see there): an fp32
        # master weight serves as it is.
        grad_dtype = gradient_dtype(dtype)
        weight_for_grad = weight if grad_dtype == dtype else student_weight[vocab].to(grad_dtype)
        grad_hidden = torch.empty_like(student_hidden, dtype=grad_dtype)
        # Gradients of the projection accumulate over chunks: fp32 so many chunks add up exactly,
        # over all V_rows rows (the padded ones stay 0) so that backward can hand them over.
        # A frozen projection (a LoRA student's output layer) gets no [V_rows, Hs] buffer at all.
        wants_weight, wants_bias = ctx.needs_input_grad[1:3]
        grad_weight = (
            torch.zeros_like(student_weight, dtype=torch.float32) if wants_weight else None
        )
        grad_bias = (
            torch.zeros_like(student_bias, dtype=torch.float32)
            if wants_bias and student_bias is not None
            else None
        )
        totals = torch.zeros(3, dtype=torch.float32, device=student_hidden.device)
        # Each chunk's logits go to buffers made once: fresh [C x V] tensors per chunk cost
        # page faults on CPU and allocator churn on GPU. The gradient overwrites the student's
        # logits block by block unless it needs another dtype (fp16 inputs). A TopKTeacher has
        # no logits: its stored rows are sliced instead.
        buffer_rows = min(chunk_rows, student_hidden.shape[0])
        student_buffer = student_hidden.new_empty(buffer_rows, vocab_size)
        top_k = isinstance(teacher_hidden, TopKTeacher)
        teacher_buffer = None if top_k else teacher_hidden.new_empty(buffer_rows, vocab_size)
        grad_buffer = (
            student_buffer
            if grad_dtype == student_buffer.dtype
            else student_buffer.new_empty(buffer_rows, vocab_size, dtype=grad_dtype)
        )
        block_rows = _block_rows(chunk_rows, vocab_size, student_hidden.device)
        for start in range(0, student_hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            hidden, chunk_labels = student_hidden[rows], labels[rows]
            count = hidden.shape[0]
            student_logits = _project(student_buffer[:count], hidden, weight, bias)
            teacher = (
                teacher_hidden[rows]
                if top_k
                else _project(
                    teacher_buffer[:count], teacher_hidden[rows], teacher_weight, teacher_bias
                )
            )  # [C, V] logits or a TopKTeacher of C rows
            grad_logits = grad_buffer[:count]
            for block_start in range(0, count, block_rows):
                block = slice(block_start, block_start + block_rows)
                *sums, grad_logits[block] = kernel(
                    student_logits[block], teacher[block], chunk_labels[block], spec,
                    student_transform, teacher_transform,
                )  # fmt: skip
                totals += torch.stack(sums)
            torch.mm(grad_logits, weight_for_grad, out=grad_hidden[rows])  # [C, Hs]
            if grad_weight is not None:
                hidden = hidden.to(grad_dtype)
                _accumulate_product(grad_weight[vocab], grad_logits.t(), hidden)  # [V, Hs]
            if grad_bias is not None:
                grad_bias[vocab] += grad_logits.sum(0, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = student_weight.dtype
        ctx.bias_dtype = None if student_bias is None else student_bias.dtype
        ctx.mark_non_differentiable(totals)
        return totals[0].clone(), totals

    @staticmethod
    def backward(ctx, grad_loss, _grad_totals):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # The fp32 accumulators are scaled in place: they become the gradients without another
        # [V_rows, Hs] copy (the cast copies only for weights that are not fp32). So this runs
        # once per forward, as a training step's backward does (no retain_graph).
        return (
            _scaled(grad_hidden, grad_loss),
            None
            if grad_weight is None
            else _scaled(grad_weight, grad_loss, ctx.weight_dtype, in_place=True),
            None
            if grad_bias is None
            else _scaled(grad_bias, grad_loss, ctx.bias_dtype, in_place=True),
            *(None,) * 10,
        )


def _scaled(
    gradient: torch.Tensor,
    grad_loss: torch.Tensor,
    dtype: torch.dtype | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """A saved gradient times the upstream one (a scalar), in fp32, returned in ``dtype``
    (default: the saved gradient's); ``in_place`` scales an fp32 ``gradient`` itself.

    A zero upstream gradient gives exact zeros even where the saved gradient is not finite
    (0 * NaN would be NaN): the trainer backpropagates a zero through a micro-batch whose loss
    or teacher is not finite, to skip it without waiting for the host (``make_micro_step``).
    """
    scale = grad_loss.float()
    scaled = gradient.mul_(scale) if in_place else gradient.float() * scale
    return scaled.masked_fill_(grad_loss == 0, 0.0).to(dtype or gradient.dtype)


def _cut(
    weight: torch.Tensor, bias: torch.Tensor | None, vocab: slice, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A head's rows of the tokenizer's vocabulary in ``dtype`` (views where it already is)."""
    return weight[vocab].to(dtype), None if bias is None else bias[vocab].to(dtype)


# (device type, dtype) -> whether torch.addmm(..., out_dtype=torch.float32) works there.
_FP32_ACCUMULATING_ADDMM: dict[tuple[str, torch.dtype], bool] = {}


def _fp32_accumulating_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(total, a, b, out_dtype=torch.float32, out=total)`` adds a product
    of ``dtype`` matrices into an fp32 ``total`` on this device (CUDA bf16/fp16 in recent torch;
    not on a CPU in torch 2.13). Probed once per device type and dtype on a small exact case."""
    key = (device.type, dtype)
    if key not in _FP32_ACCUMULATING_ADDMM:
        left = torch.arange(6.0, device=device).reshape(2, 3)
        right = torch.arange(3.0, device=device)[:, None] - 1.0
        total = torch.ones(2, 1, device=device)
        expected = total + left @ right
        try:
            torch.addmm(total, left.to(dtype), right.to(dtype), out_dtype=total.dtype, out=total)
            works = torch.equal(total, expected)
        except (RuntimeError, TypeError):  # not implemented for this backend or dtype
            works = False
        _FP32_ACCUMULATING_ADDMM[key] = works
    return _FP32_ACCUMULATING_ADDMM[key]


def _accumulate_product(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """total += left @ right: [V, C] x [C, H] into an fp32 [V, H], accumulated in fp32.

    Inputs in total's dtype, or where the device can (``_fp32_accumulating_addmm``), the
    product adds straight into ``total``; otherwise it is made in the inputs' dtype and added in
    place (a [V, H] temporary in that dtype: on a CPU its bf16 GEMMs beat upcasting to fp32).
    """
    if left.dtype == total.dtype:
        total.addmm_(left, right)
    elif _fp32_accumulating_addmm(left.device, left.dtype):
        torch.addmm(total, left, right, out_dtype=total.dtype, out=total)
    else:
        total += left @ right


def _project(
    out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """out = hidden @ weight.T (+ bias): [C, H] x [V, H] -> [C, V], in the inputs' dtype."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _normalise(loss_sum: torch.Tensor, num_tokens, num_rows: int) -> torch.Tensor:
    normaliser = num_rows if num_tokens is None else num_tokens
    if not torch.is_tensor(normaliser):
        normaliser = torch.tensor(float(normaliser), device=loss_sum.device)
    # An all-masked batch has nothing to normalise: its loss is an exact 0, never 0/0 = NaN.
    return loss_sum / normaliser.clamp(min=1).to(loss_sum.dtype)


def _check_rows(teacher: TopKTeacher, rows: int) -> None:
    if len(teacher) != rows:
        raise ValueError(
            f"the top-k teacher has {len(teacher)} rows for the student's {rows}: pass the "
            "teacher's stored rows of exactly the student's valid positions, in their order"
        )


def _check_vocab(name: str, columns: int, vocab_size: int) -> None:
    if columns < vocab_size:
        raise ValueError(
            f"{name} has {columns} vocabulary rows, fewer than the tokenizer's {vocab_size} "
            "tokens: the model's vocabulary does not cover the tokenizer."
        )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    labels: torch.Tensor,
    spec: LossSpec,
    *,
    num_tokens: int | float | torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_rows: int | None = None,
    compiled: bool = False,
) -> LossOutput:
    """Loss over rows of logits ([N, V_s], [N, V_t]) with labels [N] of the same rows.

    Callers pass only valid rows (see ``valid_rows``). ``vocab_size`` is the tokenizer's real
    vocabulary: both logit tensors are cut to it, because models often pad their embedding
    matrices and the padded columns are not real tokens (cutting equals masking them to -inf).
    ``teacher_logits`` may instead be a TopKTeacher of the same N rows (its ids within the
    vocabulary): the divergence is then over its k + 1 outcomes. ``num_tokens`` is the
    normaliser (default: N, at least 1); ``chunk_rows`` defaults to ``default_chunk_rows``.
    """
    if isinstance(teacher_logits, TopKTeacher):
        _check_rows(teacher_logits, student_logits.shape[0])
        vocab_size = vocab_size or student_logits.shape[-1]
        teacher = teacher_logits
    else:
        vocab_size = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
        _check_vocab("teacher logits", teacher_logits.shape[-1], vocab_size)
        teacher = teacher_logits[..., :vocab_size].detach()
    _check_vocab("student logits", student_logits.shape[-1], vocab_size)
    loss_sum, totals = _ChunkedLogitsLoss.apply(
        student_logits[..., :vocab_size],
        teacher,
        labels,
        spec,
        chunk_rows or default_chunk_rows(vocab_size, student_logits, teacher),
        compiled,
    )
    loss = _normalise(loss_sum, num_tokens, student_logits.shape[0])
    return LossOutput(loss, totals[1], totals[2], student_logits.shape[0])


@dataclass
class OutputHead:
    """A model's output projection: logits = transform(hidden @ weight.T + bias)."""

    weight: torch.Tensor  # [V_rows, H], V_rows >= the tokenizer's vocabulary
    bias: torch.Tensor | None = None  # [V_rows]
    transform: LogitTransform = IDENTITY


def fused_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_hidden: Teacher,
    teacher_head: OutputHead | None,
    labels: torch.Tensor,
    spec: LossSpec,
    *,
    vocab_size: int,
    num_tokens: int | float | torch.Tensor | None = None,
    chunk_rows: int | None = None,
    compiled: bool = False,
) -> LossOutput:
    """The same loss as ``distillation_loss`` on ``head(hidden)``, without ever making all logits.

    ``student_hidden`` [N, Hs] and ``teacher_hidden`` [N, Ht] are the final hidden states of the
    valid rows (the inputs of each model's output projection). The gradient reaches the student's
    hidden states, output weight and bias through autograd as usual, so tied embeddings and
    sharded (ZeRO) parameters receive it like any other gradient. Each head's weight and bias are
    cast to its hidden states' dtype (pass bf16 hidden states to compute in bf16, as autocast
    would). ``chunk_rows`` as in ``distillation_loss``.

    A TopKTeacher of the same N rows takes the teacher's place, with ``teacher_head=None``:
    nothing of the teacher is projected, its stored rows are sliced chunk by chunk.
    """
    _check_vocab("the student's output layer", student_head.weight.shape[0], vocab_size)
    top_k = isinstance(teacher_hidden, TopKTeacher)
    if top_k != (teacher_head is None):
        raise ValueError(
            "fused_distillation_loss takes a teacher's hidden states with its output head, or a "
            "TopKTeacher with teacher_head=None"
        )
    if top_k:
        _check_rows(teacher_hidden, student_hidden.shape[0])
        teacher, teacher_weight, teacher_bias = teacher_hidden, None, None
        teacher_transform = IDENTITY
    else:
        _check_vocab("the teacher's output layer", teacher_head.weight.shape[0], vocab_size)
        teacher, teacher_weight = teacher_hidden.detach(), teacher_head.weight.detach()
        teacher_bias = None if teacher_head.bias is None else teacher_head.bias.detach()
        teacher_transform = teacher_head.transform
    loss_sum, totals = _FusedLinearLoss.apply(
        student_hidden,
        student_head.weight,
        student_head.bias,
        teacher,
        teacher_weight,
        teacher_bias,
        labels,
        spec,
        student_head.transform,
        teacher_transform,
        vocab_size,
        chunk_rows or default_chunk_rows(vocab_size, student_hidden, teacher),
        compiled,
    )
    loss = _normalise(loss_sum, num_tokens, student_hidden.shape[0])
    return LossOutput(loss, totals[1], totals[2], student_hidden.shape[0])


def valid_rows(
    student: torch.Tensor, teacher: Teacher | None, labels: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, Teacher | None, torch.Tensor]:
    """Rows of both models' outputs (logits or hidden states) that predict a non-masked label.

    [B, L, D_s], [B, L, D_t] and [B, L] -> [N, D_s], [N, D_t] and [N]. Causal models predict
    token t+1 at position t, so outputs drop their last position and labels their first;
    seq2seq decoders are already aligned with their labels. No teacher (None) gives None; a
    cache's rows per position (a TopKTeacher of [B, L, k], [B, L, k], [B, L]) give its rows.
    """
    # The (example, position) of each valid row, found once: the count is the one wait on the
    # device (indexing with the mask itself would wait once per tensor).
    examples, positions = valid_mask(labels, causal).nonzero(as_tuple=True)  # [N] each

    # Output position t predicts the label at t + 1 (causal) or t (seq2seq).
    label_positions = positions + 1 if causal else positions
    return (
        student[examples, positions],
        None if teacher is None else teacher[examples, positions],
        labels[examples, label_positions],
    )


def valid_mask(labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, L] labels -> [B, L'] bool: the output positions whose label enters the loss (in the
    order ``valid_rows`` returns them); causal outputs drop their last position (L' = L - 1)."""
    return (labels[:, 1:] if causal else labels) != IGNORE_INDEX


def logit_chunks(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    *,
    vocab_size: int,
    chunk_rows: int,
    student_head: OutputHead | None = None,
    teacher_head: OutputHead | None = None,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None]]:
    """Both models' logits over the valid rows, one chunk at a time: (rows, [C, V], [C, V]) fp32.

    With heads, ``student`` and ``teacher`` are final hidden states ([N, Hs], [N, Ht]) and each
    chunk's logits are projected here, so they exist only while the caller uses that chunk;
    without, they are the models' logits ([N, V_rows]). Either way the logits are cut to the
    tokenizer's vocabulary and transformed as each model does (soft-capping, scaling). No
    teacher (None): the student's logits alone, with None in the teacher's place.
    """
    models = {"student": (student, student_head)}
    if teacher is not None:
        models["teacher"] = (teacher, teacher_head)
    for name, (values, head) in models.items():
        columns = values.shape[-1] if head is None else head.weight.shape[0]
        _check_vocab(f"the {name}'s output layer", columns, vocab_size)
    # The projections write into buffers made once (fresh [C x V] tensors per chunk cost page
    # faults on a CPU): each chunk is valid until the next one is made.
    buffer_rows = min(chunk_rows, student.shape[0])
    buffers = {
        name: None if head is None else values.new_empty(buffer_rows, vocab_size)
        for name, (values, head) in models.items()
    }
    for start in range(0, student.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        logits = {
            name: _chunk_logits(values[rows], head, vocab_size, buffers[name])
            for name, (values, head) in models.items()
        }
        yield rows, logits["student"], logits.get("teacher")


def _chunk_logits(
    rows: torch.Tensor, head: OutputHead | None, vocab_size: int, buffer: torch.Tensor | None
) -> torch.Tensor:
    """fp32 logits [C, V] of one chunk: hidden rows projected by ``head``, or logit rows cut."""
    if head is None:
        return rows[:, :vocab_size].float()
    weight = head.weight[:vocab_size].to(rows.dtype)  # the projection runs in the rows' dtype
    bias = None if head.bias is None else head.bias[:vocab_size].to(rows.dtype)
    logits = _project(buffer[: rows.shape[0]], rows, weight, bias)
    return head.transform.apply(logits.float())[0]


def hidden_state_loss(
    student: torch.Tensor, teacher: torch.Tensor, projection: torch.Tensor | None, kind: HiddenLoss
) -> torch.Tensor:
    """Sum over N rows of one matched block's loss, in fp32: [N, Hs], [N, Ht] -> [] (0 for N = 0).

    The student's rows are first mapped to the teacher's width, s' = s @ projection.T
    (``projection`` [Ht, Hs]; None when the widths are equal). Per row:

        cosine   1 - cos(s', t)                   (eps 1e-8 on the norms: a zero row gives 1)
        mse      mean over the Ht features of (s' - t)^2

    The teacher's rows get no gradient; the student's rows and the projection do.
    """
    s = student.float()
    if projection is not None:
        s = s @ projection.float().t()  # [N, Ht]
    t = teacher.detach().float()
    if kind == "cosine":
        per_row = 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        per_row = (s - t).square().mean(-1)
    return per_row.sum()


def hidden_distillation_loss(
    student_blocks: Sequence[torch.Tensor],
    teacher_blocks: Sequence[torch.Tensor],
    projections: Sequence[torch.Tensor | None],
    kind: HiddenLoss,
    *,
    num_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden-state term over K matched blocks: (loss, sum), fp32 scalars.

    Block k pairs ``student_blocks[k]`` [N, Hs] (the valid rows, as ``valid_rows`` selects
    them) with ``teacher_blocks[k]`` [N, Ht] through ``projections[k]`` (see
    ``hidden_state_loss``). sum = (1/K) sum_k sum_rows loss_k: the mean over the matched blocks,
    so --hidden_loss_weight means the same whatever the map's length; loss = sum / num_tokens
    (default N, at least 1: an all-masked batch is an exact 0), differentiable; sum detached.
    """
    terms = [
        hidden_state_loss(s, t, projection, kind)
        for s, t, projection in zip(student_blocks, teacher_blocks, projections, strict=True)
    ]
    loss_sum = torch.stack(terms).mean()
    rows = student_blocks[0].shape[0]
    return _normalise(loss_sum, num_tokens, rows), loss_sum.detach()
