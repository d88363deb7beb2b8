"""A LoRA student on two real processes (gloo on CPU): ZeRO-3 with every parameter partitioned
(the adapters, added after the partitioned loading, included), ZeRO-2 and DDP each train the
single process's adapters on the same global batches; a ZeRO-3 run resumed mid-way reproduces
the uninterrupted one exactly; the exports (adapter, merged) hold the trained weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kd_dist.cli import main

from .test_distributed import accelerate_launch, deepspeed_config, launch, torchrun

peft = pytest.importorskip("peft")

# Four SGD steps of a global batch of 4 (no dropout: the ranks' masks would differ from one
# process's), a checkpoint after the second.
LORA_STEPS = ["--optimizer", "sgd", "--learning_rate", "0.5", "--lr_scheduler", "constant",
              "--warmup_ratio", "0", "--clip_grad_norm", "0", "--alpha", "0.3", "--max_steps", "4",
              "--save_every", "0", "--save_steps", "2", "--max_length", "32", "--logging_steps",
              "1", "--no-compile_loss", "--lora_r", "4", "--lora_dropout", "0"]  # fmt: skip


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


@pytest.mark.distributed
def test_lora_on_two_processes_zero3_zero2_ddp_and_an_exact_zero3_resume(
    model_pair, text_dataset, tmp_path
):
    teacher, student = model_pair("llama")
    common = ["--teacher_model", teacher, "--student_model", student, "--dataset",
              str(text_dataset), *LORA_STEPS]  # fmt: skip
    single = tmp_path / "single"
    assert main(["train", *common, "--batch_size", "4", "--output_dir", str(single)]) == 0
    expected = load_file(single / "adapter_model.safetensors")
    two = [*common, "--batch_size", "2"]
    zero3 = accelerate_launch(deepspeed_config(tmp_path, 3))  # stage3_param_persistence_threshold 0

    straight = tmp_path / "zero3"
    log = launch(zero3, [*two, "--output_dir", str(straight)], tmp_path / "zero3.log")
    # A rank holds half of every parameter, the adapters too: DeepSpeed partitioned them.
    held = re.findall(r"this process holds (\d+) of its (\d+) parameters, (\d+) of its (\d+) "
                      r"trainable", log)  # fmt: skip
    assert held  # (logged by the main process)
    for counts in held:
        held_all, total, held_trainable, trainable = map(int, counts)
        assert 0 < trainable < total and held_all < total and 0 < held_trainable < trainable

    resumed = tmp_path / "zero3-resumed"
    checkpoint = straight / "checkpoints" / "step-00000002"
    launch(zero3, [*two, "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint)],
           tmp_path / "resumed.log")  # fmt: skip
    assert sorted(losses(resumed)) == [3, 4]
    assert losses(resumed) == {step: losses(straight)[step] for step in (3, 4)}

    zero2 = tmp_path / "zero2"
    launch(accelerate_launch(deepspeed_config(tmp_path, 2)), [*two, "--output_dir", str(zero2)],
           tmp_path / "zero2.log")  # fmt: skip
    ddp = tmp_path / "ddp"  # exported merged, from the same training
    launch(torchrun(), [*two, "--output_dir", str(ddp), "--merge_lora"], tmp_path / "ddp.log")

    resumed_adapter = load_file(resumed / "adapter_model.safetensors")
    for run in (straight, zero2):
        adapter = load_file(run / "adapter_model.safetensors")
        assert adapter.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(adapter[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    for key, tensor in load_file(straight / "adapter_model.safetensors").items():
        assert torch.equal(resumed_adapter[key], tensor), key  # bit-identical
    # The merged export is the single process's adapter merged into the student.
    merged = AutoModelForCausalLM.from_pretrained(ddp).state_dict()
    base = AutoModelForCausalLM.from_pretrained(student)
    reference = peft.PeftModel.from_pretrained(base, single).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)
