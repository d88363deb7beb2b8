"""Load a pretrained model partitioned by ZeRO-3 so that no process ever holds all of it.

transformers' own ZeRO-3 loading partitions the model as it is built (zero.Init), but then reads
the *whole* checkpoint into the first process's memory before copying it in: for a 70B teacher
that is 140 GB on one process, the memory sharding exists to avoid. Here the model is built the
same way, and the checkpoint's tensors are read one module at a time: every process holds its
shards plus the one module being filled (gathered, copied on the first process, re-partitioned).

Only local safetensors checkpoints whose tensor names are the model's parameter names take this
path (what ``save_pretrained`` writes); anything else (.bin files, checkpoints transformers
renames or converts while loading) goes through ``from_pretrained``, with a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.zero import GatheredParameters
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoConfig, GenerationConfig, PreTrainedModel
from transformers.integrations import deepspeed as transformers_deepspeed

logger = logging.getLogger("kd_dist")

SAFETENSORS_INDEX = "model.safetensors.index.json"


def from_pretrained(model_class: type, name: str | Path, **options: Any) -> PreTrainedModel:
    """``model_class.from_pretrained(name, **options)`` without the Hub's kernels.

    transformers 5.25 turns ``use_kernels`` on by default: on a GPU, loading then downloads
    layers (RMSNorm, rotary embeddings, activations) from the Hub and runs them in place of the
    model's own, and on the meta device it cannot load at all ("Unsupported device type
    'meta'"). kd_dist fetches no code at run time, and the models it trains, evaluates and
    compares are the ones their configs describe, alike on every device and in train and eval
    mode (where the kernels differ). Every model kd_dist loads comes through here.
    """
    return model_class.from_pretrained(name, use_kernels=False, **options)


def checkpoint_files(name: str) -> list[Path]:
    """The safetensors files of a local folder or a hub model (fetched into the cache as
    from_pretrained would, offline under HF_HUB_OFFLINE); none when it has none."""
    folder = Path(name)
    if not folder.is_dir():
        try:
            folder = Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json"]))
        except Exception:  # not to be had: from_pretrained will say why
            return []
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def tensor_locations(files: list[Path]) -> dict[str, Path]:
    """Each tensor name of the checkpoint -> the file holding it (headers only are read)."""
    locations = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            locations.update(dict.fromkeys(handle.keys(), file))
    return locations


def read_tensor(locations: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(locations[name], framework="pt") as handle:
        return handle.get_tensor(name)


def checkpoint_names(model: torch.nn.Module, locations: dict[str, Path]) -> dict[str, str] | None:
    """For every parameter (by its first name) and persistent buffer of ``model``, the name it
    has in the checkpoint: itself or, for a tied weight, any of its other names (a tied lm_head
    is usually not saved). None when something is missing: the checkpoint is not in the form
    this loader reads."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    names = {}
    for names_of_one in aliases.values():
        stored = next((alias for alias in names_of_one if alias in locations), None)
        if stored is None:
            return None
        names[names_of_one[0]] = stored
    persistent = set(model.state_dict()) - {n for group in aliases.values() for n in group}
    for name in persistent:
        if name not in locations:
            return None
        names[name] = name
    return names


def copy_checkpoint(
    model: torch.nn.Module, locations: dict[str, Path], names: dict[str, str]
) -> None:
    """Fill a partitioned ``model`` from the checkpoint, one module at a time: its parameters are
    gathered, the first process copies the stored tensors in, and ZeRO re-partitions them as the
    gathering ends (``modifier_rank=0`` broadcasts the first process's values). Buffers are
    never partitioned: every process reads its own."""
    rank = torch.distributed.get_rank()
    for prefix, module in model.named_modules():
        full = f"{prefix}." if prefix else ""
        own = module.named_parameters(recurse=False)
        params = {full + n: p for n, p in own if full + n in names}
        if params:
            with GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
                if rank == 0:
                    for name, param in params.items():
                        param.copy_(read_tensor(locations, names[name]))
        for name, buffer in module.named_buffers(recurse=False):
            if full + name in names:
                with torch.no_grad():
                    buffer.copy_(read_tensor(locations, names[full + name]))


def on_every_process(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (a collective). Each process must take the same
    loading path, as their collectives differ; node-local caches could disagree."""
    flags = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, flag)
    return all(flags)


def load_partitioned(model_class: type, name: str, options: dict[str, Any]) -> PreTrainedModel:
    """``model_class.from_pretrained(name, **options)`` (dtype, attn_implementation,
    trust_remote_code) for a ZeRO-3 config registered with transformers (see
    engine.partitioned_loading), reading the checkpoint module by module."""
    files = checkpoint_files(name)
    config = AutoConfig.from_pretrained(name, trust_remote_code=options["trust_remote_code"])
    if on_every_process(bool(files)):
        # Built under zero.Init: each module is partitioned as soon as it exists (transformers
        # initialises it gathered, one module at a time, before the checkpoint overwrites it).
        model = model_class.from_config(config, **options)
        locations = tensor_locations(files)
        names = checkpoint_names(model, locations)
        if on_every_process(names is not None):
            copy_checkpoint(model, locations, names)
            if (files[0].parent / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(files[0].parent)
            return model
        del model
    logger.warning(
        "%s: its checkpoint is not a set of safetensors files named like the model's "
        "parameters, so transformers loads it, holding the whole checkpoint in the first "
        "process's memory while it is partitioned.",
        name,
    )
    return from_pretrained(model_class, name, **options)


@contextmanager
def built_whole() -> Iterator[None]:
    """Models built inside are whole: the ZeRO-3 config registered with transformers, which
    partitions every model it builds (collectively, on every process), is set aside meanwhile.
    For models one process builds alone (the exported student) or that hold no weights (on the
    meta device)."""
    registered = transformers_deepspeed._hf_deepspeed_config_weak_ref
    transformers_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if registered is not None and registered() is not None:
            transformers_deepspeed.set_hf_deepspeed_config(registered())
