"""Fault injection on one process: kills during checkpoint saves, damaged `latest` pointers,
planted pickles, resumes of another run's checkpoint, NaNs, and the final export's integrity.

Kills are real SIGKILLs of a real training process (``KD_DIST_FAULT`` places them, see
``kd_dist/faults.py``); every damaged file is a real file on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kd_dist.checkpoint import (
    COMPLETE_MARKER,
    EXPORT_MANIFEST,
    TRAINER_STATE_FILE,
    check_safe_to_load,
    checkpoint_name,
    drop_metrics_after,
    resolve_checkpoint,
    set_aside_abandoned,
)
from kd_dist.cli import main
from kd_dist.config import ConfigError, TrainConfig
from kd_dist.engine import PreemptionWatch
from kd_dist.faults import FAULT_ENV
from kd_dist.losses import LossSpec, OutputHead, distillation_loss, fused_distillation_loss

from .test_train import train_args

# 64 examples, batch 16: 4 steps per epoch, 8 steps in all; dropout (gpt2) makes an exact
# resume depend on every RNG state too. (Compiling the loss would cost every new process
# seconds; these tests are about faults, not the kernel.)
RUN = ("--epochs", "2", "--batch_size", "16", "--save_steps", "2", "--seed", "7",
       "--no-compile_loss", "--resume_from_checkpoint", "auto")  # fmt: skip


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def refresh_marker(checkpoint: Path) -> None:
    """Record the current file sizes in the completion marker, as someone who edits a
    checkpoint on purpose would, so that only the check under test can refuse it."""
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    marker["files"] = {name: (checkpoint / name).stat().st_size for name in marker["files"]}
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def straight_run(model_pair, text_dataset, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    teacher, student = model_pair("gpt2")
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(train_args(teacher, student, text_dataset, out, *RUN)) == 0
    return out


def test_kills_at_every_point_of_a_save_lose_nothing_and_the_run_resumes_exactly(
    model_pair, text_dataset, straight_run, tmp_path
):
    teacher, student = model_pair("gpt2")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "kd_dist", *train_args(teacher, student, text_dataset, out,
                                                            *RUN)]  # fmt: skip

    def run(fault: str | None) -> subprocess.CompletedProcess:
        env = {**os.environ, FAULT_ENV: fault or ""}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    checkpoints = out / "checkpoints"
    # (fault, what `latest` names afterwards, which checkpoint folders are complete)
    chain = [
        # killed in the first save: nothing to resume, so the rerun starts over
        ("kill_save_state@2", None, []),
        # killed after every rank wrote its state, before the marker: staging folder only
        ("kill_save_state@4", "step-00000002", ["step-00000002"]),
        # resumed from 2, saved 4; killed after step 6's marker, before the rename
        ("kill_save_marker@6", "step-00000004", ["step-00000002", "step-00000004"]),
        # resumed from 4; step 6 renamed into place, killed before `latest` moved
        (
            "kill_save_rename@6",
            "step-00000004",
            ["step-00000002", "step-00000004", "step-00000006"],
        ),
        # resumed from 4 (`latest`): the step 6 `latest` never named is set aside in
        # abandoned/, and saved again; killed while writing `latest` for step 8 (its
        # temporary file written, not yet renamed)
        (
            "kill_save_latest@8",
            "step-00000006",
            ["step-00000002", "step-00000004", "step-00000006", "step-00000008"],
        ),
    ]
    kept: dict[str, dict[str, str]] = {}  # bytes of every complete checkpoint seen so far
    for fault, named, complete in chain:
        result = run(fault)
        assert result.returncode == -9, (fault, result.stderr[-3000:])
        assert (latest(out) if (checkpoints / "latest").exists() else None) == named, fault
        assert sorted(p.name for p in checkpoints.glob("step-*")) == complete, fault
        for name in complete:
            before = kept.setdefault(name, digests(checkpoints / name))
            if name != "step-00000006":  # 6 is legitimately saved again in the last round
                assert digests(checkpoints / name) == before, (fault, name)  # not a byte lost
    assert (checkpoints / "latest.tmp").read_text().strip() == "step-00000008"
    assert digests(checkpoints / "abandoned" / "step-00000006") == kept["step-00000006"]

    result = run(None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr and "step-00000006" in result.stderr
    # (`latest` named 6: the complete step 8 after it was set aside, and saved again.)
    assert sorted(p.name for p in (checkpoints / "abandoned").iterdir()) == [
        "step-00000006", "step-00000008"
    ]  # fmt: skip
    assert_same_weights(load_file(out / "model.safetensors"),
                        load_file(straight_run / "model.safetensors"))  # fmt: skip
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert not list(checkpoints.glob(".*"))  # no staging folders left behind


def step_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside_and_prunes_its_own_line(
    model_pair, text_dataset, straight_run, tmp_path, caplog
):
    """Resumed from step 2 of a run that saved 2, 4, 6 and 8, and run to step 6 only with
    --save_total_limit 2: the kept checkpoints are the resumed run's 4 and 6 (pruned by name,
    the abandoned 8 would outrank them), `latest` names its 6, and the abandoned run's 4, 6
    and 8 are in checkpoints/abandoned/, byte for byte."""
    teacher, student = model_pair("gpt2")
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    checkpoints = out / "checkpoints"
    argv = train_args(teacher, student, text_dataset, out, *RUN, "--resume_from_checkpoint",
                      str(checkpoints / "step-00000002"), "--max_steps", "6",
                      "--save_total_limit", "2")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="kd_dist"):
        assert main(argv) == 0
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000004", "step-00000006"]
    assert latest(out) == "step-00000006"
    for name in ("step-00000004", "step-00000006"):  # the resumed run's, not the abandoned ones
        assert json.loads((checkpoints / name / "kd_config.json").read_text())["max_steps"] == 6
    abandoned = checkpoints / "abandoned"
    assert step_names(abandoned) == ["step-00000004", "step-00000006", "step-00000008"]
    for name in step_names(abandoned):
        assert digests(abandoned / name) == digests(straight_run / "checkpoints" / name), name
    assert "moved step-00000004, step-00000006, step-00000008 into" in caplog.text
    assert "Nothing was deleted" in caplog.text


def test_a_resumed_run_killed_before_its_first_save_resumes_from_its_own_checkpoint(
    model_pair, text_dataset, straight_run, tmp_path
):
    """Resumed from step 2 (while 4, 6 and 8 exist) and killed in its first save: `latest`
    and, with `latest` lost, the fallback to the newest complete checkpoint both give step 2,
    and the run then ends exactly as the uninterrupted one."""
    teacher, student = model_pair("gpt2")
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    checkpoints = out / "checkpoints"
    argv = train_args(teacher, student, text_dataset, out, *RUN, "--resume_from_checkpoint",
                      str(checkpoints / "step-00000002"))  # fmt: skip
    env = {**os.environ, FAULT_ENV: "kill_save_state@4"}
    result = subprocess.run([sys.executable, "-m", "kd_dist", *argv], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == -9, result.stderr[-3000:]
    assert latest(out) == "step-00000002"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000002"]
    assert step_names(checkpoints / "abandoned") == [checkpoint_name(n) for n in (4, 6, 8)]
    cfg = TrainConfig(output_dir=str(out), resume_from_checkpoint="latest")
    assert resolve_checkpoint(cfg) == checkpoints / "step-00000002"
    (checkpoints / "latest").unlink()
    assert resolve_checkpoint(cfg) == checkpoints / "step-00000002"

    assert main([*argv[:-2], "--resume_from_checkpoint", "latest"]) == 0
    assert_same_weights(load_file(out / "model.safetensors"),
                        load_file(straight_run / "model.safetensors"))  # fmt: skip
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_setting_aside_the_same_step_twice_keeps_both_copies(tmp_path, caplog):
    """Resumed from step 2 twice: the second time, the resumed run's own step 4 joins the first
    run's in abandoned/ under another name. A checkpoint resumed from outside checkpoints/
    sets the newer ones aside too, but `latest` cannot name it and is left alone."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"

    def save(step: int, run: str) -> None:
        (checkpoints / checkpoint_name(step)).mkdir(parents=True)
        (checkpoints / checkpoint_name(step) / "run").write_text(run)
        (checkpoints / "latest").write_text(checkpoint_name(step) + "\n")

    for step in (2, 4, 6):
        save(step, "first")
    caplog.set_level(logging.WARNING, logger="kd_dist")
    assert set_aside_abandoned(str(out), checkpoints / "step-00000006", 6) == []  # the newest
    assert latest(out) == "step-00000006" and not caplog.text
    set_aside_abandoned(str(out), checkpoints / "step-00000002", 2)
    save(4, "second")
    set_aside_abandoned(str(out), checkpoints / "step-00000002", 2)
    abandoned = checkpoints / "abandoned"
    assert {name: (abandoned / name / "run").read_text() for name in step_names(abandoned)} == {
        "step-00000004": "first", "step-00000006": "first", "step-00000004.1": "second"
    }  # fmt: skip
    assert step_names(checkpoints) == ["abandoned", "step-00000002"]
    assert latest(out) == "step-00000002"
    save(4, "third")
    assert set_aside_abandoned(str(out), tmp_path / "elsewhere" / "step-00000002", 2) == [
        abandoned / "step-00000004.2"
    ]  # fmt: skip
    assert latest(out) == "step-00000004"  # left alone: it cannot name a folder elsewhere


