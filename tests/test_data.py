"""Tests for kd_dist.data: real `datasets`, real files in tmp_path, real in-process tokenizers."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from datasets import Dataset, DatasetDict
from datasets.packaged_modules.json.json import Json
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader
from transformers import MBartTokenizer, NllbTokenizer, PreTrainedTokenizerFast

import kd_dist.data.sampling
from kd_dist.config import ConfigError, TrainConfig
from kd_dist.data import (
    IGNORE_INDEX,
    DataSplits,
    LengthGroupedSampler,
    build_datasets,
    content_fingerprint,
    example_lengths,
    make_collator,
)
from kd_dist.data.chat import plain_chat_template
from kd_dist.data.formats import FORMATS, detect_format, render, resolve_format
from kd_dist.models import load_tokenizer
from kd_dist.tiny import build_tokenizer
from tests.test_packing import documents

# --- format table: one row per supported layout ---------------------------------------------
# (case id, raw row, detected kind, causal (prompt, response), seq2seq (source, target) or None
# when the layout can't train a seq2seq model). Expected strings are spelled out in full so the
# test documents the rendering.
FORMAT_CASES = [
    ("text", {"text": "the cat sat on the mat"}, "text", ("", "the cat sat on the mat"), None),
    ("content", {"content": "a dog ran home"}, "text", ("", "a dog ran home"), None),
    (
        "dolly",
        {"instruction": "Name a color", "context": "of the sky", "response": "blue"},
        "instruction",
        ("### Instruction:\nName a color\n\n### Input:\nof the sky\n\n### Response:\n", "blue"),
        ("### Instruction:\nName a color\n\n### Input:\nof the sky\n\n### Response:\n", "blue"),
    ),
    (
        "dolly_no_context",
        {"instruction": "Name a color", "context": "", "response": "red"},
        "instruction",
        ("### Instruction:\nName a color\n\n### Response:\n", "red"),
        ("### Instruction:\nName a color\n\n### Response:\n", "red"),
    ),
    (
        "alpaca",
        {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
        "instruction",
        ("### Instruction:\nAdd the numbers\n\n### Input:\n2 and 3\n\n### Response:\n", "5"),
        ("### Instruction:\nAdd the numbers\n\n### Input:\n2 and 3\n\n### Response:\n", "5"),
    ),
    (
        "alpaca_no_input",
        {"instruction": "Say hello", "input": "", "output": "hello"},
        "instruction",
        ("### Instruction:\nSay hello\n\n### Response:\n", "hello"),
        ("### Instruction:\nSay hello\n\n### Response:\n", "hello"),
    ),
    (
        "prompt_completion",
        {"prompt": "The capital of France is", "completion": " Paris"},
        "instruction",
        ("The capital of France is", " Paris"),
        ("The capital of France is", " Paris"),
    ),
    (
        "question_answer",
        {"question": "How many legs has a cat?", "answer": "four"},
        "instruction",
        ("### Instruction:\nHow many legs has a cat?\n\n### Response:\n", "four"),
        ("### Instruction:\nHow many legs has a cat?\n\n### Response:\n", "four"),
    ),
    (
        "source_target",
        {"source": "hello world", "target": "hallo welt"},
        "seq2seq",
        ("hello world\n", "hallo welt"),
        ("hello world", "hallo welt"),
    ),
    (
        "article_highlights",
        {"article": "the long news article", "highlights": "short news"},
        "seq2seq",
        ("the long news article\n", "short news"),
        ("the long news article", "short news"),
    ),
    (
        "document_summary",
        {"document": "a long document about cats", "summary": "cats"},
        "seq2seq",
        ("a long document about cats\n", "cats"),
        ("a long document about cats", "cats"),
    ),
    (
        "input_output",
        {"input": "translate this", "output": "done"},
        "seq2seq",
        ("translate this\n", "done"),
        ("translate this", "done"),
    ),
]
CASE_IDS = [case[0] for case in FORMAT_CASES]
# (case, task_type) for every combination that applies: plain text has no seq2seq target.
TASK_CASES = [
    pytest.param(case, task, id=f"{case[0]}-{task}")
    for case in FORMAT_CASES
    for task in ("causal", "seq2seq")
    if task == "causal" or case[4] is not None
]

# --- chat table: (case id, raw row, the tokenizer's own template or None for the plain one,
# causal pieces as (text, trained), seq2seq (source, target)). The rendered text is spelled out.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a color"},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "Another"},
    {"role": "assistant", "content": "red"},
]
CHAT_CASES = [
    (
        "messages",
        {"messages": TWO_TURNS, "prompt": "Name a color"},  # ultrachat_200k also has `prompt`
        None,
        [
            ("<|system|>\nBe brief.\n<|user|>\nName a color\n<|assistant|>\n", False),
            ("blue</s>", True),
            ("\n<|user|>\nAnother\n<|assistant|>\n", False),
            ("red</s>", True),
        ],
        (
            "<|system|>\nBe brief.\n<|user|>\nName a color\n<|assistant|>\nblue</s>\n"
            "<|user|>\nAnother\n<|assistant|>\n",
            "red",
        ),
    ),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "Say hi"},
                {"from": "gpt", "value": "hi"},
                {"from": "human", "value": "thanks"},  # after the last answer: not rendered
            ]
        },
        None,
        [("<|user|>\nSay hi\n<|assistant|>\n", False), ("hi</s>", True)],
        ("<|user|>\nSay hi\n<|assistant|>\n", "hi"),
    ),
    (
        "messages_own_template",
        {"messages": TWO_TURNS[1:3]},
        CHATML,
        [
            ("<|im_start|>user\nName a color<|im_end|>\n<|im_start|>assistant\n", False),
            ("blue<|im_end|>\n", True),
        ],
        ("<|im_start|>user\nName a color<|im_end|>\n<|im_start|>assistant\n", "blue"),
    ),
    (
        "opening_assistant_turn_is_context",
        {"messages": [{"role": "assistant", "content": "Hello!"}, *TWO_TURNS[1:3]]},
        None,
        [
            ("<|assistant|>\nHello!</s>\n<|user|>\nName a color\n<|assistant|>\n", False),
            ("blue</s>", True),
        ],
        ("<|assistant|>\nHello!</s>\n<|user|>\nName a color\n<|assistant|>\n", "blue"),
    ),
]
CHAT_IDS = [case[0] for case in CHAT_CASES]


DOLLY_ROWS = [
    {"instruction": f"Question number {i}", "context": "", "response": f"answer {i}"}
    for i in range(12)
]


def corpus() -> list[str]:
    texts = [json.dumps(case[1]) for case in FORMAT_CASES] + [json.dumps(r) for r in DOLLY_ROWS]
    texts += [text for case in CHAT_CASES for text, _ in case[3]]
    return texts + ["### Instruction:\n### Input:\n### Response:\n"] * 3


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    """GPT-2-like: adds no special tokens itself (but has a pad token)."""
    return build_tokenizer(corpus(), vocab_size=400)


def with_template(tokenizer, single: str, token: str):
    """A copy of ``tokenizer`` whose post-processor adds special tokens like a hub tokenizer."""
    tokenizer = copy.deepcopy(tokenizer)
    token_id = tokenizer.convert_tokens_to_ids(token)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(token, token_id)]
    )
    return tokenizer


@pytest.fixture(scope="module")
def bos_tok(tok):
    """Llama-like: prepends <s>."""
    return with_template(tok, "<s> $A", "<s>")


@pytest.fixture(scope="module")
def eos_tok(tok):
    """T5-like: appends </s>."""
    return with_template(tok, "$A </s>", "</s>")


@pytest.fixture(autouse=True)
def isolated_hf(tmp_path, monkeypatch):
    """Keep the datasets cache inside tmp_path and never wait on the network."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config(path, **overrides) -> TrainConfig:
    # No models to resolve --max_length from: the run's default for 512-position models.
    overrides = {"max_length": 512, **overrides}
    return TrainConfig(teacher_model="t", student_model="s", dataset=str(path), **overrides)


def ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def split_labels(example: dict) -> tuple[int, list[int]]:
    """(number of masked positions, the label ids that are trained on)."""
    labels = example["labels"]
    return labels.count(IGNORE_INDEX), [label for label in labels if label != IGNORE_INDEX]


# --- formats: detection and rendering (pure functions) --------------------------------------
@pytest.mark.parametrize(("case", "task"), TASK_CASES)
def test_detect_and_render(case, task):
    _, row, kind, causal, seq2seq = case
    spec = detect_format(list(row))
    assert spec is not None and spec.kind == kind
    assert render(row, spec, task) == (causal if task == "causal" else seq2seq)


def test_alpaca_input_is_not_a_seq2seq_source():
    # `input`/`output` is a seq2seq pair only without an `instruction` column.
    assert detect_format(["instruction", "input", "output"]).name == "alpaca"
    assert detect_format(["input", "output"]).name == "input_output"


def test_structured_columns_win_over_a_text_column():
    assert detect_format(["instruction", "input", "output", "text"]).name == "alpaca"


def test_every_format_row_has_a_test_case():
    assert {spec.name for spec in FORMATS} <= set(CASE_IDS) | set(CHAT_IDS)


def test_blank_required_field_renders_to_none():
    spec = detect_format(["instruction", "context", "response"])
    assert render({"instruction": "x", "context": "", "response": "  "}, spec, "causal") is None
    assert render({"instruction": None, "context": "", "response": "y"}, spec, "causal") is None
    assert render({"text": ""}, detect_format(["text"]), "causal") is None


# --- tokenization: label masks for every format and task -------------------------------------
@pytest.mark.parametrize(("case", "task"), TASK_CASES)
def test_label_masking(case, task, tok, tmp_path):
    _, row, kind, causal, seq2seq = case
    data = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", [row]), task_type=task), tok)
    assert data.format == kind
    assert data.stats["train_examples"] == 1 and data.eval is None
    example = data.train[0]
    eos = tok.eos_token_id
    if task == "causal":
        prompt, response = causal
        prompt_ids = ids(tok, prompt, special=True)
        response_ids = ids(tok, response, special=False)
        assert example["input_ids"] == prompt_ids + response_ids + [eos]
        assert example["attention_mask"] == [1] * len(example["input_ids"])
        masked, trained = split_labels(example)
        assert masked == len(prompt_ids)
        assert example["labels"][:masked] == [IGNORE_INDEX] * masked  # the prompt is the prefix
        assert trained == [*response_ids, eos]
        assert tok.decode(trained) == response + tok.eos_token
    else:
        source, target = seq2seq
        assert example["input_ids"] == ids(tok, source, special=True)
        # this tokenizer adds no eos itself, so the collator-facing labels get one appended
        assert example["labels"] == [*ids(tok, target, special=True), eos]


@pytest.mark.parametrize("case", FORMAT_CASES, ids=CASE_IDS)
def test_train_on_prompt_masks_nothing(case, tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [case[1]])
    example = build_datasets(config(path, train_on_prompt=True), tok).train[0]
    assert example["labels"] == example["input_ids"]


def test_text_with_bos_tokenizer_masks_only_the_bos(bos_tok, tmp_path):
    text = "the cat sat on the mat"
    data = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", [{"text": text}])), bos_tok)
    example = data.train[0]
    assert example["input_ids"][0] == bos_tok.bos_token_id
    masked, trained = split_labels(example)
    assert masked == 1
    assert bos_tok.decode(trained) == text + "</s>"


def test_instruction_with_bos_tokenizer(bos_tok, tmp_path):
    row = {"question": "How many legs has a cat?", "answer": "four"}
    data = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", [row])), bos_tok)
    prompt = "### Instruction:\nHow many legs has a cat?\n\n### Response:\n"
    masked, trained = split_labels(data.train[0])
    assert masked == len(ids(bos_tok, prompt, special=True))  # bos + prompt
    assert bos_tok.decode(trained) == "four</s>"


def test_seq2seq_with_eos_adding_tokenizer(eos_tok, tmp_path):
    row = {"source": "hello world", "target": "hallo welt"}
    data = build_datasets(
        config(write_jsonl(tmp_path / "d.jsonl", [row]), task_type="seq2seq"), eos_tok
    )
    example = data.train[0]
    assert example["input_ids"] == ids(eos_tok, "hello world", special=True)
    assert example["labels"] == ids(eos_tok, "hallo welt", special=True)  # one eos, not two
    assert example["labels"].count(eos_tok.eos_token_id) == 1


def test_seq2seq_truncation_keeps_eos(eos_tok, tmp_path):
    row = {"document": "a long document about cats " * 5, "summary": "cats " * 10}
    cfg = config(
        write_jsonl(tmp_path / "d.jsonl", [row]),
        task_type="seq2seq",
        max_length=6,
        max_target_length=4,
    )
    data = build_datasets(cfg, eos_tok)
    example = data.train[0]
    assert len(example["input_ids"]) == 6 and example["input_ids"][-1] == eos_tok.eos_token_id
    assert len(example["labels"]) == 4 and example["labels"][-1] == eos_tok.eos_token_id
    assert data.stats["truncated"] == 1


