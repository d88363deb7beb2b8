"""``kd-dist make-student``: cut a student from the teacher by keeping some of its layers.

The student is the teacher with fewer blocks (DistilBERT's initialisation; the depth half of
Minitron): the embeddings, the final norm, the output layer (tied or untied, as the teacher's)
and the chosen blocks are copied unchanged, block ``kept[j]`` of the teacher becoming block ``j``
of the student. The teacher is never built: its config is read and edited (layer counts and the
per-layer settings), and its safetensors files are read one tensor at a time (``safe_open``),
so a 70B teacher costs the memory of one shard of the student. The tensors keep the names and
dtypes they have in the teacher's files, only the block numbers change, so the student loads
with ``from_pretrained`` exactly as the teacher does (legacy names and conversions included);
that load is then checked on the meta device, where it reads no weights: no student tensor may
be missing or unused.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
)
from transformers.utils import logging as hf_logging

from kd_dist.config import ConfigError
from kd_dist.zero3_loading import (
    SAFETENSORS_INDEX,
    checkpoint_files,
    from_pretrained,
    tensor_locations,
)


@dataclass(frozen=True)
class Stack:
    """One stack of blocks: block i's tensors are named ``f"{prefix}.{i}.<rest>"`` and the config
    attribute ``count`` holds how many there are. ``first_block_only`` names tensors (by their
    ``<rest>``) that only block 0 holds but the whole stack uses: T5's relative attention bias,
    computed by the first block and passed on to the others."""

    prefix: str
    count: str
    first_block_only: tuple[str, ...] = ()


_DECODER = (Stack("model.layers", "num_hidden_layers"),)
_T5_BIAS = ("layer.0.SelfAttention.relative_attention_bias.weight",)
_T5 = (
    Stack("encoder.block", "num_layers", _T5_BIAS),
    Stack("decoder.block", "num_decoder_layers", _T5_BIAS),
)
_BART = (
    Stack("model.encoder.layers", "encoder_layers"),
    Stack("model.decoder.layers", "decoder_layers"),
)
_DECODER_FAMILIES = (
    "llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe phi phi3 gemma gemma2 gemma3_text "
    "cohere cohere2 granite"
).split()

# The families make-student can cut (those the fused loss knows, models.FUSED_HEAD_RULES): their
# stacks, a seq2seq model's encoder first.
STACKS: dict[str, tuple[Stack, ...]] = {
    **dict.fromkeys(_DECODER_FAMILIES, _DECODER),
    "gpt2": (Stack("transformer.h", "n_layer"),),
    "falcon": (Stack("transformer.h", "num_hidden_layers"),),
    "gpt_neox": (Stack("gpt_neox.layers", "num_hidden_layers"),),
    "opt": (Stack("model.decoder.layers", "num_hidden_layers"),),
    "t5": _T5,
    "mt5": _T5,
    # UMT5's blocks each hold their own relative attention bias.
    "umt5": (Stack("encoder.block", "num_layers"), Stack("decoder.block", "num_decoder_layers")),
    "bart": _BART,
    "mbart": _BART,
}

# The teacher's files make-student copies besides the weights and config.json: the tokenizer,
# its chat template, the generation settings, and the licence the weights come with.
KEPT_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                      "merges.txt", "*.model", "*.tiktoken", "chat_template.*",
                      "generation_config.json", "LICENSE*", "NOTICE*")  # fmt: skip

# Student weight files hold at most this many bytes each (save_pretrained's default shard size).
MAX_SHARD_BYTES = 5 * 1024**3


# The flags of each stack's LayerChoice (the whole model's or the encoder's; a seq2seq decoder's).
LAYER_FLAGS = ("--num_layers", "--layers")
DECODER_LAYER_FLAGS = ("--num_decoder_layers", "--decoder_layers")


@dataclass(frozen=True)
class LayerChoice:
    """What the user asked for one stack: a count (evenly spaced) or explicit indices."""

    num_layers: int | None
    layers: str | None  # "0,3,6" as typed
    flags: tuple[str, str]  # the two flags' names, for the messages


def parse_indices(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: pass comma-separated layer indices, e.g. {flag} 0,3,6."
        ) from None


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` of ``total`` layers, evenly spaced, the first and last included:
    round(i * (total - 1) / (count - 1)), rounding halves up, in integers. The step is at least
    one, so the indices are distinct."""
    if count == 1:
        return [0]
    return [(2 * i * (total - 1) + count - 1) // (2 * (count - 1)) for i in range(count)]


def select_layers(choice: LayerChoice, total: int, scope: str) -> list[int]:
    """The teacher layers to keep, increasing, checked against the ``total`` the stack has;
    ``scope`` names the stack in the messages ("the teacher", "the teacher's decoder")."""
    count_flag, list_flag = choice.flags
    if (choice.num_layers is None) == (choice.layers is None):
        raise ConfigError(
            f"Pass exactly one of {count_flag} N (N evenly spaced layers, the first and last "
            f"kept) and {list_flag} 0,3,6,... (those layers), to cut {scope}."
        )
    if choice.num_layers is not None:
        if not 1 <= choice.num_layers <= total:
            raise ConfigError(
                f"{count_flag} {choice.num_layers}: {scope} has {total} layers; pass a "
                f"number from 1 to {total}."
            )
        return evenly_spaced(total, choice.num_layers)
    indices = parse_indices(choice.layers, list_flag)
    outside = [i for i in indices if not 0 <= i < total]
    if outside:
        raise ConfigError(
            f"{list_flag}: layer(s) {outside} do not exist; {scope} has layers 0 to {total - 1}."
        )
    if len(set(indices)) != len(indices):
        raise ConfigError(f"{list_flag} {choice.layers}: a layer is named twice; name each once.")
    if indices != sorted(indices):
        raise ConfigError(
            f"{list_flag} {choice.layers}: list the layers in increasing order (the student keeps "
            "the teacher's order)."
        )
    return indices


def stacks_of(config: PretrainedConfig, teacher: str) -> tuple[Stack, ...]:
    stacks = STACKS.get(config.model_type)
    if stacks is None:
        raise ConfigError(
            f"--teacher_model {teacher!r} is a {config.model_type!r} model, whose layers "
            f"make-student cannot cut; it cuts: {', '.join(sorted(STACKS))}."
        )
    return stacks


def plan_layers(
    config: PretrainedConfig, teacher: str, encoder: LayerChoice, decoder: LayerChoice
) -> list[tuple[Stack, list[int]]]:
    """Each stack of the teacher with the layers to keep. A seq2seq model's decoder takes the
    decoder flags when given, else the same flags as its encoder."""
    stacks = stacks_of(config, teacher)
    decoder_given = decoder.num_layers is not None or decoder.layers is not None
    if len(stacks) == 1 and decoder_given:
        raise ConfigError(
            f"{' / '.join(decoder.flags)} cut the decoder of an encoder-decoder model; "
            f"--teacher_model {teacher!r} ({config.model_type}) has one stack: use "
            f"{' / '.join(encoder.flags)}."
        )
    if len(stacks) == 1:
        (stack,) = stacks
        return [(stack, select_layers(encoder, getattr(config, stack.count), "the teacher"))]
    encoder_stack, decoder_stack = stacks
    decoder_total = getattr(config, decoder_stack.count)
    return [
        (
            encoder_stack,
            select_layers(encoder, getattr(config, encoder_stack.count), "the teacher's encoder"),
        ),
        (
            decoder_stack,
            select_layers(
                decoder if decoder_given else encoder, decoder_total, "the teacher's decoder"
            ),
        ),
    ]


def _is_sparse(config: PretrainedConfig, layer: int) -> bool:
    """Whether Qwen-MoE's layer ``layer`` has a mixture of experts (the rule of its modeling;
    attributes read from the config object, which resolves their aliases: num_experts is
    stored as num_local_experts)."""
    return (
        layer not in config.mlp_only_layers
        and getattr(config, "num_experts", 0) > 0
        and (layer + 1) % getattr(config, "decoder_sparse_step", 1) == 0
    )


def per_layer_settings(config: PretrainedConfig, kept: list[int]) -> dict[str, Any]:
    """The config entries that describe each layer, for the kept layers of a decoder-only model:
    attention types (sliding or full: Qwen2/3, Gemma2/3, Cohere2...), Qwen's count of bottom
    layers with full attention, and which of Qwen-MoE's layers have experts."""
    settings: dict[str, Any] = {}
    if getattr(config, "layer_types", None) is not None:
        settings["layer_types"] = [config.layer_types[i] for i in kept]
    if getattr(config, "max_window_layers", None) is not None:
        settings["max_window_layers"] = sum(i < config.max_window_layers for i in kept)
    if getattr(config, "mlp_only_layers", None) is not None:
        # Listed explicitly: the sparse step counts layer numbers, which the cut changes.
        settings["mlp_only_layers"] = [j for j, i in enumerate(kept) if not _is_sparse(config, i)]
        settings["decoder_sparse_step"] = 1
    return settings


def student_config(
    config: PretrainedConfig, plan: list[tuple[Stack, list[int]]]
) -> PretrainedConfig:
    """The teacher's config with the student's layer counts and per-layer settings, rebuilt
    through its class, so that its own checks (layer_types' length...) run."""
    values = config.to_dict()
    for stack, kept in plan:
        values[stack.count] = len(kept)
    if len(plan) == 1:
        values.update(per_layer_settings(config, plan[0][1]))
    return type(config).from_dict(values)


def _stack_prefixes(stack: Stack) -> tuple[str, ...]:
    # Some hub checkpoints name tensors without the base model's prefix: GPT-2's "h.0...",
    # OPT's "decoder.layers.0...".
    _, _, rest = stack.prefix.partition(".")
    return (stack.prefix, rest) if rest else (stack.prefix,)


def student_name(name: str, plan: list[tuple[Stack, list[int]]]) -> str | None:
    """The student's name for the teacher tensor ``name``, or None when it is not copied (a
    dropped layer's). Outside the stacks, names are kept 1:1."""
    for stack, kept in plan:
        for prefix in _stack_prefixes(stack):
            match = re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.(.+)", name)
            if match is None:
                continue
            layer, rest = int(match.group(1)), match.group(2)
            if layer in kept:
                return f"{prefix}.{kept.index(layer)}.{rest}"
            if layer == 0 and rest in stack.first_block_only:
                return f"{prefix}.0.{rest}"  # the stack's shared tensor, to the new block 0
            return None
    return name


def name_map(teacher_names: Sequence[str], plan: list[tuple[Stack, list[int]]]) -> dict[str, str]:
    """Student name -> teacher name, for every tensor the student gets."""
    mapping = {}
    for name in teacher_names:
        new = student_name(name, plan)
        if new is not None:
            mapping[new] = name
    return mapping


def teacher_folder(teacher: str) -> Path:
    """A local folder holding the teacher's files: the path itself, or the hub model's snapshot
    (from the local cache under HF_HUB_OFFLINE)."""
    if Path(teacher).is_dir():
        return Path(teacher)
    patterns = ["*.json", "*.safetensors", *KEPT_FILE_PATTERNS]
    try:
        return Path(snapshot_download(teacher, allow_patterns=patterns))
    except Exception as error:  # any failure means: not to be had here
        raise ConfigError(
            f"--teacher_model {teacher!r}: not a folder, and no hub model of that name could be "
            f"fetched ({error}). Pass a local model folder."
        ) from None


def check_output_dir(output_dir: Path) -> None:
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir())):
        raise ConfigError(
            f"--output_dir {output_dir} already exists and is not empty: pass a new or empty "
            "folder for the student."
        )


