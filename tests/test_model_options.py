"""How the models are built for real-size runs: activation checkpointing of the student, the
teacher's dtype, the attention kernel; each through the code that loads and runs the models."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from kd_dist.cli import main
from kd_dist.config import ConfigError, TrainConfig
from kd_dist.losses import LossSpec, fused_distillation_loss, valid_rows
from kd_dist.models import (
    check_models,
    forward_hidden,
    load_models,
    load_tokenizer,
    output_head,
    teacher_dtype,
)
from kd_dist.tiny import build_model, save_pair
from tests.test_train import train_args


def make_cfg(teacher: str, student: str, task_type: str = "causal", **options) -> TrainConfig:
    return TrainConfig(
        teacher_model=teacher, student_model=student, dataset="unused", task_type=task_type,
        max_length=32, **options,
    )  # fmt: skip


def token_batch(tokenizer, task_type: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens, the second row shorter (right padding): labels masked where padded."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tokenizer), (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if task_type == "seq2seq":
        return {"input_ids": ids, "attention_mask": mask, "labels": labels[:, :7]}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fused_loss_gradients(cfg: TrainConfig, batch) -> tuple[dict[str, torch.Tensor], int, float]:
    """(the student's parameter gradients, how many times its layers' sublayers ran forward, the
    loss) of one fused-loss backward."""
    tokenizer = load_tokenizer(cfg)
    models = load_models(cfg, tokenizer)
    student, teacher = models.student, models.teacher
    layer_calls = []
    for module in student.modules():
        if isinstance(module, GradientCheckpointingLayer):
            # A layer's own hooks stay outside its checkpoint; its sublayers' run in the replay.
            for sublayer in list(module.modules())[1:]:
                sublayer.register_forward_hook(lambda *_: layer_calls.append(1))
    causal = cfg.task_type == "causal"
    with torch.no_grad():
        teacher_hidden = forward_hidden(teacher, teacher, batch, cfg.task_type)
    student_hidden = forward_hidden(student, student, batch, cfg.task_type)
    s, t, labels = valid_rows(student_hidden, teacher_hidden, batch["labels"], causal)
    out = fused_distillation_loss(
        s, output_head(student), t, output_head(teacher), labels,
        LossSpec(temperature=2.0, alpha=0.3), vocab_size=len(tokenizer),
    )  # fmt: skip
    out.loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    return grads, len(layer_calls), out.loss.item()


# Two layers (something to checkpoint) and no dropout: the same function with and without.
TWO_LAYERS_NO_DROPOUT = {
    "llama": {"num_hidden_layers": 2},
    "gpt2": {"n_layer": 2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "t5": {"num_layers": 2, "num_decoder_layers": 2, "dropout_rate": 0.0},
}


@pytest.mark.parametrize("family", list(TWO_LAYERS_NO_DROPOUT))
def test_gradient_checkpointing_gives_the_same_gradient(family, model_pair, tokenizer):
    teacher, student = model_pair(family, **TWO_LAYERS_NO_DROPOUT[family])
    task_type = "seq2seq" if family == "t5" else "causal"
    batch = token_batch(tokenizer, task_type)
    plain, plain_calls, plain_loss = fused_loss_gradients(
        make_cfg(teacher, student, task_type), batch
    )
    checkpointed, calls, loss = fused_loss_gradients(
        make_cfg(teacher, student, task_type, gradient_checkpointing=True), batch
    )
    # It really recomputed: layers ran again in the backward pass (non-reentrant checkpointing
    # stops each replay once it has what the backward needs, so not always every sublayer).
    assert calls > plain_calls > 0
    assert loss == pytest.approx(plain_loss, rel=1e-6)  # (T5: rounding-level differences)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def openai_gpt_student(tmp_path_factory, tokenizer) -> str:
    """A real family with neither sdpa attention nor activation checkpointing (GPT-1)."""
    config = AutoConfig.for_model(
        "openai-gpt", vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64
    )
    model = AutoModelForCausalLM.from_config(config)
    return save_pair(tmp_path_factory.mktemp("openai-gpt"), model, tokenizer)


def test_a_student_without_checkpointing_support_is_refused_before_loading(
    model_pair, openai_gpt_student
):
    teacher, _ = model_pair("llama")
    cfg = make_cfg(teacher, openai_gpt_student, gradient_checkpointing=True)
    with pytest.raises(ConfigError, match=r"--gradient_checkpointing: --student_model .* drop"):
        check_models(cfg, load_tokenizer(cfg))


def test_teacher_dtype_auto_follows_the_run_then_the_checkpoint(tmp_path, model_pair, tokenizer):
    teacher, student = model_pair("llama")
    assert teacher_dtype(make_cfg(teacher, student)) == torch.float32  # saved in fp32
    assert teacher_dtype(make_cfg(teacher, student, bf16=True)) == torch.bfloat16
    assert teacher_dtype(make_cfg(teacher, student, fp16=True)) == torch.float16
    assert teacher_dtype(make_cfg(teacher, student, teacher_dtype="float32", bf16=True)) == (
        torch.float32
    )
    saved_bf16 = save_pair(
        tmp_path / "bf16", build_model("llama", tokenizer).to(torch.bfloat16), tokenizer
    )
    assert teacher_dtype(make_cfg(saved_bf16, student)) == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_teacher_gives_the_fp32_teachers_loss(dtype, model_pair, tokenizer):
    """The teacher's weights are stored in the dtype asked for, and the loss (fp32 math) stays
    within half precision's rounding of an fp32 teacher's."""
    teacher, student = model_pair("llama")
    batch = token_batch(tokenizer, "causal")
    cfg = make_cfg(teacher, student, teacher_dtype=dtype)
    models = load_models(cfg, load_tokenizer(cfg))
    assert {p.dtype for p in models.teacher.parameters()} == {getattr(torch, dtype)}
    assert {p.dtype for p in models.student.parameters()} == {torch.float32}
    with torch.no_grad():  # it runs in that precision too
        hidden = forward_hidden(models.teacher, models.teacher, batch, "causal")
    assert hidden.dtype == getattr(torch, dtype)
    _, _, half_loss = fused_loss_gradients(cfg, batch)
    _, _, fp32_loss = fused_loss_gradients(make_cfg(teacher, student), batch)
    assert half_loss == pytest.approx(fp32_loss, rel=2e-2)


def test_the_summary_shows_each_models_dtype_and_size(model_pair, dolly_dataset, tmp_path, caplog):
    teacher, student = model_pair("llama")
    out = tmp_path / "run"
    argv = train_args(teacher, student, dolly_dataset, out, "--max_steps", "1",
                      "--teacher_dtype", "bfloat16", "--gradient_checkpointing",
                      "--attn_implementation", "eager", "--max_length", "128",
                      "--no-compile_loss")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="kd_dist"):
        assert main(argv) == 0
    summary = next(r.getMessage() for r in caplog.records if "Run summary" in r.getMessage())
    teacher_line, student_line = summary.splitlines()[1:3]
    assert "bfloat16" in teacher_line and " GB)" in teacher_line
    assert "float32" in student_line and "activation checkpointing" in student_line
    saved = json.loads((out / "kd_config.json").read_text())
    assert saved["teacher_dtype"] == "bfloat16" and saved["gradient_checkpointing"] is True


def test_attention_implementation_reaches_both_models(model_pair, tokenizer):
    teacher, student = model_pair("llama")
    for kernel in ("eager", "sdpa"):
        cfg = make_cfg(teacher, student, attn_implementation=kernel)
        models = load_models(cfg, load_tokenizer(cfg))
        assert models.teacher.config._attn_implementation == kernel
        assert models.student.config._attn_implementation == kernel


def test_the_hubs_kernels_stay_off(model_pair, tokenizer):
    """transformers 5.25 turns use_kernels on by default (kernelize swaps Hub-downloaded layers
    in on a GPU); kd_dist loads every model with them off. (On this CPU they would swap
    nothing, but the model would still report them on.)"""
    teacher, student = model_pair("llama")
    models = load_models(make_cfg(teacher, student), tokenizer)
    for model in (models.teacher, models.student):
        assert getattr(model, "use_kernels", False) is False


def test_flash_attention_needs_half_precision_its_package_and_a_gpu(
    model_pair, dolly_dataset, tmp_path, capsys
):
    teacher, student = model_pair("llama")
    with pytest.raises(ConfigError, match="fp16 or bf16 only: pass --bf16"):
        make_cfg(teacher, student, attn_implementation="flash_attention_2").validate()
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        pytest.skip("this machine can run flash-attention")
    out = tmp_path / "run"
    argv = train_args(teacher, student, dolly_dataset, out, "--bf16",
                      "--attn_implementation", "flash_attention_2")  # fmt: skip
    assert main(argv) == 2
    assert "--attn_implementation flash_attention_2 needs" in capsys.readouterr().err
    assert not out.exists()  # stopped before anything was written or loaded


def test_an_attention_kernel_the_model_lacks_is_refused_before_loading(
    model_pair, openai_gpt_student
):
    teacher, _ = model_pair("llama")
    cfg = make_cfg(teacher, openai_gpt_student, attn_implementation="sdpa")
    with pytest.raises(ConfigError, match=r"OpenAIGPTLMHeadModel.*does not support it; pass eager"):
        check_models(cfg, load_tokenizer(cfg))
    check_models(make_cfg(teacher, openai_gpt_student), load_tokenizer(cfg))  # auto: eager


def test_two_half_precisions_are_refused(model_pair):
    teacher, student = model_pair("llama")
    with pytest.raises(ConfigError, match="--teacher_dtype float16 with --bf16"):
        make_cfg(teacher, student, teacher_dtype="float16", bf16=True).validate()