def multilingual_tokenizer(kind: str):
    """A real mBART or NLLB tokenizer class over a tiny vocabulary, English to Romanian: in
    target mode they write the target language's code (mBART after the eos, NLLB first)."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces = [f"▁{w}" for w in "the cat sees a dog".split()] + list("abcdefghijklmnopqrstuvwxyz▁")
    if kind == "mbart":
        vocab = [(token, 0.0) for token in specials] + [(piece, -1.0) for piece in pieces]
        return MBartTokenizer(vocab=vocab, src_lang="en_XX", tgt_lang="ro_RO")
    vocab = {token: index for index, token in enumerate(specials + pieces)}
    return NllbTokenizer(vocab=vocab, merges=[], src_lang="eng_Latn", tgt_lang="ron_Latn")


@pytest.mark.parametrize("kind", ["mbart", "nllb"])
@pytest.mark.parametrize("limits", [(64, 64), (5, 4)], ids=["whole", "truncated"])
def test_seq2seq_targets_are_tokenized_as_targets(kind, limits, tmp_path):
    tokenizer = multilingual_tokenizer(kind)
    row = {"source": "the cat sees a dog", "target": "a dog sees the cat"}
    max_length, max_target_length = limits
    # What the tokenizer itself gives, its own truncation keeping its special tokens.
    source = tokenizer(row["source"], truncation=True, max_length=max_length).input_ids
    target = tokenizer(
        text_target=row["target"], truncation=True, max_length=max_target_length
    ).input_ids
    romanian = tokenizer.convert_tokens_to_ids(tokenizer.tgt_lang)
    assert romanian in target and romanian not in tokenizer(row["target"]).input_ids
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    cfg = config(path, task_type="seq2seq", max_length=max_length,
                 max_target_length=max_target_length)  # fmt: skip
    example = build_datasets(cfg, tokenizer).train[0]
    assert (example["input_ids"], example["labels"]) == (source, target)


def test_causal_truncation_is_counted(tok, tmp_path):
    rows = [{"text": "the cat sat on the mat " * 10}, {"text": "a dog"}]
    data = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", rows), max_length=8), tok)
    long, short = data.train[0], data.train[1]
    assert len(long["input_ids"]) == 8
    assert long["input_ids"] == ids(tok, rows[0]["text"], special=False)[:8]  # start kept, no eos
    assert short["input_ids"][-1] == tok.eos_token_id
    assert data.stats["truncated"] == 1


def test_prompt_filling_max_length_is_dropped(tok, tmp_path):
    rows = [
        {"question": "How many legs has a cat? " * 10, "answer": "four"},
        {"question": "Why?", "answer": "because"},
    ]
    # room for the short prompt and its answer, not for the long prompt
    limit = len(ids(tok, "### Instruction:\nWhy?\n\n### Response:\nbecause", special=True)) + 1
    data = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", rows), max_length=limit), tok)
    assert data.stats["train_examples"] == 1
    assert data.stats["dropped_no_labels"] == 1


def test_empty_examples_are_dropped_and_counted(tok, tmp_path):
    rows = [
        {"instruction": "Say hi", "context": "", "response": "hi"},
        {"instruction": "Say hi", "context": "", "response": ""},
        {"instruction": "", "context": "x", "response": "hi"},
    ]
    data = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", rows)), tok)
    assert data.stats["train_examples"] == 1
    assert data.stats["dropped_empty"] == 2


def test_example_string_marks_the_prompt(tok, tmp_path):
    row = {"question": "How many legs has a cat?", "answer": "four"}
    data = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", [row])), tok)
    prompt = "### Instruction:\nHow many legs has a cat?\n\n### Response:\n"
    assert data.example == f"[masked: {prompt}]four</s>"


def test_seq2seq_example_string(tok, tmp_path):
    row = {"source": "hello world", "target": "hallo welt"}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    data = build_datasets(config(path, task_type="seq2seq"), tok)
    assert data.example == "[source: hello world]\nhallo welt</s>"


@pytest.mark.parametrize("packing", [False, True], ids=["instruction", "packed_text"])
def test_any_num_proc_gives_the_same_examples_in_the_same_order(packing, tok, tmp_path,
                                                               monkeypatch):  # fmt: skip
    if packing:  # enough short documents that a shard's edge would end a block elsewhere
        rows, flags = [{"text": f"the cat number {i} sat"} for i in range(30)], {"max_length": 16}
    else:  # with empty rows, dropped whichever worker meets them
        rows, flags = DOLLY_ROWS + [{"instruction": "", "context": "", "response": ""}] * 3, {}
    path = write_jsonl(tmp_path / "d.jsonl", rows[::2] + rows[1::2])
    built = []
    for num_proc in (None, 2, 3):
        # A cache of its own: datasets would hand a later build an earlier one's cache files.
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / f"cache{num_proc}")
        data = build_datasets(config(path, num_proc=num_proc, packing=packing, **flags), tok)
        built.append((data.train.to_list(), content_fingerprint(data.train), data.stats))
    assert built[0][2]["dropped_empty"] == (0 if packing else 3)
    assert built[1] == built[0] and built[2] == built[0]


def test_main_process_first_wraps_loading(tok, tmp_path):
    entered = []

    @contextlib.contextmanager
    def main_process_first():
        entered.append(True)
        yield

    path = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    build_datasets(config(path), tok, main_process_first=main_process_first)
    assert entered == [True]


# --- chat: rendering and assistant-only masks ----------------------------------------------------
def chat_tokenizer(tokenizer, template: str | None):
    """A copy (building the data gives a template-less tokenizer the plain template)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("case", CHAT_CASES, ids=CHAT_IDS)
def test_chat_causal_rendering_and_mask(case, bos_tok, tmp_path):
    _, row, template, pieces, _ = case
    tokenizer = chat_tokenizer(bos_tok, template)  # Llama-like: adds a bos to plain text
    data = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", [row])), tokenizer)
    assert (data.format, data.layout) == ("chat", detect_format(list(row)).name)
    assert data.chat_template == ("tokenizer" if template else "plain")
    # The plain template writes the bos for a tokenizer that adds one to plain text; rendered
    # chat is tokenized without special tokens, as apply_chat_template does.
    assert tokenizer.chat_template == (template or plain_chat_template(with_bos=True))
    if template is None:
        pieces = [("<s>" + pieces[0][0], False), *pieces[1:]]
    # Every piece boundary here is at a newline or a special token, so tokenizing the pieces
    # one by one gives the same ids as the whole text: an independent oracle for the mask.
    expected_ids, expected_labels = [], []
    for text, trained in pieces:
        piece = ids(tokenizer, text, special=False)
        expected_ids += piece
        expected_labels += piece if trained else [IGNORE_INDEX] * len(piece)
    example = data.train[0]
    assert example["input_ids"] == expected_ids
    assert example["labels"] == expected_labels
    answers = "".join(text for text, trained in pieces if trained)
    assert tokenizer.decode(split_labels(example)[1]) == answers


