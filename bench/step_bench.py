"""A whole training step at real shapes: distillation vs what fine-tuning beside a teacher costs.

    python bench/step_bench.py                  # SmolLM2-135M's shape and a 10-layer cut of it
    python bench/step_bench.py --pair larger    # SmolLM2-1.7B's shape, 8-layer cut (24 GB GPU)
    python bench/step_bench.py --bf16 --batch 8 --seq 2048   # on a GPU

The models are built from configs with random weights (nothing is downloaded):

    default   teacher: Llama, 30 layers, hidden 576 (9 heads, 3 KV heads), MLP 1536, vocab 49152,
              tied embeddings (SmolLM2-135M's shape, 135M parameters); student: 10 layers of
              the same shape (a cut of it, 64M parameters)
    larger    teacher: 24 layers, hidden 2048, MLP 8192, vocab 49152 (SmolLM2-1.7B's shape);
              student: 8 layers of it. bf16 teacher + fp32/AdamW student fit a 24 GB GPU.

It prints, each measured side by side in one run:

1. time: the kd step (what `kd-dist train` does per micro-batch: both forwards to the final
   hidden states, the fused loss, backward, AdamW) against the baseline (a teacher forward with
   its logits + an ordinary cross-entropy step of the student), interleaved, medians; the
   ratio and tokens/s; the same with --gradient_checkpointing;
2. memory: the peak of one kd step above what the models and optimizer state hold, and the
   student's activation memory (what its forward keeps for the backward pass), with and
   without activation checkpointing, and with the teacher in each dtype, each in a fresh
   process (on a CPU glibc is set to return freed memory, so the resident set follows what is
   held); also the teacher's and student's weights in GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_probe import peak_extra_bytes, rss_bytes

from kd_dist.losses import LossSpec, fused_distillation_loss, valid_rows
from kd_dist.models import (
    enable_activation_checkpointing,
    forward_hidden,
    output_head,
    projection_input,
)
from kd_dist.tiny import model_config

VOCAB = 49152
PAIRS = {  # (hidden, MLP, heads, KV heads, teacher layers, student layers)
    "default": (576, 1536, 9, 3, 30, 10),
    "larger": (2048, 8192, 32, 32, 24, 8),
}


def build(pair: str, layers: int, device: str) -> torch.nn.Module:
    hidden, mlp, heads, kv_heads, _, _ = PAIRS[pair]
    config = model_config("llama", VOCAB, hidden_size=hidden, intermediate_size=mlp,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, head_dim=hidden // heads,
                          max_position_embeddings=8192, tie_word_embeddings=True)  # fmt: skip
    return AutoModelForCausalLM.from_config(config).to(device)


@dataclass
class Setup:
    teacher: torch.nn.Module
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict[str, torch.Tensor]
    autocast: Callable[[], torch.autocast]
    compute_dtype: torch.dtype  # what the fused loss projects the student's rows in


def setup(args: argparse.Namespace, checkpointing: bool, teacher_dtype: torch.dtype) -> Setup:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    _, _, _, _, teacher_layers, student_layers = PAIRS[args.pair]
    teacher = build(args.pair, teacher_layers, device).to(teacher_dtype).eval()
    teacher.requires_grad_(False)
    student = build(args.pair, student_layers, device).train()
    if checkpointing:
        enable_activation_checkpointing(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    input_ids = torch.randint(0, VOCAB, (args.batch, args.seq), device=device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": input_ids.clone()}  # fmt: skip

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16)

    compute_dtype = torch.bfloat16 if args.bf16 else torch.float32
    return Setup(teacher, student, optimizer, batch, autocast, compute_dtype)


def kd_step(run: Setup, spec: LossSpec) -> None:
    with run.autocast():
        hidden = forward_hidden(run.student, run.student, run.batch, "causal")
        with torch.no_grad():
            teacher_hidden = forward_hidden(run.teacher, run.teacher, run.batch, "causal")
    student_rows, teacher_rows, labels = valid_rows(hidden, teacher_hidden, run.batch["labels"],
                                                    causal=True)  # fmt: skip
    loss = fused_distillation_loss(
        projection_input(student_rows, run.compute_dtype), output_head(run.student), teacher_rows,
        output_head(run.teacher), labels, spec, vocab_size=VOCAB, compiled=True,
    ).loss  # fmt: skip
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def baseline_step(run: Setup) -> None:
    with run.autocast():
        with torch.no_grad():
            run.teacher(input_ids=run.batch["input_ids"]).logits  # noqa: B018 - the cost is the point
        loss = run.student(input_ids=run.batch["input_ids"], labels=run.batch["labels"]).loss
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def timed(step: Callable[[], None]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_steps(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of the kd step, the baseline step and the kd step with checkpointing,
    interleaved (this machine's speed drifts) after a warm-up of each."""
    spec = LossSpec(args.loss, temperature=1.0)
    run = setup(args, False, torch.bfloat16 if args.bf16 else torch.float32)

    def checkpointed_kd_step() -> None:  # the same student, its checkpointing on for the step
        enable_activation_checkpointing(run.student)
        kd_step(run, spec)
        run.student.activation_checkpointing_disable()

    steps = {
        "kd": lambda: kd_step(run, spec),
        "baseline": lambda: baseline_step(run),
        "kd_checkpointed": checkpointed_kd_step,
    }
    return interleaved_medians(steps, args.repeats)


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each step, run in turn ``repeats`` times (this machine's speed
    drifts: interleaving shares the drift out) after a warm-up of each (compilation included)."""
    for step in steps.values():
        step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(timed(step))
    return {name: statistics.median(times) for name, times in samples.items()}


def gigabytes(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9


def measure_memory(args: argparse.Namespace) -> None:
    """One variant, in this (fresh) process: JSON with the peak of one kd step above the
    models and optimizer state (after a warm-up step that creates the optimizer state)."""
    checkpointing, dtype = args.memory_of.split(",")
    run = setup(args, checkpointing == "on", getattr(torch, dtype))
    spec = LossSpec(args.loss, temperature=1.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kd_step(run, spec)  # warm-up: optimizer state, compiled kernel
    peak, _ = peak_extra_bytes(lambda: kd_step(run, spec), device)
    # The student's activation memory: what its forward leaves held for the backward pass.
    before = allocated_bytes(device)
    with run.autocast():
        hidden = forward_hidden(run.student, run.student, run.batch, "causal")
    activations = allocated_bytes(device) - before - hidden.numel() * hidden.element_size()
    print(json.dumps({"peak_mb": peak / 2**20, "activations_mb": activations / 2**20,
                      "teacher_gb": gigabytes(run.teacher),
                      "student_gb": gigabytes(run.student)}))  # fmt: skip


def allocated_bytes(device: str) -> int:
    """Memory in use now: the CUDA allocator's, or this process's resident set on a CPU."""
    return torch.cuda.memory_allocated() if device == "cuda" else rss_bytes()


def memory_in_fresh_process(args: argparse.Namespace, variant: str) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    argv = [sys.executable, __file__, "--pair", args.pair, "--batch", str(args.batch),
            "--seq", str(args.seq), "--loss", args.loss, "--memory_of", variant]  # fmt: skip
    if args.bf16:
        argv.append("--bf16")
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=list(PAIRS), default="default")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--loss", default="forward_kl")
    parser.add_argument("--bf16", action="store_true", help="autocast both models to bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teacher_dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--memory_of", help=argparse.SUPPRESS)  # internal: one memory variant
    args = parser.parse_args()
    if args.memory_of:
        return measure_memory(args)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seconds = time_steps(args)
    tokens = args.batch * args.seq
    print(f"step_bench: {device}, pair {args.pair}, vocab {VOCAB}, {tokens} tokens/step "
          f"({args.batch} x {args.seq}), {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"loss {args.loss}, median of {args.repeats}")  # fmt: skip
    for name, label in (("kd", "kd step"), ("baseline", "baseline step"),
                        ("kd_checkpointed", "kd step, checkpointing")):  # fmt: skip
        print(f"  {label:<24} {seconds[name]:7.3f} s  {tokens / seconds[name]:8.0f} tokens/s")
    print(f"  ratio kd / baseline (teacher forward + student CE step): "
          f"{seconds['kd'] / seconds['baseline']:.2f}x")  # fmt: skip
    print(f"  ratio kd with / without checkpointing: "
          f"{seconds['kd_checkpointed'] / seconds['kd']:.2f}x")  # fmt: skip

    print("Peak memory of one kd step above the models and optimizer state (fresh processes):")
    base_dtype = "bfloat16" if args.bf16 else "float32"
    without = memory_in_fresh_process(args, f"off,{base_dtype}")
    with_checkpointing = memory_in_fresh_process(args, f"on,{base_dtype}")
    print(f"  student {without['student_gb']:.2f} GB (fp32), teacher {base_dtype}")
    for key, what in (("peak_mb", "kd step peak"), ("activations_mb", "student activations")):
        off, on = without[key], with_checkpointing[key]
        print(f"  {what:<20} without checkpointing {off:7.0f} MiB, with {on:7.0f} MiB: "
              f"ratio {on / off:.2f}x")  # fmt: skip
    print("By teacher dtype (no checkpointing):")
    for dtype in args.teacher_dtypes:
        measured = without if dtype == base_dtype else memory_in_fresh_process(args, f"off,{dtype}")
        print(f"  teacher {dtype:<9} weights {measured['teacher_gb']:6.2f} GB, "
              f"step peak {measured['peak_mb']:8.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
