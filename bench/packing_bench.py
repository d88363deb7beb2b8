"""Padding and throughput of padded, length-grouped and packed batches, side by side in one run.

    python bench/packing_bench.py                  # 600 chat examples, batch 8, --max_length 512
    python bench/packing_bench.py --examples 2000 --max_length 1024
    OMP_NUM_THREADS=1 python bench/packing_bench.py  # steadier on a shared machine

The same chat data (a realistic mix: mostly short questions and answers, a long tail of long
answers and multi-turn conversations) is tokenized by kd_dist's data path three ways and batched
by the trainer's own loader (``trainer.train_data_loader``), --batch_size rows per batch:

    padded     shuffled examples, each batch right-padded to its longest row (the default)
    grouped    --group_by_length: batches of similar lengths, padded to their longest row
    packed     --packing: whole examples packed into blocks of at most --max_length tokens

Each method then trains one whole epoch (a KD step per batch as the trainer does it: teacher and
student forwards to the final hidden states, the fused loss, backward, AdamW step, fp32), the
three interleaved batch by batch so that a machine's load falls on them alike. Tokens/s counts
the real (non-padding) tokens, the same in all three; padding is the share of padding tokens in
the epoch's batches. The models are a small Llama-style teacher and student built from configs
(random weights, nothing downloaded).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="packing_bench_"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM

from kd_dist.config import TrainConfig
from kd_dist.data import build_datasets, make_collator
from kd_dist.losses import fused_distillation_loss, valid_rows
from kd_dist.models import forward_hidden, output_head
from kd_dist.tiny import build_tokenizer, model_config
from kd_dist.trainer import train_data_loader

TEACHER, STUDENT = (256, 4), (128, 2)  # (hidden, layers), Llama-style, 64-wide heads
METHODS = {"padded": {}, "grouped": {"group_by_length": True}, "packed": {"packing": True}}
SYLLABLES = "ka lo mi ne ra su ti vo ba de fi go hu ja le mo nu pi ro se ta vi wu ze".split()


def lexicon(rng: random.Random, size: int = 3000) -> list[str]:
    """Made-up words of 1-4 syllables: text with a real-sized BPE vocabulary."""
    return ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(size)]


def sentence(rng: random.Random, words: list[str], count: int) -> str:
    # Zipf-like word frequencies, as in natural text.
    weights = [1 / (rank + 1) for rank in range(len(words))]
    return " ".join(rng.choices(words, weights=weights, k=count)).capitalize() + "."


def chat_rows(count: int, seed: int = 0) -> list[dict]:
    """Conversations whose answer lengths are long-tailed (log-normal, median ~25 words, a few
    hundred at the tail), a quarter of them two turns long."""
    rng = random.Random(seed)
    words = lexicon(rng)
    rows = []
    for _ in range(count):
        messages = []
        for _ in range(2 if rng.random() < 0.25 else 1):
            answer_words = min(int(rng.lognormvariate(3.2, 1.0)) + 3, 400)
            messages += [
                {"role": "user", "content": sentence(rng, words, rng.randint(5, 30))},
                {"role": "assistant", "content": sentence(rng, words, answer_words)},
            ]
        rows.append({"messages": messages})
    return rows


def build(hidden: int, layers: int, vocab: int) -> torch.nn.Module:
    config = model_config("llama", vocab, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                          head_dim=64, intermediate_size=hidden * 3)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def padding_fraction(batches: list[dict[str, torch.Tensor]]) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1 - real / sum(b["attention_mask"].numel() for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    args = parser.parse_args()

    rows = chat_rows(args.examples)
    work = Path(os.environ["HF_DATASETS_CACHE"])
    dataset = work / "chat.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    corpus = [m["content"] for row in rows for m in row["messages"]]
    tokenizer = build_tokenizer(corpus, vocab_size=8192)
    loaders = {}
    for name, flags in METHODS.items():
        cfg = TrainConfig(teacher_model="t", student_model="s", dataset=str(dataset),
                          max_length=args.max_length, batch_size=args.batch_size,
                          **flags)  # fmt: skip
        data = build_datasets(cfg, tokenizer)
        loaders[name] = list(train_data_loader(cfg, data.train, make_collator(tokenizer)))
    lengths = sorted(int(row.sum()) for b in loaders["padded"] for row in b["attention_mask"])

    torch.manual_seed(0)
    vocab = len(tokenizer)
    teacher = build(*TEACHER, vocab).eval().requires_grad_(False)
    student = build(*STUDENT, vocab).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    spec = TrainConfig(teacher_model="t", student_model="s", dataset="d").loss_spec

    def kd_step(batch: dict[str, torch.Tensor]) -> None:
        hidden = forward_hidden(student, student, batch, "causal")
        with torch.no_grad():
            teacher_hidden = forward_hidden(teacher, teacher, batch, "causal")
        s, t, labels = valid_rows(hidden, teacher_hidden, batch["labels"], causal=True)
        fused_distillation_loss(
            s, output_head(student), t, output_head(teacher), labels, spec, vocab_size=vocab
        ).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for loader in loaders.values():  # warm-up
        kd_step(loader[0])
    # One whole epoch each, interleaved: every round, each method still running takes its next
    # batch, so that the machine's load falls on all three alike while they all run.
    seconds = dict.fromkeys(METHODS, 0.0)
    for batches in itertools.zip_longest(*loaders.values()):
        for name, batch in zip(METHODS, batches, strict=True):
            if batch is not None:
                start = time.perf_counter()
                kd_step(batch)
                seconds[name] += time.perf_counter() - start

    real_tokens = sum(lengths)
    print(
        f"packing_bench: {args.examples} chat examples, {real_tokens} tokens (length median "
        f"{lengths[len(lengths) // 2]}, p90 {lengths[len(lengths) * 9 // 10]}, max "
        f"{lengths[-1]}), batch {args.batch_size} rows, --max_length {args.max_length}"
    )
    print(
        f"  models: Llama teacher {TEACHER[0]}x{TEACHER[1]}, student {STUDENT[0]}x{STUDENT[1]}, "
        f"vocab {vocab}, CPU fp32, {torch.get_num_threads()} threads; one epoch per method "
        "(a KD step per batch), interleaved"
    )
    print(f"  {'method':<8} {'batches':>7} {'padding':>8} {'epoch s':>8} {'tokens/s':>9}"
          f"  {'tokens/s vs padded':>18}")  # fmt: skip
    for name in METHODS:
        rate = real_tokens / seconds[name]
        print(f"  {name:<8} {len(loaders[name]):>7} {padding_fraction(loaders[name]):>8.1%} "
              f"{seconds[name]:>8.1f} {rate:>9.0f}  "
              f"{seconds['padded'] / seconds[name]:>17.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
