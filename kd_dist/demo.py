"""``kd-dist demo``: distillation end to end on two CPU cores in a few minutes, nothing downloaded.

1. Write a corpus from a small random grammar (many next tokens are genuinely uncertain, which
   is where a teacher's soft distribution carries more than the one observed token).
2. Train a tokenizer and a teacher on it with plain cross-entropy.
3. With the same budget, train one student by distillation and an identical one by
   cross-entropy alone, through the same ``train`` used by ``kd-dist train``.
4. Store the teacher's top-8 tokens per position (``kd-dist cache-teacher``) and distil a third
   identical student from that cache alone, with the same budget.
5. Evaluate the untrained student and the cross-entropy one against the teacher (``kd-dist
   eval``'s function: the cross-entropy run, --alpha 1, never loaded the teacher), print the
   held-out metrics of all four and keep the distilled student in ``OUTPUT_DIR/student_kd``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from kd_dist.cache_teacher import cache_teacher
from kd_dist.checkpoint import remove_entries
from kd_dist.config import ConfigError, TrainConfig
from kd_dist.evaluation import evaluate_saved, metrics_table
from kd_dist.tiny import build_model, build_tokenizer, save_pair
from kd_dist.trainer import train

SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the teacher", "a student", "the old man"]
VERBS = ["sees", "likes", "finds", "follows", "helps", "watches", "calls"]
OBJECTS = ["the ball", "a house", "the river", "some bread", "the tree", "a letter", "the moon"]
PLACES = ["in the park", "at home", "by the sea", "near the school", "in the morning"]


def make_corpus(rng: random.Random, size: int) -> list[str]:
    """Sentences from a random grammar, with skewed choices so that probabilities matter."""
    weights = [2**-i for i in range(len(SUBJECTS))]
    sentences = []
    for _ in range(size):
        clauses = []
        for _ in range(rng.choice([1, 2, 2, 3])):
            subject = rng.choices(SUBJECTS, weights)[0]
            verb = rng.choices(VERBS, weights)[0]
            obj = rng.choices(OBJECTS, weights[::-1])[0]
            place = f" {rng.choice(PLACES)}" if rng.random() < 0.5 else ""
            clauses.append(f"{subject} {verb} {obj}{place}")
        sentences.append(" and ".join(clauses) + ".")
    return sentences


def demo_config(
    output_dir: Path, teacher: str, student: str, dataset: Path, **changes
) -> TrainConfig:
    """The shared recipe: only the models and the loss weights differ between the runs."""
    base = dict(
        teacher_model=teacher,
        student_model=student,
        dataset=str(dataset),
        eval_ratio=0.1,
        max_length=64,
        batch_size=32,
        epochs=1,
        learning_rate=3e-3,
        warmup_ratio=0.05,
        lr_scheduler="cosine",
        temperature=1.0,
        save_every=0,
        logging_steps=20,
        output_dir=str(output_dir),
    )
    return TrainConfig(**{**base, **changes})


# Everything the demo writes in its folder; a rerun replaces exactly these and nothing else.
DEMO_OUTPUTS = ("corpus.jsonl", "init", "teacher", "student_kd", "student_ce", "teacher_cache",
                "student_cached", "demo_results.json")  # fmt: skip
# The cached student's teacher: its top CACHE_TOP_K of the vocabulary's 384 tokens per position.
CACHE_TOP_K = 8


def prepare_demo_dir(root: Path) -> None:
    """Empty or create the demo's folder; refuse one holding anything the demo did not write."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--output_dir {root} is a file: pass a folder for the demo.")
    foreign = (
        sorted(p.name for p in root.iterdir() if p.name not in DEMO_OUTPUTS)
        if root.exists()
        else []
    )
    if foreign:
        raise ConfigError(
            f"--output_dir {root} holds files the demo did not write ({', '.join(foreign[:5])}): "
            "choose an empty or new folder."
        )
    if root.exists():
        remove_entries(root, DEMO_OUTPUTS)
    root.mkdir(parents=True, exist_ok=True)


