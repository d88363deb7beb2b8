"""LoRA and QLoRA students through peft (an optional extra: ``pip install 'kd_dist[peft]'``).

The student's own weights stay frozen; peft adds low-rank adapters to the linear layers named by
--lora_target_modules (default: every linear layer of the blocks, the output layer excluded) and
only they, with any --lora_modules_to_save, are trained. peft and bitsandbytes are imported
here only, when a run asks for LoRA, so the package imports and trains full students without
them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from deepspeed.runtime.zero import GatheredParameters
from transformers import PreTrainedModel

from kd_dist.config import ConfigError, TrainConfig, split_names
from kd_dist.zero3_loading import built_whole, from_pretrained

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

ADAPTER_CONFIG = "adapter_config.json"  # what marks a folder as a peft adapter


def lora_config(cfg: TrainConfig) -> LoraConfig:
    """peft's LoraConfig for --lora_* (the task type from --task_type)."""
    from peft import LoraConfig, TaskType

    targets = split_names(cfg.lora_target_modules)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=split_names(cfg.lora_modules_to_save) or None,
        task_type=TaskType.SEQ_2_SEQ_LM if cfg.task_type == "seq2seq" else TaskType.CAUSAL_LM,
    )


def with_adapters(student: PreTrainedModel, cfg: TrainConfig) -> PeftModel:
    """``student`` frozen, with trainable LoRA adapters (a PeftModel around it). Under ZeRO-3 the
    adapters are plain tensors beside the partitioned weights: DeepSpeed partitions them when it
    builds its engine (``accelerator.prepare``)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit:
        # Norms and other unquantized weights in fp32; checkpointing is enabled by load_models.
        student = prepare_model_for_kbit_training(student, use_gradient_checkpointing=False)
    # The adapters' random start (peft's Kaiming lora_A) from --seed alone: the same on one
    # process and on every rank, however the student was loaded (ZeRO-3's partitioned loading
    # draws other random numbers than from_pretrained), and the run's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            model = get_peft_model(student, lora_config(cfg))
        except ValueError as error:  # e.g. target modules the model does not have
            raise ConfigError(
                f"--lora_target_modules {cfg.lora_target_modules!r}: {error}"
            ) from None
    # (get_peft_model takes the model's name_or_path; an export names the student's folder.)
    model.peft_config["default"].base_model_name_or_path = base_name(cfg)
    return model


def base_name(cfg: TrainConfig) -> str:
    """What an adapter names as its base: --student_model, a local folder as an absolute path
    (the adapter then loads from any working directory)."""
    path = Path(cfg.student_model)
    return str(path.resolve()) if path.is_dir() else cfg.student_model


def check_lora(cfg: TrainConfig, student: PreTrainedModel) -> None:
    """The adapters fit the student, checked by adding them (in place) to ``student``, its
    weightless copy built on the meta device (before any weights load): the target modules
    exist, every --lora_modules_to_save name matches a module, and none of those is an input or
    output embedding tied to the other (training a copy of one would untie them)."""
    from peft.utils import ModulesToSaveWrapper

    # Their weights: a model may tie them to further modules (T5's embed_tokens of each stack).
    layers = (student.get_input_embeddings(), student.get_output_embeddings())
    embeddings = [layer.weight for layer in layers if layer is not None]
    tied = getattr(student.config.get_text_config(), "tie_word_embeddings", False)
    names = sorted({name.rsplit(".", 1)[-1] for name, _ in student.named_modules()} - {""})
    with built_whole(), torch.device("meta"):
        with_adapters(student, cfg)  # (peft wraps the student's modules in place)
    # peft copies every module whose full name ends with a given name, at each place it is.
    copies = {name: module for name, module in student.named_modules(remove_duplicate=False)
              if isinstance(module, ModulesToSaveWrapper)}  # fmt: skip
    saved = split_names(cfg.lora_modules_to_save)
    missing = [name for name in saved if not any(full.endswith(name) for full in copies)]
    if missing:
        raise ConfigError(
            f"--lora_modules_to_save {','.join(missing)}: the student has no such module; its "
            f"modules are named: {', '.join(name for name in names if not name.isdigit())}."
        )
    untied = [name for name, wrapper in copies.items()
              if any(getattr(wrapper.original_module, "weight", None) is weight
                     for weight in embeddings)]  # fmt: skip
    if tied and untied:
        raise ConfigError(
            f"--lora_modules_to_save {cfg.lora_modules_to_save} (copies {', '.join(untied)}): the "
            "student ties its output layer to its input embeddings, and training a copy of one "
            "would untie them: drop it (the embeddings stay frozen) or use a student with "
            "untied embeddings."
        )


def trained_adapter(accelerator: Any, student: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trained adapter weights (and --lora_modules_to_save modules), by peft's names, on the
    main process (None on the others). Every rank must call it: under ZeRO-3 the trained
    parameters alone are gathered (the frozen base is read back from its files on export)."""
    from peft import get_peft_model_state_dict

    model = accelerator.unwrap_model(student)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with GatheredParameters(list(trained.values())):  # (a no-op without ZeRO-3)
        if not accelerator.is_main_process:
            return None
        state_dict = {name: p.detach().to("cpu", copy=True) for name, p in trained.items()}
    return get_peft_model_state_dict(model, state_dict=state_dict)


def save_student(
    cfg: TrainConfig, trained: PeftModel, adapter: dict[str, torch.Tensor], folder: Path
) -> None:
    """Write the LoRA student into ``folder``: the adapter in peft's format (adapter_config.json
    and adapter_model.safetensors, whose base_model_name_or_path is ``base_name``), or with
    --merge_lora the merged, plain Hugging Face model (safetensors).

    It is rebuilt on this process's CPU from the student's own files and the trained
    ``adapter``: the base weights are frozen, so they are those files', and the rebuilt model
    is whole where the trained one is sharded (ZeRO-3) or quantized (--load_in_4bit: merged
    into the full-precision weights).
    """
    from peft import get_peft_model, set_peft_model_state_dict

    model_class = type(trained.get_base_model())
    with built_whole():  # by this process alone
        base = from_pretrained(
            model_class,
            cfg.student_model,
            dtype=torch.float32,
            trust_remote_code=cfg.trust_remote_code,
        )
    base.config.pad_token_id = trained.config.pad_token_id
    base.generation_config = trained.generation_config  # (its end-of-turn stop, for one)
    rebuilt = get_peft_model(base, lora_config(cfg))
    result = set_peft_model_state_dict(rebuilt, adapter)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter weights the rebuilt student lacks: {result.unexpected_keys}")
    rebuilt.peft_config["default"].base_model_name_or_path = base_name(cfg)
    if cfg.merge_lora:
        rebuilt.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    else:
        rebuilt.save_pretrained(folder, safe_serialization=True)
        (folder / "README.md").unlink(missing_ok=True)  # peft's empty model card template


def adapter_base(folder: str) -> str | None:
    """The student a peft adapter folder was trained from (its base_model_name_or_path), or
    None when ``folder`` is not an adapter (what a LoRA run exports without --merge_lora)."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(
            f"{folder} is a LoRA adapter, which needs the peft package: pip install "
            "'kd_dist[peft]'."
        )
    return json.loads(path.read_text())["base_model_name_or_path"]


def merged_adapter(student: PreTrainedModel, folder: str) -> PreTrainedModel:
    """``student`` (the adapter's base) with the adapter in ``folder`` merged into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(student, folder).merge_and_unload()