def test_a_damaged_latest_pointer_falls_back_to_the_newest_complete_checkpoint(
    straight_run, tmp_path, caplog
):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for step in ("step-00000006", "step-00000008"):
        source = straight_run / "checkpoints" / step
        (out / "checkpoints" / step).symlink_to(source, target_is_directory=True)
    cfg = TrainConfig(output_dir=str(out), resume_from_checkpoint="latest")
    pointer = out / "checkpoints" / "latest"
    caplog.set_level(logging.WARNING, logger="kd_dist")

    pointer.write_text("")  # a save killed while writing it, on a file system without rename
    assert resolve_checkpoint(cfg).name == "step-00000008"
    assert "is empty" in caplog.text
    pointer.write_text("step-000")  # truncated
    assert resolve_checkpoint(cfg).name == "step-00000008"
    assert "not usable" in caplog.text
    pointer.unlink()  # lost
    assert resolve_checkpoint(cfg).name == "step-00000008"


def test_truncated_or_unfinished_checkpoints_are_never_used(straight_run, tmp_path, capsys):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in ("step-00000006", "step-00000008"):
        (checkpoints / step).mkdir()
        for file in (straight_run / "checkpoints" / step).iterdir():
            (checkpoints / step / file.name).write_bytes(file.read_bytes())
    (checkpoints / "latest").write_text("step-00000008\n")
    cfg = TrainConfig(output_dir=str(out), resume_from_checkpoint="auto")

    weights = checkpoints / "step-00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated copy
    assert resolve_checkpoint(cfg).name == "step-00000006"
    (checkpoints / "step-00000006" / COMPLETE_MARKER).unlink()  # its save never finished
    with pytest.raises(ConfigError, match="none is complete"):
        resolve_checkpoint(cfg)  # never a silent fresh start
    explicit = TrainConfig(output_dir=str(out), resume_from_checkpoint=str(weights.parent))
    with pytest.raises(ConfigError, match=r"model\.safetensors has 1000 bytes"):
        resolve_checkpoint(explicit)


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would hold."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def plant_behind_a_link(path: Path, payload: Payload) -> None:
    """DeepSpeed loads ``pytorch_model/*.pt`` with weights_only=False: a linked folder of them
    must not escape the check."""
    elsewhere = path.parent.parent / "elsewhere"
    elsewhere.mkdir()
    torch.save({"module": payload}, elsewhere / "mp_rank_00_model_states.pt")
    path.symlink_to(elsewhere, target_is_directory=True)


