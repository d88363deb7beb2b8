"""The same fixed set of runs on two checkouts, side by side: are the weights and metric lines
each writes identical, byte for byte?

For a change meant to leave every number as it was (a restructuring, a refactor): check out the
commit before it beside this one, and compare, on one machine in one run (floating-point sums can
differ between machines, never between two runs of the same code here):

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/golden_runs.py --baseline /tmp/before

Each checkout runs its own ``kd_dist`` (``python -m kd_dist`` with the checkout as working
directory) on the same tiny models and data, built once. The runs: causal (Llama) with the fused
loss and from the logits, seq2seq (T5), DDP (torchrun), ZeRO-2 and ZeRO-3 with a sharded teacher
on 2 processes, a teacher cache made and distilled from, on-policy (``--lmbda 0.5``), LoRA and
hidden-state distillation. Compared: every ``*.safetensors`` file the run writes (the export)
and the cache's Arrow shards, and ``metrics.jsonl`` without its timings. Exits 1 when anything
differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from kd_dist.tiny import build_model, build_tokenizer, save_pair

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORDS = "the a cat dog bird sees likes finds river house tree moon and in park home".split()
# Fields of a metrics line that measure time or memory, not the computation.
UNTIMED = ("_per_s", "seconds", "peak_memory")
COMMON = ["--max_length", "32", "--batch_size", "4", "--logging_steps", "1", "--save_every", "0",
          "--no-compile_loss", "--seed", "3"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def shipped_json(stage: int) -> str:
    return f"accelerate_configs/ds_zero{stage}.json"


def build_inputs(root: Path) -> dict[str, str]:
    """Tiny models (Llama and T5 pairs), datasets and launch configs, written once for both."""
    rng = random.Random(0)
    sentences = [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) + "." for _ in range(64)]
    tokenizer = build_tokenizer(sentences, vocab_size=300, with_pad=False)
    paths = {}
    for family in ("llama", "t5"):
        for role, size in (("teacher", "small"), ("student", "tiny")):
            model = build_model(family, tokenizer, size)
            paths[f"{family}_{role}"] = save_pair(root / family / role, model, tokenizer)
    paths["text"] = write_jsonl(root / "text.jsonl", [{"text": s} for s in sentences])
    paths["pairs"] = write_jsonl(root / "pairs.jsonl", [
        {"source": s, "target": " ".join(reversed(s.split()))} for s in sentences])  # fmt: skip
    paths["instructions"] = write_jsonl(root / "instructions.jsonl", [
        {"instruction": f"continue: {s[:10]}", "context": "", "response": s}
        for s in sentences])  # fmt: skip
    # ZeRO-3 with every parameter partitioned: tiny models otherwise stay whole.
    ds = json.loads((REPO / "accelerate_configs" / "ds_zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "ds_zero3.json").write_text(json.dumps(ds))
    for stage in (2, 3):
        shipped = (REPO / "accelerate_configs" / f"deepspeed_zero{stage}.yaml").read_text()
        json_file = root / "ds_zero3.json" if stage == 3 else REPO / shipped_json(2)
        config = shipped.replace(shipped_json(stage), str(json_file))
        (root / f"zero{stage}.yaml").write_text(config)
        paths[f"zero{stage}"] = str(root / f"zero{stage}.yaml")
    return paths


def runs(inputs: dict[str, str]) -> dict[str, tuple[str, list[list[str]]]]:
    """name -> (launcher, its commands: kd-dist argv lists, run in order). ``{out}`` is the
    run's folder (a run of several commands writes into folders inside it)."""

    def llama(dataset: str) -> list[str]:
        return ["--teacher_model", inputs["llama_teacher"], "--student_model",
                inputs["llama_student"], "--dataset", dataset, *COMMON]  # fmt: skip

    text = llama(inputs["text"])
    t5 = ["--task_type", "seq2seq", "--teacher_model", inputs["t5_teacher"], "--student_model",
          inputs["t5_student"], "--dataset", inputs["pairs"], *COMMON]  # fmt: skip
    epochs = ["--epochs", "1", "--output_dir", "{out}"]
    cache = "{out}/cache"
    return {
        "causal_fused": ("one", [["train", *text, *epochs]]),
        "causal_logits": ("one", [["train", *text, "--no-fused_loss", *epochs]]),
        "seq2seq_fused": ("one", [["train", *t5, *epochs]]),
        "ddp_2_processes": ("torchrun", [["train", *text, "--batch_size", "2", *epochs]]),
        "zero2_2_processes": ("zero2", [["train", *text, "--batch_size", "2", *epochs]]),
        "zero3_sharded_teacher": ("zero3", [["train", *text, "--batch_size", "2",
                                             "--teacher_placement", "zero3", *epochs]]),
        # (The teacher stays named: the run evaluates against it, the loss reads the cache.)
        "teacher_cache": ("one", [
            ["cache-teacher", *text, "--top_k", "8", "--output_dir", cache],
            ["train", *text, "--teacher_cache", cache, "--epochs", "1", "--output_dir",
             "{out}/student"],
        ]),
        "on_policy_lmbda": ("one", [["train", *llama(inputs["instructions"]), "--lmbda", "0.5",
                                     "--max_new_tokens", "8", "--max_length", "96",
                                     "--max_steps", "4", "--output_dir", "{out}"]]),
        "lora": ("one", [["train", *text, "--lora_r", "4", *epochs]]),
        "hidden_states": ("one", [["train", *text, "--hidden_loss_weight", "1", *epochs]]),
    }  # fmt: skip


