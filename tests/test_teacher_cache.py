"""`kd-dist cache-teacher` and `kd-dist train --teacher_cache`, end to end on tiny real models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from kd_dist.cli import main
from kd_dist.config import TrainConfig
from kd_dist.data import build_datasets, make_collator
from kd_dist.faults import FAULT_ENV
from kd_dist.losses import (
    TopKTeacher,
    distillation_loss,
    top_k_teacher,
    valid_rows,
)
from kd_dist.models import forward_logits, load_models, load_tokenizer
from kd_dist.teacher_cache import (
    ExamplesWithTeacher,
    batch_teacher,
    bytes_per_token,
    load_split,
    read_manifest,
    with_teacher_rows,
)
from tests.test_distributed import REPO
from tests.test_train import train_args

TOP_K = 8


def cache_args(teacher: str, dataset: Path, folder: Path, *extra: str) -> list[str]:
    return [
        "cache-teacher",
        "--teacher_model", teacher,
        "--dataset", str(dataset),
        "--output_dir", str(folder),
        "--max_length", "32",
        "--batch_size", "4",
        "--eval_ratio", "0.25",
        "--top_k", str(TOP_K),
        "--cache_shard_size", "16",
        *extra,
    ]  # fmt: skip


def cached_train_args(cache: Path, student: str, dataset: Path, output_dir: Path, *extra):
    argv = train_args("", student, dataset, output_dir, "--eval_ratio", "0.25", *extra)
    teacher_flag = argv.index("--teacher_model")
    del argv[teacher_flag : teacher_flag + 2]
    return [*argv, "--teacher_cache", str(cache)]


@pytest.fixture(scope="module")
def llama_cache(model_pair, text_dataset, tmp_path_factory) -> Path:
    teacher, _ = model_pair("llama")
    folder = tmp_path_factory.mktemp("cache") / "llama"
    assert main(cache_args(teacher, text_dataset, folder)) == 0
    return folder


def config(teacher: str, student: str, dataset: Path, **changes) -> TrainConfig:
    values = dict(teacher_model=teacher, student_model=student, dataset=str(dataset),
                  max_length=32, eval_ratio=0.25)  # fmt: skip
    return TrainConfig(**{**values, **changes})


def test_the_cache_is_a_dataset_of_the_teacher_s_top_k_for_every_trained_position(
    llama_cache, model_pair, text_dataset, capsys
):
    """The files: a complete manifest, the tokenizer, one Arrow shard per 16 examples, readable
    by ``datasets`` as they are; each example's rows are the live teacher's top-k (ids exact,
    log-probabilities to fp16, the tail's log mass) at every trained position, in order."""
    teacher, student = model_pair("llama")
    manifest = read_manifest(llama_cache)
    assert manifest["complete"] and manifest["top_k"] == TOP_K and manifest["temperature"] == 1.0
    assert manifest["teacher_model"] == teacher and manifest["teacher_dtype"] == "float32"
    assert set(manifest["versions"]) == {"kd_dist", "torch", "transformers", "datasets"}
    cfg = config(teacher, student, text_dataset)
    tokenizer = load_tokenizer(cfg)
    data = build_datasets(cfg, tokenizer)
    for split, examples in (("train", data.train), ("eval", data.eval)):
        info = manifest["splits"][split]
        assert info["examples"] == len(examples)
        shards = sorted(llama_cache.glob(f"{split}-*.arrow"))
        assert len(shards) == info["shards"] == -(-len(examples) // 16)
        files = [str(path) for path in shards]
        hf_cache = str(llama_cache.parent / "hf")
        loaded = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=hf_cache)
        assert len(loaded) == len(examples)
    assert not list(llama_cache.glob("*.tmp"))
    assert (llama_cache / "tokenizer" / "tokenizer.json").is_file()

    cached = load_split(llama_cache, "train", manifest)
    model = load_models(cfg, tokenizer).teacher
    batch = make_collator(tokenizer)([data.train[i] for i in range(6)])
    with torch.no_grad():
        logits = forward_logits(model, model, batch, "causal")
    rows, _, _ = valid_rows(logits, None, batch["labels"], causal=True)
    expected = top_k_teacher(rows[:, : len(tokenizer)], TOP_K, cfg.temperature)
    stored = [cached[i] for i in range(6)]
    ids = torch.cat([torch.from_numpy(row["top_ids"]).long().view(-1, TOP_K) for row in stored])
    logprobs = torch.cat([torch.from_numpy(row["top_logprobs"]).float() for row in stored])
    tails = torch.cat([torch.from_numpy(row["tail_logprob"]) for row in stored])
    assert torch.equal(ids, expected.ids)
    torch.testing.assert_close(logprobs.view(-1, TOP_K), expected.logprobs, atol=4e-3, rtol=1e-3)
    torch.testing.assert_close(tails, expected.tail_logprob, atol=1e-5, rtol=1e-5)
    assert bytes_per_token(64) == 388


def test_k_equal_to_the_vocabulary_gives_the_live_teacher_s_loss_and_gradient(
    model_pair, text_dataset, tmp_path
):
    """A cache with every token (k = V) read back through the training batches: the loss and
    its gradient equal the live teacher's (fp32 CPU) up to the fp16 storage of the
    log-probabilities: the loss within 5e-4, the gradient within 1% (relative norm; it measured
    0.6%). On fp32 rows the loss is exact (tests/test_topk_loss.py)."""
    teacher, student = model_pair("llama")
    cfg = config(teacher, student, text_dataset, max_train_samples=12)
    tokenizer = load_tokenizer(cfg)
    vocab = len(tokenizer)
    folder = tmp_path / "full"
    argv = cache_args(teacher, text_dataset, folder, "--top_k", str(vocab),
                      "--max_train_samples", "12")  # fmt: skip
    assert main(argv) == 0
    data = build_datasets(cfg, tokenizer)
    manifest = read_manifest(folder)
    examples = ExamplesWithTeacher(data.train, load_split(folder, "train", manifest))
    collate = with_teacher_rows(make_collator(tokenizer), causal=True, k=vocab)
    batch = collate(examples.__getitems__(list(range(8))))
    models = load_models(cfg, tokenizer)
    with torch.no_grad():
        teacher_logits = forward_logits(models.teacher, models.teacher, batch, "causal")

    def loss_and_grad(teacher_side):
        models.student.zero_grad()
        student_logits = forward_logits(models.student, models.student, batch, "causal")
        s, t, labels = valid_rows(student_logits, teacher_side, batch["labels"], causal=True)
        out = distillation_loss(s, t, labels, cfg.loss_spec, vocab_size=vocab, chunk_rows=16)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in models.student.parameters()]

    live_loss, live_grads = loss_and_grad(teacher_logits)
    cached_loss, cached_grads = loss_and_grad(batch_teacher(batch))
    assert isinstance(batch_teacher(batch), TopKTeacher)
    torch.testing.assert_close(cached_loss, live_loss, rtol=5e-4, atol=0)
    for cached, live in zip(cached_grads, live_grads, strict=True):
        assert ((cached - live).norm() / live.norm()).item() < 1e-2  # fp16 log-probs: ~0.6%