@pytest.mark.parametrize(
    ("planted", "write", "reason"),
    [
        # accelerate would skip an RNG file it cannot read, silently: a non-exact resume
        ("random_states_0.pkl", lambda path, payload: torch.save({"x": payload}, path),
         "GLOBAL posix.system"),
        ("optimizer.bin", lambda path, payload: torch.save(payload, path),
         "GLOBAL posix.system"),
        # a plain (non-torch) pickle is refused before anything is unpickled
        ("scheduler.bin", lambda path, payload: path.write_bytes(pickle.dumps(payload)),
         "is not a plain tensor/data file"),
        ("pytorch_model", plant_behind_a_link, "is a symbolic link"),
    ],
)  # fmt: skip
def test_a_planted_pickle_is_refused_and_its_payload_never_runs(
    model_pair, text_dataset, straight_run, tmp_path, capsys, planted, write, reason
):
    teacher, student = model_pair("gpt2")
    checkpoint = tmp_path / "step-00000008"
    checkpoint.mkdir()
    for file in (straight_run / "checkpoints" / "step-00000008").iterdir():
        (checkpoint / file.name).write_bytes(file.read_bytes())
    works = tmp_path / "payload-works"
    pickle.loads(pickle.dumps(Payload(works)))  # unpickled the ordinary way, it runs
    assert works.exists()
    sentinel = tmp_path / "payload-ran"
    write(checkpoint / planted, Payload(sentinel))
    refresh_marker(checkpoint)

    argv = train_args(teacher, student, text_dataset, tmp_path / "out", *RUN[:-1],
                      str(checkpoint))  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"Refusing to resume from {checkpoint}: {planted}" in err
    assert reason in err
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_deepspeed_optimizer_states_pass_the_safe_loading_check(tmp_path):
    """The objects DeepSpeed's ZeRO-1/2/3 optimizer files hold (loss scalers, the ZeRO stage,
    parameter slice addresses), as its state_dict writes them (ZeRO-3's are also loaded by the
    2-process resume test)."""
    from collections import OrderedDict

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [OrderedDict(w=fragment_address(numel=4, start=0))],
             "base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(2)}}},
             "dynamic_loss_scaler": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False),
             "ds_version": "0.19"}  # fmt: skip
    checkpoint = tmp_path / "step-00000001"
    (checkpoint / "pytorch_model").mkdir(parents=True)
    torch.save(state, checkpoint / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_safe_to_load(checkpoint)
    torch.save({**state, "hook": Payload(tmp_path / "ran")}, checkpoint / "extra.pt")
    with pytest.raises(ConfigError, match=r"extra\.pt is not a plain"):
        check_safe_to_load(checkpoint)


def test_resume_refuses_a_checkpoint_of_a_different_run_unless_asked(
    model_pair, text_dataset, straight_run, tmp_path, capsys
):
    teacher, student = model_pair("gpt2")
    source = straight_run / "checkpoints" / "step-00000004"

    def resume(*changed: str, checkpoint: Path = source, dataset: Path = text_dataset) -> int:
        argv = train_args(teacher, student, dataset, tmp_path / "out", *RUN[:-2],
                          "--max_steps", "5", *changed, "--resume_from_checkpoint",
                          str(checkpoint))  # fmt: skip
        return main(argv)

    assert resume("--batch_size", "8", "--gradient_accumulation_steps", "2") == 2
    err = capsys.readouterr().err
    assert "saved by a different run" in err and "--allow_resume_mismatch" in err
    assert "--batch_size 16 -> 8" in err and "--gradient_accumulation_steps 1 -> 2" in err
    assert resume("--student_model", teacher) == 2
    assert "--student_model" in capsys.readouterr().err

    # Saved by 2 processes, resumed by 1.
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in source.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    state = json.loads((copy / TRAINER_STATE_FILE).read_text())
    (copy / TRAINER_STATE_FILE).write_text(json.dumps({**state, "world_size": 2}))
    refresh_marker(copy)
    assert resume(checkpoint=copy) == 2
    assert "processes 2 -> 1" in capsys.readouterr().err

    # The data is compared by content: a copy elsewhere (node-local disk on a requeue) resumes,
    # the same file edited after the checkpoint was saved does not.
    dataset = tmp_path / "data.jsonl"
    dataset.write_text(text_dataset.read_text())
    first = tmp_path / "first"

    def run(data: Path, steps: str, *resume: str) -> int:
        return main(train_args(teacher, student, data, first, "--max_steps", steps, "--batch_size",
                               "16", "--save_steps", "1", *resume))  # fmt: skip

    assert run(dataset, "1") == 0
    copied = tmp_path / "node-local" / "data.jsonl"
    copied.parent.mkdir()
    copied.write_text(dataset.read_text())
    assert run(copied, "2", "--resume_from_checkpoint", "latest") == 0
    dataset.write_text(text_dataset.read_text() + json.dumps({"text": "one more line."}) + "\n")
    assert run(dataset, "3", "--resume_from_checkpoint", "latest") == 2
    assert "the training data (its tokenized examples)" in capsys.readouterr().err

    # An explicit override continues (from step 4 to 5) with the new batch size.
    assert resume("--batch_size", "8", "--allow_resume_mismatch") == 0
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [5]


def test_the_export_is_complete_checksummed_and_reloads_as_the_trained_weights(straight_run):
    manifest = json.loads((straight_run / EXPORT_MANIFEST).read_text())
    exported = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json"}  # fmt: skip
    assert set(manifest["files"]) >= exported
    for name, record in manifest["files"].items():
        data = (straight_run / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
    assert not (straight_run / ".export.partial").exists()
    final_state = json.loads(
        (straight_run / "checkpoints" / "step-00000008" / TRAINER_STATE_FILE).read_text()
    )
    assert manifest["global_step"] == 8
    assert manifest["skipped_nonfinite"] == manifest["overflow_steps"] == 0
    assert manifest["data_fingerprint"] == final_state["data_fingerprint"] != ""
    assert manifest["config"]["seed"] == 7 and manifest["config"]["dataset"]
    assert {"torch", "transformers", "accelerate", "deepspeed", "datasets", "kd_dist",
            "python"} <= set(manifest["versions"])  # fmt: skip
    # The reloaded student holds exactly the weights of the last training state.
    trained = load_file(straight_run / "checkpoints" / "step-00000008" / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(straight_run).state_dict()
    for name, tensor in trained.items():
        torch.testing.assert_close(reloaded[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_nan_stops_the_run_without_saving_or_is_skipped_within_the_bound(
    model_pair, text_dataset, tmp_path, capsys, monkeypatch, precision
):
    teacher, student = model_pair("llama")
    monkeypatch.setenv(FAULT_ENV, "nan_teacher@3,nan_teacher@5")
    extra = ("--max_steps", "6", "--save_steps", "2", "--batch_size", "16",
             *(("--bf16",) if precision == "bf16" else ()))  # fmt: skip
    stopped = tmp_path / "stopped"
    assert main(train_args(teacher, student, text_dataset, stopped, *extra)) == 1
    err = capsys.readouterr().err
    assert "the loss of step 3 (epoch 0, batch 2 of the epoch) on rank(s) [0]" in err
    assert "--skip_nonfinite" in err
    assert latest(stopped) == "step-00000002"  # nothing saved after the NaN
    leftovers = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    assert leftovers == ["latest", "step-00000002"]
    assert not (stopped / "model.safetensors").exists()

    # One skip allowed: the second NaN (step 5) stops the run.
    assert main(train_args(teacher, student, text_dataset, tmp_path / "one", *extra,
                           "--skip_nonfinite", "1")) == 1  # fmt: skip
    assert "the loss of step 5" in capsys.readouterr().err
    assert latest(tmp_path / "one") == "step-00000004"

    skipped = tmp_path / "skipped"
    assert main(train_args(teacher, student, text_dataset, skipped, *extra,
                           "--skip_nonfinite", "2")) == 0  # fmt: skip
    state = json.loads((skipped / "checkpoints" / "step-00000006" / TRAINER_STATE_FILE).read_text())
    assert state["skipped_nonfinite"] == 2
    records = [json.loads(line) for line in (skipped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    weights = load_file(skipped / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_micro_batch_backpropagates_exact_zeros_though_its_teacher_is_nan(fused):
    # What the trainer does with a non-finite micro-batch: where(finite, loss, 0) goes to the
    # backward. The loss's own saved gradients are NaN here; 0 * NaN must not reach the student.
    torch.manual_seed(0)
    rows, hidden, vocab = 6, 8, 11
    student_hidden = torch.randn(rows, hidden, requires_grad=True)
    weight = torch.randn(vocab, hidden, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    teacher = torch.full((rows, hidden if fused else vocab), float("nan"))
    labels = torch.randint(vocab, (rows,))
    spec = LossSpec(objective="jsd", alpha=0.5)

    def loss() -> torch.Tensor:
        if fused:
            student_head, teacher_head = (
                OutputHead(weight, bias),
                OutputHead(torch.randn(vocab, hidden)),
            )
            return fused_distillation_loss(
                student_hidden, student_head, teacher, teacher_head, labels, spec, vocab_size=vocab
            ).loss
        return distillation_loss(student_hidden @ weight.t() + bias, teacher, labels, spec).loss

    leaves = (student_hidden, weight, bias)
    loss().backward()  # unmasked, the NaN reaches every gradient: the mask below is needed
    assert all(torch.isnan(leaf.grad).any() for leaf in leaves)
    for leaf in leaves:
        leaf.grad = None
    value = loss()
    finite = torch.isfinite(value) & torch.isfinite(teacher).all()
    (torch.where(finite, value, 0.0) * 8.0).backward()
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_an_infinite_gradient_norm_is_caught_like_a_nan_loss(
    model_pair, text_dataset, tmp_path, capsys, monkeypatch
):
    # The loss stays finite; its backward is scaled by 1e30, so the gradient norm overflows.
    teacher, student = model_pair("llama")
    monkeypatch.setenv(FAULT_ENV, "overflow@2")
    extra = ("--max_steps", "3", "--batch_size", "16", "--save_steps", "1")
    assert main(train_args(teacher, student, text_dataset, tmp_path / "stop", *extra)) == 1
    assert "the gradient norm (inf) of step 2 (epoch 0, batches 1-1" in capsys.readouterr().err
    assert latest(tmp_path / "stop") == "step-00000001"

    skipped = tmp_path / "skip"
    argv = train_args(teacher, student, text_dataset, skipped, *extra, "--skip_nonfinite", "1")
    assert main(argv) == 0
    state = json.loads((skipped / "checkpoints" / "step-00000003" / TRAINER_STATE_FILE).read_text())
    assert state["skipped_nonfinite"] == 1
    records = [json.loads(line) for line in (skipped / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["grad_norm"] is None  # infinite: JSON has no infinity
    weights = load_file(skipped / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_overwriting_an_export_leaves_none_of_its_files(model_pair, text_dataset, tmp_path):
    # A previous, differently sharded export, with a chat template this run does not write.
    teacher, student = model_pair("gpt2")
    out = tmp_path / "run"
    out.mkdir()
    stale = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "chat_template.jinja"]  # fmt: skip
    for name in stale:
        (out / name).write_text("{}")
    files = {name: {"sha256": "", "bytes": 2} for name in stale}
    (out / EXPORT_MANIFEST).write_text(json.dumps({"files": files}))
    (out / "notes.txt").write_text("mine")  # not the export's: kept
    argv = train_args(teacher, student, text_dataset, out, "--max_steps", "1",
                      "--overwrite_output_dir")  # fmt: skip
    assert main(argv) == 0
    assert not any((out / name).exists() for name in stale)
    assert (out / "notes.txt").read_text() == "mine"
    assert set(json.loads((out / EXPORT_MANIFEST).read_text())["files"]) >= {"model.safetensors"}


def test_a_torn_metrics_line_does_not_block_the_resume(straight_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo')
    drop_metrics_after(str(out), 6)
    assert [
        json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_sigterm_and_the_launch_scripts_sigusr1_are_watched_whatever_the_early_warning(sent):
    with PreemptionWatch("SIGUSR2") as watch:
        os.kill(os.getpid(), sent)
        assert watch.received == sent
    with PreemptionWatch("SIGHUP") as watch:
        os.kill(os.getpid(), signal.SIGHUP)
        assert watch.received == signal.SIGHUP
