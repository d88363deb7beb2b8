"""Distilling from a stored teacher (``kd-dist train --teacher_cache``) against a live teacher.

    python bench/teacher_cache_bench.py                      # SmolLM2-135M's shape, k = 64, CPU
    python bench/teacher_cache_bench.py --teacher DIR        # a real model (e.g. SmolLM2-135M)
    python bench/teacher_cache_bench.py --bf16 --batch 8 --seq 2048   # on a GPU

Without --teacher the models are step_bench.py's (random weights, nothing downloaded): a teacher
of SmolLM2-135M's shape (30 layers, hidden 576, vocab 49152) and a 10-layer student. Random
weights give a nearly uniform teacher, unlike a trained one, so its final norm is scaled by
--sharpen (12: at T = 1 its top-64 tokens then hold about 94% of the mass, its top token 31%,
entropy 3.1 nats, like a small LM's). With --teacher DIR (a saved Llama-family causal LM, e.g.
SmolLM2-135M-Instruct, see DESIGN.md), the student is a cut of it (every third layer) and the
batch is this repository's README, tokenized: real distributions on real text.

It prints, measured side by side in one run:

1. how much of the teacher's mass its top-k hold, and how far the k + 1-outcome loss (top-k +
   tail) is from the full-vocabulary loss for the same student and teacher, forward KL at
   T = 1 and T = 2 (the relative gap);
2. bytes stored per trained token: the rows `kd-dist cache-teacher` writes (a real shard);
3. time: a training step from the cache (the student's forward, the fused top-k loss, backward,
   AdamW) against the live step (both forwards, the fused loss, backward, AdamW), interleaved,
   medians; tokens/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_bench import VOCAB, Setup, interleaved_medians, kd_step, setup

from kd_dist.cache_teacher import concatenated
from kd_dist.losses import (
    LossSpec,
    TopKTeacher,
    fused_distillation_loss,
    logit_chunks,
    top_k_teacher,
    valid_rows,
)
from kd_dist.models import forward_hidden, output_head, projection_input
from kd_dist.teacher_cache import example_rows, write_shard
from kd_dist.zero3_loading import from_pretrained


def teacher_rows(run: Setup, k: int, temperature: float) -> TopKTeacher:
    """What cache-teacher stores for the batch: the teacher's top-k at each trained position."""
    with torch.no_grad(), run.autocast():
        hidden = forward_hidden(run.teacher, run.teacher, run.batch, "causal")
    rows, _, _ = valid_rows(hidden, None, run.batch["labels"], causal=True)
    chunks = logit_chunks(rows, None, vocab_size=VOCAB, chunk_rows=1024,
                          student_head=output_head(run.teacher))  # fmt: skip
    return concatenated([top_k_teacher(logits, k, temperature) for _, logits, _ in chunks], k)


def stored_bytes_per_token(rows: TopKTeacher) -> float:
    """A real shard of the rows (one example), on disk, per trained token."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train-00000-of-00001.arrow"
        write_shard(path, example_rows(rows, [len(rows)]))
        return path.stat().st_size / len(rows)


def losses(run: Setup, rows: TopKTeacher, spec: LossSpec) -> tuple[float, float]:
    """(full-vocabulary loss, k + 1-outcome loss) of the same student rows."""
    with torch.no_grad(), run.autocast():
        student = forward_hidden(run.student, run.student, run.batch, "causal")
        teacher = forward_hidden(run.teacher, run.teacher, run.batch, "causal")
    s, t, labels = valid_rows(student, teacher, run.batch["labels"], causal=True)
    s = projection_input(s, run.compute_dtype)
    head = output_head(run.student)
    full = fused_distillation_loss(s, head, t, output_head(run.teacher), labels, spec,
                                   vocab_size=VOCAB).loss  # fmt: skip
    sparse = fused_distillation_loss(s, head, rows, None, labels, spec, vocab_size=VOCAB).loss
    return full.item(), sparse.item()


def cached_step(run: Setup, rows: TopKTeacher, spec: LossSpec) -> None:
    with run.autocast():
        hidden = forward_hidden(run.student, run.student, run.batch, "causal")
    s, _, labels = valid_rows(hidden, None, run.batch["labels"], causal=True)
    loss = fused_distillation_loss(
        projection_input(s, run.compute_dtype), output_head(run.student), rows, None, labels,
        spec, vocab_size=VOCAB, compiled=True,
    ).loss  # fmt: skip
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def real_pair(run: Setup, args: argparse.Namespace) -> None:
    """Replace the random models with a real teacher, a cut of it as student, and real text."""
    device = run.batch["input_ids"].device
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    run.teacher = from_pretrained(AutoModelForCausalLM, args.teacher, dtype=dtype).to(device)
    run.teacher.eval().requires_grad_(False)
    student = from_pretrained(AutoModelForCausalLM, args.teacher, dtype=torch.float32)
    student.model.layers = torch.nn.ModuleList(student.model.layers[::3])
    student.config.num_hidden_layers = len(student.model.layers)
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index
    run.student = student.to(device).train()
    run.optimizer = torch.optim.AdamW(run.student.parameters(), lr=1e-5)
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    ids = AutoTokenizer.from_pretrained(args.teacher)(text)["input_ids"]
    needed = args.batch * args.seq
    ids = torch.tensor((ids * (needed // len(ids) + 1))[:needed], device=device)
    input_ids = ids.view(args.batch, args.seq)
    run.batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                 "labels": input_ids.clone()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--sharpen", type=float, default=12.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--teacher", help="A saved causal LM (else random weights)")
    args = parser.parse_args()
    args.pair = "default"
    run = setup(args, checkpointing=False, teacher_dtype=torch.bfloat16 if args.bf16 else
                torch.float32)  # fmt: skip
    if args.teacher:
        real_pair(run, args)
        what = f"{args.teacher} and a cut of it (every third layer), on README.md"
    else:
        with torch.no_grad():
            run.teacher.model.norm.weight.mul_(args.sharpen)
        what = f"random weights of SmolLM2-135M's shape (sharpened x{args.sharpen})"
    tokens = args.batch * (args.seq - 1)
    print(f"{what}: {args.batch} x {args.seq} tokens, {'bf16' if args.bf16 else 'fp32'}, "
          f"k = {args.k}")  # fmt: skip

    for temperature in (1.0, 2.0):
        rows = teacher_rows(run, args.k, temperature)
        mass = torch.cat([rows.logprobs, rows.tail_logprob[:, None]], 1)[:, :-1].exp().sum(1)
        full, sparse = losses(run, rows, LossSpec("forward_kl", temperature))
        print(f"T = {temperature}: the teacher's top-{args.k} hold {mass.mean():.1%} of its mass "
              f"on average; full forward KL {full:.4f}, k + 1-outcome {sparse:.4f} "
              f"({(full - sparse) / full:.1%} below)")  # fmt: skip
    rows = teacher_rows(run, args.k, 1.0)
    print(f"stored: {stored_bytes_per_token(rows):.1f} bytes per trained token (a real shard)")

    spec = LossSpec("forward_kl", temperature=1.0)
    steps = {"live teacher": lambda: kd_step(run, spec),
             "from the cache": lambda: cached_step(run, rows, spec)}  # fmt: skip
    medians = interleaved_medians(steps, args.repeats)
    for name, seconds in medians.items():
        print(f"{name:>15}: {seconds:.3f} s per step, {tokens / seconds:,.0f} tokens/s")
    speedup = medians["live teacher"] / medians["from the cache"]
    print(f"from the cache / live teacher: {speedup:.2f}x the tokens/s")


if __name__ == "__main__":
    main()
