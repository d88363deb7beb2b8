"""Load the tokenizer, the frozen teacher and the trainable student, after checking they fit.

Checks run in order of cost: configs and tokenizers (small files) before any weights, so a
mismatch is reported in seconds rather than after loading a 70B teacher.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.masking_utils import create_causal_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from kd_dist.config import ConfigError, TrainConfig, parse_layer_map
from kd_dist.lora import check_lora, with_adapters
from kd_dist.losses import IGNORE_INDEX, LogitTransform, OutputHead, TopKTeacher
from kd_dist.teacher_cache import cache_lengths
from kd_dist.zero3_loading import built_whole, from_pretrained, load_partitioned

logger = logging.getLogger("kd_dist")


def _load_config(name: str, role: str, cfg: TrainConfig) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"--{role}_model {name!r}: could not load its config. Pass a local folder holding "
            f"config.json or a hub name already in the local Hugging Face cache. ({error})"
        ) from None


def model_roles(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(role, name) of the models the run names: `kd-dist cache-teacher` may run without a
    student, `kd-dist train --teacher_cache` without a teacher."""
    named = (("teacher", cfg.teacher_model), ("student", cfg.student_model))
    return [(role, name) for role, name in named if name]


def check_task_type(config: PretrainedConfig, role: str, name: str, task_type: str) -> None:
    """Refuse a causal model run as seq2seq and the other way round, naming the right flag."""
    is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if is_seq2seq and task_type == "causal":
        raise ConfigError(
            f"--{role}_model {name!r} is an encoder-decoder ({config.model_type}) model but "
            "--task_type is causal: pass --task_type seq2seq."
        )
    if not is_seq2seq and task_type == "seq2seq":
        raise ConfigError(
            f"--{role}_model {name!r} is a decoder-only ({config.model_type}) model but "
            "--task_type is seq2seq: pass --task_type causal."
        )


