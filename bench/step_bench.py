"""A whole training step: distillation vs what any fine-tuning step with a teacher costs anyway.

    python bench/step_bench.py                 # Llama-style teacher 512x4, student 256x2, V 32000
    python bench/step_bench.py --loss jsd --batch 4 --seq 512

Both steps run on the same batch, interleaved, in one process:

    kd          what `kd-dist train` does per micro-batch: student and teacher forwards up to the
                final hidden states, the fused loss (torch.compile'd kernel), backward, AdamW step
    baseline    a teacher forward (with its logits) + an ordinary cross-entropy step of the
                student (HF's own loss on full logits), backward, AdamW step

The ratio kd / baseline is the price of distillation over plain fine-tuning beside a teacher.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from kd_dist.losses import LossSpec, fused_distillation_loss, valid_rows
from kd_dist.models import forward_hidden, output_head
from kd_dist.tiny import model_config


def build(hidden: int, layers: int, vocab: int, device: str) -> torch.nn.Module:
    config = model_config("llama", vocab, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                          head_dim=64, intermediate_size=hidden * 3)  # fmt: skip
    return AutoModelForCausalLM.from_config(config).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--loss", default="forward_kl")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    torch.manual_seed(0)
    teacher = build(512, 4, args.vocab, device).eval().requires_grad_(False)
    student = build(256, 2, args.vocab, device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    spec = LossSpec(args.loss, temperature=2.0)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": input_ids.clone()}  # fmt: skip

    def kd_step() -> None:
        with autocast:
            hidden = forward_hidden(student, student, batch, "causal")
            with torch.no_grad():
                teacher_hidden = forward_hidden(teacher, teacher, batch, "causal")
        rows = valid_rows(hidden, teacher_hidden, batch["labels"], causal=True)
        loss = fused_distillation_loss(
            rows[0], output_head(student), rows[1], output_head(teacher), rows[2], spec,
            vocab_size=args.vocab, compiled=True,
        ).loss  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def baseline_step() -> None:
        with autocast:
            with torch.no_grad():
                teacher(input_ids=batch["input_ids"]).logits  # noqa: B018 - the cost is the point
            loss = student(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {"kd": kd_step, "baseline": baseline_step}
    for step in steps.values():  # warm-up, compile included
        step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    kd, baseline = (statistics.median(samples[name]) for name in steps)
    tokens = args.batch * args.seq
    print(f"step_bench: {device}, vocab {args.vocab}, {tokens} tokens/step, loss {args.loss}, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"  kd step        {kd:.3f} s")
    print(f"  baseline step  {baseline:.3f} s   (teacher forward + student CE step)")
    print(f"  ratio kd / baseline: {kd / baseline:.2f}x")


if __name__ == "__main__":
    main()
