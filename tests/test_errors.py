"""Bad input gives a clear error naming the fix, before any model weights are loaded."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from kd_dist.cli import main
from kd_dist.tiny import build_model, build_tokenizer, model_config, save_pair

from .conftest import write_jsonl


def run_train(capsys, teacher, student, dataset, output_dir, *extra) -> str:
    argv = ["train", "--teacher_model", teacher, "--student_model", student,
            "--dataset", str(dataset), "--output_dir", str(output_dir), "--max_steps", "1",
            *extra]  # fmt: skip
    assert main(argv) == 2
    return capsys.readouterr().err


def test_different_tokenizers_are_refused(capsys, model_pair, text_dataset, tmp_path):
    teacher, _ = model_pair("gpt2")
    other_tokenizer = build_tokenizer(["completely different words here"] * 20, vocab_size=280)
    student = save_pair(tmp_path / "student", build_model("gpt2", other_tokenizer, "tiny"),
                        other_tokenizer)  # fmt: skip
    err = run_train(capsys, teacher, student, text_dataset, tmp_path / "out")
    assert "Teacher and student tokenizers differ" in err
    assert "same tokenizer" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("family", "task_type", "fix"),
    [("gpt2", "seq2seq", "--task_type causal"), ("t5", "causal", "--task_type seq2seq")],
)
def test_task_type_that_does_not_match_the_model_is_refused(
    capsys, model_pair, text_dataset, tmp_path, family, task_type, fix
):
    teacher, student = model_pair(family)
    err = run_train(capsys, teacher, student, text_dataset, tmp_path / "out", "--task_type",
                    task_type)  # fmt: skip
    assert f"pass {fix}" in err


def test_unknown_dataset_columns_list_what_was_found(capsys, model_pair, tmp_path):
    teacher, student = model_pair("gpt2")
    dataset = write_jsonl(tmp_path / "odd.jsonl", [{"body": "hello", "meta": 1}] * 4)
    err = run_train(capsys, teacher, student, dataset, tmp_path / "out")
    assert "body" in err and "meta" in err
    assert "--text_column" in err and "--dataset_format" in err


def test_model_vocabulary_smaller_than_tokenizer_is_refused(capsys, tokenizer, model_pair,
                                                            text_dataset, tmp_path):  # fmt: skip
    teacher, _ = model_pair("llama")
    small = AutoModelForCausalLM.from_config(model_config("llama", vocab_size=100, size="tiny"))
    student = save_pair(tmp_path / "student", small, tokenizer)
    err = run_train(capsys, teacher, student, text_dataset, tmp_path / "out")
    assert "vocabulary (100 rows) is smaller than the tokenizer's" in err


def test_missing_model_path_is_named(capsys, model_pair, text_dataset, tmp_path):
    teacher, _ = model_pair("gpt2")
    err = run_train(capsys, teacher, str(tmp_path / "nope"), text_dataset, tmp_path / "out")
    assert "--student_model" in err and "nope" in err


def test_fp16_without_a_gpu_is_refused(capsys, model_pair, text_dataset, tmp_path):
    teacher, student = model_pair("gpt2")
    err = run_train(capsys, teacher, student, text_dataset, tmp_path / "out", "--fp16")
    assert "--fp16 needs a CUDA GPU" in err and "--bf16" in err
