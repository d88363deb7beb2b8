"""Two real processes on CPU (gloo): DeepSpeed ZeRO-2/3 through `accelerate launch`, DDP through
`torchrun`. One SGD step of the fused loss must equal the single-process step on the same
global batch: the gradient reaches sharded and replicated students alike, and the loss is
normalised by the tokens of all ranks. --epochs means the same passes over the data on any
number of processes, and DeepSpeed works however the launch was configured (a JSON file,
accelerate config fields, launch flags) with every teacher placement."""

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
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kd_dist.cli import main
from kd_dist.faults import TRACE_ENV

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


def questionnaire_config(tmp_path: Path, stage: int, **deepspeed_fields: object) -> Path:
    """An accelerate config as the `accelerate config` questionnaire writes it with its default
    answers: the DeepSpeed settings as accelerate fields, no JSON file. (For ZeRO-3 it turns
    zero3_init_flag on and zero3_save_16bit_model off.)"""
    deepspeed = {"gradient_accumulation_steps": 1, "offload_optimizer_device": "none",
                 "offload_param_device": "none", "zero3_init_flag": stage == 3,
                 "zero_stage": stage, **deepspeed_fields}  # fmt: skip
    if stage == 3:
        deepspeed.setdefault("zero3_save_16bit_model", False)
    config = {
        "compute_environment": "LOCAL_MACHINE", "debug": False, "deepspeed_config": deepspeed,
        "distributed_type": "DEEPSPEED", "downcast_bf16": "no", "enable_cpu_affinity": False,
        "machine_rank": 0, "main_training_function": "main", "mixed_precision": "no",
        "num_machines": 1, "num_processes": 2, "rdzv_backend": "static", "same_network": True,
        "tpu_env": [], "tpu_use_cluster": False, "tpu_use_sudo": False, "use_cpu": False,
    }  # fmt: skip
    path = tmp_path / f"questionnaire_zero{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def accelerate_launch(config: Path | None, *flags: str) -> list[str]:
    """`accelerate launch` of 2 processes, from a config file or (None) from flags alone."""
    source = [] if config is None else ["--config_file", str(config)]
    return [str(BIN / "accelerate"), "launch", *source, *flags, "--num_processes", "2",
            "--main_process_port", str(free_port())]  # fmt: skip