def shards(names: list[str], sizes: dict[str, int]) -> list[list[str]]:
    """``names`` in order, grouped into shards of at most MAX_SHARD_BYTES (a larger tensor
    gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    filled = 0
    for name in names:
        if groups[-1] and filled + sizes[name] > MAX_SHARD_BYTES:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += sizes[name]
    return groups


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                "BF16": 2, "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1,
                "BOOL": 1}  # fmt: skip


def tensor_sizes(locations: dict[str, Path]) -> dict[str, tuple[int, int]]:
    """Each tensor's (elements, bytes), from the files' headers."""
    sizes = {}
    for file in set(locations.values()):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = handle.get_slice(name)
                elements = int(torch.Size(piece.get_shape()).numel())
                # Unlisted (sub-byte) dtypes count one byte: sizes only group the shards.
                itemsize = _DTYPE_BYTES.get(piece.get_dtype(), 1)
                sizes[name] = (elements, elements * itemsize)
    return sizes


def read_tensors(
    locations: dict[str, Path], mapping: dict[str, str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(student name, tensor as stored) for ``mapping``'s tensors, each file opened once."""
    by_file: dict[Path, list[str]] = {}
    for new in mapping:
        by_file.setdefault(locations[mapping[new]], []).append(new)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for new in names:
                yield new, handle.get_tensor(mapping[new])


