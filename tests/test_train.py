"""The real CLI, end to end, on tiny real models of each supported family (CPU)."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
)

import kd_dist.models
from kd_dist.cli import main
from kd_dist.config import TrainConfig
from kd_dist.data import build_datasets, make_collator
from kd_dist.evaluation import METRIC_KEYS, TEACHER_KEYS
from kd_dist.faults import TRACE_ENV
from kd_dist.models import load_models, resolve_lengths
from kd_dist.tiny import CAUSAL_FAMILIES, SEQ2SEQ_FAMILIES, build_model, save_pair
from kd_dist.trainer import build_optimizer, decay_split
from tests.test_evaluation import run_reference, saved_tokenizer

FINAL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "kd_config.json",
    "metrics.jsonl",
}


def train_args(teacher, student, dataset, output_dir, *extra):
    return [
        "train",
        "--teacher_model", teacher,
        "--student_model", student,
        "--dataset", str(dataset),
        "--output_dir", str(output_dir),
        "--max_length", "32",
        "--batch_size", "4",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        *extra,
    ]  # fmt: skip


def assert_student_reloads_and_generates(output_dir: Path, seq2seq: bool):
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    inputs = tokenizer("the cat sees", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[-1] > (0 if seq2seq else inputs["input_ids"].shape[-1])


@pytest.mark.parametrize("family", CAUSAL_FAMILIES + SEQ2SEQ_FAMILIES)
def test_each_family_trains_saves_and_reloads(
    family, model_pair, text_dataset, pairs_dataset, tmp_path
):
    teacher, student = model_pair(family)
    seq2seq = family in SEQ2SEQ_FAMILIES
    dataset = pairs_dataset if seq2seq else text_dataset
    task = "seq2seq" if seq2seq else "causal"
    out = tmp_path / "run"
    argv = train_args(
        teacher, student, dataset, out, "--task_type", task, "--max_steps", "3", "--alpha", "0.2"
    )
    assert main(argv) == 0

    assert {p.name for p in out.iterdir()} >= FINAL_FILES
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["kd_loss"] > 0 and r["ce_loss"] > 0 for r in records)
    saved = json.loads((out / "kd_config.json").read_text())
    assert saved["teacher_model"] == teacher and saved["max_steps"] == 3
    # The student was trained: its weights differ from the starting point.
    before = load_file(Path(student) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert_student_reloads_and_generates(out, seq2seq)


def test_instruction_data_bf16_gradient_accumulation_and_every_optimizer(
    model_pair, dolly_dataset, tmp_path
):
    teacher, student = model_pair("llama")
    for optimizer in ("adamw", "sgd", "adafactor"):
        out = tmp_path / optimizer
        argv = train_args(
            teacher, student, dolly_dataset, out,
            "--optimizer", optimizer, "--bf16", "--gradient_accumulation_steps", "2",
            "--max_steps", "2", "--lr_scheduler", "cosine", "--max_length", "128",
        )  # fmt: skip
        assert main(argv) == 0
        assert (out / "model.safetensors").is_file()


def sharegpt_dataset(path: Path, sentences: list[str]) -> Path:
    rows = [
        {"conversations": [{"from": "human", "value": s[:12]}, {"from": "gpt", "value": s}]}
        for s in sentences[:16]
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_chat_data_trains_and_the_student_keeps_its_chat_template(
    model_pair, tokenizer, sentences, tmp_path, caplog
):
    teacher, student = model_pair("qwen2")
    dataset = sharegpt_dataset(tmp_path / "sharegpt.jsonl", sentences)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="kd_dist"):
        assert main(train_args(teacher, student, dataset, out, "--max_steps", "2")) == 0
    assert "format chat (sharegpt, plain chat template)" in caplog.text
    assert "[masked: <|user|>\n" in caplog.text  # the example shows the prompt masked
    # The exported tokenizer carries the template the student was trained with.
    reloaded = AutoTokenizer.from_pretrained(out)
    prompt = reloaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"
    # The plain template ends answers with eos: generation already stops there.
    assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.eos_token_id


# Llama-3's template, reduced: each turn ends with <|eot_id|>, not with the eos token.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_a_base_student_trained_on_an_instruct_template_stops_at_its_end_of_turn(
    tokenizer, sentences, tmp_path, caplog
):
    """Llama-3 shape: a base student (no template, eos <|end_of_text|>) takes the instruct
    teacher's template, whose answers end with <|eot_id|>; the exported generation_config must
    stop at both, as Llama-3-Instruct's does."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    end_of_turn = tok.convert_tokens_to_ids("<|eot_id|>")
    student = save_pair(tmp_path / "student", build_model("llama", tok, "tiny"), tok)
    tok.chat_template = LLAMA3_TEMPLATE
    teacher = save_pair(tmp_path / "teacher", build_model("llama", tok, "small"), tok)
    out = tmp_path / "run"
    dataset = sharegpt_dataset(tmp_path / "sharegpt.jsonl", sentences)
    with caplog.at_level(logging.INFO, logger="kd_dist"):
        assert main(train_args(teacher, student, dataset, out, "--max_steps", "1")) == 0
    assert "has no chat template: using the teacher's" in caplog.text
    assert "<|eot_id|>" in caplog.text  # the first example: the answer trains <|eot_id|>
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [tok.eos_token_id, end_of_turn]
    assert GenerationConfig.from_pretrained(out).eos_token_id == [tok.eos_token_id, end_of_turn]