def launch(command: list[str], argv: list[str], log: Path, subcommand: str = "train",
           env: dict[str, str] | None = None, returncode: int = 0) -> str:  # fmt: skip
    # HF_HOME: no accelerate default config of this machine's user may change the launch.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "HF_HOME": str(log.parent / "hf_home"), **(env or {})}  # fmt: skip
    result = subprocess.run([*command, "-m", "kd_dist", subcommand, *argv], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == returncode, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def torchrun() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]


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
        "ddp": (torchrun(), "DistributedType.MULTI_CPU"),
    }  # fmt: skip
    for name, (command, kind) in launchers.items():
        out = tmp_path / name
        # 2 processes x batch 2 x accumulation 2 = the single process's batch of 8, with the
        # student's activations recomputed in the backward pass: the gradient is the same.
        split = ["--batch_size", "2", "--gradient_accumulation_steps", "2",
                 "--gradient_checkpointing"]  # fmt: skip
        output = launch(command, [*common, *split, "--output_dir", str(out)],
                        tmp_path / f"{name}.log")  # fmt: skip
        assert re.search(rf"2 process\(es\) \({re.escape(kind)}\)", output), name
        # One machine: every process sees the main process's datasets cache (--tokenize_on auto).
        assert "Tokenizing once, on the main process" in output, name
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
    dropout (every rank's RNG restored) whose activations are recomputed in the backward pass
    (--gradient_checkpointing: the replay draws the same dropout masks), a mid-epoch data
    position: the same losses and weights.
    The ZeRO-3 export gathers the shards into one safetensors student that loads."""
    teacher, student = model_pair("gpt2")
    common = ["--teacher_model", teacher, "--student_model", student, "--dataset",
              str(text_dataset), "--max_length", "32", "--batch_size", "2",
              "--gradient_accumulation_steps", "2", "--max_steps", "8", "--save_every", "0",
              "--save_steps", "4", "--logging_steps", "1", "--seed", "4",
              "--gradient_checkpointing"]  # fmt: skip
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
    """An fp32 run with a bf16 teacher: the teacher's own ZeRO-3 engine keeps it in bf16."""
    teacher, student = model_pair("llama")
    common = ["--teacher_model", teacher, "--student_model", student, "--dataset",
              str(text_dataset), *ONE_SGD_STEP, "--batch_size", "4",
              "--save_steps", "1", "--teacher_dtype", "bfloat16"]  # fmt: skip
    config = deepspeed_config(tmp_path, 3)
    runs = {}
    for placement in ("replicate", "zero3", "zero3_offload"):
        out = tmp_path / placement
        output = launch(accelerate_launch(config),
                        [*common, "--output_dir", str(out), "--teacher_placement", placement],
                        tmp_path / f"{placement}.log")  # fmt: skip
        assert f"Teacher placement: {placement}" in output
        assert re.search(r"teacher .*\(llama, [\d,]+ parameters, bfloat16, ", output), placement
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


def trained_examples(trace: Path) -> tuple[dict[int, int], dict[int, list[tuple[int, ...]]]]:
    """({step: epoch}, {epoch: the examples trained on}) from the ranks' KD_DIST_TRACE files."""
    epoch_of_step, examples = {}, {}
    for rank_file in sorted(trace.parent.glob(trace.name + ".rank*")):
        for record in map(json.loads, rank_file.read_text().splitlines()):
            epoch_of_step[record["step"]] = record["epoch"]
            examples.setdefault(record["epoch"], []).extend(map(tuple, record["examples"]))
    return epoch_of_step, {epoch: sorted(rows) for epoch, rows in examples.items()}


@pytest.mark.distributed
def test_epochs_on_two_processes_pass_over_the_data_once_each(model_pair, text_dataset, tmp_path):
    """61 examples, 3 per process x accumulation 2, 2 epochs: each rank gets 11 micro-batches an
    epoch (the last global batch holds one real example, the rest are accelerate's repeats), so
    6 optimizer steps an epoch and 12 in all, under DDP, ZeRO-2 and ZeRO-3 alike. Across the
    ranks every example is trained on exactly once per epoch: the same examples as one
    process reading the whole data."""
    teacher, student = model_pair("llama")
    common = ["--teacher_model", teacher, "--student_model", student, "--dataset",
              str(text_dataset), "--max_train_samples", "61", "--max_length", "32",
              "--epochs", "2", "--logging_steps", "1", "--save_every", "0",
              "--save_steps", "4", "--no-compile_loss"]  # fmt: skip
    single = tmp_path / "single"
    launch([sys.executable], [*common, "--batch_size", "6", "--output_dir", str(single)],
           tmp_path / "single.log", env={TRACE_ENV: str(tmp_path / "single.trace")})  # fmt: skip
    single_epochs, expected = trained_examples(tmp_path / "single.trace")
    assert len(expected[0]) == len(expected[1]) == 61
    assert single_epochs == {step: int(step > 11) for step in range(1, 23)}  # 61 / 6 -> 11

    launchers = {
        "ddp": torchrun(),
        "zero2": accelerate_launch(deepspeed_config(tmp_path, 2)),
        "zero3": accelerate_launch(deepspeed_config(tmp_path, 3)),
    }
    for name, command in launchers.items():
        out = tmp_path / name
        output = launch(command, [*common, "--batch_size", "3", "--gradient_accumulation_steps",
                                  "2", "--output_dir", str(out)], tmp_path / f"{name}.log",
                        env={TRACE_ENV: str(tmp_path / f"{name}.trace")})  # fmt: skip
        assert "plan     12 optimizer steps (6 per epoch; 2 epochs)" in output, name
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        epochs = {step: int(step > 6) for step in range(1, 13)}
        assert {r["step"]: r["epoch"] for r in records} == epochs, name
        epoch_of_step, seen = trained_examples(tmp_path / f"{name}.trace")
        assert epoch_of_step == epochs, name
        assert seen == expected, name  # each example once per epoch, none repeated or missed

    # Resumed mid-epoch (step 4 of 6), the ZeRO-3 run trains on the same examples, rank by rank
    # and step by step, and ends on the same weights.
    resumed = tmp_path / "resumed"
    launch(accelerate_launch(deepspeed_config(tmp_path, 3)),
           [*common, "--batch_size", "3", "--gradient_accumulation_steps", "2",
            "--output_dir", str(resumed), "--resume_from_checkpoint",
            str(tmp_path / "zero3" / "checkpoints" / "step-00000004")],
           tmp_path / "resumed.log", env={TRACE_ENV: str(tmp_path / "resumed.trace")})  # fmt: skip
    for rank in (0, 1):
        straight = (tmp_path / f"zero3.trace.rank{rank}").read_text().splitlines()
        again = (tmp_path / f"resumed.trace.rank{rank}").read_text().splitlines()
        assert again == [line for line in straight if json.loads(line)["step"] > 4]
    expected_weights = load_file(tmp_path / "zero3" / "model.safetensors")
    for key, tensor in load_file(resumed / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected_weights[key], rtol=1e-6, atol=1e-7, msg=key)


LAUNCH_FORMS = ("json_file", "yaml_fields", "launch_flags")
PLACEMENTS = ("auto", "replicate", "zero3", "zero3_offload")


@pytest.fixture(scope="module")
def single_process_step(model_pair, text_dataset, tmp_path_factory):
    """(the student after one SGD step on one process with batch 8, the student before it)."""
    teacher, student = model_pair("llama")
    out = tmp_path_factory.mktemp("single") / "out"
    assert main(["train", "--teacher_model", teacher, "--student_model", student, "--dataset",
                 str(text_dataset), *ONE_SGD_STEP, "--batch_size", "8", "--output_dir",
                 str(out), "--no-compile_loss"]) == 0  # fmt: skip
    return load_file(out / "model.safetensors"), load_file(Path(student) / "model.safetensors")


@pytest.mark.distributed
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("form", LAUNCH_FORMS)
def test_every_way_of_configuring_deepspeed_works_with_every_teacher_placement(
    form, placement, single_process_step, model_pair, text_dataset, tmp_path
):
    """DeepSpeed settings as a JSON file (the shipped ZeRO-2 config), as the questionnaire's
    accelerate fields (ZeRO-2) or as launch flags (ZeRO-3, with accelerate's defaults:
    zero3_init on, 16-bit save off), each with accumulation 2 set on both sides: 2 processes x
    batch 2 x accumulation 2 take the single process's step on batch 8, and the student
    exports."""
    teacher, student = model_pair("llama")
    command = {
        "json_file": lambda: accelerate_launch(deepspeed_config(tmp_path, 2)),
        "yaml_fields": lambda: accelerate_launch(
            questionnaire_config(tmp_path, 2, gradient_accumulation_steps=2)
        ),
        "launch_flags": lambda: accelerate_launch(
            None, "--use_deepspeed", "--zero_stage", "3", "--gradient_accumulation_steps", "2"
        ),
    }[form]()
    out = tmp_path / "out"
    output = launch(command, ["--teacher_model", teacher, "--student_model", student,
                              "--dataset", str(text_dataset), *ONE_SGD_STEP, "--batch_size", "2",
                              "--gradient_accumulation_steps", "2", "--output_dir", str(out),
                              "--teacher_placement", placement, "--no-compile_loss"],
                    tmp_path / "run.log")  # fmt: skip
    assert "2 process(es) (DistributedType.DEEPSPEED)" in output
    expected_placement = "replicate" if placement == "auto" else placement  # no GPU to save
    assert f"Teacher placement: {expected_placement}" in output
    expected, start = single_process_step
    assert relative_difference(load_file(out / "model.safetensors"), expected, start) < 1e-3


@pytest.mark.distributed
def test_a_launch_config_that_disagrees_with_the_flags_stops_before_any_model_loads(
    model_pair, text_dataset, tmp_path
):
    """The questionnaire's accumulation 1 against --gradient_accumulation_steps 4, and its
    mixed_precision bf16 against a fp32 run: accelerate would silently train with its own
    values."""
    teacher, student = model_pair("llama")
    config = questionnaire_config(tmp_path, 2)
    config.write_text(config.read_text().replace("mixed_precision: 'no'", "mixed_precision: bf16"))
    output = launch(accelerate_launch(config),
                    ["--teacher_model", teacher, "--student_model", student, "--dataset",
                     str(text_dataset), "--gradient_accumulation_steps", "4", "--output_dir",
                     str(tmp_path / "out")], tmp_path / "run.log", returncode=1)  # fmt: skip
    assert "gradient_accumulation_steps: the DeepSpeed settings have 1" in output
    assert "kd-dist --gradient_accumulation_steps 4" in output
    assert "mixed_precision: the launch asks for bf16, kd-dist runs fp32" in output
    assert "Teacher placement" not in output and not (tmp_path / "out").exists()


AUTO_PLACEMENT = """
import logging, torch
from kd_dist.config import TrainConfig
from kd_dist.engine import accelerator_session, choose_teacher_placement
logging.basicConfig(level=logging.INFO)
# (teacher_dtype given: there is no teacher checkpoint to read auto's dtype from)
cfg = TrainConfig(teacher_model="t", student_model="s", dataset="d", batch_size=2,
                  teacher_dtype="float32")
with accelerator_session(cfg) as accelerator:
    # What two GPUs near the threshold would report: a 3 GiB teacher against 5 GiB free on
    # rank 0 (over half: shard it) and 7 GiB free on rank 1 (under half: replicate it).
    free = (5 if accelerator.process_index == 0 else 7) * 2**30
    torch.cuda.is_available = lambda: True
    torch.cuda.mem_get_info = lambda: (free, 80 * 2**30)
    placement = choose_teacher_placement(cfg, accelerator, lambda: 3 * 2**30)
    print(f"rank {accelerator.process_index} chose {placement}", flush=True)
"""


@pytest.mark.distributed
def test_auto_placement_is_the_same_on_every_rank_near_the_threshold(tmp_path):
    """Each rank's own free memory would make them choose differently (and then hang in
    mismatched collectives); the least free memory of any rank decides for all. The GPUs'
    memory query is the only thing stood in for: the collective is real."""
    script = tmp_path / "auto_placement.py"
    script.write_text(AUTO_PLACEMENT)
    command = accelerate_launch(deepspeed_config(tmp_path, 2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([*command, str(script)], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "rank 0 chose zero3" in output and "rank 1 chose zero3" in output
    assert "the least free on any process 5.0 GiB" in output


def cached_rows(folder: Path) -> dict[str, list]:
    """Every shard's rows of a teacher cache, by file name."""
    import datasets

    return {path.name: datasets.Dataset.from_file(str(path)).to_list()
            for path in sorted(folder.glob("*.arrow"))}  # fmt: skip


@pytest.mark.distributed
def test_a_teacher_cache_made_and_used_on_two_processes_matches_one_process(
    model_pair, text_dataset, tmp_path
):
    """cache-teacher with a ZeRO-3-sharded teacher on 2 processes writes the single process's
    cache (58 train examples in shards of 4: 15 shards, the last one of 2, so the last round
    leaves one rank without a shard, which must still join the sharded teacher's forwards), and
    so does a replicated one under DDP.
    Training from it for a whole epoch on 2 processes (DDP, ZeRO-2, ZeRO-3) takes the
    single process's steps, and evaluates on the cache's eval split the same."""
    teacher, student = model_pair("llama")
    data = ["--dataset", str(text_dataset), "--max_train_samples", "61", "--max_length", "32",
            "--eval_ratio", "0.1", "--top_k", "8"]  # fmt: skip
    cache_flags = [*data, "--teacher_model", teacher, "--cache_shard_size", "4",
                   "--batch_size", "2"]  # fmt: skip
    single_cache = tmp_path / "single_cache"
    assert main(["cache-teacher", *cache_flags, "--output_dir", str(single_cache)]) == 0
    sharded_cache = tmp_path / "sharded_cache"
    sharded_flags = [*cache_flags, "--teacher_placement", "zero3", "--output_dir",
                     str(sharded_cache)]  # fmt: skip
    output = launch(accelerate_launch(deepspeed_config(tmp_path, 3)), sharded_flags,
                    tmp_path / "cache.log", subcommand="cache-teacher")  # fmt: skip
    assert "Teacher placement: zero3 (asked for)" in output
    assert len(list(sharded_cache.glob("train-*.arrow"))) == 15
    # Replicated, nothing keeps the ranks in step: each shard still has exactly one writer.
    replicated_cache = tmp_path / "replicated_cache"
    launch(torchrun(), [*cache_flags, "--output_dir", str(replicated_cache)],
           tmp_path / "replicated.log", subcommand="cache-teacher")  # fmt: skip
    expected_rows = cached_rows(single_cache)
    for cache in (sharded_cache, replicated_cache):
        actual_rows = cached_rows(cache)
        assert actual_rows.keys() == expected_rows.keys()
        for name, rows in expected_rows.items():
            for expected, actual in zip(rows, actual_rows[name], strict=True):
                assert actual["top_ids"] == expected["top_ids"], name
                assert actual["top_logprobs"] == pytest.approx(expected["top_logprobs"], abs=2e-3)

    train_flags = [*data, "--student_model", student, "--teacher_cache", str(single_cache),
                   "--epochs", "1", "--optimizer", "sgd", "--clip_grad_norm", "0",
                   "--learning_rate", "0.1", "--alpha", "0.3", "--save_every", "0",
                   "--logging_steps", "1"]  # fmt: skip
    single = tmp_path / "single"
    assert main(["train", *train_flags, "--batch_size", "8", "--output_dir", str(single)]) == 0
    expected = load_file(single / "model.safetensors")
    expected_eval = json.loads((single / "eval_results.json").read_text())
    start = load_file(Path(student) / "model.safetensors")
    split = ["--batch_size", "2", "--gradient_accumulation_steps", "2"]
    launchers = {"ddp": torchrun(), "zero2": accelerate_launch(deepspeed_config(tmp_path, 2)),
                 "zero3": accelerate_launch(deepspeed_config(tmp_path, 3))}  # fmt: skip
    for name, command in launchers.items():
        out = tmp_path / name
        output = launch(command, [*train_flags, *split, "--output_dir", str(out)],
                        tmp_path / f"{name}.log")  # fmt: skip
        assert "plan     8 optimizer steps (8 per epoch; 1 epoch)" in output, name
        assert relative_difference(load_file(out / "model.safetensors"), expected, start) < 1e-4
        evaluation = json.loads((out / "eval_results.json").read_text())
        assert evaluation["teacher_ce"] is None
        for key in ("kl_to_teacher", "top1_agreement", "student_ce", "tokens"):
            assert evaluation[key] == pytest.approx(expected_eval[key], rel=1e-3), (name, key)