def write_weights(
    output_dir: Path, locations: dict[str, Path], mapping: dict[str, str], sizes: dict[str, int]
) -> None:
    """The student's safetensors files: one model.safetensors, or shards and their index as
    save_pretrained names them. One shard's tensors are in memory at a time."""
    groups = shards(sorted(mapping), {new: sizes[mapping[new]] for new in mapping})
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file = (
            "model.safetensors"
            if len(groups) == 1
            else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        )
        tensors = dict(read_tensors(locations, {new: mapping[new] for new in group}))
        save_file(tensors, output_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(sizes[mapping[new]] for new in mapping)},
            "weight_map": weight_map,
        }
        (output_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(source: Path, output_dir: Path) -> None:
    """Copy the tokenizer, chat template, generation config and licence files as they are."""
    for pattern in KEPT_FILE_PATTERNS:
        for file in source.glob(pattern):
            if file.is_file():
                shutil.copy2(file, output_dir / file.name)


def check_loads(output_dir: Path, config: PretrainedConfig) -> None:
    """from_pretrained the student on the meta device (it reads no weights): every tensor of the
    model is filled and every stored tensor is used, or the student is refused."""
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights": it loads none
    try:
        _, info = from_pretrained(auto, output_dir, device_map="meta", output_loading_info=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    problems = {key: sorted(info[key]) for key in ("missing_keys", "unexpected_keys",
                                                   "mismatched_keys") if info[key]}  # fmt: skip
    if problems:
        raise ConfigError(
            f"The student written to {output_dir} does not load cleanly ({problems}): this "
            f"{config.model_type} checkpoint's layout is not one make-student knows how to cut."
        )


@dataclass(frozen=True)
class StudentSummary:
    output_dir: Path
    kept: dict[str, list[int]]  # stack ("layers", "encoder", "decoder") -> kept teacher layers
    teacher_layers: dict[str, int]
    teacher_parameters: int  # stored tensor elements
    student_parameters: int

    def hidden_layer_map(self) -> str:
        """The --hidden_layer_map pairing each student block with the teacher block it was
        copied from, "0:0,1:3,...": in the stack the hidden-state loss matches (the last: a
        seq2seq model's decoder). The default map pairs blocks by relative depth, which for
        a cut student is mostly another teacher block (10 of 30: 7 of 10 pairs)."""
        kept = list(self.kept.values())[-1]
        return ",".join(f"{student}:{teacher}" for student, teacher in enumerate(kept))

    def describe(self) -> str:
        lines = [f"Student written to {self.output_dir}"]
        for stack, kept in self.kept.items():
            lines.append(
                f"  {stack}: kept {len(kept)} of {self.teacher_layers[stack]}: "
                f"{', '.join(map(str, kept))}"
            )
        share = self.student_parameters / self.teacher_parameters
        lines.append(
            f"  parameters: teacher {self.teacher_parameters:,}, student "
            f"{self.student_parameters:,} ({share:.0%})"
        )
        lines += [
            f"  hidden-state loss: --hidden_layer_map {self.hidden_layer_map()}",
            "    (each student block and the teacher block it was copied from; pass it with "
            "--hidden_loss_weight)",
        ]
        return "\n".join(lines)


def make_student(
    teacher: str,
    output_dir: str | Path,
    encoder: LayerChoice,
    decoder: LayerChoice,
) -> StudentSummary:
    """Cut the student from ``teacher`` into ``output_dir``; everything is checked before any
    weight is read."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    try:
        config = AutoConfig.from_pretrained(teacher, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"--teacher_model {teacher!r}: could not load its config. Pass a local folder "
            f"holding config.json or a hub name in the local Hugging Face cache. ({error})"
        ) from None
    plan = plan_layers(config, teacher, encoder, decoder)
    new_config = student_config(config, plan)
    source = teacher_folder(teacher)
    files = checkpoint_files(str(source))
    if not files:
        raise ConfigError(
            f"--teacher_model {teacher!r} has no safetensors weights (model.safetensors or "
            f"{SAFETENSORS_INDEX}): load it with from_pretrained and save it with "
            "save_pretrained, which writes safetensors, then pass that folder."
        )
    locations = tensor_locations(files)
    mapping = name_map(sorted(locations), plan)
    sizes = tensor_sizes(locations)

    output_dir.mkdir(parents=True, exist_ok=True)
    new_config.save_pretrained(output_dir)
    write_weights(output_dir, locations, mapping, {name: size[1] for name, size in sizes.items()})
    copy_side_files(source, output_dir)
    try:
        check_loads(output_dir, new_config)
    except ConfigError:
        for entry in output_dir.iterdir():  # the folder was new or empty: all of it is ours
            entry.unlink()
        raise

    names = ("layers",) if len(plan) == 1 else ("encoder", "decoder")
    return StudentSummary(
        output_dir=output_dir,
        kept={name: kept for name, (_, kept) in zip(names, plan, strict=True)},
        teacher_layers={
            name: getattr(config, stack.count) for name, (stack, _) in zip(names, plan, strict=True)
        },
        teacher_parameters=sum(elements for elements, _ in sizes.values()),
        student_parameters=sum(sizes[old][0] for old in mapping.values()),
    )
