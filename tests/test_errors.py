"""Bad input gives a clear error naming the fix, before any model weights are loaded."""

from __future__ import annotations

import json

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


def test_non_empty_output_dir_is_refused_and_nothing_is_touched(capsys, model_pair, text_dataset,
                                                                tmp_path):  # fmt: skip
    teacher, student = model_pair("gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = run_train(capsys, teacher, student, text_dataset, out)
    assert "is not empty (notes.txt)" in err and "--overwrite_output_dir" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_output_dir_replaces_a_previous_run_but_keeps_other_files(
    model_pair, text_dataset, tmp_path
):
    teacher, student = model_pair("gpt2")
    out = tmp_path / "out"
    argv = ["train", "--teacher_model", teacher, "--student_model", student, "--dataset",
            str(text_dataset), "--output_dir", str(out), "--logging_steps", "1"]  # fmt: skip
    assert main([*argv, "--epochs", "1", "--save_every", "1"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--max_steps", "2", "--save_every", "0", "--overwrite_output_dir"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert not (out / "checkpoints").exists()  # the old run's checkpoints cannot be resumed
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resume_from_checkpoint", "/nonexistent/step-1"], "not a complete kd_dist checkpoint"),
        (["--max_train_samples", "0"], "--max_train_samples must be at least 1"),
    ],
)
def test_errors_before_any_model_loads(capsys, model_pair, text_dataset, tmp_path, extra, message,
                                       monkeypatch):  # fmt: skip
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr("kd_dist.trainer.load_models", no_weights)
    teacher, student = model_pair("gpt2")
    err = run_train(capsys, teacher, student, text_dataset, tmp_path / "out", *extra)
    assert message in err
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_refused(capsys, model_pair, text_dataset, tmp_path):
    teacher, student = model_pair("gpt2")
    (tmp_path / "afile").write_text("x")
    err = run_train(capsys, teacher, student, text_dataset, tmp_path / "afile")
    assert "is a file" in err


def test_empty_dataset_file_is_a_clear_error(capsys, model_pair, tmp_path):
    teacher, student = model_pair("gpt2")
    (tmp_path / "empty.jsonl").write_text("")
    err = run_train(capsys, teacher, student, tmp_path / "empty.jsonl", tmp_path / "out")
    assert "empty.jsonl" in err and "not empty" in err
