"""Bad input gives a clear error naming the fix, before any model weights are loaded."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kd_dist.cli import main
from kd_dist.tiny import build_model, build_tokenizer, model_config, save_pair

from .conftest import write_jsonl


def run_train(capsys, teacher, student, dataset, output_dir, *extra) -> str:
    argv = ["train", "--teacher_model", teacher, "--student_model", student,
            "--dataset", str(dataset), "--output_dir", str(output_dir), "--max_steps", "1",
            *extra]  # fmt: skip
    assert main(argv) == 2
    return capsys.readouterr().err


def test_unknown_dataset_columns_list_what_was_found(capsys, model_pair, tmp_path):
    teacher, student = model_pair("gpt2")
    dataset = write_jsonl(tmp_path / "odd.jsonl", [{"body": "hello", "meta": 1}] * 4)
    err = run_train(capsys, teacher, student, dataset, tmp_path / "out")
    assert "body" in err and "meta" in err
    assert "--text_column" in err and "--dataset_format" in err


def test_missing_model_path_is_named(capsys, model_pair, text_dataset, tmp_path):
    teacher, _ = model_pair("gpt2")
    err = run_train(capsys, teacher, str(tmp_path / "nope"), text_dataset, tmp_path / "out")
    assert "--student_model" in err and "nope" in err


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
        (["--hidden_loss_weight", "-1"], "--hidden_loss_weight must be >= 0"),
        (["--hidden_loss_weight", "1", "--alpha", "1"], "loads no teacher, whose hidden states"),
        (
            ["--hidden_loss_weight", "1", "--teacher_cache", "/nonexistent"],
            "which no --teacher_cache holds",
        ),
        (["--hidden_layer_map", "0:1"], "--hidden_loss_weight 0 turns off"),
        (["--hidden_loss", "mse"], "--hidden_loss mse chooses the hidden-state loss"),
        (
            ["--hidden_loss_weight", "1", "--hidden_layer_map", "0-1"],
            "'0-1' is not a pair of block numbers",
        ),
        (
            ["--hidden_loss_weight", "1", "--hidden_layer_map", "0:1,0:0"],
            "names a student block twice",
        ),
        # The tiny gpt2 pair: a student of 1 block, a teacher of 2 (checked on their configs).
        (
            ["--hidden_loss_weight", "1", "--hidden_layer_map", "0:2"],
            "names teacher block 2, and the teacher's blocks are 0 to 1",
        ),
        (
            ["--hidden_loss_weight", "1", "--hidden_layer_map", "1:0"],
            "names student block 1, and the student's blocks are 0 to 0",
        ),
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


def vllm_can_run() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def qlora_can_run() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()


def other_tokenizer_student(tmp_path: Path, tokenizer) -> str:
    other = build_tokenizer(["completely different words here"] * 20, vocab_size=280)
    return save_pair(tmp_path / "student", build_model("gpt2", other, "tiny"), other)


def small_vocabulary_student(tmp_path: Path, tokenizer) -> str:
    small = AutoModelForCausalLM.from_config(model_config("gpt2", vocab_size=100, size="tiny"))
    return save_pair(tmp_path / "student", small, tokenizer)


def short_student(tmp_path: Path, tokenizer) -> str:
    model = build_model("gpt2", tokenizer, "tiny", n_positions=256)
    return save_pair(tmp_path / "student", model, tokenizer)


def empty_dataset(tmp_path: Path) -> Path:
    (tmp_path / "empty.jsonl").write_text("")
    return tmp_path / "empty.jsonl"


def folder_with_notes(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    return tmp_path / "out"


def dolly_like(tmp_path: Path) -> Path:
    rows = [{"instruction": f"say {word}", "response": word} for word in ("a", "b", "c", "d")]
    return write_jsonl(tmp_path / "instructions.jsonl", rows)


@dataclass
class BadInput:
    message: str  # part of the error, naming the problem or the fix
    flags: tuple[str, ...] = ()
    family: str = "gpt2"
    student: Callable[[Path, object], str] | None = None  # builds another student
    dataset: Callable[[Path], Path] | None = None
    output_dir: Callable[[Path], Path] | None = None
    launch: tuple[tuple[str, str], ...] = ()  # the environment accelerate launch would set


ZERO3_LAUNCH_WITHOUT_INIT = (("ACCELERATE_USE_DEEPSPEED", "true"),
                             ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3"),
                             ("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false"))  # fmt: skip

BAD_INPUTS = {
    "tokenizers differ": BadInput(
        "Teacher and student tokenizers differ", student=other_tokenizer_student
    ),
    "student vocabulary too small": BadInput(
        "vocabulary (100 rows) is smaller than the tokenizer's", student=small_vocabulary_student
    ),
    "decoder-only model as seq2seq": BadInput(
        "pass --task_type causal", ("--task_type", "seq2seq")
    ),
    "encoder-decoder model as causal": BadInput("pass --task_type seq2seq", family="t5"),
    "empty dataset": BadInput("empty.jsonl", dataset=empty_dataset),
    "max_length beyond the positions": BadInput(
        "--max_length 1024 is longer than the 512 positions", ("--max_length", "1024")
    ),
    # The default fits a short model (min(512, its positions)); a value the user set does not.
    "explicit max_length beyond a short student": BadInput(
        "--max_length 512 is longer than the 256 positions of --student_model",
        ("--max_length", "512"),
        student=short_student,
    ),
    "non-empty output_dir": BadInput(
        "is not empty (notes.txt). Pass --resume_from_checkpoint latest",
        output_dir=folder_with_notes,
    ),
    "unwritable output_dir": BadInput(
        "cannot write in /proc", output_dir=lambda tmp_path: Path("/proc/kd_dist_test_out")
    ),
    "fp16 on a CPU": BadInput(
        "--fp16 needs a CUDA GPU and none is available: use --bf16", ("--fp16",)
    ),
    "temperature 0": BadInput("--temperature must be > 0 (got 0.0)", ("--temperature", "0")),
    "batch size 0": BadInput("--batch_size must be at least 1 (got 0)", ("--batch_size", "0")),
    # On-policy distillation (--lmbda, --seq_kd): generation needs prompts and a live teacher.
    "on-policy on plain text": BadInput("is plain text, which has none", ("--lmbda", "0.5")),
    "lmbda beyond 1": BadInput("--lmbda must be in [0, 1] (got 1.5)", ("--lmbda", "1.5")),
    "top_p 0": BadInput("--top_p must be in (0, 1]", ("--top_p", "0")),
    "on-policy from a cache": BadInput(
        "pass --teacher_model instead of --teacher_cache",
        ("--lmbda", "1", "--teacher_cache", "/nonexistent/cache"),
    ),
    "sequence-level KD without a teacher": BadInput(
        "--alpha 1 trains on the ground truth alone", ("--seq_kd", "--alpha", "1")
    ),
    "on-policy packed": BadInput("drop --packing", ("--lmbda", "1", "--packing")),
    "prompt and completion beyond the positions": BadInput(
        "--max_length + --max_new_tokens 600 is longer than the 512 positions",
        ("--lmbda", "1", "--max_length", "400", "--max_new_tokens", "200"),
    ),
    "generation on a text format": BadInput(
        "--dataset_format text has none", ("--eval_on_policy", "--dataset_format", "text")
    ),
    "on-policy with the prompt trained": BadInput(
        "drop --train_on_prompt", ("--lmbda", "0.5", "--train_on_prompt")
    ),
    "negative generation temperature": BadInput(
        "--generation_temperature must be >= 0", ("--generation_temperature", "-1")
    ),
    "no new tokens": BadInput("--max_new_tokens must be at least 1", ("--max_new_tokens", "0")),
    "sequence-level KD with every batch the student's": BadInput(
        "--lmbda 1 leaves it none", ("--seq_kd", "--lmbda", "1")
    ),
    "vllm backend with nothing for it to write": BadInput(
        "--lmbda 0 generates none", ("--seq_kd", "--generation_backend", "vllm")
    ),
    "on-policy evaluation without an eval split": BadInput(
        "--eval_on_policy need an eval split", ("--eval_on_policy",), dataset=dolly_like
    ),
    "vllm backend without its package or a GPU": BadInput(
        "--generation_backend vllm needs", ("--lmbda", "1", "--generation_backend", "vllm")
    ),
    "vllm backend for a seq2seq student": BadInput(
        "--generation_backend vllm runs causal students only",
        ("--task_type", "seq2seq", "--lmbda", "1", "--generation_backend", "vllm"),
        family="t5",
    ),
    # LoRA students (--lora_r): flags that need it, values, modules, and what it cannot do.
    "LoRA flags without --lora_r": BadInput(
        "--lora_alpha, --merge_lora only apply to LoRA students: pass --lora_r",
        ("--lora_alpha", "32", "--merge_lora"),
    ),
    "negative LoRA rank": BadInput("--lora_r must be >= 0", ("--lora_r", "-1")),
    "LoRA dropout 1": BadInput(
        "--lora_dropout must be in [0, 1)", ("--lora_r", "4", "--lora_dropout", "1")
    ),
    "LoRA on modules the student lacks": BadInput(
        "--lora_target_modules 'wq,wv'", ("--lora_r", "4", "--lora_target_modules", "wq,wv")
    ),
    "LoRA training a tied output layer": BadInput(
        "ties its output layer to its input embeddings",
        ("--lora_r", "4", "--lora_modules_to_save", "lm_head"),
    ),
    "LoRA training a module the student lacks": BadInput(
        "--lora_modules_to_save lm_haed: the student has no such module; its modules are named: ",
        ("--lora_r", "4", "--lora_modules_to_save", "lm_head,lm_haed"),
        family="llama",
    ),
    "LoRA training tied input embeddings": BadInput(
        "(copies model.decoder.embed_tokens): the student ties its output layer to its input",
        ("--lora_r", "4", "--lora_modules_to_save", "embed_tokens"),
        family="opt",
    ),
    "LoRA with the vllm backend": BadInput(
        "not LoRA adapters: pass --generation_backend transformers",
        ("--lora_r", "4", "--lmbda", "1", "--generation_backend", "vllm"),
        dataset=dolly_like,
    ),
    "QLoRA without bitsandbytes or a GPU": BadInput(
        "--load_in_4bit needs", ("--lora_r", "4", "--load_in_4bit")
    ),
    # A ZeRO-3 launch, whether or not it partitions models as they load (zero3_init_flag).
    "QLoRA under ZeRO-3": BadInput(
        "--load_in_4bit: a 4-bit student cannot be partitioned by ZeRO-3",
        ("--load_in_4bit", "--lora_r", "4"),
        launch=ZERO3_LAUNCH_WITHOUT_INIT,
    ),
    "no room left for prompts": BadInput(
        "--max_new_tokens 600 leaves no room for the prompts",
        ("--seq_kd", "--max_new_tokens", "600"),
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_clear_error_before_any_model_loads_and_nothing_is_written(
    case, capsys, model_pair, tokenizer, text_dataset, tmp_path, monkeypatch
):
    if case.flags[-2:] == ("--generation_backend", "vllm") and vllm_can_run():
        pytest.skip("this machine has vLLM and a CUDA GPU: the backend is not refused here")
    if case.flags[-1:] == ("--load_in_4bit",) and qlora_can_run():
        pytest.skip("this machine has bitsandbytes and a CUDA GPU: QLoRA is not refused here")

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr("kd_dist.trainer.load_models", no_weights)
    for name, value in case.launch:
        monkeypatch.setenv(name, value)
    teacher, student = model_pair(case.family)
    if case.student is not None:
        student = case.student(tmp_path, tokenizer)
    dataset = case.dataset(tmp_path) if case.dataset else text_dataset
    out = case.output_dir(tmp_path) if case.output_dir else tmp_path / "out"
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    err = run_train(capsys, teacher, student, dataset, out, *case.flags)
    assert case.message in err
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before


def config_only_teacher(tmp_path: Path, model_type: str) -> str:
    """A folder with a config.json and no weights."""
    layers = {"bloom": {"n_layer": 2}, "gpt2": {"n_layer": 2}}[model_type]
    AutoConfig.for_model(model_type, **layers).save_pretrained(tmp_path / "teacher")
    return str(tmp_path / "teacher")


MAKE_STUDENT_BAD_INPUTS = {
    "no layer flag": ((), "Pass exactly one of --num_layers N"),
    "both layer flags": (("--num_layers", "1", "--layers", "0"), "Pass exactly one of"),
    "no layers": (("--num_layers", "0"), "--num_layers 0: the teacher has 2 layers; pass a "
                                         "number from 1 to 2"),
    "more layers than the teacher": (("--num_layers", "3"), "pass a number from 1 to 2"),
    "layer out of range": (("--layers", "0,5"), "layer(s) [5] do not exist"),
    "layer twice": (("--layers", "1,1"), "a layer is named twice"),
    "layers out of order": (("--layers", "1,0"), "list the layers in increasing order"),
    "layers not numbers": (("--layers", "0,x"), "pass comma-separated layer indices"),
    "decoder flag, decoder-only model": (("--layers", "0", "--decoder_layers", "0"),
                                         "has one stack: use --num_layers / --layers"),
    "both decoder flags": (("--layers", "0", "--num_decoder_layers", "1", "--decoder_layers",
                            "0"), "Pass exactly one of --num_decoder_layers"),
    "seq2seq encoder layer out of range": (("--layers", "0,3", "--num_decoder_layers", "1"),
                                              "layer(s) [3] do not exist; the teacher's encoder"),
    "family it cannot cut": (("--num_layers", "1"), "a 'bloom' model, whose layers make-student "
                                                    "cannot cut; it cuts: bart, cohere"),
    "no safetensors": (("--num_layers", "1"), "has no safetensors weights"),
    "output folder not empty": (("--num_layers", "1"), "already exists and is not empty"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"), MAKE_STUDENT_BAD_INPUTS.values(), ids=MAKE_STUDENT_BAD_INPUTS.keys()
)
def test_make_student_refuses_bad_input_before_reading_weights(
    flags, message, capsys, model_pair, tmp_path, monkeypatch
):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the error")

    monkeypatch.setattr("kd_dist.make_student.tensor_locations", no_weights)
    teacher = model_pair("t5" if "--num_decoder_layers" in flags else "gpt2")[0]
    if "bloom" in message:
        teacher = config_only_teacher(tmp_path, "bloom")
    if "safetensors" in message:
        teacher = config_only_teacher(tmp_path, "gpt2")
    out = tmp_path / "student"
    if "not empty" in message:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    argv = ["make-student", "--teacher_model", teacher, "--output_dir", str(out), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before
