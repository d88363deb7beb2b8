"""`kd-dist make-student`: a student cut from the teacher computes what the teacher computes with
the dropped layers deleted, loads cleanly, keeps the tokenizer files, and trains."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
)

import kd_dist.make_student as make_student_module
from kd_dist.cli import main
from kd_dist.config import ConfigError
from kd_dist.make_student import (
    DECODER_LAYER_FLAGS,
    LAYER_FLAGS,
    LayerChoice,
    Stack,
    evenly_spaced,
    make_student,
)
from kd_dist.models import FUSED_HEAD_RULES
from kd_dist.tiny import build_model, save_pair

# Written here, not taken from make_student: each family's block containers (module paths) and
# the config attributes that count them, as the reference cut below needs them.
CONTAINERS = {
    "llama": [("model.layers", "num_hidden_layers")],
    "mistral": [("model.layers", "num_hidden_layers")],
    "qwen2": [("model.layers", "num_hidden_layers")],
    "qwen3": [("model.layers", "num_hidden_layers")],
    "gemma": [("model.layers", "num_hidden_layers")],
    "gemma2": [("model.layers", "num_hidden_layers")],
    "gpt2": [("transformer.h", "n_layer")],
    "opt": [("model.decoder.layers", "num_hidden_layers")],
    "t5": [("encoder.block", "num_layers"), ("decoder.block", "num_decoder_layers")],
    "bart": [
        ("model.encoder.layers", "encoder_layers"),
        ("model.decoder.layers", "decoder_layers"),
    ],
}
# The other families make-student cuts, built from these configs (4 layers, or 4 + 4).
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=4, num_decoder_layers=4, num_heads=4)
OTHER_FAMILIES = {
    "mixtral": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
    # Experts every second layer, but not in layer 3: the student lists its dense layers.
    "qwen2_moe": dict(_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16, decoder_sparse_step=2,
                      mlp_only_layers=[3]),
    "qwen3_moe": dict(_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      mlp_only_layers=[1]),
    "phi": dict(_DECODER, num_key_value_heads=4),
    "phi3": _DECODER,
    "gemma3_text": dict(_DECODER, sliding_window=4, layer_types=["sliding_attention",
                        "full_attention"] * 2),
    "cohere": _DECODER,
    "cohere2": dict(_DECODER, sliding_window=4),
    "granite": _DECODER,
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=64),
    "falcon": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4),
    "mt5": _T5,
    "umt5": _T5,  # each block has its own position bias
    "mbart": dict(d_model=32, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  max_position_embeddings=64),
}  # fmt: skip
CONTAINERS.update(
    {family: [("model.layers", "num_hidden_layers")] for family in OTHER_FAMILIES}
    | {"gpt_neox": [("gpt_neox.layers", "num_hidden_layers")]}
    | {"falcon": [("transformer.h", "num_hidden_layers")]}
    | {family: CONTAINERS["t5"] for family in ("mt5", "umt5")}
    | {"mbart": CONTAINERS["bart"]}
)
SEQ2SEQ = ("t5", "mt5", "umt5", "bart", "mbart")
LAYERS = 4
# Qwen2/3, Mistral and Gemma2 get a sliding window shorter than the inputs, so that each layer's
# attention type matters; Qwen's bottom two layers keep full attention.
WINDOWS = {
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "mistral": dict(sliding_window=4),
    "gemma2": dict(sliding_window=4),
}
NO_DECODER_FLAGS = LayerChoice(None, None, DECODER_LAYER_FLAGS)


def layers_flag(text: str) -> LayerChoice:
    return LayerChoice(None, text, LAYER_FLAGS)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer):
    """``teacher(family)`` -> folder of a 4-layer teacher (both stacks for seq2seq), cached."""
    cache: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in cache:
            counts = {count: LAYERS for _, count in CONTAINERS[family]}
            torch.manual_seed(0)
            if family in OTHER_FAMILIES:
                ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2, decoder_start_token_id=0)
                config = AutoConfig.for_model(
                    family, vocab_size=320, **OTHER_FAMILIES[family], **ids
                )
                auto = AutoModelForSeq2SeqLM if family in SEQ2SEQ else AutoModelForCausalLM
                model = auto.from_config(config)
            else:
                model = build_model(family, tokenizer, "small", **counts, **WINDOWS.get(family, {}))
            cache[family] = save_pair(tmp_path_factory.mktemp(family), model, tokenizer)
        return cache[family]

    return make


def load(folder: str | Path, family: str):
    auto = AutoModelForSeq2SeqLM if family in SEQ2SEQ else AutoModelForCausalLM
    model, info = auto.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    return model.eval()


def logits(model, family: str) -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.randint(4, 250, (2, 12))  # longer than the sliding windows
    extra = {"decoder_input_ids": ids[:, :7]} if family in SEQ2SEQ else {}
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **extra).logits


def delete_layers(model, family: str, kept: list[int]) -> None:
    """The reference cut: the teacher's dropped blocks deleted from its ModuleLists in place, and
    its config told how many blocks and which attention types are left."""
    for path, count in CONTAINERS[family]:
        blocks = model.get_submodule(path)
        if family in ("t5", "mt5") and 0 not in kept:
            # T5's first block computes the relative position bias the others reuse: the new
            # first block takes over the teacher's bias table.
            attention, first = blocks[kept[0]].layer[0].SelfAttention, blocks[0].layer[0]
            attention.relative_attention_bias = first.SelfAttention.relative_attention_bias
            attention.has_relative_attention_bias = True
        for index in sorted(set(range(len(blocks))) - set(kept), reverse=True):
            del blocks[index]
        setattr(model.config, count, len(kept))
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in kept]


@pytest.mark.parametrize("family", list(CONTAINERS))
def test_the_student_is_the_teacher_with_the_dropped_layers_deleted(family, teacher, tmp_path):
    source = teacher(family)
    teacher_model = load(source, family)
    if family not in OTHER_FAMILIES:  # keeping every layer is the teacher (cheap families only)
        make_student(source, tmp_path / "all", layers_flag("0,1,2,3"), NO_DECODER_FLAGS)
        everything = load(tmp_path / "all", family)
        assert torch.equal(logits(everything, family), logits(teacher_model, family))

    kept = [1, 3]  # drops layer 0: T5's position bias must move to the student's first block
    summary = make_student(source, tmp_path / "cut", layers_flag("1,3"), NO_DECODER_FLAGS)
    student = load(tmp_path / "cut", family)
    delete_layers(teacher_model, family, kept)
    assert torch.equal(logits(student, family), logits(teacher_model, family))
    for _, count in CONTAINERS[family]:
        assert getattr(student.config, count) == 2
    assert student.config.get_text_config().tie_word_embeddings == (
        teacher_model.config.get_text_config().tie_word_embeddings
    )
    stored = {t.data_ptr(): t.numel() for t in student.state_dict().values()}  # tied: once
    assert summary.student_parameters == sum(stored.values())
    assert all(layers == kept for layers in summary.kept.values())


def test_layer_types_and_qwen_windows_follow_their_layers(teacher, tmp_path):
    source = teacher("qwen2")
    make_student(source, tmp_path / "s", layers_flag("1,2,3"), NO_DECODER_FLAGS)
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert config["max_window_layers"] == 1  # of the kept layers, only teacher layer 1 is below 2


def test_seq2seq_decoder_takes_its_own_flags(teacher, tmp_path):
    source = teacher("bart")
    decoder = LayerChoice(1, None, DECODER_LAYER_FLAGS)
    summary = make_student(source, tmp_path / "s", layers_flag("0,2,3"), decoder)
    assert summary.kept == {"encoder": [0, 2, 3], "decoder": [0]}
    assert summary.hidden_layer_map() == "0:0"  # the hidden-state loss matches decoder blocks
    config = load(tmp_path / "s", "bart").config
    assert (config.encoder_layers, config.decoder_layers) == (3, 1)


def test_sharded_bf16_teacher_gives_a_sharded_bf16_student(tokenizer, tmp_path, monkeypatch):
    model = build_model("llama", tokenizer, "small", num_hidden_layers=LAYERS).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "teacher", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "teacher")
    assert (tmp_path / "teacher" / "model.safetensors.index.json").is_file()
    monkeypatch.setattr(make_student_module, "MAX_SHARD_BYTES", 60_000)
    make_student(str(tmp_path / "teacher"), tmp_path / "s", layers_flag("0,3"), NO_DECODER_FLAGS)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    for file in files:
        with safe_open(tmp_path / "s" / file, framework="pt") as handle:
            assert {handle.get_tensor(name).dtype for name in handle.keys()} == {torch.bfloat16}  # noqa: SIM118
    student = load(tmp_path / "s", "llama")
    reference = load(tmp_path / "teacher", "llama")
    delete_layers(reference, "llama", [0, 3])
    assert torch.equal(logits(student, "llama"), logits(reference, "llama"))


def test_tokenizer_chat_template_and_generation_config_are_kept(tokenizer, tmp_path):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    model = build_model("gpt2", chat, "small", n_layer=LAYERS)
    model.generation_config = GenerationConfig(
        max_new_tokens=7, do_sample=True, temperature=0.7, eos_token_id=chat.eos_token_id
    )
    source = save_pair(tmp_path / "teacher", model, chat)
    make_student(source, tmp_path / "s", LayerChoice(2, None, LAYER_FLAGS),
                 NO_DECODER_FLAGS)  # fmt: skip
    kept = AutoTokenizer.from_pretrained(tmp_path / "s")
    assert kept.chat_template == chat.chat_template
    assert (
        kept.get_vocab() == chat.get_vocab()
        and kept("the cat").input_ids == chat("the cat").input_ids
    )
    assert GenerationConfig.from_pretrained(tmp_path / "s").to_diff_dict() == (
        GenerationConfig.from_pretrained(source).to_diff_dict()
    )


def test_default_selection_is_evenly_spaced_with_the_first_and_last():
    assert evenly_spaced(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced(4, 2) == [0, 3]
    assert evenly_spaced(5, 5) == [0, 1, 2, 3, 4]
    assert evenly_spaced(7, 1) == [0]


def hub_cache_with(folder: str, cache: Path, repo: str) -> None:
    """A Hugging Face hub cache holding ``folder`` as model ``repo``, as a download leaves it."""
    commit = "0" * 40
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)


def test_the_cli_cuts_a_hub_teacher_into_a_student_that_kd_dist_train_takes(
    teacher, text_dataset, tmp_path
):
    source = teacher("gpt2")
    hub_cache_with(source, tmp_path / "hub", "someone/teacher")
    student = tmp_path / "student"
    environment = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "kd_dist", "make-student", "--teacher_model",
               "someone/teacher", "--num_layers", "2", "--output_dir", str(student)]  # fmt: skip
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "kept 2 of 4: 0, 3" in done.stdout and str(student) in done.stdout
    assert "parameters: teacher" in done.stdout
    assert "Loading weights" not in done.stderr  # the meta-device check loads none
    # The printed map pairs each student block with the teacher block it was copied from (the
    # default map would pair them by depth: 0:1,1:3); train takes it as printed.
    layer_map = done.stdout.split("--hidden_layer_map ")[1].split()[0]
    assert layer_map == "0:0,1:3"
    train = ["train", "--teacher_model", source, "--student_model", str(student), "--dataset",
             str(text_dataset), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
             "--logging_steps", "1", "--hidden_loss_weight", "1",
             "--hidden_layer_map", layer_map]  # fmt: skip
    assert main(train) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert all(json.loads(line)["hidden_loss"] > 0 for line in lines)
    assert load(tmp_path / "run", "gpt2").config.n_layer == 2


def test_every_family_the_fused_loss_knows_can_be_cut():
    assert set(make_student_module.STACKS) == set(FUSED_HEAD_RULES)


@pytest.mark.parametrize(("family", "prefix"), [("gpt2", "transformer."), ("opt", "model.")])
def test_hub_checkpoints_named_without_the_base_model_prefix_are_cut(
    family, prefix, teacher, tmp_path
):
    """The hub's GPT-2 and OPT files name their tensors "h.0..." and "decoder.layers.0..."."""
    legacy = tmp_path / "teacher"
    shutil.copytree(teacher(family), legacy)
    stored = load_file(legacy / "model.safetensors")
    renamed = {name.removeprefix(prefix): tensor for name, tensor in stored.items()}
    assert renamed.keys() != stored.keys()
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    make_student(str(legacy), tmp_path / "s", layers_flag("1,3"), NO_DECODER_FLAGS)
    reference = load(legacy, family)
    delete_layers(reference, family, [1, 3])
    assert torch.equal(logits(load(tmp_path / "s", family), family), logits(reference, family))


