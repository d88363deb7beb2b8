"""The engine's decisions, tested directly: which launch settings disagree with kd-dist's flags,
and the partitioned (ZeRO-3) loading of a pretrained model, module by module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kd_dist.config import TrainConfig
from kd_dist.engine import launch_conflicts

from .test_distributed import free_port

REPO = Path(__file__).resolve().parent.parent
SHIPPED = [REPO / "accelerate_configs" / name
           for name in ("ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json")]  # fmt: skip


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("flags", [{}, {"bf16": True, "gradient_accumulation_steps": 4,
                                        "batch_size": 2, "clip_grad_norm": 0.0}])  # fmt: skip
def test_the_shipped_deepspeed_jsons_agree_with_any_flags(path, flags):
    """Their "auto" values leave every such setting to kd-dist."""
    cfg = TrainConfig(**flags)
    assert launch_conflicts(cfg, "no", json.loads(path.read_text())) == []


def test_what_the_questionnaire_writes_agrees_with_the_default_flags():
    """accelerate's config built from the questionnaire's fields (gradient_accumulation_steps 1,
    clipping "auto" when not asked for), `accelerate launch`'s mixed_precision 'no'."""
    fields = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": 1, "gradient_clipping": "auto",
              "zero_optimization": {"stage": 2}}  # fmt: skip
    assert launch_conflicts(TrainConfig(), "no", fields) == []
    assert launch_conflicts(TrainConfig(bf16=True), "bf16", fields) == []


def test_each_disagreement_is_named_with_both_values():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "bf16": {"enabled": True},
          "fp16": {"enabled": "auto"}}  # fmt: skip
    cfg = TrainConfig(batch_size=8, gradient_accumulation_steps=2, clip_grad_norm=0.5)
    conflicts = launch_conflicts(cfg, "fp16", ds)
    assert conflicts == [
        "mixed_precision: the launch asks for fp16, kd-dist runs fp32 (pass --fp16, or "
        "mixed_precision: 'no' in the accelerate config)",
        "train_micro_batch_size_per_gpu: the DeepSpeed settings have 4, kd-dist --batch_size 8",
        "gradient_accumulation_steps: the DeepSpeed settings have 1 (accelerate's value when "
        "it is left out), kd-dist --gradient_accumulation_steps 2",
        "gradient_clipping: the DeepSpeed settings have 1.0, kd-dist --clip_grad_norm 0.5",
        "bf16.enabled: the DeepSpeed settings have True, kd-dist does not pass --bf16",
    ]
    # Without DeepSpeed only the precision can disagree.
    assert launch_conflicts(TrainConfig(bf16=True), "bf16", None) == []
    assert len(launch_conflicts(TrainConfig(), "bf16", None)) == 1


LOAD_PARTITIONED = """
import json, sys, deepspeed, torch
from deepspeed.runtime.zero import GatheredParameters
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.integrations import HfDeepSpeedConfig
from kd_dist.zero3_loading import load_partitioned
deepspeed.init_distributed(dist_backend="gloo")
folder, seq2seq = sys.argv[1], sys.argv[2] == "seq2seq"
model_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
registered = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization":
                                {"stage": 3, "stage3_param_persistence_threshold": 0}})
model = load_partitioned(model_class, folder, {"dtype": torch.float32, "trust_remote_code": False})
partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
with GatheredParameters(list(model.parameters())):
    state = {k: v.clone() for k, v in model.state_dict().items()}
torch.save(state, sys.argv[3])
print(json.dumps({"partitioned": partitioned}))
"""


def load_in_one_zero3_process(
    folder: str, task: str, tmp_path: Path, **env_vars: str
) -> tuple[dict[str, torch.Tensor], str]:
    """(the gathered state dict of load_partitioned's model, the process's log)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1",
           **env_vars}  # fmt: skip
    saved = tmp_path / "state.pt"
    result = subprocess.run([sys.executable, "-c", LOAD_PARTITIONED, folder, task, str(saved)],
                            env=env, capture_output=True, text=True, timeout=300,
                            cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"partitioned": True}
    return torch.load(saved, weights_only=True), result.stderr


@pytest.mark.parametrize(("family", "task"), [("gpt2", "causal"), ("llama", "causal"),
                                              ("t5", "seq2seq"), ("bart", "seq2seq")])  # fmt: skip
def test_partitioned_loading_gives_the_checkpoint_s_weights(family, task, model_pair, tmp_path):
    """Under a registered ZeRO-3 config the model is built partitioned and filled module by
    module: gathered, it holds exactly the saved weights (GPT-2 and T5 tie their head to the
    embeddings, BART has a persistent buffer), the same as from_pretrained would load."""
    teacher, _ = model_pair(family)
    loaded, log = load_in_one_zero3_process(teacher, task, tmp_path)
    saved = load_file(Path(teacher) / "model.safetensors")
    assert "transformers loads it" not in log  # the module-by-module path, not the fallback
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def test_a_checkpoint_in_another_form_falls_back_to_transformers_with_a_warning(
    model_pair, tmp_path
):
    """Tensor names that are not the model's (here: an old-style prefix-less checkpoint) go
    through from_pretrained, which knows how to map them, and say so."""
    teacher, _ = model_pair("llama")
    folder = tmp_path / "renamed"
    folder.mkdir()
    for file in Path(teacher).iterdir():
        if file.name != "model.safetensors":
            (folder / file.name).write_bytes(file.read_bytes())
    saved = load_file(Path(teacher) / "model.safetensors")
    renamed = {name.removeprefix("model."): tensor for name, tensor in saved.items()}
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    loaded, log = load_in_one_zero3_process(str(folder), "causal", tmp_path)
    assert "transformers loads it, holding the whole checkpoint" in log
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def test_a_hub_model_from_the_cache_loads_partitioned_too(model_pair, tmp_path):
    """A teacher named like a hub model is found in the Hugging Face cache (offline here) and
    read module by module, not handed to transformers' whole-checkpoint loading."""
    teacher, _ = model_pair("llama")
    hub = tmp_path / "hf_home" / "hub" / "models--kd-test--teacher"
    snapshot = hub / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for file in Path(teacher).iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("0123456789abcdef")
    loaded, log = load_in_one_zero3_process("kd-test/teacher", "causal", tmp_path,
                                            HF_HOME=str(tmp_path / "hf_home"),
                                            HF_HUB_OFFLINE="1")  # fmt: skip
    assert "transformers loads it" not in log
    for name, tensor in load_file(Path(teacher) / "model.safetensors").items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
