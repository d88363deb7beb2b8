"""The loss against a stored top-k teacher next to the live teacher's, at SmolLM2-135M's shape.

    python bench/topk_loss_bench.py                      # 1024 rows, vocab 49152, hidden 576, k 64
    python bench/topk_loss_bench.py --rows 4096 --k 32 --repeats 5

Random weights, with a teacher shaped like a language model's: a Zipfian unigram prior (a bias of
-1.1 log rank) plus a projection of random hidden states, scaled so that its top-1 probability is
about 0.45 and its entropy about 2.6 nats (both printed). Two students, the same construction:
"near" (the teacher's weights and hidden states plus noise, as after some training) and "far"
(independent weights and hidden states).

It prints:
  - how far the k + 1-outcome loss (the top-k tokens and the tail) is below the full one,
    forward KL at T = 1 and T = 2, per student;
  - forward + backward time of fused_distillation_loss against the top-k teacher and against the
    live teacher (its hidden states and output layer), medians of --repeats interleaved, compiled
    as in training (warm-up excluded), and their ratio;
  - the bytes a cache stores per trained token: int32 ids + fp16 log-probs + an fp32 tail.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from kd_dist.losses import LossSpec, OutputHead, TopKTeacher, fused_distillation_loss, top_k_teacher

VOCAB, HIDDEN = 49152, 576  # SmolLM2-135M
TEACHER_SCALE = 5.0  # the hidden states' scale: top-1 ~0.45, entropy ~2.6 nats with the prior


def model(generator: torch.Generator, rows: int, prior: torch.Tensor):
    """Random hidden states [rows, H] and an output head whose bias is the unigram prior."""
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) / math.sqrt(HIDDEN)
    hidden = torch.randn(rows, HIDDEN, generator=generator) * TEACHER_SCALE
    return hidden, OutputHead(weight, prior.clone())


def perturbed(generator: torch.Generator, hidden, head: OutputHead, noise: float):
    def noisy(x):
        return x + noise * x.std() * torch.randn(x.shape, generator=generator)

    return noisy(hidden), OutputHead(noisy(head.weight), head.bias.clone())


def cached(hidden, head: OutputHead, k: int, temperature: float) -> TopKTeacher:
    """The teacher's rows as a cache stores them (int32 ids, fp16 log-probs, fp32 tail)."""
    parts = [
        top_k_teacher(rows @ head.weight.t() + head.bias, k, temperature)
        for rows in hidden.split(256)
    ]
    return TopKTeacher(
        torch.cat([p.ids for p in parts]).int(),
        torch.cat([p.logprobs for p in parts]).half(),
        torch.cat([p.tail_logprob for p in parts]),
    )


def kd_sum(student, teacher, teacher_head, spec) -> float:
    hidden, head = student
    out = fused_distillation_loss(hidden, head, teacher, teacher_head, torch.zeros(
        hidden.shape[0], dtype=torch.long), spec, vocab_size=VOCAB)  # fmt: skip
    return out.kd_sum.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    rank = torch.randperm(VOCAB, generator=g).float() + 1
    prior = -1.1 * rank.log()
    teacher_hidden, teacher_head = model(g, args.rows, prior)
    students = {
        "near": perturbed(g, teacher_hidden, teacher_head, noise=0.15),
        "far": model(g, args.rows, prior),
    }

    logits = teacher_hidden[:256] @ teacher_head.weight.t() + teacher_head.bias
    p, p_2 = torch.softmax(logits, -1), torch.softmax(logits / 2, -1)
    entropy = -torch.xlogy(p, p).sum(-1).mean().item()
    mass, mass_2 = (x.topk(args.k, -1).values.sum(-1).mean().item() for x in (p, p_2))
    print(f"rows {args.rows}, vocab {VOCAB}, hidden {HIDDEN}, k {args.k}; teacher at T = 1: "
          f"top-1 {p.max(-1).values.mean():.2f}, entropy {entropy:.2f} nats, top-{args.k} mass "
          f"{mass:.3f} (at T = 2: {mass_2:.3f})")  # fmt: skip

    print("\nforward KL per token, full vs k + 1 outcomes (relative distance)")
    for temperature in (1.0, 2.0):
        spec = LossSpec("forward_kl", temperature=temperature)
        teacher = cached(teacher_hidden, teacher_head, args.k, temperature)
        for name, student in students.items():
            full = kd_sum(student, teacher_hidden, teacher_head, spec) / args.rows
            top_k = kd_sum(student, teacher, None, spec) / args.rows
            print(f"  T = {temperature:g}, {name:4s} student: full {full:.4f}, top-k + tail "
                  f"{top_k:.4f} ({(full - top_k) / full:.2%} below)")  # fmt: skip

    spec = LossSpec("forward_kl", temperature=1.0)
    teacher = cached(teacher_hidden, teacher_head, args.k, 1.0)
    hidden, head = students["near"]
    hidden.requires_grad_(True)
    head.weight.requires_grad_(True)
    labels = torch.zeros(args.rows, dtype=torch.long)
    sources = {"live": (teacher_hidden, teacher_head), "top-k": (teacher, None)}

    def step(source) -> float:
        start = time.perf_counter()
        out = fused_distillation_loss(hidden, head, *sources[source], labels, spec,
                                      vocab_size=VOCAB, compiled=True)  # fmt: skip
        torch.autograd.grad(out.loss, (hidden, head.weight))
        return time.perf_counter() - start

    for source in sources:  # compile warm-up
        step(source)
    samples = {source: [] for source in sources}
    for _ in range(args.repeats):
        for source in sources:
            samples[source].append(step(source))
    live, top_k = (statistics.median(samples[s]) for s in sources)
    print(f"\nfused forward + backward, forward KL T = 1, compiled, median of {args.repeats}:")
    print(f"  live teacher {live:.3f} s   top-k teacher {top_k:.3f} s   ratio {live / top_k:.2f}x")

    stored = args.k * (4 + 2) + 4
    print(f"\ncache bytes per trained token: {args.k} x (int32 id + fp16 log-prob) + fp32 tail "
          f"= {stored}")  # fmt: skip


if __name__ == "__main__":
    main()