def test_a_student_that_would_not_load_cleanly_is_refused_and_removed(
    teacher, tmp_path, monkeypatch
):
    """The meta-device check: told nothing of T5's shared position bias, the cut would leave the
    student's first block without it."""
    plain = tuple(Stack(stack.prefix, stack.count) for stack in make_student_module.STACKS["t5"])
    monkeypatch.setitem(make_student_module.STACKS, "t5", plain)
    with pytest.raises(ConfigError, match=r"does not load cleanly.*relative_attention_bias"):
        make_student(teacher("t5"), tmp_path / "s", layers_flag("1,3"), NO_DECODER_FLAGS)
    assert list((tmp_path / "s").iterdir()) == []


def test_the_command_cuts_checks_and_trains_a_student_with_hub_kernels_installed(
    model_pair, text_dataset, tmp_path
):
    """transformers 5.25 requires the kernels package and kernelizes every from_pretrained by
    default, which fails on the meta device where make-student checks its cut ("Unsupported
    device type 'meta'"). The real commands, as a user runs them: make-student, then a LoRA run
    on the cut (its adapters are checked on the meta device too) and its evaluation. (The
    demo's step 7, the same path, runs in test_demo.py.)"""
    from transformers.utils.import_utils import is_kernels_available

    transformers_version = Version(importlib.metadata.version("transformers"))
    if transformers_version >= Version("5.25") and not is_kernels_available():
        pytest.fail("transformers >= 5.25 requires the kernels package, and it is not installed")
    teacher, _ = model_pair("llama")
    cut = tmp_path / "cut"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    kd_dist = [str(Path(sys.executable).parent / "kd-dist")]
    commands = [
        ["make-student", "--teacher_model", teacher, "--num_layers", "1", "--output_dir", str(cut)],
        ["train", "--teacher_model", teacher, "--student_model", str(cut), "--dataset",
         str(text_dataset), "--lora_r", "4", "--max_steps", "1", "--max_length", "32",
         "--no-compile_loss", "--output_dir", str(tmp_path / "run")],
        ["eval", "--teacher", teacher, "--student", str(tmp_path / "run"),
         "--dataset", str(text_dataset), "--max_length", "32"],
    ]  # fmt: skip
    for command in commands:
        result = subprocess.run([*kd_dist, *command], env=env, capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert result.returncode == 0, (command[0], (result.stdout + result.stderr)[-3000:])
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
