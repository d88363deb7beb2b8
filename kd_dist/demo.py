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
6. Exposure bias: distil two more students on prompts ("the cat sees") whose responses leave
   out what the teacher often writes (place phrases), off-policy and on-policy (GKD: --lmbda
   0.5, JSD), with the same budget, and measure each on its own sampled completions of held-out
   prompts (--eval_on_policy): how likely the teacher finds them, and the reverse KL there.
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
from kd_dist.make_student import DECODER_LAYER_FLAGS, LAYER_FLAGS, LayerChoice, make_student
from kd_dist.tiny import build_model, build_tokenizer, save_pair
from kd_dist.trainer import train

SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the teacher", "a student", "the old man"]
VERBS = ["sees", "likes", "finds", "follows", "helps", "watches", "calls"]
OBJECTS = ["the ball", "a house", "the river", "some bread", "the tree", "a letter", "the moon"]
PLACES = ["in the park", "at home", "by the sea", "near the school", "in the morning"]


def make_corpus(rng: random.Random, size: int, place_rate: float = 0.5) -> list[str]:
    """Sentences from a random grammar, with skewed choices so that probabilities matter; a
    clause ends with a place phrase ("in the park") at ``place_rate``."""
    weights = [2**-i for i in range(len(SUBJECTS))]
    sentences = []
    for _ in range(size):
        clauses = []
        for _ in range(rng.choice([1, 2, 2, 3])):
            subject = rng.choices(SUBJECTS, weights)[0]
            verb = rng.choices(VERBS, weights)[0]
            obj = rng.choices(OBJECTS, weights[::-1])[0]
            place = f" {rng.choice(PLACES)}" if rng.random() < place_rate else ""
            clauses.append(f"{subject} {verb} {obj}{place}")
        sentences.append(" and ".join(clauses) + ".")
    return sentences