def run_demo(output_dir: str = "demo_output", seed: int = 0, corpus_size: int = 6000) -> dict:
    root = Path(output_dir)
    prepare_demo_dir(root)
    rng = random.Random(seed)
    sentences = make_corpus(rng, corpus_size)
    dataset = root / "corpus.jsonl"
    dataset.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))

    tokenizer = build_tokenizer(sentences, vocab_size=384)
    torch.manual_seed(seed)  # the initial weights too, so that a rerun prints the same table
    teacher_init = save_pair(
        root / "init" / "teacher",
        build_model(
            "llama", tokenizer, "small", hidden_size=128, num_hidden_layers=3, intermediate_size=256
        ),
        tokenizer,
    )
    student_init = save_pair(
        root / "init" / "student", build_model("llama", tokenizer, "tiny"), tokenizer
    )

    print("[1/5] training the teacher (cross-entropy)")
    teacher = demo_config(
        root / "teacher", teacher_init, teacher_init, dataset, alpha=1.0, epochs=3, seed=seed
    )
    train(teacher)
    budget = dict(epochs=2, seed=seed)
    print("[2/5] distilling the student (forward KL to the teacher)")
    kd = train(
        demo_config(
            root / "student_kd", teacher.output_dir, student_init, dataset, alpha=0.0, **budget
        )
    )
    print("[3/5] training the same student on cross-entropy only (baseline)")
    ce = train(
        demo_config(
            root / "student_ce", teacher.output_dir, student_init, dataset, alpha=1.0, **budget
        )
    )

    print(f"[4/5] caching the teacher's top-{CACHE_TOP_K} tokens, distilling the same student "
          "from the cache alone")  # fmt: skip
    cache = demo_config(root / "teacher_cache", teacher.output_dir, "", dataset, top_k=CACHE_TOP_K,
                        **budget)  # fmt: skip
    cache_teacher(cache)
    # Evaluated against the live teacher (given too), for figures comparable with the others.
    cached = train(
        demo_config(
            root / "student_cached",
            teacher.output_dir,
            student_init,
            dataset,
            teacher_cache=cache.output_dir,
            **budget,
        )
    )

    print("[5/5] evaluating the untrained and the cross-entropy students against the teacher")
    untrained = evaluate_saved(
        demo_config(root / "student_kd", teacher.output_dir, student_init, dataset, **budget)
    )
    # --alpha 1 trains without loading the teacher, so its run measured the student alone.
    cross_entropy_only = evaluate_saved(
        demo_config(root / "student_ce", teacher.output_dir, ce.output_dir, dataset, **budget)
    )

    results = {
        "untrained": untrained,
        "distilled": kd.eval_metrics,
        "distilled_from_cache": cached.eval_metrics,
        "cross_entropy_only": cross_entropy_only,
    }
    (root / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("Held-out metrics")
    print(metrics_table(results))
    print(verdict(results))
    print(cache_verdict(results))
    print(f"Distilled student saved in {root / 'student_kd'} (load it with from_pretrained).")
    return results


def verdict(results: dict[str, dict[str, float]]) -> str:
    kd, ce = results["distilled"], results["cross_entropy_only"]
    if kd["kl_to_teacher"] < ce["kl_to_teacher"]:
        return (
            f"Distillation wins on KL to the teacher: {kd['kl_to_teacher']:.4f} vs "
            f"{ce['kl_to_teacher']:.4f} ({kd['kl_to_teacher'] / ce['kl_to_teacher']:.0%})."
        )
    return (
        f"Distillation did NOT beat the cross-entropy baseline on KL to the teacher this time "
        f"({kd['kl_to_teacher']:.4f} vs {ce['kl_to_teacher']:.4f})."
    )


def cache_verdict(results: dict[str, dict[str, float]]) -> str:
    live, cached = (
        results["distilled"]["kl_to_teacher"],
        results["distilled_from_cache"]["kl_to_teacher"],
    )
    return (
        f"From the cached teacher (its top-{CACHE_TOP_K} tokens and the rest's mass): KL to the "
        f"teacher {cached:.4f}, {cached / live:.0%} of the live-teacher student's {live:.4f}."
    )