@pytest.mark.parametrize("case", CHAT_CASES, ids=CHAT_IDS)
def test_chat_seq2seq_source_and_target(case, eos_tok, tmp_path):
    _, row, template, _, (source, target) = case
    tokenizer = chat_tokenizer(eos_tok, template)  # T5-like: appends </s>
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    example = build_datasets(config(path, task_type="seq2seq"), tokenizer).train[0]
    assert example["input_ids"] == ids(tokenizer, source, special=True)
    assert example["labels"] == ids(tokenizer, target, special=True)


def test_chat_example_string_marks_every_prompt_turn(tok, tmp_path):
    tokenizer = chat_tokenizer(tok, None)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}])
    example = build_datasets(config(path), tokenizer).example
    assert example == (
        "[masked: <|system|>\nBe brief.\n<|user|>\nName a color\n<|assistant|>\n]blue</s>"
        "[masked: \n<|user|>\nAnother\n<|assistant|>\n]red</s>"
    )


def test_chat_train_on_prompt_trains_every_turn(tok, tmp_path):
    tokenizer = chat_tokenizer(tok, None)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}])
    example = build_datasets(config(path, train_on_prompt=True), tokenizer).train[0]
    assert example["labels"] == example["input_ids"]
    assert tokenizer.decode(example["input_ids"]).endswith("Another\n<|assistant|>\nred</s>")


def test_chat_without_an_answer_is_dropped_and_counted(tok, tmp_path):
    rows = [
        {"messages": TWO_TURNS},
        {"messages": TWO_TURNS[:2]},  # no assistant turn
        {"messages": [*TWO_TURNS[1:2], {"role": "assistant", "content": "  "}]},  # blank answer
    ]
    data = build_datasets(
        config(write_jsonl(tmp_path / "d.jsonl", rows)), chat_tokenizer(tok, None)
    )
    assert data.stats["train_examples"] == 1 and data.stats["dropped_empty"] == 2


def test_messages_column_flag(tok, tmp_path):
    rows = [{"dialog": TWO_TURNS, "id": 3}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = build_datasets(config(path, messages_column="dialog"), chat_tokenizer(tok, None))
    assert (data.format, data.layout) == ("chat", "custom_chat")
    assert tok.decode(split_labels(data.train[0])[1]) == "blue</s>red</s>"


def test_chat_with_an_unknown_role(tok, tmp_path):
    rows = [{"messages": TWO_TURNS}, {"messages": [{"role": "narrator", "content": "x"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        ConfigError, match=r"train example 1: unknown chat role 'narrator'.*Known roles"
    ):
        build_datasets(config(path), chat_tokenizer(tok, None))


def test_chat_cell_that_is_not_a_list(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": "user: hi"}])
    with pytest.raises(ConfigError, match=r"train example 0: the conversation cell holds str"):
        build_datasets(config(path), chat_tokenizer(tok, None))


def test_chat_template_that_rewrites_earlier_turns(tok, tmp_path):
    # Renders the number of messages first, so a longer conversation changes the start.
    template = "{{ messages | length }}\n" + CHATML
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}])
    with pytest.raises(
        ConfigError, match=r"train example 0: .*generation prompt.*--train_on_prompt"
    ):
        build_datasets(config(path), chat_tokenizer(tok, template))
    # ...and --train_on_prompt, which needs no turn boundaries, trains on it.
    data = build_datasets(config(path, train_on_prompt=True), chat_tokenizer(tok, template))
    assert tok.decode(data.train[0]["input_ids"]).startswith("5\n<|im_start|>system")


def test_chat_template_that_rewrites_earlier_turns_gives_one_example_per_answer(tok, tmp_path):
    # Like Qwen3: the last answer gets an (empty) thinking block, earlier answers don't, so a
    # two-answer conversation does not start with its own first turn.
    template = CHATML.replace(
        "{{ m['content'] }}",
        "{% if loop.last and m['role'] == 'assistant' %}<think></think>{% endif %}"
        "{{ m['content'] }}",
    )
    tokenizer = chat_tokenizer(tok, template)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}])
    data = build_datasets(config(path), tokenizer)
    assert data.stats["train_examples"] == 2  # one per answer, each with its own history
    first, second = (tokenizer.decode(split_labels(e)[1]) for e in data.train)
    assert (first, second) == ("<think></think>blue<|im_end|>\n", "<think></think>red<|im_end|>\n")
    assert tokenizer.decode(data.train[1]["input_ids"]).count("<|im_start|>assistant") == 2


def test_chat_template_that_breaks_even_single_turns(tok, tmp_path):
    # The generation prompt differs from the start of a rendered answer: nothing to mask by.
    template = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>bot\n{% endif %}")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}])
    with pytest.raises(
        ConfigError, match=r"train example 0: .*generation prompt.*--train_on_prompt"
    ):
        build_datasets(config(path), chat_tokenizer(tok, template))


def test_chat_template_errors_name_the_example(tok, tmp_path):
    template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + CHATML
    )
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}])
    with pytest.raises(
        ConfigError,
        match=r"train example 0: the chat template refused the conversation "
        r"\(system -> user -> assistant -> user -> assistant\): System role not supported",
    ):
        build_datasets(config(path), chat_tokenizer(tok, template))


def test_chat_turns_that_are_not_trained(tok, tmp_path):
    messages = [
        {"role": "user", "content": "Name a color"},
        {"role": "assistant", "content": "blue", "weight": 0},  # OpenAI: excluded
        {"role": "user", "content": "Another"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "pick"}]},  # no text
        {"role": "tool", "content": "red"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "r"}, {"type": "text", "text": "ed"}],
        },
    ]
    rows = [{"messages": messages}, {"messages": None}]
    data = build_datasets(
        config(write_jsonl(tmp_path / "d.jsonl", rows)), chat_tokenizer(tok, None)
    )
    assert data.stats["train_examples"] == 1 and data.stats["dropped_empty"] == 1
    assert tok.decode(split_labels(data.train[0])[1]) == "red</s>"


