"""The distillation temperature: one recipe at T = 0.5, 1, 2, 4 and on cross-entropy alone.

    export OMP_NUM_THREADS=1    # on a shared machine: 2 threads competing for 2 cores ran 3x slower
    python bench/temperature_sweep.py demo                       # the built-in demo
    python bench/temperature_sweep.py demo --corpus_size 2000 --epochs 1
    python bench/prepare_smollm2.py                              # once: the real teacher
    kd-dist make-student --teacher_model /tmp/smollm2/teacher --num_layers 10 \
        --output_dir /tmp/smollm2/student                        # once: its 10-layer cut
    python bench/temperature_sweep.py real --teacher /tmp/smollm2/teacher \
        --student /tmp/smollm2/student                           # ~10 min of CPU

Each setting trains the same student five times with the same budget (the same steps, data
order and seed) through ``kd_dist.trainer.train``: forward-KL distillation (--alpha 0) at each
temperature, and a cross-entropy baseline (--alpha 1, which never loads the teacher: its
student is then measured against the teacher by ``kd-dist eval``'s function). It prints the
held-out metrics of each, as the trainer computes them (KL(teacher || student) at T = 1,
perplexity, top-1 agreement), as one Markdown table.

    demo   kd_dist/demo.py's corpus, teacher (trained once, first) and student, and its recipe
           (demo_config, with the demo's two epochs), only the temperature changing.
    real   a real pretrained teacher, SmolLM2-135M-Instruct (``bench/prepare_smollm2.py``), and a
           --student cut from it (``kd-dist make-student --num_layers 10``: 10 of its 30 layers,
           evenly spaced, keeping the first and last), --steps optimizer steps each. The data is
           English prose found on every machine with this Python: the paragraphs of the
           docstrings of a fixed list of standard-library modules (``stdlib_prose``), one example
           each, 15% held out, packed into blocks of --max_length 64 tokens (--packing: no
           padding, long paragraphs split, so every token counts), --batch_size 4, AdamW at
           --learning_rate 2e-4 with 10% warm-up and cosine decay. It is real technical
           writing, offline, and the same on any machine with the same Python version (3.11
           here: 418 paragraphs).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kd_dist.config import TrainConfig
from kd_dist.demo import demo_config, make_corpus, train_teacher, write_corpus
from kd_dist.evaluation import evaluate_saved, metrics_table
from kd_dist.trainer import train

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
CE_RUN = "CE only (--alpha 1)"
# The real setting's corpus: standard-library modules whose docstrings are mostly prose.
MODULES = ("argparse", "collections", "configparser", "contextlib", "csv", "dataclasses",
           "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gettext",
           "heapq", "http.client", "inspect", "json", "logging", "optparse", "pathlib", "pickle",
           "pprint", "queue", "random", "sched", "shutil", "smtplib", "statistics", "string",
           "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "typing",
           "unittest", "urllib.request", "warnings", "zipfile")  # fmt: skip

# A run's config from its name and what it changes in the setting's recipe.
Recipe = Callable[..., TrainConfig]


def sweep(recipe: Recipe, temperatures: tuple[float, ...] = TEMPERATURES) -> dict[str, dict]:
    """Each run's held-out metrics by name: KD at each temperature, then the CE baseline."""
    results = {}
    for temperature in temperatures:
        run = recipe(f"kd_t{temperature:g}", alpha=0.0, temperature=temperature)
        results[f"KD, T = {temperature:g}"] = train(run).eval_metrics
    ce = train(recipe("ce", alpha=1.0))
    # --alpha 1 never loaded the teacher: measure its saved student against it, on the same split.
    results[CE_RUN] = evaluate_saved(recipe("ce", student_model=ce.output_dir))
    return results


def demo_recipe(root: Path, corpus_size: int, epochs: int, seed: int) -> Recipe:
    """The demo's corpus, teacher (trained here, once) and untrained student, and its recipe."""
    sentences = make_corpus(random.Random(seed), corpus_size)
    dataset = write_corpus(root / "corpus.jsonl", sentences)
    print("training the demo's teacher (cross-entropy)")
    teacher, student = train_teacher(root, dataset, sentences, seed)

    def recipe(name: str, **changes) -> TrainConfig:
        return demo_config(root / name, teacher, student, dataset,
                           **{"epochs": epochs, "seed": seed, **changes})  # fmt: skip

    return recipe


