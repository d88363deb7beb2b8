"""Tokenization throughput: one process against --num_proc's default, side by side in one run.

    python bench/tokenize_bench.py                       # 20,000 chat rows, and the small sizes
    python bench/tokenize_bench.py --rows 50000 --sizes 1000,5000
    python bench/tokenize_bench.py --data text   # plain documents of 40-400 words instead

The data is a generated chat dataset (``messages`` lists: an optional system prompt, then one to
three user/assistant turns of 20-60 and 40-200 words), or with ``--data text`` plain documents
(about 20x faster to tokenize: no template to render), tokenized for a causal model by
``build_datasets`` exactly as ``kd-dist train`` and ``kd-dist tokenize`` do it: rendered with the
chat template (each answer twice, to place the loss mask), tokenized with offsets, masked,
filtered. The tokenizer is a byte-level BPE trained in-process (nothing is downloaded).

Each run starts from a cold cache: the raw rows are saved once with ``save_to_disk``, and each run
reads a fresh copy of that folder, so ``datasets`` writes the tokenized cache beside it, as it
does for any source, and never finds an earlier run's. Loading the copy is memory-mapped and
takes milliseconds: the time is the tokenization. Runs alternate between the two settings so that
machine noise hits them alike; the median of --repeats is printed.

The small sizes show where workers start to pay (``parallel.PARALLEL_MIN_ROWS``): below it the
default is one process whatever the CPU count.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import datasets

from kd_dist.config import TrainConfig
from kd_dist.data import build_datasets
from kd_dist.data.parallel import PARALLEL_MIN_ROWS, resolve_num_proc, usable_cpus
from kd_dist.tiny import build_tokenizer

SYLLABLES = "ka lo mi ne su ta ri po de fa gu li mo na se to ve zi ba co".split()


def vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    return ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(size)]


def sentence(rng: random.Random, words: list[str], low: int, high: int) -> str:
    return " ".join(rng.choices(words, k=rng.randint(low, high))).capitalize() + "."


def chat_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = vocabulary(rng)
    rows = []
    for _ in range(count):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": sentence(rng, words, 5, 20)})
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": sentence(rng, words, 20, 60)})
            messages.append({"role": "assistant", "content": sentence(rng, words, 40, 200)})
        rows.append({"messages": messages})
    return rows


def text_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = vocabulary(rng)
    return [{"text": sentence(rng, words, 40, 400)} for _ in range(count)]


def timed_build(saved: Path, workdir: Path, tokenizer, num_proc: int) -> float:
    """Seconds to tokenize a fresh copy of ``saved`` (a cold cache) with ``num_proc``."""
    copy = Path(tempfile.mkdtemp(dir=workdir))
    shutil.copytree(saved, copy, dirs_exist_ok=True)
    cfg = TrainConfig(teacher_model="t", student_model="s", dataset=str(copy), max_length=2048,
                      num_proc=num_proc)  # fmt: skip
    started = time.perf_counter()
    build_datasets(cfg, tokenizer)
    seconds = time.perf_counter() - started
    shutil.rmtree(copy)
    return seconds


def compare(
    rows: int, make_rows, settings: dict[str, int], tokenizer, workdir: Path, repeats: int
) -> None:
    saved = workdir / f"raw_{rows}"
    datasets.Dataset.from_list(make_rows(rows)).save_to_disk(str(saved))
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, num_proc in settings.items():
            times[name].append(timed_build(saved, workdir, tokenizer, num_proc))
    medians = {name: statistics.median(values) for name, values in times.items()}
    baseline = next(iter(medians.values()))
    cells = [
        f"{name} {medians[name]:6.2f} s {rows / medians[name]:7,.0f} rows/s "
        f"x{baseline / medians[name]:4.2f}"
        for name in settings
    ]
    print(f"{rows:>7,} rows | " + " | ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="Rows of the main comparison.")
    parser.add_argument(
        "--sizes", default="500,2000,5000", help="Smaller sizes, for the one-process threshold."
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", choices=("chat", "text"), default="chat")
    args = parser.parse_args()

    datasets.disable_progress_bars()
    tokenizer = build_tokenizer(
        [sentence(random.Random(i), vocabulary(random.Random(0)), 5, 50) for i in range(2000)],
        vocab_size=8000,
    )
    cpus = usable_cpus()
    default, why = resolve_num_proc(None, args.rows, cpus)
    workers = min(cpus, 16)
    print(f"{args.data} data, {cpus} usable CPUs; default --num_proc at {args.rows:,} rows: "
          f"{default} ({why}); below {PARALLEL_MIN_ROWS:,} rows: 1. Medians of {args.repeats}, "
          "ratio = speed-up over one process.")  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        make_rows = chat_rows if args.data == "chat" else text_rows
        compare(args.rows, make_rows, {"num_proc 1": 1, f"default ({default})": default}, tokenizer,
                Path(workdir), args.repeats)  # fmt: skip
        for rows in (int(size) for size in args.sizes.split(",") if size):
            compare(rows, make_rows, {"num_proc 1": 1, f"num_proc {workers}": workers}, tokenizer,
                    Path(workdir), args.repeats)  # fmt: skip


if __name__ == "__main__":
    main()