def test_chat_image_content_is_refused(tok, tmp_path):
    parts = [{"type": "image_url", "image_url": "x.png"}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": "a cat"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    with pytest.raises(ConfigError, match=r"content parts of type image_url"):
        build_datasets(config(path), chat_tokenizer(tok, None))


@pytest.mark.parametrize("completion", ["blue", [{"role": "assistant", "content": "blue"}]])
def test_trl_conversational_prompt_completion(completion, tok, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "Name a color"}], "completion": completion}]
    data = build_datasets(
        config(write_jsonl(tmp_path / "d.jsonl", rows)), chat_tokenizer(tok, None)
    )
    assert (data.format, data.layout) == ("chat", "prompt_completion_conversational")
    assert data.example == "[masked: <|user|>\nName a color\n<|assistant|>\n]blue</s>"


def test_student_without_a_chat_template_takes_the_teacher_s(tok, tmp_path):
    chat_tokenizer(tok, CHATML).save_pretrained(tmp_path / "teacher")
    chat_tokenizer(tok, None).save_pretrained(tmp_path / "student")
    cfg = TrainConfig(
        teacher_model=str(tmp_path / "teacher"),
        student_model=str(tmp_path / "student"),
        dataset="x",
    )
    assert load_tokenizer(cfg).chat_template == CHATML


def test_the_end_of_turn_token_is_the_first_special_token_after_an_answer(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}])
    plain = build_datasets(config(path), chat_tokenizer(tok, None))
    assert plain.end_of_turn_id == tok.eos_token_id  # the plain template ends answers with eos
    chatml = chat_tokenizer(tok, CHATML)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert build_datasets(config(path), chatml).end_of_turn_id == im_end
    # seq2seq targets are the answers' text and end with eos, not with the template's marker.
    assert build_datasets(config(path, task_type="seq2seq"), chatml).end_of_turn_id is None
    with caplog.at_level(logging.WARNING, logger="kd_dist"):
        markup = build_datasets(config(path), chat_tokenizer(tok, CHATML))  # <|im_end|> as text
    assert markup.end_of_turn_id is None
    assert "The chat template writes no special token after an answer" in caplog.text


# --- tokenizers that add their own tokens, and token boundaries ------------------------------
@pytest.fixture(scope="module")
def sentencepiece_tok():
    """Llama-2/Mistral-like: a Metaspace tokenizer that puts "▁" before the text and a bos."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace = dict(replacement="▁", prepend_scheme="first", split=False)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    backend.decoder = decoders.Metaspace(**metaspace)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )  # fmt: skip


def test_sentencepiece_response_gets_no_spurious_word_start(sentencepiece_tok, tmp_path):
    row = {"instruction": "Name a color", "context": "", "response": "blue"}
    example = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", [row])), sentencepiece_tok)
    prompt = "### Instruction:\nName a color\n\n### Response:\n"
    whole = ids(sentencepiece_tok, prompt + "blue", special=True)
    example = example.train[0]
    # The ids are those of the text read as a whole (tokenizing the response alone would put
    # a "▁" before "blue"), plus eos; the bos and the prompt are masked.
    assert example["input_ids"] == [*whole, sentencepiece_tok.eos_token_id]
    trained = split_labels(example)[1]
    assert sentencepiece_tok.convert_ids_to_tokens(trained)[-1] == "</s>"
    assert sentencepiece_tok.decode(trained) == "blue</s>"


def test_a_token_straddling_prompt_and_response_is_trained(tok, tmp_path):
    # "Answer: " + "Paris": byte-level BPE reads " Paris" as one token that starts in the prompt.
    row = {"prompt": "Answer: ", "completion": "Paris"}
    example = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", [row])), tok).train[0]
    assert example["input_ids"] == [*ids(tok, "Answer: Paris", special=True), tok.eos_token_id]
    assert tok.decode(split_labels(example)[1]).strip() == "Paris</s>"


def test_causal_data_with_an_eos_adding_tokenizer(eos_tok, tmp_path):
    row = {"question": "How many legs has a cat?", "answer": "four"}
    example = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", [row])), eos_tok).train[0]
    prompt = "### Instruction:\nHow many legs has a cat?\n\n### Response:\n"
    # One eos, at the end (the tokenizer's own), trained; none after the prompt.
    assert example["input_ids"] == ids(eos_tok, prompt + "four", special=True)
    assert example["input_ids"].count(eos_tok.eos_token_id) == 1
    assert eos_tok.decode(split_labels(example)[1]) == "four</s>"


# --- packing ------------------------------------------------------------------------------------
def test_packing_packs_whole_documents_and_splits_long_text(tok, tmp_path):
    texts = [f"the cat number {i} sat" + " on the mat" * (i % 4) for i in range(10)] + [""]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    data = build_datasets(config(path, packing=True, max_length=16), tok)
    texts_ids = [[*ids(tok, t, special=True), tok.eos_token_id] for t in texts if t]
    assert max(map(len, texts_ids)) > 16 > min(map(len, texts_ids))
    # A text document longer than a block is split into pieces overlapping by one token (the
    # next piece's first, masked, which it predicts from): every token but the first is trained.
    pieces = [doc[s : s + 16] for doc in texts_ids for s in range(0, len(doc) - 1, 15)]
    blocks = data.train.to_list()
    packed = [doc for block in blocks for doc in documents(block)]
    assert sorted(doc["input_ids"] for doc in packed) == sorted(pieces)
    for doc in packed:  # every token trained but each piece's first: nothing predicts that one
        assert doc["labels"] == [IGNORE_INDEX, *doc["input_ids"][1:]]
    assert all(len(block["input_ids"]) <= 16 for block in blocks)
    assert len(blocks) < len(pieces)  # short documents share blocks
    assert data.stats["packed_documents"] == 10 and data.stats["dropped_empty"] == 1
    assert data.stats["train_examples"] == len(blocks)
    assert "packed from 10 documents" in data.summary()


def test_packed_instructions_keep_their_prompt_masks(tok, tmp_path):
    rows = [*DOLLY_ROWS, {"instruction": "long " * 40, "context": "", "response": "cut"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    unpacked = build_datasets(config(path, max_length=48), tok)
    packed = build_datasets(config(path, packing=True, max_length=48), tok)
    docs = [doc for block in packed.train.to_list() for doc in documents(block)]
    # The same examples with the same prompt masks (an example's first label is never trained).
    assert sorted((doc["input_ids"], doc["labels"][1:]) for doc in docs) == sorted(
        (row["input_ids"], row["labels"][1:]) for row in unpacked.train.to_list()
    )
    first = next(doc for doc in docs if doc["input_ids"] == unpacked.train[0]["input_ids"])
    masked, trained = split_labels(first)
    assert tok.decode(trained) == "answer 0</s>" and masked > 5
    # An instruction longer than a block is truncated (and counted) as unpacked: its answer was
    # cut away, so it is dropped, never split from its prompt.
    assert packed.stats["dropped_no_labels"] == unpacked.stats["dropped_no_labels"] == 1
    assert packed.stats["packed_documents"] == 12 and len(packed.train) < 12


def test_packing_is_refused_for_seq2seq(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    with pytest.raises(ConfigError, match=r"--packing packs causal documents.*drop --packing"):
        config(path, packing=True, task_type="seq2seq").validate()


# --- --group_by_length ----------------------------------------------------------------------
def grouped_epoch(lengths: list[int], seed: int, epoch: int, batch_size: int = 8) -> list[int]:
    sampler = LengthGroupedSampler(lengths, batch_size, seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def padding(lengths: list[int], order: list[int], batch_size: int = 8) -> float:
    """The padding fraction of the batches cut from ``order``."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / padded