def launcher(kind: str, inputs: dict[str, str]) -> list[str]:
    python = [sys.executable, "-m", "kd_dist"]
    if kind == "one":
        return python
    if kind == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "kd_dist"]  # fmt: skip
    return [str(BIN / "accelerate"), "launch", "--config_file", inputs[kind], "--num_processes",
            "2", "--main_process_port", str(free_port()), "-m", "kd_dist"]  # fmt: skip


def fingerprint(out: Path) -> dict[str, object]:
    """The run's numbers: a digest of each safetensors file it wrote (and of a teacher cache's
    Arrow shards), and its untimed metric lines (of each metrics.jsonl in its folder)."""
    weights = {
        str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        for path in sorted([*out.rglob("*.safetensors"), *out.rglob("*.arrow")])
    }
    lines = []
    for metrics in sorted(out.rglob("metrics.jsonl")):
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            lines.append({k: v for k, v in record.items() if not any(t in k for t in UNTIMED)})
    return {"weights": weights, "metrics": lines}


def run_all(checkout: Path, inputs: dict[str, str], work: Path, names: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(work / "hf_home"),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    results = {}
    for name in names:
        kind, commands = runs(inputs)[name]
        out = work / name
        for command in commands:
            argv = [arg.replace("{out}", str(out)) for arg in command]
            result = subprocess.run([*launcher(kind, inputs), *argv], cwd=checkout, env=env,
                                    capture_output=True, text=True, timeout=900)  # fmt: skip
            if result.returncode != 0:
                sys.exit(f"{checkout}: {name} failed:\n{(result.stdout + result.stderr)[-3000:]}")
        results[name] = fingerprint(out)
        print(f"  {checkout.name or checkout}: {name} done", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="The checkout to compare with.")
    parser.add_argument("--checkout", default=str(REPO), help="This checkout (default: here).")
    parser.add_argument("--only", nargs="*", help="Run only these (default: all).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = build_inputs(root / "inputs")
        names = args.only or list(runs(inputs))
        before = run_all(Path(args.baseline), inputs, root / "baseline", names)
        after = run_all(Path(args.checkout), inputs, root / "checkout", names)
    differing = 0
    print(f"{'run':24} {'weights':10} metric lines")
    for name in names:
        same_weights = before[name]["weights"] == after[name]["weights"]
        same_metrics = before[name]["metrics"] == after[name]["metrics"]
        files, lines = len(after[name]["weights"]), len(after[name]["metrics"])
        print(f"{name:24} {'same' if same_weights else 'DIFFER':6} ({files}) "
              f"{'same' if same_metrics else 'DIFFER'} ({lines})")  # fmt: skip
        differing += not (same_weights and same_metrics)
    print("identical" if not differing else f"{differing} run(s) differ")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