def prompt_completions(sentences: list[str]) -> list[dict[str, str]]:
    """Each sentence as a prompt (its first subject and verb) and the completion after it."""
    rows = []
    for sentence in sentences:
        words = sentence.split(" ")
        cut = next(i for i, word in enumerate(words, 1) if word in VERBS)
        rows.append({"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])})
    return rows


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
                "student_cached", "prompts.jsonl", "student_off_policy", "student_on_policy",
                "student_cut", "student_cut_kd", "student_cut_ce", "student_cut_lora",
                "student_hidden", "demo_results.json")  # fmt: skip
# Step 7's cut student keeps CUT_LAYERS of the teacher's 3 layers (the first and the last), and
# its LoRA adapters have rank LORA_RANK; each of its runs takes CUT_STEPS optimizer steps.
CUT_LAYERS = 2
LORA_RANK = 8
CUT_STEPS = 60
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


def write_corpus(path: Path, sentences: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    return path


def train_teacher(root: Path, dataset: Path, sentences: list[str], seed: int) -> tuple[str, str]:
    """The demo's tokenizer, teacher (trained on ``dataset`` with cross-entropy) and untrained
    student, in ``root``: returns the trained teacher's folder and the untrained student's."""
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
    teacher = demo_config(
        root / "teacher", teacher_init, teacher_init, dataset, alpha=1.0, epochs=3, seed=seed
    )
    train(teacher)
    return teacher.output_dir, student_init


def run_demo(output_dir: str = "demo_output", seed: int = 0, corpus_size: int = 6000) -> dict:
    root = Path(output_dir)
    prepare_demo_dir(root)
    sentences = make_corpus(random.Random(seed), corpus_size)
    dataset = write_corpus(root / "corpus.jsonl", sentences)
    print("[1/7] training the teacher (cross-entropy)")
    teacher_dir, student_init = train_teacher(root, dataset, sentences, seed)
    budget = dict(epochs=2, seed=seed)
    print("[2/7] distilling the student (forward KL to the teacher)")
    kd = train(
        demo_config(root / "student_kd", teacher_dir, student_init, dataset, alpha=0.0, **budget)
    )
    print("[3/7] training the same student on cross-entropy only (baseline)")
    ce = train(
        demo_config(root / "student_ce", teacher_dir, student_init, dataset, alpha=1.0, **budget)
    )

    print(f"[4/7] caching the teacher's top-{CACHE_TOP_K} tokens, distilling the same student "
          "from the cache alone")  # fmt: skip
    cache = demo_config(root / "teacher_cache", teacher_dir, "", dataset, top_k=CACHE_TOP_K,
                        **budget)  # fmt: skip
    cache_teacher(cache)
    # Evaluated against the live teacher (given too), for figures comparable with the others.
    cached = train(
        demo_config(
            root / "student_cached",
            teacher_dir,
            student_init,
            dataset,
            teacher_cache=cache.output_dir,
            **budget,
        )
    )

    print("[5/7] evaluating the untrained and the cross-entropy students against the teacher")
    untrained = evaluate_saved(
        demo_config(root / "student_kd", teacher_dir, student_init, dataset, **budget)
    )
    # --alpha 1 trains without loading the teacher, so its run measured the student alone.
    cross_entropy_only = evaluate_saved(
        demo_config(root / "student_ce", teacher_dir, ce.output_dir, dataset, **budget)
    )

    print("[6/7] distilling two students on prompts whose responses leave out the teacher's place "
          "phrases: off-policy, and on-policy (--lmbda 0.5)")  # fmt: skip
    # The same grammar without place phrases: what the teacher often writes, the data never
    # shows. Held-out prompts, and the students' own completions of them, measure the rest.
    prompts = root / "prompts.jsonl"
    narrow = make_corpus(random.Random(seed + 1), corpus_size, place_rate=0.0)
    prompts.write_text("".join(json.dumps(row) + "\n" for row in prompt_completions(narrow)))
    # The same number of optimizer steps whatever the corpus size (the test runs a small one).
    recipe = dict(loss="jsd", eval_on_policy=True, max_new_tokens=40, max_steps=150, seed=seed)
    on_policy_results = {}
    for name, lmbda in (("off_policy", 0.0), ("on_policy", 0.5)):
        config = demo_config(root / f"student_{name}", teacher_dir, student_init, prompts,
                             lmbda=lmbda, **recipe)  # fmt: skip
        on_policy_results[name] = train(config).eval_metrics

    print(f"[7/7] students users bring: a {CUT_LAYERS}-layer student cut from the teacher, "
          "healed by KD and by cross-entropy; LoRA on it; hidden-state matching")  # fmt: skip
    student_results = bring_students(root, teacher_dir, student_init, dataset, budget)

    results = {
        "untrained": untrained,
        "distilled": kd.eval_metrics,
        "distilled_from_cache": cached.eval_metrics,
        "cross_entropy_only": cross_entropy_only,
    }
    (root / "demo_results.json").write_text(
        json.dumps({**results, **on_policy_results, **student_results}, indent=2) + "\n"
    )
    print("Held-out metrics")
    print(metrics_table(results))
    print(verdict(results))
    print(cache_verdict(results))
    print("On the prompts, and on each student's own completions of them")
    print(metrics_table(on_policy_results))
    print(on_policy_verdict(on_policy_results))
    print("Students users bring (held out)")
    print(metrics_table(student_results))
    print(students_verdict(student_results, kd.eval_metrics))
    print(f"Distilled student saved in {root / 'student_kd'} (load it with from_pretrained).")
    return results


def bring_students(
    root: Path, teacher: str, student_init: str, dataset: Path, budget: dict
) -> dict[str, dict[str, float]]:
    """Step 7: the held-out metrics of a student cut from the teacher before and after healing
    (distillation, cross-entropy alone, LoRA adapters), and of step 2's student distilled with
    its hidden states matched too (each with step 2's budget)."""
    cut = make_student(
        teacher, root / "student_cut",
        LayerChoice(CUT_LAYERS, None, LAYER_FLAGS),
        LayerChoice(None, None, DECODER_LAYER_FLAGS),
    ).output_dir  # fmt: skip
    # The cut student starts close to the teacher: its runs get CUT_STEPS steps each; the
    # hidden-state run has step 2's budget, to compare with step 2's student.
    healing = dict(max_steps=CUT_STEPS, seed=budget["seed"])
    # name -> (output folder, student, the recipe's changes)
    runs = {
        "cut_distilled": ("student_cut_kd", cut, dict(alpha=0.0, **healing)),
        "cut_cross_entropy_only": ("student_cut_ce", cut, dict(alpha=1.0, **healing)),
        "cut_lora_distilled": ("student_cut_lora", cut,
                               dict(alpha=0.0, lora_r=LORA_RANK, **healing)),
        "hidden_states_distilled": ("student_hidden", student_init,
                                    dict(alpha=0.0, hidden_loss_weight=1.0, **budget)),
    }  # fmt: skip
    results = {
        "cut_untrained": evaluate_saved(
            demo_config(root / "student_cut", teacher, str(cut), dataset, **healing)
        )
    }
    for name, (folder, student, changes) in runs.items():
        results[name] = train(demo_config(root / folder, teacher, str(student), dataset,
                                          **changes)).eval_metrics  # fmt: skip
    # --alpha 1 trains without loading the teacher: its student is measured against it after.
    ce_folder = str(root / "student_cut_ce")
    results["cut_cross_entropy_only"] = evaluate_saved(
        demo_config(root / "student_cut_ce", teacher, ce_folder, dataset, **healing)
    )
    return results


def students_verdict(results: dict[str, dict[str, float]], distilled: dict[str, float]) -> str:
    """Step 7's findings: the healed cut student against cross-entropy, LoRA against training
    every weight, hidden-state matching against step 2's plain distillation."""
    kl, ppl = "kl_to_teacher", "student_ppl"
    kd, ce = results["cut_distilled"], results["cut_cross_entropy_only"]
    lora, hidden = results["cut_lora_distilled"], results["hidden_states_distilled"]
    untrained = results["cut_untrained"]
    healed = "wins" if kd[kl] < ce[kl] and kd[ppl] < ce[ppl] else "did NOT win on both this time"
    return "\n".join([
        f"The cut student healed by distillation {healed} against cross-entropy alone: KL to "
        f"the teacher {kd[kl]:.4f} vs {ce[kl]:.4f}, perplexity {kd[ppl]:.3f} vs {ce[ppl]:.3f} "
        f"(cut, untrained: {untrained[kl]:.4f}, {untrained[ppl]:.3f}).",
        f"LoRA adapters of rank {LORA_RANK} on it, distilled: KL {lora[kl]:.4f}, perplexity "
        f"{lora[ppl]:.3f} (all its weights trained: {kd[kl]:.4f}, {kd[ppl]:.3f}).",
        f"Hidden states matched too (--hidden_loss_weight 1): KL {hidden[kl]:.4f}, perplexity "
        f"{hidden[ppl]:.3f} (step 2's plain distillation: {distilled[kl]:.4f}, "
        f"{distilled[ppl]:.3f}).",
    ])  # fmt: skip


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


def on_policy_verdict(results: dict[str, dict[str, float]]) -> str:
    off, on = results["off_policy"], results["on_policy"]
    nll, reverse_kl = "on_policy_teacher_nll", "on_policy_reverse_kl"
    outcome = "wins" if on[nll] < off[nll] else "did NOT win this time"
    return (
        f"On-policy distillation {outcome} on the students' own completions: the teacher's NLL "
        f"of them {on[nll]:.4f} vs {off[nll]:.4f}, reverse KL {on[reverse_kl]:.4f} vs "
        f"{off[reverse_kl]:.4f}."
    )
