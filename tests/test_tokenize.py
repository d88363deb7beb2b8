"""Tokenization at scale: the --num_proc default, which ranks tokenize (--tokenize_on), and
`kd-dist tokenize` building the cache a later `kd-dist train` reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from kd_dist.cli import main
from kd_dist.data.parallel import (
    MAX_DEFAULT_NUM_PROC,
    PARALLEL_MIN_ROWS,
    resolve_num_proc,
    tokenizing_rank,
    usable_cpus,
)
from tests.test_distributed import BIN, REPO, free_port


# --- pure decisions ----------------------------------------------------------------------------
def test_num_proc_default_is_the_usable_cpus_capped_and_one_for_small_splits():
    big = PARALLEL_MIN_ROWS
    assert resolve_num_proc(None, big, cpus=8)[0] == 8
    assert resolve_num_proc(None, big, cpus=64)[0] == MAX_DEFAULT_NUM_PROC == 16
    assert resolve_num_proc(None, big, cpus=1)[0] == 1
    assert resolve_num_proc(None, big - 1, cpus=8) == (
        1, f"fewer than {PARALLEL_MIN_ROWS:,} rows: workers would cost more than they save"
    )  # fmt: skip
    # An explicit --num_proc wins, over the cap and the small-split rule alike.
    assert resolve_num_proc(32, 10, cpus=8) == (32, "--num_proc")
    assert usable_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("choice", "shared", "rank"),
    [("auto", True, "main"), ("auto", False, "local_main"),
     ("main", None, "main"), ("local_main", None, "local_main")],
)  # fmt: skip
def test_which_process_tokenizes(choice, shared, rank):
    assert tokenizing_rank(choice, shared) == rank


# --- kd-dist tokenize, then kd-dist train -------------------------------------------------------
def cached_files(directory: Path) -> dict[Path, int]:
    """The datasets map/filter cache files under ``directory`` and when each was written."""
    return {path: path.stat().st_mtime_ns for path in directory.rglob("cache-*.arrow")}


def test_train_reads_the_cache_that_kd_dist_tokenize_built(model_pair, dolly_dataset, tmp_path,
                                                          monkeypatch, caplog):  # fmt: skip
    teacher, student = model_pair("llama")
    cache = tmp_path / "datasets_cache"
    out = tmp_path / "run"
    # The same flags for both (no teacher weights or loss compilation: the data is under test).
    flags = ["--teacher_model", teacher, "--student_model", student, "--dataset",
             str(dolly_dataset), "--eval_ratio", "0.25", "--max_length", "48", "--alpha", "1",
             "--no-compile_loss", "--max_steps", "1", "--save_every", "0", "--output_dir",
             str(out)]  # fmt: skip
    # Another process, as a CPU job would be (the tokenizer is pickled into the map's
    # fingerprint there), and with workers: train, on 48 rows, tokenizes in one process.
    tokenize = subprocess.run(
        [sys.executable, "-m", "kd_dist", "tokenize", *flags, "--num_proc", "2"],
        env={**os.environ, "HF_DATASETS_CACHE": str(cache)}, cwd=REPO, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert tokenize.returncode == 0, tokenize.stderr[-3000:]
    report = tokenize.stdout
    assert "train  48 examples" in report and "eval   16 examples" in report, report
    assert "rows/s" in report and "file(s) written in" in report, report
    built = cached_files(cache)
    assert built

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    caplog.set_level("INFO", logger="kd_dist")
    assert main(["train", *flags]) == 0
    assert "The train split: 48 rows, 1 tokenizing process(es)" in caplog.text
    # Nothing tokenized again: no new cache file, none rewritten.
    assert cached_files(cache) == built
    assert (out / "model.safetensors").is_file()


# --- two nodes, each with its own cache ---------------------------------------------------------
@pytest.mark.distributed
def test_two_nodes_with_node_local_caches_each_tokenize_once(model_pair, text_dataset, tmp_path):
    """Two torchrun "nodes" of one process each on this machine, each with its own HF_HOME: the
    main process's marker is not seen by node 1, so each node's local main tokenizes into its
    own cache (with main_process_first, node 1 would tokenize only after node 0, and on a
    bigger node every rank of it at once)."""
    teacher, student = model_pair("llama")
    port = free_port()
    argv = ["--teacher_model", teacher, "--student_model", student, "--dataset",
            str(text_dataset), "--max_steps", "1", "--save_every", "0", "--max_length", "32",
            "--batch_size", "2", "--alpha", "1", "--no-compile_loss", "--output_dir",
            str(tmp_path / "run")]  # fmt: skip
    nodes = []
    for node in (0, 1):
        command = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port",
                   str(port), "-m", "kd_dist", "train", *argv]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / f"node{node}")}
        nodes.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]
    assert "Tokenizing once per node" in outputs[0], outputs[0][-4000:]
    assert "not every process sees a file the main process writes there" in outputs[0]
    for node in (0, 1):  # each node tokenized into its own cache
        assert list((tmp_path / f"node{node}" / "datasets").rglob("cache-*.arrow")), node
