"""Two real processes on CPU (gloo): DeepSpeed ZeRO-3 through `accelerate launch`, DDP through
`torchrun`. One SGD step of the fused loss must equal the single-process step on the same
global batch: the gradient reaches sharded and replicated students alike, and the loss is
normalised by the tokens of all ranks."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kd_dist.cli import main

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ONE_SGD_STEP = ["--optimizer", "sgd", "--max_steps", "1", "--clip_grad_norm", "0",
                "--warmup_ratio", "0", "--lr_scheduler", "constant", "--learning_rate", "0.5",
                "--alpha", "0.3", "--save_every", "0", "--max_length", "32"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_config(tmp_path: Path, stage: int) -> Path:
    """The shipped ZeRO-2/3 config; for ZeRO-3 with every parameter partitioned (tiny models
    otherwise stay whole under the default persistence threshold, and the test would prove
    nothing)."""
    ds = json.loads((REPO / "accelerate_configs" / f"ds_zero{stage}.json").read_text())
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    json_path = tmp_path / f"ds{stage}.json"
    json_path.write_text(json.dumps(ds))
    shipped = (REPO / "accelerate_configs" / f"deepspeed_zero{stage}.yaml").read_text()
    config = tmp_path / f"zero{stage}.yaml"
    config.write_text(shipped.replace(f"accelerate_configs/ds_zero{stage}.json", str(json_path)))
    return config


def accelerate_launch(config: Path) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--num_processes",
            "2", "--main_process_port", str(free_port())]  # fmt: skip


def launch(command: list[str], argv: list[str], log: Path, subcommand: str = "train") -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([*command, "-m", "kd_dist", subcommand, *argv], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def relative_difference(actual: dict, expected: dict, start: dict) -> float:
    """Largest weight difference, relative to the size of the step itself."""
    return max(
        ((actual[k].float() - expected[k].float()).abs().max()
         / (expected[k].float() - start[k].float()).abs().max()).item()
        for k in expected if not torch.equal(expected[k], start[k])
    )  # fmt: skip


@pytest.mark.distributed
def test_two_processes_zero3_zero2_and_ddp_take_the_single_process_step(model_pair, text_dataset,
                                                                   tmp_path):  # fmt: skip
    teacher, student = model_pair("llama")  # no dropout: the split changes nothing else
    common = ["--teacher_model", teacher, "--student_model", student, "--dataset",
              str(text_dataset), *ONE_SGD_STEP]  # fmt: skip
    assert (
        main(["train", *common, "--batch_size", "8", "--output_dir", str(tmp_path / "single")]) == 0
    )
    expected = load_file(tmp_path / "single" / "model.safetensors")
    start = load_file(Path(student) / "model.safetensors")
    # What two ranks reading the *same* half of the batch would produce instead.
    half = tmp_path / "half"
    assert main(["train", *common, "--batch_size", "4", "--output_dir", str(half)]) == 0
    same_data = load_file(half / "model.safetensors")
    assert relative_difference(same_data, expected, start) > 1e-2

    launchers = {
        "zero3": (accelerate_launch(deepspeed_config(tmp_path, 3)), "DistributedType.DEEPSPEED"),
        "zero2": (accelerate_launch(deepspeed_config(tmp_path, 2)), "DistributedType.DEEPSPEED"),
        "ddp": ([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                 str(free_port())], "DistributedType.MULTI_CPU"),
    }  # fmt: skip
    for name, (command, kind) in launchers.items():
        out = tmp_path / name
        # 2 processes x batch 2 x accumulation 2 = the single process's batch of 8
        split = ["--batch_size", "2", "--gradient_accumulation_steps", "2"]
        output = launch(command, [*common, *split, "--output_dir", str(out)],
                        tmp_path / f"{name}.log")  # fmt: skip
        assert re.search(rf"2 process\(es\) \({re.escape(kind)}\)", output), name
        # Equal to one process on the whole batch: the ranks saw its two different halves.
        assert relative_difference(load_file(out / "model.safetensors"), expected, start) < 1e-3
        losses = [
            json.loads(line)["loss"]
            for line in (out / "metrics.jsonl").read_text().split("\n")
            if line
        ]
        single = json.loads((tmp_path / "single" / "metrics.jsonl").read_text())["loss"]
        assert losses == pytest.approx([single], rel=1e-5)


@pytest.mark.distributed
def test_zero3_resume_with_two_processes_reproduces_the_uninterrupted_run(
    model_pair, text_dataset, tmp_path
):
    """8 steps straight vs 4 steps, resume, 4 steps: 2 ranks, ZeRO-3 shards, a model with
    dropout (every rank's RNG restored), a mid-epoch data position: the same losses and weights.
    The ZeRO-3 export gathers the shards into one safetensors student that loads."""
    teacher, student = model_pair("gpt2")
    common = ["--teacher_model", teacher, "--student_model", student, "--dataset",
              str(text_dataset), "--max_length", "32", "--batch_size", "2",
              "--gradient_accumulation_steps", "2", "--max_steps", "8", "--save_every", "0",
              "--save_steps", "4", "--logging_steps", "1", "--seed", "4"]  # fmt: skip
    config = deepspeed_config(tmp_path, 3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(accelerate_launch(config), [*common, "--output_dir", str(straight)],
           tmp_path / "straight.log")  # fmt: skip
    checkpoint = straight / "checkpoints" / "step-00000004"
    launch(accelerate_launch(config),
           [*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint)],
           tmp_path / "resumed.log")  # fmt: skip

    def losses(run: Path) -> dict[int, float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {record["step"]: record["loss"] for record in map(json.loads, lines)}

    assert sorted(losses(resumed)) == [5, 6, 7, 8]
    assert losses(resumed) == pytest.approx({s: losses(straight)[s] for s in (5, 6, 7, 8)},
                                            rel=1e-6)  # fmt: skip
    expected, actual = (load_file(run / "model.safetensors") for run in (straight, resumed))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
    reloaded = AutoModelForCausalLM.from_pretrained(straight)
    for name, tensor in reloaded.state_dict().items():
        if name in expected:
            torch.testing.assert_close(tensor, expected[name])


@pytest.mark.distributed
def test_replicated_sharded_and_offloaded_teacher_give_the_same_loss(model_pair, text_dataset,
                                                                 tmp_path):  # fmt: skip
    teacher, student = model_pair("llama")
    common = ["--teacher_model", teacher, "--student_model", student, "--dataset",
              str(text_dataset), *ONE_SGD_STEP, "--batch_size", "4",
              "--save_steps", "1"]  # fmt: skip
    config = deepspeed_config(tmp_path, 3)
    runs = {}
    for placement in ("replicate", "zero3", "zero3_offload"):
        out = tmp_path / placement
        output = launch(accelerate_launch(config),
                        [*common, "--output_dir", str(out), "--teacher_placement", placement],
                        tmp_path / f"{placement}.log")  # fmt: skip
        assert f"Teacher placement: {placement}" in output
        runs[placement] = out
    held, total = map(int, re.search(r"holds (\d+) of its (\d+) parameters",
                                     (tmp_path / "zero3.log").read_text()).groups())  # fmt: skip
    assert 0 < held < total  # really sharded
    losses = {
        name: [(r["loss"], r["kd_loss"], r["ce_loss"]) for r in map(json.loads, lines)]
        for name, lines in ((n, (o / "metrics.jsonl").read_text().splitlines())
                            for n, o in runs.items())
    }  # fmt: skip
    assert losses["zero3"] == losses["replicate"] == losses["zero3_offload"]
    # The teacher is never checkpointed: only the student's state is saved.
    assert (runs["zero3"] / "checkpoints" / "latest").is_file()
    expected, *others = (load_file(out / "model.safetensors") for out in runs.values())
    for actual in others:
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