def test_packed_instructions_train_and_evaluate(model_pair, dolly_dataset, tmp_path, caplog):
    teacher, student = model_pair("llama")
    out = tmp_path / "run"
    argv = train_args(teacher, student, dolly_dataset, out, "--packing", "--max_length", "128",
                      "--max_steps", "2", "--eval_ratio", "0.25", "--no-compile_loss")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="kd_dist"):
        assert main(argv) == 0
    blocks = re.search(r"train (\d+) examples \(packed from 48 documents\)", caplog.text)
    assert blocks and int(blocks[1]) < 48
    assert re.search(r"eval \d+ examples \(packed from 16 documents\)", caplog.text)
    assert "[masked: " in caplog.text  # the first block's prompts are shown masked
    metrics = json.loads((out / "eval_results.json").read_text())
    assert all(math.isfinite(metrics[key]) for key in METRIC_KEYS)
    assert (out / "model.safetensors").is_file()


def test_group_by_length_resumes_mid_epoch_exactly(
    model_pair, dolly_dataset, tmp_path, monkeypatch
):
    teacher, student = model_pair("llama")
    common = ("--group_by_length", "--max_length", "128", "--max_train_samples", "16",
              "--epochs", "2", "--save_steps", "6", "--save_every", "0",
              "--no-compile_loss")  # fmt: skip

    def run(name: str, *extra: str) -> list[dict]:
        monkeypatch.setenv(TRACE_ENV, str(tmp_path / name))
        assert (
            main(train_args(teacher, student, dolly_dataset, tmp_path / name, *common, *extra)) == 0
        )
        trace = (tmp_path / f"{name}.rank0").read_text().splitlines()
        return [json.loads(line) for line in trace]

    straight = run("straight")
    epochs = [
        [e for r in straight if r["epoch"] == epoch for e in r["examples"]] for epoch in (0, 1)
    ]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])  # reshuffled
    for order in epochs:  # the longest example first
        assert len(order[0]) == max(map(len, order))
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-00000006"  # epoch 1, step 2 of 4
    resumed = run("resumed", "--resume_from_checkpoint", str(checkpoint))
    assert resumed == [record for record in straight if record["step"] > 6]
    expected, actual = (
        load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed")
    )
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_python_module_and_console_script_entry_points(model_pair, text_dataset, tmp_path):
    teacher, student = model_pair("gpt2")
    for index, command in enumerate(
        ([sys.executable, "-m", "kd_dist"], [str(Path(sys.executable).parent / "kd-dist")])
    ):
        out = tmp_path / f"run{index}"
        argv = train_args(teacher, student, text_dataset, out, "--max_steps", "1")
        result = subprocess.run([*command, *argv], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (out / "model.safetensors").is_file()


def test_resume_continues_the_step_count_and_reproduces_the_run(model_pair, text_dataset, tmp_path):
    # GPT-2 has dropout, so an exact match also needs the RNG state restored.
    teacher, student = model_pair("gpt2")
    common = (
        "--epochs",
        "2",
        "--save_every",
        "1",
        "--batch_size",
        "8",
        "--gradient_accumulation_steps",
        "2",
        "--seed",
        "3",
    )
    straight = tmp_path / "straight"
    assert main(train_args(teacher, student, text_dataset, straight, *common)) == 0
    checkpoints = sorted((straight / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000004", "step-00000008"]
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step-00000008"

    resumed = tmp_path / "resumed"
    argv = train_args(
        teacher,
        student,
        text_dataset,
        resumed,
        *common,
        "--resume_from_checkpoint",
        str(checkpoints[0]),
    )
    assert main(argv) == 0
    steps = [
        json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [5, 6, 7, 8]
    expected = load_file(straight / "model.safetensors")
    actual = load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    straight_losses = [
        json.loads(x)["loss"] for x in (straight / "metrics.jsonl").read_text().splitlines()
    ]
    resumed_losses = [
        json.loads(x)["loss"] for x in (resumed / "metrics.jsonl").read_text().splitlines()
    ]
    assert resumed_losses == straight_losses[4:]


def test_resume_latest_without_checkpoint_is_a_clear_error(
    model_pair, text_dataset, tmp_path, capsys
):
    teacher, student = model_pair("gpt2")
    argv = train_args(
        teacher, student, text_dataset, tmp_path / "none", "--resume_from_checkpoint", "latest"
    )
    assert main(argv) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_teacher_is_frozen_in_eval_mode_and_student_trains(model_pair, tokenizer):
    teacher, student = model_pair("gpt2")
    cfg = TrainConfig(teacher_model=teacher, student_model=student, dataset="unused", bf16=True)
    models = load_models(cfg, tokenizer)
    assert not models.teacher.training
    assert not any(p.requires_grad for p in models.teacher.parameters())
    assert {p.dtype for p in models.teacher.parameters()} == {torch.bfloat16}
    assert models.student.training
    assert all(p.requires_grad and p.dtype == torch.float32 for p in models.student.parameters())


def test_one_batch_of_8_equals_two_accumulated_micro_batches_of_4(model_pair, text_dataset,
                                                                   tmp_path):  # fmt: skip
    """The loss is normalised by the optimizer step's tokens, not per micro-batch: one SGD step
    (its first update is lr * gradient) lands on the same weights however the batch is split."""
    teacher, student = model_pair("llama")  # no dropout, so the split changes nothing else
    common = ("--optimizer", "sgd", "--max_steps", "1", "--clip_grad_norm", "0",
              "--warmup_ratio", "0", "--lr_scheduler", "constant", "--learning_rate", "0.5",
              "--alpha", "0.3", "--save_every", "0")  # fmt: skip
    splits = {"8x1": ("--batch_size", "8"),
              "4x2": ("--batch_size", "4", "--gradient_accumulation_steps", "2")}  # fmt: skip
    weights = {}
    for name, split in splits.items():
        out = tmp_path / name
        assert main(train_args(teacher, student, text_dataset, out, *common, *split)) == 0
        weights[name] = load_file(out / "model.safetensors")
    before = load_file(Path(student) / "model.safetensors")
    for key, value in weights["8x1"].items():
        if key in before and not torch.equal(before[key], value):
            torch.testing.assert_close(weights["4x2"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert any(not torch.equal(before[k], weights["8x1"][k]) for k in before)


def test_resuming_in_the_same_folder_keeps_one_metrics_line_per_step(model_pair, text_dataset,
                                                                      tmp_path):  # fmt: skip
    teacher, student = model_pair("gpt2")
    out = tmp_path / "run"
    argv = train_args(teacher, student, text_dataset, out, "--epochs", "2", "--save_every", "1",
                      "--batch_size", "16")  # fmt: skip
    assert main(argv) == 0
    first = (out / "metrics.jsonl").read_text()
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[0]
    assert main([*argv, "--resume_from_checkpoint", str(checkpoint)]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in first.splitlines()] == list(range(1, 9))


def test_a_model_the_fused_loss_does_not_know_trains_on_logits_with_a_warning(
    model_pair, text_dataset, tmp_path, monkeypatch, caplog
):
    monkeypatch.delitem(kd_dist.models.FUSED_HEAD_RULES, "llama")
    teacher, student = model_pair("llama")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="kd_dist"):
        assert main(train_args(teacher, student, text_dataset, out, "--max_steps", "2")) == 0
    assert "fused loss does not know llama/llama" in caplog.text
    assert (out / "model.safetensors").is_file()


def test_mid_epoch_checkpoints_resume_exactly_and_old_ones_are_pruned(model_pair, text_dataset,
                                                                       tmp_path):  # fmt: skip
    """--save_steps saves inside an epoch; resuming there skips the batches already seen and
    replays the rest in the same order, so the run ends on the same weights."""
    teacher, student = model_pair("gpt2")  # dropout: the RNG state must be restored too
    common = ("--epochs", "2", "--save_every", "0", "--save_steps", "3", "--batch_size", "8",
              "--save_total_limit", "2", "--seed", "5")  # fmt: skip
    straight = tmp_path / "straight"
    assert main(train_args(teacher, student, text_dataset, straight, *common)) == 0
    # 8 batches per epoch, 16 steps: saved at 3, 6, ..., 15; only the newest two are kept.
    kept = sorted(p.name for p in (straight / "checkpoints").glob("step-*"))
    assert kept == ["step-00000012", "step-00000015"]
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step-00000015"

    resumed = tmp_path / "resumed"
    checkpoint = straight / "checkpoints" / "step-00000012"  # step 12 = batch 4 of epoch 2
    argv = train_args(teacher, student, text_dataset, resumed, *common,
                      "--resume_from_checkpoint", str(checkpoint))  # fmt: skip
    assert main(argv) == 0
    expected, actual = (load_file(d / "model.safetensors") for d in (straight, resumed))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_preempted_run_saves_exits_75_and_the_same_command_resumes_exactly(
    model_pair, text_dataset, tmp_path
):
    """SIGTERM (or SLURM's early SIGUSR1) mid-run: the step finishes, a checkpoint is saved, the
    process exits with 75; rerunning the same command with --resume_from_checkpoint auto ends
    on exactly the weights of a run that was never interrupted."""
    teacher, student = model_pair("gpt2")
    common = ("--epochs", "12", "--batch_size", "4", "--save_every", "0", "--seed", "9",
              "--resume_from_checkpoint", "auto")  # fmt: skip
    out = tmp_path / "preempted"
    argv = [sys.executable, "-m", "kd_dist", *train_args(teacher, student, text_dataset, out,
                                                         *common)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline, "no training steps seen"
        time.sleep(0.01)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 75, stderr[-3000:]
    assert "stopped at step" in stderr
    stopped_at = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 3 <= stopped_at < 192

    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight"
    assert main(train_args(teacher, student, text_dataset, straight, *common)) == 0
    expected, actual = (load_file(d / "model.safetensors") for d in (straight, out))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 193))


def without_flag(argv: list[str], flag: str) -> list[str]:
    index = argv.index(flag)
    return argv[:index] + argv[index + 2 :]


def test_without_max_length_a_short_model_gets_a_length_that_fits_and_resumes(
    model_pair, text_dataset, tmp_path, caplog
):
    """The seed's basic command passes no --max_length: a 256-position student must train with
    256 (not fail on 512), record it, and resume without the flag."""
    teacher, student = model_pair("llama", max_position_embeddings=256)
    out = tmp_path / "run"
    argv = without_flag(train_args(teacher, student, text_dataset, out), "--max_length")
    common = ("--save_steps", "1", "--save_every", "0")
    with caplog.at_level(logging.INFO, logger="kd_dist"):
        assert main([*argv, *common, "--max_steps", "1"]) == 0
    assert "--max_length not set: using 256 (min of 512 and the student's 256 positions)" in (
        caplog.text
    )
    assert json.loads((out / "kd_config.json").read_text())["max_length"] == 256
    resumed = [*argv, *common, "--max_steps", "2", "--resume_from_checkpoint", "latest"]
    assert main(resumed) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


@pytest.mark.parametrize(
    ("family", "limit", "message"),
    [
        ("bart", 256, "using 256 (min of 512 and the models' 256 positions)"),
        ("t5", None, "using 512 (the models have no position limit)"),
    ],
)
def test_seq2seq_lengths_default_to_what_fits_the_target_too(
    family, limit, message, tokenizer, tmp_path, caplog
):
    overrides = {"max_position_embeddings": limit} if limit else {}
    folders = [
        save_pair(tmp_path / role, build_model(family, tokenizer, "tiny", **overrides), tokenizer)
        for role in ("teacher", "student")
    ]
    cfg = TrainConfig(teacher_model=folders[0], student_model=folders[1], dataset="unused",
                      task_type="seq2seq")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="kd_dist"):
        resolved = resolve_lengths(cfg)
    assert message in caplog.text
    expected = limit or 512
    assert (resolved.max_length, resolved.max_target_length) == (expected, expected)
    # Values the user set are kept (an explicit one that does not fit is check_models' error).
    explicit = resolve_lengths(replace(cfg, max_length=64, max_target_length=16))
    assert (explicit.max_length, explicit.max_target_length) == (64, 16)


def weights(prefix: str, *layers: str) -> set[str]:
    return {f"{prefix}.{layer}.weight" for layer in layers}


QKVO, BART_ATTENTION = ("q", "k", "v", "o"), ("k_proj", "v_proj", "q_proj", "out_proj")
# The weight-decayed parameters of each tiny ("tiny": one layer) model: the matrices of its
# linear layers. Everything else (biases, LayerNorm/RMSNorm/T5LayerNorm scales, token, position
# and relative-attention embeddings, tied heads) is not decayed.
DECAYED = {
    "gpt2": weights("transformer.h.0", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "llama": weights("model.layers.0", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                     "mlp.down_proj") | {"lm_head.weight"},  # untied: a plain linear layer
    "t5": weights("encoder.block.0.layer.0.SelfAttention", *QKVO)
    | weights("encoder.block.0.layer.1.DenseReluDense", "wi", "wo")
    | weights("decoder.block.0.layer.0.SelfAttention", *QKVO)
    | weights("decoder.block.0.layer.1.EncDecAttention", *QKVO)
    | weights("decoder.block.0.layer.2.DenseReluDense", "wi", "wo"),
    "bart": weights("model.encoder.layers.0.self_attn", *BART_ATTENTION)
    | weights("model.encoder.layers.0", "fc1", "fc2")
    | weights("model.decoder.layers.0.self_attn", *BART_ATTENTION)
    | weights("model.decoder.layers.0.encoder_attn", *BART_ATTENTION)
    | weights("model.decoder.layers.0", "fc1", "fc2"),
}  # fmt: skip
# Among what is not decayed, the embeddings (token, position, T5's relative attention bias).
EMBEDDINGS = {
    "gpt2": {"transformer.wte.weight", "transformer.wpe.weight"},  # wte is also the tied lm_head
    "llama": {"model.embed_tokens.weight"},
    "t5": {"shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
           "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"},
    "bart": {"model.shared.weight", "model.encoder.embed_positions.weight",
             "model.decoder.embed_positions.weight"},
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(DECAYED))
def test_weight_decay_applies_only_to_the_matrices_of_non_embedding_layers(family, tokenizer):
    model = build_model(family, tokenizer, "tiny")
    decayed, not_decayed = decay_split(model)
    names = {name for name, _ in model.named_parameters()}  # a tied weight under one name
    assert set(decayed) == DECAYED[family]
    assert set(not_decayed) == names - DECAYED[family]
    assert EMBEDDINGS[family] <= set(not_decayed)
    assert all(p.dim() == 1 for n, p in not_decayed.items() if n not in EMBEDDINGS[family])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
def test_every_optimizer_gets_the_two_groups_and_no_empty_one(optimizer, tokenizer):
    model = build_model("gpt2", tokenizer, "tiny")
    cfg = TrainConfig(optimizer=optimizer, weight_decay=0.3)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = [(g["weight_decay"], {name_of[id(p)] for p in g["params"]})
              for g in build_optimizer(cfg, model).param_groups]  # fmt: skip
    decayed, not_decayed = (set(group) for group in decay_split(model))
    assert groups == [(0.3, decayed), (0.0, not_decayed)]
    # Nothing to decay (a model of embeddings only): one group, not an empty one beside it.
    (only,) = build_optimizer(cfg, torch.nn.Embedding(8, 4)).param_groups
    assert only["weight_decay"] == 0.0 and len(only["params"]) == 1


ZERO3_SPLIT = """
import json, sys, deepspeed, torch
from kd_dist.tiny import build_model, build_tokenizer
from kd_dist.trainer import decay_split
from tests.conftest import make_sentences
deepspeed.init_distributed(dist_backend="gloo")
tokenizer = build_tokenizer(make_sentences(64), vocab_size=300, with_pad=False)
zero3 = {"train_micro_batch_size_per_gpu": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
with deepspeed.zero.Init(config_dict_or_path=zero3):
    model = build_model("gpt2", tokenizer, "tiny")
assert all(p.numel() == 0 for p in model.parameters())  # partitioned: no shape left
print(json.dumps([sorted(group) for group in decay_split(model)]))
"""


def test_weight_decay_groups_are_the_same_under_zero3_partitioning(tokenizer):
    """Under zero.Init every parameter is partitioned before the optimizer is built; the split
    reads the real shapes DeepSpeed keeps."""
    from tests.test_distributed import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", ZERO3_SPLIT], env=env, capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    partitioned = json.loads(result.stdout.strip().splitlines()[-1])
    whole = [sorted(group) for group in decay_split(build_model("gpt2", tokenizer, "tiny"))]
    assert partitioned == whole and set(partitioned[0]) == DECAYED["gpt2"]


def test_a_large_weight_decay_shrinks_only_the_decayed_matrices(model_pair, text_dataset,
                                                                 tmp_path):  # fmt: skip
    """One AdamW step at lr 1e-3 with --weight_decay 100: decayed weights are multiplied by
    1 - lr * wd = 0.9 besides Adam's own update (at most lr per entry in its first step); the
    others (GPT-2's biases, LayerNorms, token and position embeddings) move by Adam's only."""
    teacher, student = model_pair("gpt2")
    out = tmp_path / "run"
    argv = train_args(teacher, student, text_dataset, out, "--max_steps", "1",
                      "--weight_decay", "100", "--warmup_ratio", "0", "--lr_scheduler",
                      "constant", "--save_every", "0")  # fmt: skip
    assert main(argv) == 0
    before = load_file(Path(student) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and DECAYED["gpt2"] < set(before)
    adam_step = 1e-3 * (1 + 1e-5)
    for name in before:
        shrunk = 0.9 if name in DECAYED["gpt2"] else 1.0
        torch.testing.assert_close(after[name], shrunk * before[name], rtol=0, atol=adam_step,
                                   msg=name)  # fmt: skip


ALPHA_1_RUN = ("--alpha", "1", "--eval_ratio", "0.2", "--eval_steps", "2",
               "--eval_before_training", "--max_steps", "3", "--learning_rate", "1e-2",
               "--save_every", "0", "--no-compile_loss")  # fmt: skip


@pytest.fixture(scope="module")
def fine_tuning_runs(model_pair, text_dataset, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """The same --alpha 1 run (evaluated before, during and after training) with a teacher whose
    weights cannot load (config and tokenizer intact, model.safetensors corrupt) and with a
    loadable one: name -> (output folder, its kd_dist log)."""
    teacher, student = model_pair("llama")
    root = tmp_path_factory.mktemp("alpha1")
    broken = root / "broken_teacher"
    shutil.copytree(teacher, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    logger, level = logging.getLogger("kd_dist"), logging.getLogger("kd_dist").level
    runs = {}
    for name, teacher_dir in (("broken", broken), ("loadable", teacher)):
        out, log = root / name, io.StringIO()
        handler = logging.StreamHandler(log)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            assert main(train_args(str(teacher_dir), student, text_dataset, out,
                                   *ALPHA_1_RUN)) == 0  # fmt: skip
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        runs[name] = (out, log.getvalue())
    return runs


def test_alpha_1_never_loads_the_teacher_and_evaluates_the_student_alone(fine_tuning_runs,
                                                                         model_pair):  # fmt: skip
    """A teacher that cannot load does not matter: the run says it fine-tunes, its evaluations
    hold the student's cross-entropy (the float64 reference, at the start and on the exported
    student) and null teacher metrics, and it trains exactly as with a loadable teacher."""
    teacher, student = model_pair("llama")
    out, log = fine_tuning_runs["broken"]
    assert (
        "Teacher placement: none (--alpha 1 trains on the labels alone: plain fine-tuning)" in log
    )
    assert f"teacher  {out.parent / 'broken_teacher'}: not loaded (--alpha 1: plain " in log
    assert "Evaluation at step 3: student ppl " in log and "(no teacher to compare with)" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_tokens" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for record in evals:
        assert all(record[f"eval_{key}"] is None for key in TEACHER_KEYS), record
    final = json.loads((out / "eval_results.json").read_text())
    assert final == {key: evals[-1][f"eval_{key}"] for key in METRIC_KEYS}
    for metrics, trained in ((evals[0], student), (evals[-1], out)):
        expected = run_reference(out, trained, teacher)
        assert metrics["eval_tokens"] == expected["tokens"] > 0
        assert metrics["eval_student_ce"] == pytest.approx(expected["student_ce"], rel=1e-4)
    assert evals[-1]["eval_student_ce"] < evals[0]["eval_student_ce"]
    assert all(r["kd_loss"] == 0 and r["loss"] == r["ce_loss"] > 0 for r in records if "loss" in r)
    loadable, _ = fine_tuning_runs["loadable"]
    expected = load_file(loadable / "model.safetensors")
    actual = load_file(out / "model.safetensors")
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_report_of_a_run_without_a_teacher_shows_the_student_alone(fine_tuning_runs):
    out, _ = fine_tuning_runs["broken"]
    assert main(["report", str(out)]) == 0
    written = sorted(p.name for p in (out / "report").iterdir())
    assert written == sorted(["train_loss.png", "learning_rate.png", "throughput.png",
                              "eval_perplexity.png", "report.md"])  # fmt: skip
    summary = (out / "report" / "report.md").read_text()
    assert "| teacher |" not in summary and "| n/a | n/a |" in summary
    assert "(no teacher: --alpha 1 is plain fine-tuning)" in summary


def training_examples(out: Path, student: str) -> tuple[TrainConfig, object, object]:
    """(the run's resolved config, its tokenizer, its tokenized training examples) of the run in
    ``out``, rebuilt from its kd_config.json as the run built them."""
    cfg = TrainConfig(**json.loads((out / "kd_config.json").read_text()))
    tokenizer = saved_tokenizer(student)
    return cfg, tokenizer, build_datasets(cfg, tokenizer).train


def one_sgd_step_of_cross_entropy(student_dir: str, batch: dict, vocab_size: int,
                                  learning_rate: float) -> dict[str, torch.Tensor]:  # fmt: skip
    """The student's weights after one SGD step (momentum's first is lr * gradient) on the mean
    cross-entropy of the batch's valid next tokens, by the definition, in float64."""
    model = AutoModelForCausalLM.from_pretrained(student_dir).double()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1, :vocab_size], batch["labels"][:, 1:]
    valid = labels != -100
    log_q = logits[valid].log_softmax(-1)
    (-log_q.gather(-1, labels[valid][:, None])).mean().backward()
    return {name: p.detach() - learning_rate * p.grad for name, p in model.named_parameters()}


def test_alpha_1_with_a_loadable_teacher_is_one_step_of_plain_cross_entropy(model_pair,
                                                                            text_dataset,
                                                                            tmp_path):  # fmt: skip
    """--alpha 1 trains on the labels alone: one SGD step over all 64 examples lands where the
    float64 gradient of the mean cross-entropy says, whatever the teacher."""
    teacher, student = model_pair("llama")  # no dropout
    out = tmp_path / "run"
    argv = train_args(teacher, student, text_dataset, out, "--alpha", "1", "--optimizer", "sgd",
                      "--max_steps", "1", "--batch_size", "64", "--clip_grad_norm", "0",
                      "--warmup_ratio", "0", "--lr_scheduler", "constant", "--learning_rate",
                      "0.5", "--save_every", "0", "--no-compile_loss")  # fmt: skip
    assert main(argv) == 0
    _, tokenizer, examples = training_examples(out, student)
    assert len(examples) == 64  # one batch: the whole step
    batch = make_collator(tokenizer)([examples[i] for i in range(len(examples))])
    expected = one_sgd_step_of_cross_entropy(student, batch, len(tokenizer), 0.5)
    before = load_file(Path(student) / "model.safetensors")
    actual = load_file(out / "model.safetensors")
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value.float(), rtol=1e-5, atol=1e-6, msg=key)
    assert max((expected[k].float() - before[k]).abs().max() for k in before) > 1e-3
