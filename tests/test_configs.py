"""Every shipped accelerate config loads, its DeepSpeed JSON is there and well-formed, and a
real launch with it trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from .test_distributed import BIN, free_port, launch

CONFIGS = Path(__file__).resolve().parent.parent / "accelerate_configs"
YAMLS = sorted(CONFIGS.glob("*.yaml"))
EXPECTED = {
    "single_gpu.yaml": "NO",
    "multi_gpu.yaml": "MULTI_GPU",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
    "zero3_offload.yaml": "DEEPSPEED",
    "multi_node.yaml": "DEEPSPEED",
}


def test_every_documented_config_is_shipped():
    assert sorted(p.name for p in YAMLS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_config_loads_with_accelerate(path):
    config = load_config_from_file(str(path))
    assert str(config.distributed_type).split(".")[-1] == EXPECTED[path.name]
    if EXPECTED[path.name] == "DEEPSPEED":
        json_path = CONFIGS.parent / config.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(json_path.read_text())
        assert ds["zero_optimization"]["stage"] in (2, 3)
        # filled from the run's flags, so the JSON never disagrees with the command line
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):  # fmt: skip
            assert ds[key] == "auto", key
        assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"


# How each shipped config is launched here: 2 processes on this machine (1 for single_gpu; the
# multi-node config as its first and only machine), and what the run must report.
LAUNCH_HERE = {
    "single_gpu.yaml": (["--num_processes", "1"], "1 process(es) (DistributedType.NO)"),
    "multi_gpu.yaml": (["--num_processes", "2"], "2 process(es) (DistributedType.MULTI_CPU)"),
    "deepspeed_zero2.yaml": (["--num_processes", "2"], "ZeRO stage 2"),
    "deepspeed_zero3.yaml": (["--num_processes", "2"], "ZeRO stage 3"),
    "zero3_offload.yaml": (["--num_processes", "2"], "ZeRO stage 3"),
    "multi_node.yaml": (["--num_processes", "2", "--num_machines", "1", "--machine_rank", "0",
                         "--main_process_ip", "127.0.0.1"], "ZeRO stage 3"),
}  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_shipped_config_launches_and_trains(path, model_pair, text_dataset, tmp_path):
    """Each shipped YAML, as the README launches it (from the repository root, its DeepSpeed
    JSON by relative path), trains two steps with the default flags and exports the student."""
    teacher, student = model_pair("llama")
    flags, expected = LAUNCH_HERE[path.name]
    command = [str(BIN / "accelerate"), "launch", "--config_file", str(path), *flags,
               "--main_process_port", str(free_port())]  # fmt: skip
    out = tmp_path / "out"
    output = launch(command, ["--teacher_model", teacher, "--student_model", student,
                              "--dataset", str(text_dataset), "--max_steps", "2",
                              "--batch_size", "2", "--output_dir", str(out),
                              "--no-compile_loss"], tmp_path / "run.log")  # fmt: skip
    assert expected in output
    assert "plan     2 optimizer steps" in output
    assert (out / "model.safetensors").is_file()
    assert [
        json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == [2]
