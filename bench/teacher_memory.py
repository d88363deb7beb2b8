"""Peak resident memory of each process with the teacher replicated vs sharded by ZeRO-3.

    python bench/teacher_memory.py                  # a randomly initialised ~540 MB fp32 teacher
    python bench/teacher_memory.py --hidden 768 --layers 6 --placements replicate zero3

It saves a randomly initialised Llama-style teacher (hidden 1024, 8 layers: 134M parameters,
537 MB in fp32) and a tiny student, then runs `kd-dist train` for 2 steps on 2 processes (gloo,
CPU) under the shipped ZeRO-3 accelerate config, once per --teacher_placement, one after the
other. Every rank records its own peak resident set (ru_maxrss) as its run ends, loading
included (glibc set to return freed memory to the system, so that it measures what is held).
The printed saving is replicate's peak minus each placement's, per process, as a fraction of
the teacher's size: a sharded teacher should save about half of it on 2 processes
(each holds half the shards), and at least a quarter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEAK_FILE = "peak_rss_mb.rank{rank}"


def worker(peak_dir: str, argv: list[str]) -> int:
    """One rank: `kd-dist train ARGV`, then its peak resident set into PEAK_DIR."""
    from kd_dist.cli import main

    code = main(["train", *argv])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rank = os.environ.get("RANK", "0")
    (Path(peak_dir) / PEAK_FILE.format(rank=rank)).write_text(f"{peak_mb:.1f}\n")
    return code


def save_models(root: Path, hidden: int, layers: int) -> tuple[str, str, str, int]:
    """(teacher folder, student folder, dataset file, teacher bytes), built and saved."""
    import torch
    from transformers import AutoModelForCausalLM

    from kd_dist.tiny import build_model, build_tokenizer, model_config, save_pair

    words = "the a cat dog bird sees likes finds river house tree moon and in park".split()
    sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(64)]
    tokenizer = build_tokenizer(sentences, vocab_size=300, with_pad=False)
    torch.manual_seed(0)
    config = model_config("llama", len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                          head_dim=64, intermediate_size=hidden * 4)  # fmt: skip
    teacher = AutoModelForCausalLM.from_config(config)
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    teacher_dir = save_pair(root / "teacher", teacher, tokenizer)
    del teacher
    student_dir = save_pair(root / "student", build_model("llama", tokenizer, "tiny"), tokenizer)
    dataset = root / "text.jsonl"
    dataset.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    return teacher_dir, student_dir, str(dataset), teacher_bytes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_per_rank(root: Path, placement: str, models: tuple[str, str, str]) -> list[float]:
    """Each rank's peak resident memory (MB) in a 2-step, 2-process run with ``placement``."""
    teacher, student, dataset = models
    peaks = root / f"peaks_{placement}"
    peaks.mkdir()
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
        "accelerate_configs/deepspeed_zero3.yaml", "--num_processes", "2",
        "--main_process_port", str(free_port()), __file__, "--worker", str(peaks), "--",
        "--teacher_model", teacher, "--student_model", student, "--dataset", dataset,
        "--max_length", "32", "--batch_size", "2", "--max_steps", "2", "--save_every", "0",
        "--no-compile_loss", "--teacher_placement", placement,
        "--output_dir", str(root / f"out_{placement}"),
    ]  # fmt: skip
    # A fixed mmap threshold makes glibc return every freed block over 64 KiB to the system, so
    # the resident set follows the memory in use (by default freed blocks stay resident, and the
    # peak would count every layer ever gathered); both placements run with it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(root / "hf_home"),
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{placement} run failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return [float((peaks / PEAK_FILE.format(rank=r)).read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--placements", nargs="+", default=["replicate", "zero3", "zero3_offload"])
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a rank of the launched run
    args, rest = parser.parse_known_args()
    if args.worker:
        sys.exit(worker(args.worker, rest[1:] if rest[:1] == ["--"] else rest))

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        *models, teacher_bytes = save_models(root, args.hidden, args.layers)
        teacher_mb = teacher_bytes / 2**20
        placements = ["replicate", *(p for p in args.placements if p != "replicate")]
        peaks = {placement: peak_per_rank(root, placement, tuple(models))
                 for placement in placements}  # fmt: skip
    print(f"teacher {teacher_mb:.0f} MB (fp32), 2 processes, student ZeRO-3, peak RSS per rank")
    print(f"{'placement':<15}{'rank 0 MB':>11}{'rank 1 MB':>11}{'saved vs replicate':>32}")
    figures = {"teacher_mb": teacher_mb, "peak_mb": peaks, "saved_fraction": {}}
    for placement, ranks in peaks.items():
        saved = [(r - p) / teacher_mb for r, p in zip(peaks["replicate"], ranks, strict=True)]
        figures["saved_fraction"][placement] = saved
        shown = "" if placement == "replicate" else ", ".join(f"{s:.2f}x" for s in saved)
        print(f"{placement:<15}{ranks[0]:>11.0f}{ranks[1]:>11.0f}{shown:>32}")
    print("(saved: replicate's peak minus this placement's, per rank, in teacher sizes)")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
