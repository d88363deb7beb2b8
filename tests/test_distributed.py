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


def zero3_config(tmp_path: Path) -> Path:
    """The shipped ZeRO-3 config, with every parameter partitioned (tiny models otherwise stay
    whole under the default persistence threshold, and the test would prove nothing)."""
    ds = json.loads((REPO / "accelerate_configs" / "ds_zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    shipped = (REPO / "accelerate_configs" / "deepspeed_zero3.yaml").read_text()
    config = tmp_path / "zero3.yaml"
    config.write_text(
        shipped.replace("accelerate_configs/ds_zero3.json", str(tmp_path / "ds.json"))
    )
    return config


def launch(command: list[str], argv: list[str], log: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([*command, "-m", "kd_dist", "train", *argv], env=env, cwd=REPO,
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
def test_two_processes_zero3_and_ddp_take_the_single_process_step(model_pair, text_dataset,
                                                                   tmp_path):  # fmt: skip
    teacher, student = model_pair("llama")  # no dropout: the split changes nothing else
    common = ["--teacher_model", teacher, "--student_model", student, "--dataset",
              str(text_dataset), *ONE_SGD_STEP]  # fmt: skip
    assert (
        main(["train", *common, "--batch_size", "8", "--output_dir", str(tmp_path / "single")]) == 0
    )
    expected = load_file(tmp_path / "single" / "model.safetensors")
    start = load_file(Path(student) / "model.safetensors")

    launchers = {
        "zero3": ([str(BIN / "accelerate"), "launch", "--config_file", str(zero3_config(tmp_path)),
                   "--num_processes", "2", "--main_process_port", str(free_port())],
                  "DistributedType.DEEPSPEED"),
        "ddp": ([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                 str(free_port())], "DistributedType.MULTI_CPU"),
    }  # fmt: skip
    for name, (command, kind) in launchers.items():
        out = tmp_path / name
        output = launch(command, [*common, "--batch_size", "4", "--output_dir", str(out)],
                        tmp_path / f"{name}.log")  # fmt: skip
        assert re.search(rf"2 process\(es\) \({re.escape(kind)}\)", output), name
        assert relative_difference(load_file(out / "model.safetensors"), expected, start) < 1e-3
        losses = [
            json.loads(line)["loss"]
            for line in (out / "metrics.jsonl").read_text().split("\n")
            if line
        ]
        single = json.loads((tmp_path / "single" / "metrics.jsonl").read_text())["loss"]
        assert losses == pytest.approx([single], rel=1e-5)
