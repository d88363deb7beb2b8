"""Peak memory and time of the held-out metrics, side by side in one run.

    python bench/eval_bench.py                  # batch 4 x 512 tokens, vocab 32000 and 128256
    python bench/eval_bench.py --vocabs 50257 --batch 8

Methods, all on the same Llama-style teacher (hidden 256, 2 layers) and student (hidden 64,
1 layer), the same batch and the same metrics (student/teacher CE, KL at T = 1, agreement):

    naive      both models' full [tokens x vocab] logits, log-softmax over all of them at once
    logits     kd_dist.evaluation.evaluate on a model family the fused path does not know: the
               models' full logits, the softmax math chunk by chunk (kd_dist before issue 7)
    fused      kd_dist.evaluation.evaluate as it runs: final hidden states, each chunk of rows
               projected to logits, measured and freed; no full logits ever exist

Each method runs in fresh subprocesses (fp32, CPU or GPU), each with a warm-up call first: one
measures the peak memory of one call above what the process held just before it (models and
inputs loaded): CUDA max_memory_allocated, or on a CPU the resident set sampled every
millisecond with glibc told to return freed blocks to the OS; another times --repeats calls
with the default allocator and reports the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from memory_probe import peak_extra_bytes
from transformers import AutoModelForCausalLM

import kd_dist.models
from kd_dist.evaluation import evaluate, metrics_from_sums
from kd_dist.losses import auto_chunk_rows
from kd_dist.tiny import model_config

METHODS = ("naive", "logits", "fused")


def make_models_and_batch(vocab: int, batch: int, length: int, device: str):
    torch.manual_seed(0)
    big = model_config("llama", vocab, "small", hidden_size=256, intermediate_size=512, head_dim=64)
    teacher = AutoModelForCausalLM.from_config(big)
    student = AutoModelForCausalLM.from_config(
        model_config("llama", vocab, "small", num_hidden_layers=1)
    )
    ids = torch.randint(0, vocab, (batch, length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return student.to(device).eval(), teacher.to(device).eval(), inputs


@torch.no_grad()
def naive(student, teacher, batch, vocab: int) -> dict[str, float]:
    """The textbook way: every logit of the batch at once."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s, t = s[:, :-1].flatten(0, 1), t[:, :-1].flatten(0, 1)
    labels = batch["labels"][:, 1:].flatten()
    log_q, log_p = s.float().log_softmax(-1), t.float().log_softmax(-1)
    sums = torch.stack(
        [
            -log_q.gather(-1, labels[:, None]).sum(),
            -log_p.gather(-1, labels[:, None]).sum(),
            (log_p.exp() * (log_p - log_q)).sum(),
            (s.argmax(-1) == t.argmax(-1)).sum(),
            torch.tensor(labels.numel()),
        ]
    )
    return metrics_from_sums(sums.double().cpu())


def run(method: str, student, teacher, batch, vocab: int, chunk_rows: int) -> dict[str, float]:
    if method == "naive":
        return naive(student, teacher, batch, vocab)
    if method == "logits":  # the fused path treats an unknown family this way
        kd_dist.models.FUSED_HEAD_RULES.pop("llama", None)
    return evaluate(student, teacher, [batch], task_type="causal", vocab_size=vocab,
                    chunk_rows=chunk_rows)  # fmt: skip


def measure_memory(method: str, args, vocab: int, device: str) -> dict:
    """Peak extra bytes of one evaluation call (in a fresh process), and its metrics."""
    student, teacher, batch = make_models_and_batch(vocab, args.batch, args.length, device)
    chunk_rows = auto_chunk_rows(vocab, device, memory_budget_mb=256)  # a fixed budget
    run(method, student, teacher, batch, vocab, chunk_rows)  # warm-up
    peak, metrics = peak_extra_bytes(
        lambda: run(method, student, teacher, batch, vocab, chunk_rows), device
    )
    return {"peak": peak, "metrics": metrics}


def measure_time(method: str, args, vocab: int, device: str) -> dict:
    """Median seconds of --repeats evaluation calls after a warm-up (in a fresh process)."""
    student, teacher, batch = make_models_and_batch(vocab, args.batch, args.length, device)
    chunk_rows = auto_chunk_rows(vocab, device, memory_budget_mb=256)
    run(method, student, teacher, batch, vocab, chunk_rows)
    seconds = []
    for _ in range(args.repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(method, student, teacher, batch, vocab, chunk_rows)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # METHOD memory|time
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        method, what = args.child
        measure = measure_memory if what == "memory" else measure_time
        print(json.dumps(measure(method, args, args.vocabs[0], device)))
        return
    # For the memory runs, large freed blocks go back to the OS at once, so the resident set
    # follows live memory; the timing runs keep the allocator's defaults (that setting makes
    # every fresh block page-fault, which would charge code with many allocations unfairly).
    memory_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    tokens = args.batch * (args.length - 1)
    print(f"eval_bench: {args.batch} x {args.length} tokens ({tokens} evaluated), {device} fp32, "
          f"time: median of {args.repeats}")  # fmt: skip
    print(f"{'vocab':>7} {'method':<7} {'peak extra MiB':>14} {'time s':>7}  KL to teacher")
    for vocab in args.vocabs:
        results = {}
        for method in args.methods:
            result = {}
            for what, env in (("memory", memory_env), ("time", os.environ)):
                child = [sys.executable, __file__, "--child", method, what, "--batch",
                         str(args.batch), "--length", str(args.length), "--vocabs", str(vocab),
                         "--repeats", str(args.repeats)]  # fmt: skip
                out = subprocess.run(child, capture_output=True, text=True, env=env, check=True)
                result.update(json.loads(out.stdout.strip().splitlines()[-1]))
            results[method] = result
            print(f"{vocab:>7} {method:<7} {result['peak'] / 2**20:14.0f} "
                  f"{result['seconds']:7.2f}  {result['metrics']['kl_to_teacher']:.6f}",
                  flush=True)  # fmt: skip
        for other in ("naive", "logits"):
            if {"fused", other} <= set(results):
                memory = results["fused"]["peak"] / max(results[other]["peak"], 1)
                seconds = results["fused"]["seconds"] / results[other]["seconds"]
                print(f"{vocab:>7} fused / {other}: memory {memory:.3f}x, time {seconds:.2f}x")


if __name__ == "__main__":
    main()
