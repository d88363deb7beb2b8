"""Forward + backward of the distillation loss, side by side in one run.

    python bench/loss_bench.py          # tokens 4096, hidden 256, vocab 32000 and 128256
    python bench/loss_bench.py --vocabs 32000 --repeats 5
    python bench/loss_bench.py --baseline-ref 9796684 --methods kd_dist gemm   # before/after
    python bench/loss_bench.py --tokens 8192 --hidden 4096 --vocabs 128256 \
        --baseline-ref 9796684 --methods kd_dist gemm            # on a GPU (bf16): issue 12

Methods, all on the same inputs and objective (generalized JSD, beta 0.5, T = 1, no CE: the
objective Liger implements):

    naive      full [tokens x vocab] logits of both models, the loss by autograd (fp32 softmax)
    kd_dist    kd_dist.losses.fused_distillation_loss (never makes the full logits), its chunk
               kernel torch.compile'd as in training (warm-up excluded)
    baseline   the same function as it was at git revision --baseline-ref (with that option)
    liger      liger_kernel's LigerFusedLinearJSDLoss, torch.compile'd (when liger-kernel is
               installed; the compile warm-up is excluded from the timings)
    gemm       the bare matrix multiplications any implementation needs: student and teacher
               logits forward, student grad-input and grad-weight (a floor, not a loss)

Times are medians over --repeats, the methods interleaved so that machine noise hits them alike.
Peak memory is measured in a fresh subprocess per method (CUDA: max_memory_allocated; CPU: the
resident set sampled every millisecond, with glibc told to return freed blocks to the OS), minus
the memory held just before the call (inputs included). CPU runs fp32, a GPU run bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from memory_probe import peak_extra_bytes

from kd_dist.losses import LossSpec, OutputHead, fused_distillation_loss

SPEC = LossSpec("jsd", temperature=1.0, alpha=0.0, jsd_beta=0.5)
METHODS = ("naive", "kd_dist", "baseline", "liger", "gemm")
CHUNK_ROWS = [None]  # kd_dist's chunk size; None: its automatic choice
BASELINE: dict[str, types.ModuleType] = {}  # "losses": kd_dist.losses at --baseline-ref
REPO = Path(__file__).resolve().parent.parent


def load_baseline(ref: str) -> types.ModuleType:
    """kd_dist/losses.py as it was at git revision ``ref`` (it imports nothing of kd_dist)."""
    source = subprocess.run(["git", "show", f"{ref}:kd_dist/losses.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    module = types.ModuleType(f"losses_at_{ref}")
    sys.modules[module.__name__] = module  # its dataclasses look themselves up there
    exec(compile(source, f"{ref}:kd_dist/losses.py", "exec"), module.__dict__)
    return module


def liger_available() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception:
        return False
    return True


def make_inputs(tokens: int, hidden: int, vocab: int, device: str, dtype: torch.dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return {
        "student_hidden": randn(tokens, hidden, scale=1.0).requires_grad_(True),
        "student_weight": randn(vocab, hidden, scale=hidden**-0.5).requires_grad_(True),
        "teacher_hidden": randn(tokens, hidden, scale=1.0),
        "teacher_weight": randn(vocab, hidden, scale=1.5 * hidden**-0.5),
        "labels": torch.randint(0, vocab, (tokens,), generator=g).to(device),
    }


def naive(x) -> torch.Tensor:
    student_logits = x["student_hidden"] @ x["student_weight"].t()  # [N, V]
    with torch.no_grad():
        teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].t()
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    beta = SPEC.jsd_beta
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    jsd = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (
        log_q.exp() * (log_q - log_m)
    ).sum(-1)
    return jsd.mean()


def kd_dist(x, fused_loss=fused_distillation_loss) -> torch.Tensor:
    vocab = x["student_weight"].shape[0]
    return fused_loss(
        x["student_hidden"],
        OutputHead(x["student_weight"]),
        x["teacher_hidden"],
        OutputHead(x["teacher_weight"]),
        x["labels"],
        SPEC,
        vocab_size=vocab,
        chunk_rows=CHUNK_ROWS[0],
        compiled=True,
    ).loss


def baseline(x) -> torch.Tensor:
    return kd_dist(x, BASELINE["losses"].fused_distillation_loss)


_LIGER = {}


def liger(x) -> torch.Tensor:
    if "loss" not in _LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        _LIGER["loss"] = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=SPEC.jsd_beta, temperature=1.0
        )
    return _LIGER["loss"](
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
        x["labels"],
    )  # fmt: skip


def gemm(x) -> None:
    h, w = x["student_hidden"].detach(), x["student_weight"].detach()
    logits = h @ w.t()  # student logits forward [N, V]
    x["teacher_hidden"] @ x["teacher_weight"].t()  # teacher logits forward
    logits @ w  # grad w.r.t. hidden states [N, H]
    logits.t() @ h  # grad w.r.t. the weight [V, H]


def run(method: str, x) -> None:
    """One forward + backward; gradients are dropped so every call starts alike."""
    for key in ("student_hidden", "student_weight"):
        x[key].grad = None
    result = globals()[method](x)
    if result is not None:
        result.backward()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_methods(methods, args, device, dtype) -> dict[str, dict[int, float]]:
    times: dict[str, dict[int, float]] = {m: {} for m in methods}
    for vocab in args.vocabs:
        x = make_inputs(args.tokens, args.hidden, vocab, device, dtype)
        for method in methods:  # warm-up (and Liger's torch.compile)
            run(method, x)
        samples: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.repeats):
            for method in methods:
                synchronize(device)
                start = time.perf_counter()
                run(method, x)
                synchronize(device)
                samples[method].append(time.perf_counter() - start)
        for method in methods:
            times[method][vocab] = statistics.median(samples[method])
        print(f"  timed vocab {vocab}", flush=True)
    return times


def measure_peak(method: str, tokens: int, hidden: int, vocab: int, device: str) -> int:
    """Peak extra bytes of one forward + backward (run in a fresh process)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = make_inputs(tokens, hidden, vocab, device, dtype)
    run(method, x)  # warm-up (compile), then measure a second call
    for key in ("student_hidden", "student_weight"):
        x[key].grad = None
    return peak_extra_bytes(lambda: run(method, x), device)[0]


