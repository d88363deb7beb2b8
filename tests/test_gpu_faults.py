"""fp16 overflow on a CUDA GPU (fp16 autocast needs one; skipped elsewhere): the loss scaler
skips the overflowing step, the run counts it and goes on, and the weights stay finite.

Run on a GPU machine: ``pytest tests/test_gpu_faults.py -m gpu``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kd_dist.cli import main
from kd_dist.faults import FAULT_ENV

from .test_train import train_args


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a CUDA GPU")
def test_an_fp16_overflow_skips_the_step_and_is_counted(
    model_pair, text_dataset, tmp_path, monkeypatch
):
    teacher, student = model_pair("llama")
    monkeypatch.setenv(FAULT_ENV, "overflow@3")
    out = tmp_path / "run"
    argv = train_args(teacher, student, text_dataset, out, "--fp16", "--max_steps", "5",
                      "--save_steps", "5", "--batch_size", "16")  # fmt: skip
    assert main(argv) == 0
    state = json.loads((out / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["overflow_steps"] == 1 and state["skipped_nonfinite"] == 0
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["overflow_steps"] == 1
    assert all(torch.isfinite(w).all() for w in load_file(out / "model.safetensors").values())
