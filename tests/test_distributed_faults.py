"""Faults in two real processes on CPU (gloo): a preemption signal to one rank or to the
launcher, a NaN on one rank, an all-masked batch and uneven data under ZeRO-3, a hung rank.
Every rank must take the same decision at the same step, and nothing may wait forever."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_dist.faults import FAULT_ENV

from .conftest import make_sentences, write_jsonl
from .test_distributed import BIN, REPO, accelerate_launch, deepspeed_config, free_port


def torchrun() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]


def run(
    command: list[str], argv: list[str], fault: str = "", timeout: int = 600
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_ENV: fault}
    # Compiling the loss would cost every new process seconds; these tests are about faults.
    return subprocess.run([*command, "-m", "kd_dist", "train", *argv, "--no-compile_loss"],
                          env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_preempting_one_rank_or_the_launcher_stops_all_ranks_and_resumes_exactly(
    model_pair, text_dataset, tmp_path
):
    """12 steps over 2 ranks (a model with dropout, a mid-epoch position). The configured early
    warning signal reaches rank 1 alone after step 4; later SIGTERM reaches the launcher
    (torchrun), which passes it on. Each time both ranks save at one step boundary and exit
    75; the same command then ends on exactly the weights of an uninterrupted run."""
    teacher, student = model_pair("gpt2")
    common = ["--teacher_model", teacher, "--student_model", student, "--dataset",
              str(text_dataset), "--max_length", "32", "--batch_size", "4", "--max_steps", "12",
              "--save_every", "0", "--logging_steps", "1", "--seed", "11",
              "--preemption_signal", "SIGUSR2", "--resume_from_checkpoint", "auto"]  # fmt: skip
    straight, out = tmp_path / "straight", tmp_path / "preempted"
    result = run(torchrun(), [*common, "--output_dir", str(straight)])
    assert result.returncode == 0, result.stderr[-4000:]

    argv = [*common, "--output_dir", str(out)]
    result = run(torchrun(), argv, fault="signal_SIGUSR2@4:1")
    assert result.returncode != 0  # torchrun reports a failed worker as 1
    assert result.stderr.count("kd-dist: stopped at step 4 on request") == 2, result.stderr[-4000:]
    assert "exitcode  : 75" in result.stderr
    assert latest(out) == "step-00000004"

    result = run(torchrun(), argv, fault="signal_parent_SIGTERM@7:1")
    assert result.returncode != 0
    assert result.stderr.count("kd-dist: stopped at step") == 2, result.stderr[-4000:]
    stopped_at = int(latest(out).split("-")[1])
    assert 7 <= stopped_at < 12

    result = run(torchrun(), argv)
    assert result.returncode == 0, result.stderr[-4000:]
    assert logged_steps(out) == list(range(1, 13))
    expected, actual = (load_file(d / "model.safetensors") for d in (straight, out))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.distributed
def test_zero3_ranks_agree_on_nans_and_run_the_same_collectives_on_uneven_masked_data(
    model_pair, tmp_path
):
    """ZeRO-3 with every parameter sharded, 61 examples over 2 ranks x batch 4 (the last global
    batch is uneven), accumulation 2. Rank 1's first micro-batch of step 2 is fully masked;
    rank 1's teacher gives NaN in step 3 (both micro-batches skipped, the bound being 2), rank
    0's in step 5, in the second epoch (beyond the bound): both ranks stop there with the same
    message, the last checkpoint intact. A short process-group timeout turns any hang into a
    failure instead."""
    teacher, student = model_pair("llama")
    dataset = write_jsonl(tmp_path / "uneven.jsonl",
                          [{"text": s} for s in make_sentences(61, seed=3)])  # fmt: skip
    out = tmp_path / "run"
    argv = ["--teacher_model", teacher, "--student_model", student, "--dataset", str(dataset),
            "--max_length", "32", "--batch_size", "4", "--gradient_accumulation_steps", "2",
            "--epochs", "2", "--save_steps", "2", "--logging_steps", "1", "--skip_nonfinite", "2",
            "--dist_timeout", "120", "--output_dir", str(out)]  # fmt: skip
    fault = "mask_labels@2:1,nan_teacher@3:1,nan_teacher@5:0"
    result = run(accelerate_launch(deepspeed_config(tmp_path, 3)), argv, fault=fault)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    message = "the loss of step 5 (epoch 1, batch 0 of the epoch) on rank(s) [0] is not finite"
    assert output.count(message) == 2, output[-4000:]  # the same decision on both ranks
    assert output.count("Skipped so far: 2") == 2
    assert "The loss of step 3 (epoch 0, batch 4 of the epoch) on rank(s) [1]" in output
    assert latest(out) == "step-00000004"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in records)


@pytest.mark.distributed
def test_a_step_runs_one_collective_and_waits_on_the_host_once_whatever_its_micro_batches(
    model_pair, text_dataset, tmp_path
):
    """DDP over 2 ranks, 2 micro-batches per step, a NaN teacher on rank 1 in step 3 (skipped):
    past an epoch's first step (which counts its own tokens), each step calls one collective
    from Python (its agreement, which also counts the next step's tokens) and kd_dist waits on
    the host once (reading it); DDP's gradient all-reduce runs in C++ and is not counted. The
    counts come from tests/step_waits.py, which wraps torch.distributed and the tensor methods
    that wait on the host."""
    teacher, student = model_pair("llama")
    trace, out = tmp_path / "waits", tmp_path / "run"
    argv = ["--teacher_model", teacher, "--student_model", student, "--dataset",
            str(text_dataset), "--max_length", "32", "--batch_size", "2",
            "--gradient_accumulation_steps", "2", "--max_steps", "5", "--save_every", "0",
            "--logging_steps", "1", "--skip_nonfinite", "2", "--no-compile_loss",
            "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEP_WAITS": str(trace),
           FAULT_ENV: "nan_teacher@3:1"}  # fmt: skip
    result = subprocess.run([*torchrun(), str(REPO / "tests" / "step_waits.py"), *argv],
                            env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "The loss of step 3 (epoch 0, batch 4 of the epoch) on rank(s) [1]" in result.stderr
    for rank in (0, 1):
        steps = json.loads(Path(f"{trace}.rank{rank}").read_text())
        assert len(steps) == 5
        assert [s["collectives"] for s in steps[1:]] == [1] * 4, steps
        assert [s["host_waits"] for s in steps[1:]] == [1] * 4, steps
    assert logged_steps(out) == [1, 2, 3, 4, 5]


@pytest.mark.distributed
def test_a_hung_rank_fails_the_run_after_the_timeout_instead_of_waiting_forever(
    model_pair, text_dataset, tmp_path
):
    teacher, student = model_pair("llama")
    argv = ["--teacher_model", teacher, "--student_model", student, "--dataset",
            str(text_dataset), "--max_length", "32", "--batch_size", "4", "--max_steps", "6",
            "--save_every", "0", "--dist_timeout", "5",
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    started = time.monotonic()
    result = run(torchrun(), argv, fault="hang@2:1", timeout=240)
    assert result.returncode != 0
    message = "rank 0: the other processes did not join a collective operation within "
    assert message + "--dist_timeout 5 s" in result.stderr, result.stderr[-4000:]
    assert time.monotonic() - started < 240
