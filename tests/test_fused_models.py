"""The fused loss on real (tiny) models equals the plain loss on the models' own logits."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from kd_dist.losses import LossSpec, distillation_loss, fused_distillation_loss, valid_rows
from kd_dist.models import (
    FUSED_HEAD_RULES,
    decoder_inputs,
    forward_hidden,
    forward_logits,
    output_head,
)
from kd_dist.tiny import SEQ2SEQ_FAMILIES, build_model

from .test_distributed import REPO, accelerate_launch, deepspeed_config

# family -> config overrides that exercise its head's specifics
FAMILIES = {
    "gpt2": {},
    "opt": {},
    "llama": {},
    "qwen2": {},
    "t5": {},  # tied embeddings: the decoder output is scaled by d_model**-0.5 before lm_head
    "bart": {},  # final_logits_bias after lm_head
    "gemma2": {"final_logit_softcapping": 2.0},
    "cohere": {"logit_scale": 0.5},
}


def batch_for(tokenizer, seq2seq: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    input_ids = torch.randint(3, vocab, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # a padded row
    labels = input_ids.clone() if not seq2seq else torch.randint(3, vocab, (3, 7), generator=g)
    labels[:, :2] = -100  # a masked prompt
    if not seq2seq:
        labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_path_equals_the_logits_path(family, tokenizer):
    torch.manual_seed(0)
    overrides = FAMILIES[family]
    teacher = build_model(family, tokenizer, "small", pad_vocab_to=128, **overrides).eval()
    student = build_model(family, tokenizer, "tiny", pad_vocab_to=32, **overrides).eval()
    seq2seq = family in SEQ2SEQ_FAMILIES
    task = "seq2seq" if seq2seq else "causal"
    batch = batch_for(tokenizer, seq2seq)
    spec = LossSpec("jsd", temperature=2.0, alpha=0.3, jsd_beta=0.3)
    params = [p for p in student.parameters() if p.requires_grad]
    vocab = len(tokenizer)

    with torch.no_grad():
        teacher_logits = forward_logits(teacher, teacher, batch, task)
    student_logits = forward_logits(student, student, batch, task)
    rows = valid_rows(student_logits, teacher_logits, batch["labels"], causal=not seq2seq)
    plain = distillation_loss(*rows, spec, vocab_size=vocab)
    plain_grads = torch.autograd.grad(plain.loss, params, allow_unused=True)

    student_head, teacher_head = output_head(student), output_head(teacher)
    assert student_head is not None and teacher_head is not None
    with torch.no_grad():
        teacher_hidden = forward_hidden(teacher, teacher, batch, task)
    student_hidden = forward_hidden(student, student, batch, task)
    s_rows, t_rows, labels = valid_rows(
        student_hidden, teacher_hidden, batch["labels"], causal=not seq2seq
    )
    fused = fused_distillation_loss(
        s_rows, student_head, t_rows, teacher_head, labels, spec, vocab_size=vocab, chunk_rows=5
    )
    fused_grads = torch.autograd.grad(fused.loss, params, allow_unused=True)

    assert fused.num_tokens == plain.num_tokens > 0
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for param, expected, actual in zip(params, plain_grads, fused_grads, strict=True):
        if expected is None:
            assert actual is None or torch.all(actual == 0)
            continue
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=str(param.shape))


def test_unknown_model_family_has_no_fused_head(tokenizer):
    model = build_model("llama", tokenizer, "tiny")
    model.config.model_type = "some_new_model"
    assert output_head(model) is None


# A tiny config of every model type the fused loss claims to know.
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64)  # fmt: skip
_T5 = dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
           decoder_start_token_id=0)  # fmt: skip
_BART = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
             decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
             max_position_embeddings=64, decoder_start_token_id=2)  # fmt: skip
EVERY_KNOWN_TYPE = {
    "gpt2": dict(n_embd=32, n_layer=1, n_head=2, n_positions=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=64),
    "opt": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                word_embed_proj_dim=16, max_position_embeddings=64),  # project_out
    "llama": _DECODER, "mistral": _DECODER, "qwen2": _DECODER, "qwen3": _DECODER,
    "gemma": _DECODER,
    "mixtral": dict(_DECODER, num_local_experts=2, num_experts_per_tok=1),
    "qwen2_moe": dict(_DECODER, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16),
    "qwen3_moe": dict(_DECODER, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16),
    "phi": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64),  # lm_head bias
    "phi3": dict(_DECODER, pad_token_id=0),
    "falcon": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2),
    "gemma2": dict(_DECODER, final_logit_softcapping=3.0),
    "gemma3_text": dict(_DECODER, final_logit_softcapping=3.0),
    "cohere": dict(_DECODER, logit_scale=0.37),
    "cohere2": dict(_DECODER, logit_scale=0.37),
    "granite": dict(_DECODER, logits_scaling=7.0),
    "t5": _T5, "mt5": _T5, "umt5": _T5,
    "bart": _BART, "mbart": _BART,  # final_logits_bias
}  # fmt: skip


def test_every_known_model_type_is_covered():
    assert set(EVERY_KNOWN_TYPE) == set(FUSED_HEAD_RULES)


@pytest.mark.parametrize("model_type", sorted(EVERY_KNOWN_TYPE))
def test_output_head_reproduces_the_model_logits(model_type):
    """hidden @ W.T + bias, then the family's transform, equals the model's own logits."""
    torch.manual_seed(0)
    overrides = {"pad_token_id": 1, **EVERY_KNOWN_TYPE[model_type]}
    config = AutoConfig.for_model(model_type, vocab_size=101, **overrides)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config).eval()
    with torch.no_grad():  # make zero-initialised biases matter
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_()
        if getattr(model.get_output_embeddings(), "bias", None) is not None:
            model.get_output_embeddings().bias.normal_()
    ids = torch.randint(3, 101, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    task = "seq2seq" if config.is_encoder_decoder else "causal"
    head = output_head(model)
    with torch.no_grad():
        expected = forward_logits(model, model, batch, task)
        hidden = forward_hidden(model, model, batch, task)
        logits = hidden @ head.weight.t() + (0 if head.bias is None else head.bias)
        logits, _ = head.transform.apply(logits)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_mbart_decoder_starts_with_the_language_id(tokenizer):
    """mBART shifts its labels its own way (the last token, a language id, leads)."""
    from transformers.models.mbart.modeling_mbart import shift_tokens_right

    config = AutoConfig.for_model("mbart", vocab_size=101, pad_token_id=1, **_BART)
    model = AutoModelForSeq2SeqLM.from_config(config)
    labels = torch.tensor([[5, 6, 7, 2, 50], [8, 9, 2, 50, -100]])
    expected = shift_tokens_right(labels.masked_fill(labels == -100, 1), 1)
    torch.testing.assert_close(decoder_inputs(model, labels), expected)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_forward_hidden_never_runs_the_output_projection(family, tokenizer):
    """The projection is swapped out for the call (ZeRO-3 then never gathers it for the forward)
    and back in afterwards, also when the forward fails; tied weights stay tied."""
    model = build_model(family, tokenizer, "tiny", tie_word_embeddings=True)
    projection = model.get_output_embeddings()
    calls = []
    projection.register_forward_pre_hook(lambda module, args: calls.append(module))
    seq2seq = family in SEQ2SEQ_FAMILIES
    batch, task = batch_for(tokenizer, seq2seq), "seq2seq" if seq2seq else "causal"
    hidden = forward_hidden(model, model, batch, task)
    assert hidden.shape[-1] == projection.in_features and not calls
    assert model.get_output_embeddings() is projection
    assert projection.weight is model.get_input_embeddings().weight
    with pytest.raises(IndexError):  # token ids beyond the embedding
        forward_hidden(model, model, {**batch, "input_ids": batch["input_ids"] + 10**6}, task)
    assert model.get_output_embeddings() is projection


@pytest.mark.distributed
def test_zero3_gathers_the_output_layer_once_per_micro_step(tmp_path):
    """2 processes, ZeRO-3 with every parameter partitioned, the trainer's fused micro-step:
    DeepSpeed's communication logger sees the student's output layer gathered once per
    micro-step (by the loss's GatheredParameters) and never by the forward. (Before the
    projection was swapped out of the forward: once by the forward, twice per micro-step.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": str(REPO)}  # fmt: skip
    script = Path(__file__).parent / "zero3_head_gathers.py"
    command = [*accelerate_launch(deepspeed_config(tmp_path, 3)), str(script), str(tmp_path)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    counts = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(c["rank"] for c in counts) == [0, 1]
    for rank in counts:
        assert rank["forward_hidden"] == [0, 0] and rank["micro_step"] == [1, 1], rank