def test_a_student_trains_from_the_cache_alone_and_evaluates_on_its_eval_split(
    llama_cache, model_pair, text_dataset, tmp_path, caplog
):
    """No --teacher_model: the teacher never loads; evaluation uses the cache's eval split (KL
    over the top-k + tail, agreement with its top token; no teacher cross-entropy)."""
    _, student = model_pair("llama")
    out = tmp_path / "from_cache"
    with caplog.at_level("INFO", logger="kd_dist"):
        assert main(cached_train_args(llama_cache, student, text_dataset, out,
                                      "--epochs", "2")) == 0  # fmt: skip
    assert "Teacher placement: none (--teacher_cache holds its distributions)" in caplog.text
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["kd_loss"] for line in lines if "kd_loss" in line]
    assert losses[-1] < losses[0]
    final = json.loads((out / "eval_results.json").read_text())
    assert final["teacher_ce"] is None and final["teacher_ppl"] is None
    assert final["kl_to_teacher"] > 0 and 0 <= final["top1_agreement"] <= 1
    assert load_file(out / "model.safetensors")


def test_with_a_teacher_too_the_cache_trains_and_the_live_teacher_evaluates(
    llama_cache, model_pair, text_dataset, tmp_path
):
    teacher, student = model_pair("llama")
    out = tmp_path / "cache_and_teacher"
    argv = [*cached_train_args(llama_cache, student, text_dataset, out, "--max_steps", "2"),
            "--teacher_model", teacher]  # fmt: skip
    assert main(argv) == 0
    final = json.loads((out / "eval_results.json").read_text())
    assert final["teacher_ce"] is not None and final["kl_to_teacher"] > 0