def peak_memory(methods, args, device) -> dict[str, dict[int, float]]:
    # Large freed blocks go back to the OS at once, so the resident set follows live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    peaks: dict[str, dict[int, float]] = {m: {} for m in methods}
    for vocab in args.vocabs:
        for method in methods:
            chunk = ["--chunk-rows", str(args.chunk_rows)] if args.chunk_rows else []
            ref = ["--baseline-ref", args.baseline_ref] if args.baseline_ref else []
            child = [sys.executable, __file__, "--memory-child", method, "--tokens",
                     str(args.tokens), "--hidden", str(args.hidden), "--vocabs", str(vocab),
                     *chunk, *ref]  # fmt: skip
            result = subprocess.run(child, capture_output=True, text=True, env=env, check=True)
            peaks[method][vocab] = json.loads(result.stdout.strip().splitlines()[-1])["peak"]
        print(f"  measured memory at vocab {vocab}", flush=True)
    return peaks


def report(times, peaks, args, device, dtype) -> None:
    mib = 2**20
    print(f"\nloss_bench: tokens {args.tokens}, hidden {args.hidden}, {device} {dtype}, "
          f"JSD beta {SPEC.jsd_beta}, forward + backward, median of {args.repeats}")  # fmt: skip
    print(f"{'vocab':>7} {'method':<8} {'time s':>8} {'peak MiB':>9}")
    for vocab in args.vocabs:
        for method in times:
            peak = peaks.get(method, {}).get(vocab)
            peak_text = f"{peak / mib:9.0f}" if peak is not None else f"{'-':>9}"
            print(f"{vocab:>7} {method:<8} {times[method][vocab]:8.3f} {peak_text}")
    print("\nratios (kd_dist / other; lower is better)")
    for vocab in args.vocabs:
        parts = []
        for other in ("baseline", "naive", "liger", "gemm"):
            if other not in times or "kd_dist" not in times:
                continue
            parts.append(f"time vs {other} {times['kd_dist'][vocab] / times[other][vocab]:.2f}x")
            if other != "gemm" and peaks:
                ratio = peaks["kd_dist"][vocab] / max(peaks[other][vocab], 1)
                parts.append(f"memory vs {other} {ratio:.2f}x")
        print(f"{vocab:>7}: " + ", ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="Methods to run (naive needs ~22 GiB at vocab 128256).")  # fmt: skip
    parser.add_argument("--chunk-rows", type=int, help="kd_dist's chunk size (default: auto).")
    parser.add_argument("--baseline-ref", help="A git revision: also run kd_dist's loss as it "
                        "was there (method 'baseline'), e.g. before a change.")  # fmt: skip
    parser.add_argument("--skip-memory", action="store_true", help="Only time the methods.")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    CHUNK_ROWS[0] = args.chunk_rows
    if args.baseline_ref:
        BASELINE["losses"] = load_baseline(args.baseline_ref)
    if args.memory_child:
        peak = measure_peak(args.memory_child, args.tokens, args.hidden, args.vocabs[0], device)
        print(json.dumps({"peak": peak}))
        return
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    methods = [m for m in args.methods if m != "liger" or liger_available()]
    methods = [m for m in methods if m != "baseline" or args.baseline_ref]
    if "liger" not in methods:
        print("liger-kernel is not installed: `pip install liger-kernel` to compare with it.")
    times = time_methods(methods, args, device, dtype)
    peaks = {} if args.skip_memory else peak_memory([m for m in methods if m != "gemm"], args,
                                                    device)  # fmt: skip
    report(times, peaks, args, device, dtype)


if __name__ == "__main__":
    main()