def check_vocab_covers_tokenizer(
    config: PretrainedConfig, role: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The model's output layer must have a row for every token; extra (padded) rows are fine."""
    model_vocab = config.get_text_config().vocab_size
    if model_vocab < len(tokenizer):
        raise ConfigError(
            f"The {role}'s vocabulary ({model_vocab} rows) is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens: teacher and student must share one tokenizer that both "
            "models were trained with."
        )


def position_limit(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings allow; None for models with relative
    positions, like T5, which have no such limit."""
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def check_positions(config: PretrainedConfig, role: str, name: str, cfg: TrainConfig) -> None:
    """Sequences must fit the model's position embeddings."""
    limit = position_limit(config)
    lengths = {"--max_length": cfg.max_length}
    if cfg.task_type == "seq2seq" and cfg.max_target_length is not None:
        lengths["--max_target_length"] = cfg.max_target_length
    if cfg.generates or cfg.measures_on_policy:  # a prompt and its generated completion
        if cfg.task_type == "causal":
            lengths["--max_length + --max_new_tokens"] = cfg.max_length + cfg.max_new_tokens
        else:
            lengths["--max_new_tokens"] = cfg.max_new_tokens
    for flags, length in lengths.items():
        if limit is not None and length > limit:
            raise ConfigError(
                f"{flags} {length} is longer than the {limit} positions of --{role}_model "
                f"{name!r}: pass {flags} {limit} or less."
            )


# --max_length when it is not set and the models allow more (the cap of HF's run_clm).
DEFAULT_MAX_LENGTH = 512


def resolve_lengths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the lengths the user left unset filled in (reading only the model configs).

    --max_length: min(512, the smaller position limit of the two models), HF run_clm's rule, so
    the default always fits; with --teacher_cache, the lengths its examples were cut at.
    --max_target_length (seq2seq): --max_length, as documented. The run saves the resolved
    values, so a resumed run without the flags compares equal.
    """
    if cfg.teacher_cache:
        cfg = cache_lengths(cfg)
    if cfg.max_length is None:
        limits = {
            role: position_limit(_load_config(name, role, cfg)) for role, name in model_roles(cfg)
        }
        known = {role: limit for role, limit in limits.items() if limit is not None}
        # A causal prompt and its generated completion share the positions.
        generated = cfg.task_type == "causal" and (cfg.generates or cfg.measures_on_policy)
        room = cfg.max_new_tokens if generated else 0
        length = min([DEFAULT_MAX_LENGTH, *(limit - room for limit in known.values())])
        if known:
            smallest = min(known.values())
            binding = [role for role, limit in known.items() if limit == smallest]
            whose = "models'" if len(binding) > 1 else f"{binding[0]}'s"
            less = f" less --max_new_tokens {room}" if room else ""
            why = f"min of {DEFAULT_MAX_LENGTH} and the {whose} {smallest} positions{less}"
            if length < 2:
                raise ConfigError(
                    f"--max_new_tokens {room} leaves no room for the prompts in the {whose} "
                    f"{smallest} positions: lower --max_new_tokens."
                )
        else:
            why = "the models have no position limit"
        logger.info("--max_length not set: using %d (%s).", length, why)
        cfg = replace(cfg, max_length=length)
    if cfg.task_type == "seq2seq" and cfg.max_target_length is None:
        logger.info("--max_target_length not set: using --max_length (%d).", cfg.max_length)
        cfg = replace(cfg, max_target_length=cfg.max_length)
    return cfg


def tokenizer_sources(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(role, folder or hub name) of the tokenizers a run must agree on, the student's first:
    a teacher cache's saved tokenizer stands in for a teacher that is not named."""
    sources = dict(model_roles(cfg))
    if cfg.teacher_cache and "teacher" not in sources:
        sources["teacher"] = str(Path(cfg.teacher_cache) / "tokenizer")
    return sorted(sources.items(), key=lambda source: source[0] != "student")


def load_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """The student's tokenizer, after checking the teacher's is the same; pad token ensured.
    (`kd-dist cache-teacher` without a student: the teacher's.)"""
    tokenizers = {}
    for role, name in tokenizer_sources(cfg):
        try:
            tokenizers[role] = AutoTokenizer.from_pretrained(
                name, trust_remote_code=cfg.trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"--{role}_model {name!r}: could not load its tokenizer. The folder must hold "
                f"the tokenizer files saved with the model. ({error})"
            ) from None
    student_tok = tokenizers.get("student", tokenizers["teacher"])
    teacher_tok = tokenizers.get("teacher", student_tok)
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        only_student = len(set(student_tok.get_vocab()) - set(teacher_tok.get_vocab()))
        raise ConfigError(
            "Teacher and student tokenizers differ "
            f"(teacher {len(teacher_tok)} tokens, student {len(student_tok)} tokens, "
            f"{only_student} tokens only in the student's). Token-level distillation compares "
            "the two models' distributions token by token, so both must use the same tokenizer: "
            "pick a student from the teacher's model family."
        )
    if not student_tok.chat_template and teacher_tok.chat_template:
        # An instruct teacher with a base student: chat data must be rendered the way the
        # teacher was trained, and the exported student keeps that template.
        logger.info("The student's tokenizer has no chat template: using the teacher's.")
        student_tok.chat_template = teacher_tok.chat_template
    if student_tok.pad_token is None:
        # GPT-2, Llama and others ship without a pad token; padded positions are masked out of
        # the loss and the attention, so any existing token serves.
        if student_tok.eos_token is None:
            raise ConfigError(
                f"The tokenizer of {cfg.student_model!r} has neither a pad nor an eos token: "
                "add a pad token to it (tokenizer.add_special_tokens) and save it again."
            )
        student_tok.pad_token = student_tok.eos_token
    return student_tok


def check_models(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Configuration-level checks of the models (no weights loaded)."""
    for role, name in model_roles(cfg):
        config = _load_config(name, role, cfg)
        check_task_type(config, role, name, cfg.task_type)
        check_vocab_covers_tokenizer(config, role, tokenizer)
        check_positions(config, role, name, cfg)
        check_model_features(concrete_class(cfg, config), role, name, cfg)
        if role == "student" and cfg.lora:
            check_lora(cfg, meta_model(cfg, config))
        if cfg.packing:
            check_packing(config, f"--{role}_model {name!r}")
    roles = model_roles(cfg)
    if cfg.hidden_loss_weight > 0 and len(roles) == 2:  # (cache-teacher may run no student)
        counts = {role: block_count(cfg, role, name) for role, name in roles}
        layer_pairs(cfg, counts["student"], counts["teacher"])


def block_count(cfg: TrainConfig, role: str, name: str) -> int:
    """The blocks of the model's stack that the hidden-state loss matches (``decoder_blocks``),
    counted on a model built on the meta device from its config (no weights)."""
    config = _load_config(name, role, cfg)
    blocks = decoder_blocks(meta_model(cfg, config))
    if not blocks:
        raise ConfigError(
            f"--hidden_loss_weight: kd_dist finds no stack of blocks in --{role}_model {name!r} "
            f"(a {config.model_type} model) to match hidden states at: drop --hidden_loss_weight."
        )
    return len(blocks)


def default_layer_map(student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """Every student block i, paired with the teacher block at the same relative depth:
    max(1, (i+1) * Lt // Ls) - 1, whose output ends the first (i+1)/Ls of the teacher's stack
    (rounded down), so the last block matches the last. Ls=2, Lt=4: [(0, 1), (1, 3)]."""
    return [
        (i, max(1, (i + 1) * teacher_blocks // student_blocks) - 1) for i in range(student_blocks)
    ]


def layer_pairs(
    cfg: TrainConfig, student_blocks: int, teacher_blocks: int
) -> list[tuple[int, int]]:
    """The (student block, teacher block) pairs of the hidden-state loss: --hidden_layer_map,
    checked against the models' block counts, else ``default_layer_map``."""
    if cfg.hidden_layer_map is None:
        return default_layer_map(student_blocks, teacher_blocks)
    pairs = parse_layer_map(cfg.hidden_layer_map)
    for role, index, count in [
        *(("student", s, student_blocks) for s, _ in pairs),
        *(("teacher", t, teacher_blocks) for _, t in pairs),
    ]:
        if index >= count:
            raise ConfigError(
                f"--hidden_layer_map {cfg.hidden_layer_map!r} names {role} block {index}, and "
                f"the {role}'s blocks are 0 to {count - 1}: pass blocks in that range."
            )
    return pairs


def decoder_blocks(model: PreTrainedModel) -> torch.nn.ModuleList | None:
    """The stack of blocks whose outputs the hidden-state loss matches: a causal model's, a
    seq2seq model's decoder's. It is the first ModuleList not inside another (Llama's
    model.layers, GPT-2's transformer.h, OPT's model.decoder.layers, T5's decoder.block, BART's
    model.decoder.layers; not T5's per-block sublayers nor a mixture's experts)."""
    root = model.get_decoder() if model.config.is_encoder_decoder else model
    for module in root.modules():
        if isinstance(module, torch.nn.ModuleList):
            return module
    return None


def concrete_class(cfg: TrainConfig, config: PretrainedConfig) -> type | None:
    """The class ``model_class(cfg)`` builds for ``config`` (None for remote code: unknown until
    its code is loaded)."""
    return model_class(cfg)._model_mapping.get(type(config), None)


# The class attribute saying a transformers model supports each --attn_implementation.
_ATTENTION_SUPPORT = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}


def check_model_features(model: type | None, role: str, name: str, cfg: TrainConfig) -> None:
    """The attention kernel asked for, and the student's activation checkpointing, must be
    supported by the model's class (what from_pretrained would refuse after loading)."""
    if model is None:
        return
    support = _ATTENTION_SUPPORT.get(cfg.attn_implementation)
    if support is not None and not getattr(model, support, False):
        raise ConfigError(
            f"--attn_implementation {cfg.attn_implementation}: --{role}_model {name!r} "
            f"({model.__name__}) does not support it; pass eager, or auto to use what it "
            "supports."
        )
    if (
        role == "student"
        and cfg.gradient_checkpointing
        and not model.supports_gradient_checkpointing
    ):
        raise ConfigError(
            f"--gradient_checkpointing: --student_model {name!r} ({model.__name__}) does not "
            "support activation checkpointing; drop the flag."
        )


def precision_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype mixed precision computes in (fp32 without it)."""
    return torch.float16 if cfg.fp16 else torch.bfloat16 if cfg.bf16 else torch.float32


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype | None:
    """The dtype a model's checkpoint was saved in (config.json's ``dtype``), if it says."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def teacher_dtype(cfg: TrainConfig) -> torch.dtype:
    """--teacher_dtype as a torch dtype. auto: the run's half precision under --bf16/--fp16
    (transformers keeps a model's fp32-only modules, like T5's ``wo``, in fp32 under fp16), else
    the checkpoint's own dtype, else fp32. The teacher is frozen: no master copy, no gradients."""
    if cfg.teacher_dtype != "auto":
        return getattr(torch, cfg.teacher_dtype)
    if cfg.fp16 or cfg.bf16:
        return precision_dtype(cfg)
    saved = checkpoint_dtype(_load_config(cfg.teacher_model, "teacher", cfg))
    return saved or torch.float32


def projection_input(student_hidden: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """The student's final hidden states as the fused path projects them: in ``compute_dtype``
    (``precision_dtype``). Its final norm leaves fp32 hidden states even under autocast, where
    lm_head's matrix product would run in the mixed precision; training and evaluation both
    project through here, so evaluation measures the logits training optimises."""
    return student_hidden.to(compute_dtype)


@dataclass
class ModelPair:
    teacher: PreTrainedModel | None  # None when the run needs no teacher (--alpha 1)
    student: PreTrainedModel  # (a peft PeftModel around it under --lora_r)
    # (student block, teacher block) of the hidden-state loss; none without --hidden_loss_weight
    hidden_pairs: list[tuple[int, int]] = field(default_factory=list)


def model_class(cfg: TrainConfig) -> type:
    return AutoModelForSeq2SeqLM if cfg.task_type == "seq2seq" else AutoModelForCausalLM


def teacher_bytes(cfg: TrainConfig) -> int:
    """The teacher's weights in memory, in the dtype it loads in, without loading them (built
    on the meta device from its config)."""
    model = meta_model(cfg, _load_config(cfg.teacher_model, "teacher", cfg))
    return sum(p.numel() for p in model.parameters()) * teacher_dtype(cfg).itemsize


def meta_model(cfg: TrainConfig, config: PretrainedConfig) -> PreTrainedModel:
    """The model of ``config`` built on the meta device: its structure, no weights. (Built
    while no ZeRO-3 config is registered with transformers: under one, from_config partitions
    the model and initialises its weights, which meta tensors cannot hold.)"""
    with built_whole(), torch.device("meta"):
        return model_class(cfg).from_config(config, trust_remote_code=cfg.trust_remote_code)


def pretrained(
    model_class: type, name: str, dtype: torch.dtype, cfg: TrainConfig, quantized: bool = False
) -> PreTrainedModel:
    """``model_class.from_pretrained``, partitioned as it loads, module by module, while a ZeRO-3
    config is registered with transformers (see ``zero3_loading``); ``quantized``: in 4-bit NF4
    on this process's GPU (--load_in_4bit)."""
    options: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation != "auto":  # auto: transformers' choice, sdpa where supported
        options["attn_implementation"] = cfg.attn_implementation
    if quantized:  # (never under ZeRO-3: engine refuses that launch)
        options.update(quantization_options(cfg))
    if is_deepspeed_zero3_enabled():
        return load_partitioned(model_class, name, options)
    return from_pretrained(model_class, name, **options)


def quantization_options(cfg: TrainConfig) -> dict[str, Any]:
    """from_pretrained's options for a QLoRA student: NF4 weights with double quantization
    (the QLoRA paper's), computing in the run's precision, whole on this process's GPU."""
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=precision_dtype(cfg),
    )  # fmt: skip
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def load_models(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    loading: Callable[[str], AbstractContextManager] = lambda role: nullcontext(),
    with_teacher: bool = True,
) -> ModelPair:
    """Teacher (frozen, eval, in ``teacher_dtype``) and student (fp32 master weights, train,
    with activation checkpointing under --gradient_checkpointing).

    Call ``check_models`` first: it catches mismatches before any weights load. ``loading(role)``
    is entered around each ``from_pretrained`` ("teacher", "student"), e.g. to decide whether
    DeepSpeed ZeRO-3 partitions the model as it loads. ``with_teacher=False`` (--alpha 1) loads
    the student alone.
    """
    teacher = load_teacher(cfg, tokenizer, loading) if with_teacher else None
    with loading("student"):
        student = pretrained(
            model_class(cfg), cfg.student_model, torch.float32, cfg, quantized=cfg.load_in_4bit
        )
    student.train()
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(student)
    set_pad_token(student, tokenizer)
    if cfg.lora:  # its weights frozen, LoRA adapters trained (a PeftModel around it)
        student = with_adapters(student, cfg)
    # After the adapters: peft would freeze the projections, which train with them.
    pairs = []
    if cfg.hidden_loss_weight > 0 and teacher is not None:
        pairs = layer_pairs(cfg, len(decoder_blocks(student)), len(decoder_blocks(teacher)))
        attach_hidden_projections(student, teacher, len(pairs), cfg.seed)
    return ModelPair(teacher=teacher, student=student, hidden_pairs=pairs)


# The student's submodule holding the hidden-state loss's projections: as part of the student,
# DDP, DeepSpeed (ZeRO-3 partitions it), the optimizer and the checkpoints include it; the
# export leaves it out (``without_hidden_projections``).
HIDDEN_PROJECTIONS = "kd_hidden_projections"


def attach_hidden_projections(
    student: PreTrainedModel, teacher: PreTrainedModel, count: int, seed: int
) -> None:
    """Give the student ``count`` learned projections from its width to the teacher's, one per
    matched block pair (Linear without bias, weight [Ht, Hs]), when the widths differ; none when
    they are equal. Initialised as torch's Linear is, from a generator of ``seed``: the same on
    every rank, and the global RNG (dropout's) is not drawn from."""
    student_width = student.config.get_text_config().hidden_size
    teacher_width = teacher.config.get_text_config().hidden_size
    if student_width == teacher_width:
        return
    generator = torch.Generator().manual_seed(seed)
    projections = torch.nn.ModuleList()
    for _ in range(count):
        layer = torch.nn.Linear(student_width, teacher_width, bias=False, device="meta")
        layer.to_empty(device="cpu")
        torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        projections.append(layer)
    student.add_module(HIDDEN_PROJECTIONS, projections)


def hidden_projections(student: torch.nn.Module, count: int) -> list[torch.nn.Linear | None]:
    """The student's projection of each of ``count`` matched block pairs (None: equal widths)."""
    projections = getattr(student, HIDDEN_PROJECTIONS, None)
    return [None] * count if projections is None else list(projections)


@contextlib.contextmanager
def without_hidden_projections(student: torch.nn.Module) -> Iterator[None]:
    """The student without its hidden-state projections for a while (its export: an ordinary
    Hugging Face model)."""
    projections = student._modules.pop(HIDDEN_PROJECTIONS, None)
    try:
        yield
    finally:
        if projections is not None:
            student._modules[HIDDEN_PROJECTIONS] = projections


def is_hidden_projection_key(key: str) -> bool:
    """Whether a student state-dict key belongs to the hidden-state projections."""
    return key.split(".", 1)[0] == HIDDEN_PROJECTIONS


def load_teacher(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    loading: Callable[[str], AbstractContextManager] = lambda role: nullcontext(),
) -> PreTrainedModel:
    """The teacher, frozen, in eval mode and in ``teacher_dtype``: it only runs forward, so it
    is stored in half precision where the run allows (the student keeps fp32 weights and mixed
    precision autocasts its forward)."""
    with loading("teacher"):
        teacher = pretrained(model_class(cfg), cfg.teacher_model, teacher_dtype(cfg), cfg)
    teacher.eval()
    teacher.requires_grad_(False)
    set_pad_token(teacher, tokenizer)
    return teacher


def set_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokenizer's pad token where the model's config (or generation config) names none."""
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them
    (--gradient_checkpointing). Non-reentrant: it works with inputs that need no gradient (token
    ids), with ZeRO-3's hooks and DDP, and it restores the RNG state, so the replay draws the
    same dropout masks."""
    model.activation_checkpointing_enable({"use_reentrant": False})


def stop_at_end_of_turn(model: PreTrainedModel, end_of_turn_id: int | None) -> None:
    """Make ``model.generate`` stop at the chat template's end-of-turn token as well as at the
    model's own eos: a base student trained on an instruct template (Llama-3's ``<|eot_id|>``)
    would otherwise talk past the end of its answer. A list of both, as Llama-3-Instruct ships.
    """
    generation = model.generation_config
    if end_of_turn_id is None or generation is None:
        return
    eos = generation.eos_token_id
    stops = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if end_of_turn_id not in stops:
        generation.eos_token_id = [*stops, end_of_turn_id]
        logger.info(
            "Generation stops at eos_token_id %s (the chat template's end of turn added).",
            generation.eos_token_id,
        )


def decoder_inputs_from_labels(labels: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    """seq2seq decoder inputs: labels shifted right behind the decoder start token.

    [B, T] -> [B, T]; masked (-100) label positions become the pad token, as T5 and BART expect.
    """
    start = config.decoder_start_token_id
    if start is None:
        raise ConfigError(
            f"The {config.model_type} model config has no decoder_start_token_id, which seq2seq "
            "training needs: set it in the model's config.json."
        )
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, config.pad_token_id)


@dataclass(frozen=True)
class _HeadRule:
    """What a model family does around its output projection, beyond ``hidden @ W.T + b``.

    Anything applied *before* the projection (T5 scaling the decoder output by d_model**-0.5
    when its embeddings are tied, OPT's project_out, final norms) is already in the hidden states
    captured at the projection's input, so only what comes after needs a rule.
    """

    softcap: str | None = None  # config attribute: logits = cap * tanh(logits / cap)
    scale: str | None = None  # config attribute: logits *= scale
    inverse_scale: str | None = None  # config attribute: logits /= value (Granite)
    extra_bias: str | None = None  # model buffer added to the logits (BART's final_logits_bias)


# Model types whose logits the fused loss can reproduce from hidden states exactly.
_PLAIN_HEADS = (
    "gpt2 gpt_neox opt llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe phi phi3 falcon "
    "gemma t5 mt5 umt5"
).split()
FUSED_HEAD_RULES: dict[str, _HeadRule] = {
    **dict.fromkeys(_PLAIN_HEADS, _HeadRule()),
    "gemma2": _HeadRule(softcap="final_logit_softcapping"),
    "gemma3_text": _HeadRule(softcap="final_logit_softcapping"),
    "cohere": _HeadRule(scale="logit_scale"),
    "cohere2": _HeadRule(scale="logit_scale"),
    "granite": _HeadRule(inverse_scale="logits_scaling"),
    "bart": _HeadRule(extra_bias="final_logits_bias"),
    "mbart": _HeadRule(extra_bias="final_logits_bias"),
}


def output_projection(model: PreTrainedModel) -> torch.nn.Module:
    """The module that projects to the vocabulary: the model's output embeddings, or, where peft
    trains a copy of them (--lora_modules_to_save lm_head: a ModulesToSaveWrapper), the copy
    the model runs. A PeftModel passes these calls on to the model it wraps."""
    projection = model.get_output_embeddings()
    copies = getattr(projection, "modules_to_save", None)
    if copies is not None and not projection.disable_adapters:
        return copies[projection.active_adapters[0]]
    return projection


def output_head(model: PreTrainedModel) -> OutputHead | None:
    """The model's output projection as the fused loss needs it, or None for an unknown family."""
    rule = FUSED_HEAD_RULES.get(model.config.model_type)
    projection = output_projection(model)
    if rule is None or not isinstance(projection, torch.nn.Linear):
        return None
    config = model.config.get_text_config()
    bias = projection.bias
    if rule.extra_bias is not None:
        extra = getattr(model, rule.extra_bias).view(-1)
        bias = extra if bias is None else bias + extra
    scale = getattr(config, rule.scale, None) if rule.scale else None
    if rule.inverse_scale and getattr(config, rule.inverse_scale, None):
        scale = 1.0 / getattr(config, rule.inverse_scale)
    softcap = getattr(config, rule.softcap, None) if rule.softcap else None
    transform = LogitTransform(scale=float(scale or 1.0), softcap=softcap)
    return OutputHead(projection.weight, bias, transform)


class _InputCapture(torch.nn.Module):
    """Stands in for a model's output projection in ``forward_hidden``: it keeps its input and
    returns empty logits [..., 0, V], so what the model does to its logits afterwards (soft-
    capping, a final bias) runs on nothing. It holds no parameters and no hooks."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.captured: list[torch.Tensor] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [B, 0, V]
        self.captured.append(hidden)
        return hidden.new_empty(*hidden.shape[:-2], 0, self.out_features)


def forward_hidden(
    model: torch.nn.Module,
    module: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    task_type: str,
) -> torch.Tensor:
    """The final hidden states the output projection would see: [B, L, H] (or [B, T, H]).

    ``model`` is what to call (possibly DDP/DeepSpeed-wrapped), ``module`` the model inside. Its
    output projection is swapped for an ``_InputCapture`` for the call, so the model runs its
    own code (T5's scaling before lm_head included) but never projects to the vocabulary, and
    the projection module never runs: ZeRO-3 does not gather its weight for the forward (the
    loss gathers it once, see ``trainer.make_micro_step``). Tied embeddings stay tied: only the
    module attribute is swapped, the shared parameter is untouched; backward (and activation
    checkpointing's recomputation of the layers) never re-enters the projection.
    """
    projection = module.get_output_embeddings()
    capture = _InputCapture(output_projection(module).out_features)
    module.set_output_embeddings(capture)
    try:
        _forward(model, module, batch, task_type)
    finally:
        module.set_output_embeddings(projection)
    return capture.captured[0]


@dataclass
class Forward:
    """A model's outputs of a batch, per position (what ``valid_rows`` selects rows of)."""

    # [B, L, H] final hidden states (fused), [B, L, V] logits, or a teacher cache's top-k rows
    outputs: torch.Tensor | TopKTeacher
    blocks: list[torch.Tensor]  # [B, L, H] outputs of the blocks asked for, in their order


def forward_outputs(
    model: torch.nn.Module,
    module: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    task_type: str,
    fused: bool,
    blocks: Sequence[int] = (),
) -> Forward:
    """``forward_hidden`` (fused) or ``forward_logits``, and from the same forward the outputs
    of ``decoder_blocks(module)[i]`` for i in ``blocks`` (the hidden-state loss's)."""
    forward = forward_hidden if fused else forward_logits
    with block_outputs(module, blocks) as states:
        outputs = forward(model, module, batch, task_type)
    return Forward(outputs, states)


@contextlib.contextmanager
def block_outputs(module: PreTrainedModel, indices: Sequence[int]) -> Iterator[list[torch.Tensor]]:
    """Keep the outputs ([B, L, H]) of the blocks ``decoder_blocks(module)[i]``, i in
    ``indices``, of the forward run inside; the list yielded holds them, in ``indices`` order,
    once it ends. Forward hooks on those blocks only (not every layer's states, as
    output_hidden_states would keep), removed as the forward ends: a backward's recomputation
    (activation checkpointing) and later forwards (generation, evaluation) keep nothing."""
    states: list[torch.Tensor] = []
    captured: dict[int, torch.Tensor] = {}

    def keep(index: int) -> Callable:
        def hook(block, args, output) -> None:  # T5's blocks return a tuple, the others a tensor
            captured[index] = output[0] if isinstance(output, tuple) else output

        return hook

    blocks = decoder_blocks(module) if indices else []
    handles = [blocks[index].register_forward_hook(keep(index)) for index in set(indices)]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()
    states.extend(captured[index] for index in indices)


def forward_logits(
    model: torch.nn.Module, module: PreTrainedModel, batch: dict[str, torch.Tensor], task_type: str
) -> torch.Tensor:
    """The model's logits for a collated batch: [B, L, V] (causal) or [B, T, V] (seq2seq).

    Labels are not passed to the model, so it does not compute its own full-vocabulary loss.
    """
    return _forward(model, module, batch, task_type).logits


def _forward(model, module, batch, task_type):
    if "position_ids" in batch:  # --packing: several documents per row
        attention = packed_inputs(module, batch["position_ids"])
    else:
        attention = {"attention_mask": batch["attention_mask"]}
    inputs = {"input_ids": batch["input_ids"], **attention}
    if task_type == "seq2seq":
        inputs["decoder_input_ids"] = decoder_inputs(module, batch["labels"])
    return model(**inputs, use_cache=False)


# Families whose forward, given position_ids and no attention_mask, keeps packed documents apart
# by itself: they hand position_ids to transformers' mask functions (masking_utils, which finds
# the documents where the positions restart), sliding-window layers included (transformers 5).
_PACKED_FROM_POSITIONS = (
    "llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe gemma gemma2 gemma3_text cohere "
    "cohere2 granite phi phi3 gpt2 gpt_neox falcon starcoder2 olmo olmo2 stablelm"
).split()
# Families that take position_ids but build their mask without them (OPT): they are given the
# mask transformers builds for packed documents, as a 4D mask, which they use as it is.
_PACKED_MASK_GIVEN = ("opt",)


def check_packing(config: PretrainedConfig, which: str) -> None:
    """--packing needs a model family whose attention can be kept within each document;
    ``which`` names the model in the error (e.g. "--student_model 'path'")."""
    if config.model_type not in (*_PACKED_FROM_POSITIONS, *_PACKED_MASK_GIVEN):
        raise ConfigError(
            f"--packing: {which} is a {config.model_type} model, and kd_dist "
            "does not know how to keep packed documents from attending to each other in it "
            f"(it knows {', '.join(sorted((*_PACKED_FROM_POSITIONS, *_PACKED_MASK_GIVEN)))}): "
            "drop --packing (--group_by_length also cuts padding)."
        )


def packed_inputs(module: PreTrainedModel, position_ids: torch.Tensor) -> dict[str, Any]:
    """The forward's attention inputs for packed rows ([B, L] ``position_ids``, restarting at 0
    with every document) that keep each document's attention to itself."""
    config = module.config
    check_packing(config, f"the model {config.name_or_path!r}")
    if config._attn_implementation.startswith("flash_attention"):
        # The variable-length kernel, over every row's documents: transformers infers their
        # bounds from position_ids only for a single (flattened) row, so they are passed.
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
        return dict(
            position_ids=position_ids, attention_mask=None, cu_seq_lens_q=cu_q,
            cu_seq_lens_k=cu_k, max_length_q=max_q, max_length_k=max_k,
        )  # fmt: skip
    if config.model_type in _PACKED_MASK_GIVEN:
        # masking_utils reads only the shape, dtype and device of the embeddings: [B, L, 0].
        embeds = position_ids.new_empty((*position_ids.shape, 0), dtype=module.dtype)
        mask = create_causal_mask(
            config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
            position_ids=position_ids,
        )  # fmt: skip
        return dict(position_ids=position_ids, attention_mask=mask)
    return dict(position_ids=position_ids, attention_mask=None)  # _PACKED_FROM_POSITIONS


def decoder_inputs(module: PreTrainedModel, labels: torch.Tensor) -> torch.Tensor:
    """seq2seq decoder inputs, built the model's own way where it has one (mBART, for one,
    starts the decoder with the target's language id rather than a fixed start token)."""
    if hasattr(module, "prepare_decoder_input_ids_from_labels"):
        return module.prepare_decoder_input_ids_from_labels(labels=labels)
    return decoder_inputs_from_labels(labels, module.config)