def paragraphs(doc: str, min_words: int = 20) -> list[str]:
    """A docstring's prose paragraphs, each on one line: no doctests, mostly letters."""
    kept = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [line.strip() for line in block.splitlines()]
        text = " ".join(lines)
        if any(line.startswith((">>>", "...")) for line in lines) or len(text.split()) < min_words:
            continue
        if sum(c.isalpha() or c.isspace() for c in text) >= 0.9 * len(text):
            kept.append(text)
    return kept


def stdlib_prose(modules: tuple[str, ...] = MODULES) -> list[str]:
    """The distinct prose paragraphs of the docstrings of ``modules``, their public classes and
    functions (those defined there), in a fixed order."""
    seen: dict[str, None] = {}  # insertion-ordered set
    for name in modules:
        module = importlib.import_module(name)
        members = [
            value
            for key, value in sorted(vars(module).items())
            if not key.startswith("_")
            and (inspect.isclass(value) or inspect.isfunction(value))
            and getattr(value, "__module__", "").startswith(name)
        ]
        for obj in (module, *members):
            seen.update(dict.fromkeys(paragraphs(inspect.getdoc(obj) or "")))
    return list(seen)


def real_recipe(root: Path, teacher: str, student: str, steps: int, batch_size: int,
                max_length: int, learning_rate: float, seed: int) -> Recipe:  # fmt: skip
    dataset = root / "stdlib_prose.jsonl"
    texts = stdlib_prose()
    dataset.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    print(f"{len(texts)} paragraphs of Python {sys.version.split()[0]}'s docstrings in {dataset}")
    # --no-compile_loss: the same math; compiling it would cost more than 30 steps take.
    base = dict(teacher_model=teacher, student_model=student, dataset=str(dataset),
                eval_ratio=0.15, max_length=max_length, packing=True, batch_size=batch_size,
                max_steps=steps,
                learning_rate=learning_rate, warmup_ratio=0.1, lr_scheduler="cosine",
                save_every=0, logging_steps=10, seed=seed,
                compile_loss=False)  # fmt: skip

    def recipe(name: str, **changes) -> TrainConfig:
        return TrainConfig(**{**base, "output_dir": str(root / name), **changes})

    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=None,
        help="where the runs go (default: a temporary folder, removed after)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES))
    settings = parser.add_subparsers(dest="setting", required=True)
    demo = settings.add_parser("demo", help="kd_dist/demo.py's teacher, student and recipe")
    demo.add_argument("--corpus_size", type=int, default=6000)
    demo.add_argument("--epochs", type=int, default=2)
    real = settings.add_parser("real", help="SmolLM2-135M-Instruct and a 10-layer cut of it")
    real.add_argument("--teacher", required=True, help="bench/prepare_smollm2.py's folder")
    real.add_argument("--student", required=True, help="a cut of it: kd-dist make-student")
    real.add_argument("--steps", type=int, default=30)
    real.add_argument("--batch_size", type=int, default=4)
    real.add_argument("--max_length", type=int, default=64)
    real.add_argument("--learning_rate", type=float, default=2e-4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="temperature_sweep_") as tmp:
        root = args.output_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.setting == "demo":
            recipe = demo_recipe(root, args.corpus_size, args.epochs, args.seed)
        else:
            recipe = real_recipe(root, args.teacher, args.student, args.steps, args.batch_size,
                                 args.max_length, args.learning_rate, args.seed)  # fmt: skip
        results = sweep(recipe, tuple(args.temperatures))
    tokens = next(iter(results.values()))["tokens"]  # each run's: the same held-out split
    print(f"\nHeld-out metrics ({args.setting}, {tokens:,} tokens; KL and agreement at T = 1):\n")
    print(metrics_table(results, markdown=True))


if __name__ == "__main__":
    main()