def test_length_grouped_order_is_a_seeded_permutation_of_similar_lengths():
    lengths = [int(x) for x in torch.randint(1, 400, (2000,), generator=torch.Generator())]
    order = grouped_epoch(lengths, seed=1, epoch=0)
    assert order == grouped_epoch(lengths, seed=1, epoch=0)  # a function of (seed, epoch)
    assert sorted(order) == list(range(2000))  # each example once
    others = [grouped_epoch(lengths, 1, 1), grouped_epoch(lengths, 2, 0)]
    assert all(other != order and sorted(other) == sorted(order) for other in others)
    assert lengths[order[0]] == max(lengths)  # the longest batch first
    # Megabatches of 50 batches (400 examples), each sorted longest first (but for their first
    # example: the longest of all was swapped to the front).
    for start in range(0, 2000, 400):
        megabatch = [lengths[i] for i in order[start + 1 : start + 400]]
        assert megabatch == sorted(megabatch, reverse=True)
    shuffled = torch.randperm(2000, generator=torch.Generator().manual_seed(1)).tolist()
    assert padding(lengths, order) < 0.02 < 0.4 < padding(lengths, shuffled)


def test_length_grouped_batches_shard_over_processes_and_resume_mid_epoch():
    """What the trainer does: accelerate shards the batches (each process takes every other
    one), ``set_sampler`` lets ``set_epoch`` reach the sampler through ``skip_first_batches``."""
    lengths = [(i * 37) % 101 + 1 for i in range(64)]
    order = grouped_epoch(lengths, seed=3, epoch=2, batch_size=4)
    batches = [order[i : i + 4] for i in range(0, 64, 4)]

    def rank_batches(rank: int, skip: int) -> list[list[int]]:
        sampler = LengthGroupedSampler(lengths, 4, seed=3)
        loader = DataLoader(range(64), batch_size=4, sampler=sampler)
        sharded = prepare_data_loader(loader, num_processes=2, process_index=rank,
                                      put_on_device=False)  # fmt: skip
        sharded.set_sampler(sampler)
        resumed = skip_first_batches(sharded, skip)
        resumed.set_epoch(2)
        return [batch.tolist() for batch in resumed]

    for rank in (0, 1):
        assert rank_batches(rank, skip=0) == batches[rank::2]
        assert rank_batches(rank, skip=3) == batches[rank::2][3:]


def test_group_by_length_and_packing_are_exclusive(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"--group_by_length.*drop one of --packing and"):
        config(tmp_path / "d.jsonl", packing=True, group_by_length=True).validate()


