"""Shared fixtures: tiny real models and tokenizers built in-process and saved to disk."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kd_dist.tiny import build_model, build_tokenizer, save_pair

WORDS = "the a cat dog bird sees likes finds river house tree moon and in park home".split()


def make_sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) + "." for _ in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return make_sentences(64)


@pytest.fixture(scope="session")
def tokenizer(sentences):
    # No pad token, like GPT-2 and Llama: kd_dist must supply one.
    return build_tokenizer(sentences, vocab_size=300, with_pad=False)


@pytest.fixture(scope="session")
def model_pair(tmp_path_factory, tokenizer):
    """``model_pair(family, **student_overrides)`` -> (teacher_dir, student_dir), cached."""
    cache: dict[tuple, tuple[str, str]] = {}

    def make(family: str, **student_overrides) -> tuple[str, str]:
        key = (family, tuple(sorted(student_overrides.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(family)
            teacher = save_pair(
                root / "teacher", build_model(family, tokenizer, "small"), tokenizer
            )
            student = save_pair(
                root / "student",
                build_model(family, tokenizer, "tiny", **student_overrides),
                tokenizer,
            )
            cache[key] = (teacher, student)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory, sentences) -> Path:
    return write_jsonl(
        tmp_path_factory.mktemp("data") / "text.jsonl", [{"text": s} for s in sentences]
    )


@pytest.fixture(scope="session")
def dolly_dataset(tmp_path_factory, sentences) -> Path:
    rows = [{"instruction": f"continue: {s[:10]}", "context": "", "response": s} for s in sentences]
    return write_jsonl(tmp_path_factory.mktemp("data") / "dolly.jsonl", rows)


@pytest.fixture(scope="session")
def pairs_dataset(tmp_path_factory, sentences) -> Path:
    rows = [{"source": s, "target": " ".join(reversed(s.split()))} for s in sentences]
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)
