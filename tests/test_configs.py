"""Every shipped accelerate config loads, and its DeepSpeed JSON is there and well-formed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

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