def test_example_lengths_read_the_kept_examples(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(kd_dist.data.sampling, "LENGTH_ROWS", 5)  # 11 rows: 3 slices
    rows = [*DOLLY_ROWS, {"instruction": "", "context": "", "response": ""}]
    data = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", rows)), tok)
    kept = data.train.select(range(1, 12))  # an indices mapping, as filters and selects make
    assert example_lengths(kept) == [len(row) for row in kept["input_ids"]]


# --- caching and determinism --------------------------------------------------------------------
def test_tokenization_is_cached_and_deterministic(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    first = build_datasets(config(path), tok)
    cache = Path(first.train.cache_files[0]["filename"])
    written = cache.stat().st_mtime_ns
    second = build_datasets(config(path), tok)
    assert second.train.cache_files == first.train.cache_files  # the map result was reused
    assert cache.stat().st_mtime_ns == written
    assert second.train.to_list() == first.train.to_list()


# --- explicit format flags ---------------------------------------------------------------------
def test_text_column_flag(tok, tmp_path):
    rows = [{"body": "the cat sat", "id": 1}]
    data = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", rows), text_column="body"), tok)
    assert data.format == "text"
    assert tok.decode(split_labels(data.train[0])[1]) == "the cat sat</s>"


@pytest.mark.parametrize(
    ("fmt", "prompt"),
    [
        ("instruction", "### Instruction:\nhello world\n\n### Response:\n"),
        ("seq2seq", "hello world\n"),
    ],
)
def test_prompt_and_response_column_flags(fmt, prompt, tok, tmp_path):
    rows = [{"q": "hello world", "a": "hallo welt"}]
    cfg = config(
        write_jsonl(tmp_path / "d.jsonl", rows),
        dataset_format=fmt,
        prompt_column="q",
        response_column="a",
    )
    data = build_datasets(cfg, tok)
    assert data.format == fmt
    masked, trained = split_labels(data.train[0])
    assert masked == len(ids(tok, prompt, special=True))
    assert tok.decode(trained) == "hallo welt</s>"


def test_one_named_column_completes_a_detected_layout():
    cfg = config("x", response_column="best_answer")
    spec = resolve_format(["question", "answer", "best_answer"], cfg)
    assert (spec.name, spec.prompt, spec.response) == ("question_answer", "question", "best_answer")


def test_one_named_column_without_a_layout_asks_for_the_other():
    with pytest.raises(ConfigError, match=r"holds the response: set --response_column"):
        resolve_format(["q", "a"], config("x", prompt_column="q"))


def test_text_and_pair_columns_conflict():
    with pytest.raises(ConfigError, match=r"describe different formats: set only one"):
        resolve_format(["q", "a"], config("x", text_column="q", response_column="a"))


def test_dataset_format_overrides_detection():
    cfg = config("x", dataset_format="seq2seq")
    assert resolve_format(["instruction", "input", "output"], cfg).name == "input_output"


# --- sources ------------------------------------------------------------------------------------
def write_json(path: Path, rows):
    path.write_text(json.dumps(rows))


def write_csv(path: Path, rows):
    Dataset.from_list(rows).to_csv(str(path), index=False)


def write_parquet(path: Path, rows):
    Dataset.from_list(rows).to_parquet(str(path))


def write_dataset_folder(path: Path, rows):
    Dataset.from_list(rows).save_to_disk(str(path))


@pytest.mark.parametrize(
    ("name", "writer"),
    [
        ("d.jsonl", write_jsonl),
        ("d.json", write_json),
        ("d.csv", write_csv),
        ("d.parquet", write_parquet),
        ("folder", write_dataset_folder),
    ],
)
def test_source_kinds(name, writer, tok, tmp_path):
    path = tmp_path / name
    writer(path, DOLLY_ROWS)
    data = build_datasets(config(path), tok)
    assert isinstance(data, DataSplits)
    assert data.format == "instruction"
    assert data.stats["train_examples"] == len(DOLLY_ROWS)
    assert data.eval is None
    assert tok.decode(split_labels(data.train[3])[1]) == "answer 3</s>"


def test_txt_file_one_example_per_line(tok, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("the cat sat on the mat\n\na dog ran home\n")
    data = build_datasets(config(path), tok)
    assert data.format == "text"
    assert data.stats["train_examples"] == 2
    assert data.stats["dropped_empty"] == 1  # the blank line
    assert tok.decode(data.train[1]["input_ids"]) == "a dog ran home</s>"


def test_dataset_dict_folder_picks_up_validation(tok, tmp_path):
    path = tmp_path / "dd"
    DatasetDict(
        train=Dataset.from_list(DOLLY_ROWS[:8]), validation=Dataset.from_list(DOLLY_ROWS[8:])
    ).save_to_disk(str(path))
    data = build_datasets(config(path), tok)
    assert data.stats["train_examples"] == 8
    assert data.stats["eval_examples"] == 4
    assert tok.decode(split_labels(data.eval[0])[1]) == "answer 8</s>"


def dict_folder(tmp_path: Path, **splits: list[dict]) -> Path:
    path = tmp_path / "dd"
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


def test_test_split_is_used_when_there_is_no_validation(tok, tmp_path):
    path = dict_folder(tmp_path, train=DOLLY_ROWS[:8], test=DOLLY_ROWS[8:10])
    assert build_datasets(config(path), tok).stats["eval_examples"] == 2


def test_explicit_eval_split(tok, tmp_path):
    path = dict_folder(tmp_path, train=DOLLY_ROWS[:8], dev=DOLLY_ROWS[8:11])
    assert build_datasets(config(path), tok).eval is None
    assert build_datasets(config(path, eval_split="dev"), tok).stats["eval_examples"] == 3


def test_eval_ratio_holds_out_deterministically(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)

    def held_out(seed: int) -> list[list[int]]:
        data = build_datasets(config(path, eval_ratio=0.25, seed=seed), tok)
        assert data.stats["eval_examples"] == 3 and data.stats["train_examples"] == 9
        return data.eval["input_ids"]

    assert held_out(1) == held_out(1)
    assert held_out(1) != held_out(2)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({}, "--eval_ratio 0.25 is ignored: the dataset has a 'validation' split, which is "
             "evaluated on instead. Pass --eval_split to evaluate on another split (one of "
             "train, validation)."),
        ({"eval_split": "validation"}, "--eval_ratio 0.25 is ignored: --eval_split "
                                       "'validation' is evaluated on instead."),
    ],
)  # fmt: skip
def test_eval_ratio_beside_an_eval_split_is_ignored_with_a_warning(
    flags, message, tok, tmp_path, caplog
):
    """HF run_clm's rule: a held-out share only without a validation split; never silently."""
    path = dict_folder(tmp_path, train=DOLLY_ROWS[:8], validation=DOLLY_ROWS[8:])
    with caplog.at_level(logging.WARNING, logger="kd_dist"):
        data = build_datasets(config(path, eval_ratio=0.25, **flags), tok)
    assert (data.stats["train_examples"], data.stats["eval_examples"]) == (8, 4)
    assert message in caplog.text


def test_sample_caps_take_the_first_examples(tok, tmp_path):
    path = dict_folder(tmp_path, train=DOLLY_ROWS[:8], validation=DOLLY_ROWS[8:])
    data = build_datasets(config(path, max_train_samples=3, max_eval_samples=2), tok)
    assert (data.stats["train_examples"], data.stats["eval_examples"]) == (3, 2)
    assert tok.decode(split_labels(data.train[2])[1]) == "answer 2</s>"


def test_glob_of_files(tok, tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", DOLLY_ROWS[:5])
    write_jsonl(tmp_path / "part-1.jsonl", DOLLY_ROWS[5:])
    write_jsonl(tmp_path / "other.jsonl", [{"foo": "not matched"}])
    data = build_datasets(config(f"{tmp_path}/part-*.jsonl"), tok)
    assert data.stats["train_examples"] == len(DOLLY_ROWS)
    assert tok.decode(split_labels(data.train[7])[1]) == "answer 7</s>"  # files in sorted order


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_folder_of_files_takes_split_names_from_file_names(suffix, tok, tmp_path):
    writer = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[suffix]
    (tmp_path / "repo" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "README.md").write_text("# a dataset card\n")
    writer(tmp_path / "repo" / "data" / f"train.{suffix}", DOLLY_ROWS[:9])
    writer(tmp_path / "repo" / "data" / f"validation.{suffix}", DOLLY_ROWS[9:])
    data = build_datasets(config(tmp_path / "repo"), tok)
    assert (data.stats["train_examples"], data.stats["eval_examples"]) == (9, 3)


def test_folder_of_txt_files(tok, tmp_path):
    (tmp_path / "a.txt").write_text("the cat sat\n\n")
    (tmp_path / "b.txt").write_text("a dog ran\n")
    data = build_datasets(config(tmp_path), tok)
    assert data.format == "text" and data.stats["train_examples"] == 2


def cache_hub_dataset(tmp_path: Path, name: str, config_name: str, **splits: list[dict]) -> None:
    """Leave ``name`` in the datasets cache the way a hub download does (the test is offline)."""
    files = {s: str(write_jsonl(tmp_path / f"{s}.jsonl", rows)) for s, rows in splits.items()}
    Json(
        data_files=files,
        dataset_name=name,
        config_name=config_name,
        config_id=config_name,
        hash="0123abcd",  # a hub download sits under its commit hash
    ).download_and_prepare()


def test_hub_dataset_from_the_local_cache_offline(tok, tmp_path):
    cache_hub_dataset(tmp_path, "tiny_dolly", "en", train=DOLLY_ROWS[:8], test=DOLLY_ROWS[8:])
    data = build_datasets(config("tiny_dolly", dataset_config="en"), tok)
    assert (data.stats["train_examples"], data.stats["eval_examples"]) == (8, 4)
    with pytest.raises(ConfigError, match=r"in the local cache, but can't be loaded with conf"):
        build_datasets(config("tiny_dolly", dataset_config="fr"), tok)


def test_suffixed_training_split_finds_its_eval_split(tok, tmp_path):
    # ultrachat_200k: train_sft / test_sft (and train_gen / test_gen)
    path = dict_folder(
        tmp_path, train_sft=DOLLY_ROWS[:8], test_sft=DOLLY_ROWS[8:11], test_gen=DOLLY_ROWS[11:]
    )
    data = build_datasets(config(path, dataset_split="train_sft"), tok)
    assert (data.stats["train_examples"], data.stats["eval_examples"]) == (8, 3)


def test_glob_over_split_named_files_warns(tok, tmp_path, caplog):
    write_jsonl(tmp_path / "train.jsonl", DOLLY_ROWS[:9])
    write_jsonl(tmp_path / "validation.jsonl", DOLLY_ROWS[9:])
    with caplog.at_level(logging.WARNING, logger="kd_dist"):
        data = build_datasets(config(f"{tmp_path}/*.jsonl"), tok)
    assert data.stats["train_examples"] == 12
    assert "matches validation.jsonl, named like an evaluation split" in caplog.text


def test_packed_txt_file_is_one_document(tok, tmp_path):
    (tmp_path / "d.txt").write_text("the cat sat.\nthe dog ran.\n")
    lines = build_datasets(config(tmp_path / "d.txt"), tok)
    assert lines.stats["train_examples"] == 2
    packed = build_datasets(config(tmp_path / "d.txt", packing=True, max_length=64), tok)
    assert tok.decode(packed.train[0]["input_ids"]) == "the cat sat.\nthe dog ran.\n</s>"


def test_broken_save_to_disk_folder(tok, tmp_path):
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"looks like a save_to_disk folder.*can't be loaded"):
        build_datasets(config(tmp_path), tok)


# --- errors ---------------------------------------------------------------------------------------
def test_unknown_columns(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(ConfigError) as error:
        build_datasets(config(path), tok)
    message = str(error.value)
    flags = ("--dataset_format", "--text_column", "--prompt_column", "--response_column")
    for expected in ("foo", "bar", *flags):
        assert expected in message


def test_named_column_missing(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(ConfigError, match=r"--prompt_column 'q'.*Columns found: foo, bar"):
        build_datasets(config(path, prompt_column="q", response_column="bar"), tok)


def test_missing_train_split_lists_splits(tok, tmp_path):
    path = dict_folder(tmp_path, train=DOLLY_ROWS[:8], validation=DOLLY_ROWS[8:])
    with pytest.raises(ConfigError, match=r"'nope'.*Available splits: train, validation"):
        build_datasets(config(path, dataset_split="nope"), tok)


def test_missing_eval_split_lists_splits(tok, tmp_path):
    path = dict_folder(tmp_path, train=DOLLY_ROWS[:8], validation=DOLLY_ROWS[8:])
    with pytest.raises(ConfigError, match=r"--eval_split 'dev'.*Available splits: train"):
        build_datasets(config(path, eval_split="dev"), tok)


def test_empty_after_filtering(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(
        ConfigError, match=r"No training examples left.*2 were empty \(blank text\)"
    ):
        build_datasets(config(path), tok)


def test_empty_because_prompts_fill_max_length(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "why? " * 20, "answer": "so"}])
    with pytest.raises(ConfigError, match=r"1 had no token left to train on.*--max_length 8"):
        build_datasets(config(path, max_length=8), tok)


def test_text_data_with_seq2seq_task(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat"}])
    with pytest.raises(ConfigError, match=r"seq2seq needs \(source, target\) pairs.*plain text"):
        build_datasets(config(path, task_type="seq2seq"), tok)


def test_nonexistent_local_path(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"no such file or folder.*--dataset accepts"):
        build_datasets(config(tmp_path / "missing.jsonl"), tok)


def test_unsupported_file_type(tok, tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("a\tb\n")
    with pytest.raises(ConfigError, match=r"unsupported file type \.tsv\. --dataset accepts"):
        build_datasets(config(path), tok)


def test_folder_without_data_files(tok, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "README.md").write_text("# notes\n")
    with pytest.raises(ConfigError, match=r"folder without json/jsonl/csv/parquet/txt files"):
        build_datasets(config(tmp_path / "plain"), tok)


def test_folder_with_mixed_file_types(tok, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", DOLLY_ROWS)
    write_csv(tmp_path / "more.csv", DOLLY_ROWS)
    with pytest.raises(ConfigError, match=r"mixes file types \(csv, json\)"):
        build_datasets(config(tmp_path), tok)


def test_glob_matching_nothing(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"the pattern matches no file"):
        build_datasets(config(f"{tmp_path}/*.jsonl"), tok)


def test_hub_name_not_in_cache(tok):
    with pytest.raises(ConfigError) as error:
        build_datasets(config("no_such_org/no_such_dataset_kd"), tok)
    message = str(error.value)
    assert "no_such_org/no_such_dataset_kd" in message
    assert "not found as a hub dataset in the local cache" in message
    assert "--dataset accepts" in message


# --- collator -------------------------------------------------------------------------------------
def test_collator_pads_causal_batches(tok):
    collate = make_collator(tok)
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]},
        ]
    )
    pad = tok.pad_token_id
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collator_pads_seq2seq_source_and_labels_separately(tok):
    collate = make_collator(tok)
    batch = collate(
        [
            {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [9]},
            {"input_ids": [7], "attention_mask": [1], "labels": [9, 10, 11]},
        ]
    )
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6], [7, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["labels"].tolist() == [[9, -100, -100], [9, 10, 11]]


def test_collator_on_built_dataset(tok, tmp_path):
    data = build_datasets(config(write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)), tok)
    batch = make_collator(tok)([data.train[i] for i in range(4)])
    lengths = [len(data.train[i]["input_ids"]) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths


def test_collator_needs_a_pad_token():
    with pytest.raises(ValueError, match="no pad token"):
        make_collator(build_tokenizer(["abc"], with_pad=False))