def test_training_from_the_cache_resumes_mid_epoch_exactly(
    llama_cache, model_pair, text_dataset, tmp_path
):
    _, student = model_pair("llama")
    common = ("--epochs", "2", "--save_steps", "3", "--save_every", "0",
              "--gradient_accumulation_steps", "2")  # fmt: skip
    straight = tmp_path / "straight"
    assert main(cached_train_args(llama_cache, student, text_dataset, straight, *common)) == 0
    checkpoint = sorted((straight / "checkpoints").glob("step-*"))[0]
    resumed = tmp_path / "resumed"
    argv = cached_train_args(llama_cache, student, text_dataset, resumed, *common,
                             "--resume_from_checkpoint", str(checkpoint))  # fmt: skip
    assert main(argv) == 0
    expected, actual = (
        load_file(straight / "model.safetensors"),
        load_file(resumed / "model.safetensors"),
    )
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_killed_cache_job_continues_from_its_last_complete_shard(
    llama_cache, model_pair, text_dataset, tmp_path, capsys
):
    """SIGKILLed while writing its second shard (between the temporary file and the rename),
    the job leaves one complete shard, a temporary file and an incomplete manifest; training
    refuses that, and the same command continues: the first shard is kept as it was, and the
    cache ends byte for byte the uninterrupted one."""
    teacher, student = model_pair("llama")
    folder = tmp_path / "killed"
    env = {**os.environ, FAULT_ENV: "kill_save_shard@2", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "kd_dist", *cache_args(teacher, text_dataset, folder)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    complete = sorted(p.name for p in folder.glob("*.arrow"))
    assert complete == ["train-00000-of-00003.arrow"]
    assert [p.name for p in folder.glob("*.tmp")] == ["train-00001-of-00003.arrow.tmp"]
    assert not read_manifest(folder)["complete"]
    first = (folder / complete[0]).stat().st_mtime_ns
    assert main(cached_train_args(folder, student, text_dataset, tmp_path / "early")) == 2
    assert "incomplete (3 shard(s) missing" in capsys.readouterr().err

    assert main(cache_args(teacher, text_dataset, folder)) == 0
    printed = capsys.readouterr().out
    # A random tiny teacher at T = 2 is nearly uniform: its top-8 of 300 tokens hold little.
    assert "of the teacher's mass on average" in printed and "warning: the rest" in printed
    assert read_manifest(folder)["complete"] and not list(folder.glob("*.tmp"))
    assert (folder / complete[0]).stat().st_mtime_ns == first  # not written again
    for path in llama_cache.glob("*.arrow"):
        assert (folder / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_cache_of_other_settings_or_an_unrelated_folder_is_refused(
    llama_cache, model_pair, text_dataset, tmp_path, capsys
):
    teacher, _ = model_pair("llama")
    assert main(cache_args(teacher, text_dataset, llama_cache, "--top_k", "4")) == 2
    assert "top_k: 8 -> 4" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("mine")
    assert main(cache_args(teacher, text_dataset, tmp_path)) == 2
    assert "holds no teacher cache" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def unloadable_student(student: str, folder: Path) -> str:
    """The student's config and tokenizer, with weights that fail to load: a run that gets as
    far as loading it fails differently from one refused before."""
    shutil.copytree(student, folder)
    (folder / "model.safetensors").write_bytes(b"not weights")
    return str(folder)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--max_length", "24"), "--max_length 32 (cache) vs 24 (this run)"),
        (("--temperature", "2.0"), "pass --temperature 1.0"),
        (("--eval_ratio", "0.5"), "--eval_ratio 0.25 (cache) vs 0.5 (this run)"),
    ],
)
def test_a_cache_that_does_not_fit_the_run_is_refused_before_any_model_loads(
    flags, message, llama_cache, model_pair, text_dataset, tmp_path, capsys
):
    _, student = model_pair("llama")
    broken = unloadable_student(student, tmp_path / "student")
    argv = cached_train_args(llama_cache, broken, text_dataset, tmp_path / "out")
    assert main([*argv, *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_student_with_another_tokenizer_is_refused(llama_cache, text_dataset, tmp_path, capsys):
    from kd_dist.tiny import build_model, build_tokenizer, save_pair
    from tests.conftest import make_sentences

    other = build_tokenizer(make_sentences(64, seed=5), vocab_size=280, with_pad=False)
    student = save_pair(tmp_path / "other", build_model("llama", other, "tiny"), other)
    assert main(cached_train_args(llama_cache, student, text_dataset, tmp_path / "out")) == 2
    assert "tokenizers differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("family", "dataset", "flags"),
    [("llama", "text_dataset", ("--packing",)), ("t5", "pairs_dataset", ("--task_type", "seq2seq")),
     ("gpt2", "text_dataset", ("--teacher_dtype", "bfloat16", "--no-fused_loss"))],
)  # fmt: skip
def test_packed_seq2seq_and_half_precision_caches_train(family, dataset, flags, model_pair,
                                                        request, tmp_path):  # fmt: skip
    """Packed blocks and seq2seq targets are examples like any other: the cache holds a row per
    trained position of each, and training reads them back (here for 2 steps and the eval);
    a bf16 teacher is cached in bf16 (and a student on the logits path reads the cache too)."""
    teacher, student = model_pair(family)
    data = request.getfixturevalue(dataset)
    folder = tmp_path / "cache"
    assert main(cache_args(teacher, data, folder, *flags)) == 0
    dtype = "bfloat16" if "bfloat16" in flags else "float32"
    assert read_manifest(folder)["teacher_dtype"] == dtype
    out = tmp_path / "out"
    train_flags = [flag for flag in flags if flag != "--teacher_dtype" and flag != "bfloat16"]
    assert main(cached_train_args(folder, student, data, out, "--max_steps", "2",
                                  *train_flags)) == 0  # fmt: skip
    final = json.loads((out / "eval_results.json").read_text())
    assert final["kl_to_teacher"] > 0 and final["tokens"] > 0


def test_cache_teacher_refuses_bad_folders_and_a_top_k_beyond_the_vocabulary(
    model_pair, text_dataset, tmp_path, capsys
):
    teacher, _ = model_pair("llama")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert main(cache_args(teacher, text_dataset, a_file)) == 2
    assert "is a file: pass a folder" in capsys.readouterr().err
    argv = cache_args(teacher, text_dataset, tmp_path / "cache")
    del argv[argv.index("--output_dir") : argv.index("--output_dir") + 2]
    assert main(argv) == 2
    assert "--output_dir is required" in capsys.readouterr().err
    assert main(cache_args(teacher, text_dataset, tmp_path / "big", "--top_k", "100000")) == 2
    assert "--top_k 100000 is more than the tokenizer's" in capsys.readouterr().err
    # A corrupt manifest is named, and --overwrite_output_dir replaces it.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    assert main(cache_args(teacher, text_dataset, broken)) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    argv = cache_args(teacher, text_dataset, broken, "--overwrite_output_dir",
                      "--max_train_samples", "8")  # fmt: skip
    assert main(argv) == 0 and read_manifest(broken)["complete"]


def test_a_checkpoint_resumes_only_with_the_teacher_signal_it_was_trained_on(
    llama_cache, model_pair, text_dataset, tmp_path, capsys
):
    """Trained from the cache (with the live teacher for evaluation), a checkpoint does not
    resume from the live teacher alone: the loss would compare with another distribution."""
    teacher, student = model_pair("llama")
    out = tmp_path / "run"
    argv = cached_train_args(llama_cache, student, text_dataset, out, "--max_steps", "2",
                             "--save_steps", "1", "--teacher_model", teacher)  # fmt: skip
    assert main(argv) == 0
    live = train_args(teacher, student, text_dataset, out, "--eval_ratio", "0.25",
                      "--max_steps", "3", "--resume_from_checkpoint", "latest")  # fmt: skip
    assert main(live) == 2
    err = capsys.readouterr().err
    assert "what the loss compares with (teacher cache " in err and "-> a live teacher)" in err
