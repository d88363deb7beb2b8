"""How fast a ZeRO-3-sharded student generates: gathered once vs gathered layer by layer.

    python bench/generation_bench.py                 # hidden 512, 8 layers, 32 new tokens
    python bench/generation_bench.py --hidden 384 --layers 6 --new_tokens 64

It launches itself on 2 processes (CPU, gloo) under the shipped ZeRO-3 accelerate config with
stage3_param_persistence_threshold 0, so that every parameter of the randomly initialised
Llama-style student (vocabulary 4096) is really partitioned: each rank holds half of it. Both
ranks then complete their own batch (8 prompts of 32 tokens) with the student's own samples,
``--new_tokens`` of them per row (no stop token: every row generates the full length), in
three ways, interleaved (this machine's speed drifts), medians of ``--repeats``:

1. gathered once: ``kd_dist.generation.generating`` gathers the whole student once (DeepSpeed's
   ``unwrap_model_for_generation``, which also removes ZeRO's per-module hooks) and the
   unwrapped module generates like a plain one: what on-policy training does;
2. per-layer gathers: the sharded module generates with its hooks (``synced_gpus``): every
   forward of every generated token gathers each layer's shards from all ranks;
3. replicated: the same weights, a plain module on each rank, no ZeRO: the floor.

It prints each variant's generated tokens/s per rank, the ratio gathered once / per-layer, the
time of the gather alone (``generating``'s entry and exit, nothing generated) against one
generate call, the model's size, and the forwards one generate call runs (counted). It also
says whether the three variants sampled the same tokens (same weights, same seed: they should).

What to expect (measured on 2 shared CPU cores, defaults): the gathered-once student generates
as fast as the replicated one (within ~5%: the one gather, about 0.2 s for the 144 MiB model, is
~5% of a 3.7 s generate call, and shrinks with longer generations), and 3-4x faster than the
per-layer variant, which moves the whole model between the ranks at every forward (32 per call:
one per generated token, with the KV cache). On GPUs the ratio depends on the interconnect
against the compute (not measured here). One run takes about 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_bench import interleaved_medians

REPO = Path(__file__).resolve().parent.parent
VOCAB = 4096
RESPONSE = 8  # dataset response tokens per row: replaced by the generated ones
GENERATING = ("gathered once", "per-layer gathers", "replicated")  # the variants that generate


def zero3_launch_config(folder: Path) -> Path:
    """The shipped ZeRO-3 accelerate config, its DeepSpeed JSON with every parameter
    partitioned (a small model otherwise stays whole under the default threshold)."""
    ds = json.loads((REPO / "accelerate_configs" / "ds_zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_path = folder / "ds_zero3.json"
    ds_path.write_text(json.dumps(ds))
    shipped = (REPO / "accelerate_configs" / "deepspeed_zero3.yaml").read_text()
    config = folder / "zero3.yaml"
    config.write_text(shipped.replace("accelerate_configs/ds_zero3.json", str(ds_path)))
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_student(hidden: int, layers: int) -> torch.nn.Module:
    """A randomly initialised Llama-style student (the same weights on every rank: seeded)."""
    from transformers import AutoModelForCausalLM

    from kd_dist.tiny import model_config

    torch.manual_seed(0)
    heads = hidden // 64
    config = model_config("llama", VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, head_dim=64,
                          intermediate_size=hidden * 4)  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def prompts_batch(rows: int, prompt: int, rank: int) -> dict[str, torch.Tensor]:
    """A tokenized causal batch [rows, prompt + RESPONSE]: labels on the response only, so that
    generation continues each row from its ``prompt`` tokens. Each rank has its own rows."""
    generator = torch.Generator().manual_seed(1 + rank)
    input_ids = torch.randint(0, VOCAB, (rows, prompt + RESPONSE), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": labels}  # fmt: skip


def counting_forwards(modules: list[torch.nn.Module]) -> list[int]:
    """A counter, one item a forward of any of ``modules`` (hooks left on: the bench's own)."""
    calls: list[int] = []
    for module in modules:
        module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def worker(args: argparse.Namespace) -> None:
    """One rank: prepare the ZeRO-3 student, time the variants, the main process prints."""
    from kd_dist.config import TrainConfig
    from kd_dist.engine import accelerator_session
    from kd_dist.generation import Sampling, generate_responses, generating

    replicated = build_student(args.hidden, args.layers)
    parameters = sum(p.numel() for p in replicated.parameters())
    student = copy.deepcopy(replicated)  # built before the Accelerator: plain, not zero.Init
    batch = prompts_batch(args.batch, args.prompt, int(os.environ["RANK"]))
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, stop_ids=(),
                        pad_id=0, vocab_size=VOCAB)  # fmt: skip
    with accelerator_session(TrainConfig(teacher_placement="replicate")) as accelerator:
        # No dataloader to infer it from: DeepSpeed needs the micro-batch size to initialise.
        plugin = accelerator.state.deepspeed_plugin
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
        engine, optimizer = accelerator.prepare(student, optimizer)
        sharded = accelerator.unwrap_model(engine).eval()
        held = sum(p.ds_tensor.numel() for p in sharded.parameters())
        assert accelerator.num_processes == 2 and held < parameters, "not sharded"

        outputs: dict[str, torch.Tensor] = {}

        def run(name: str, model: torch.nn.Module, synced: bool) -> None:
            generated = generate_responses(model, batch, sampling, seed=7, causal=True,
                                           sharded=synced)  # fmt: skip
            outputs[name] = generated["input_ids"]

        def gathered_once() -> None:
            with generating(accelerator, engine) as model:
                run("gathered once", model, synced=False)

        def gather_only() -> None:
            with generating(accelerator, engine):
                pass

        variants = {
            "gathered once": gathered_once,
            "per-layer gathers": lambda: run("per-layer gathers", sharded, synced=True),
            "replicated": lambda: run("replicated", replicated, synced=False),
            "gather only": gather_only,
        }
        calls = counting_forwards([sharded, replicated])
        forwards: dict[str, int] = {}

        def timed_call(name: str, step: Callable[[], None]) -> None:
            accelerator.wait_for_everyone()  # both ranks start together (ZeRO-3 waits anyway)
            before = len(calls)
            step()
            forwards[name] = len(calls) - before  # of the last call

        seconds = interleaved_medians(
            {name: lambda n=name, s=step: timed_call(n, s) for name, step in variants.items()},
            args.repeats,
        )
        width = args.prompt + args.new_tokens
        assert all(out.shape == (args.batch, width) for out in outputs.values()), "rows stopped"
        same = all(torch.equal(out, outputs["replicated"]) for out in outputs.values())
        if accelerator.is_main_process:
            report(args, parameters, held, seconds, forwards, same)


def report(
    args: argparse.Namespace,
    parameters: int,
    held: int,
    seconds: dict[str, float],
    forwards: dict[str, int],
    same: bool,
) -> None:
    tokens = args.batch * args.new_tokens  # generated per rank per call
    print(f"generation_bench: 2 processes (CPU, gloo), ZeRO-3, persistence threshold 0, "
          f"median of {args.repeats}, interleaved")  # fmt: skip
    print(f"  student: Llama, hidden {args.hidden}, {args.layers} layers, vocab {VOCAB}: "
          f"{parameters / 1e6:.1f}M parameters, {parameters * 4 / 2**20:.0f} MiB fp32; "
          f"rank 0 holds {held / parameters:.0%} of it")  # fmt: skip
    print(f"  per rank and call: {args.batch} prompts x {args.prompt} tokens, "
          f"{args.new_tokens} new tokens each ({tokens} tokens); forwards per generate: "
          + ", ".join(f"{name} {forwards[name]}" for name in GENERATING))  # fmt: skip
    for name in GENERATING:
        print(f"  {name:<18} {seconds[name]:7.3f} s  {tokens / seconds[name]:8.1f} tokens/s")
    print(f"  ratio gathered once / per-layer gathers (tokens/s): "
          f"{seconds['per-layer gathers'] / seconds['gathered once']:.2f}x")  # fmt: skip
    print(f"  ratio gathered once / replicated (tokens/s): "
          f"{seconds['replicated'] / seconds['gathered once']:.2f}x")  # fmt: skip
    print(f"  the gather alone (generating's entry + exit): {seconds['gather only']:.3f} s, "
          f"{seconds['gather only'] / seconds['gathered once']:.1%} of a gathered-once call "
          f"({seconds['gathered once']:.3f} s, gather included)")  # fmt: skip
    print(f"  same samples in all three variants (same weights, same seed): "
          f"{'yes' if same else 'no'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512, help="a multiple of 64")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="prompts per rank")
    parser.add_argument("--prompt", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a rank
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as folder:
        command = [
            str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
            str(zero3_launch_config(Path(folder))), "--num_processes", "2",
            "--main_process_port", str(free_port()), __file__, "--worker",
            *(f"--{key}={value}" for key, value in vars(args).items() if key != "worker"),
        ]  # fmt: skip
        # HF_HOME: no accelerate default config of this machine's user may change the launch.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(Path(folder) / "hf_home")}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"the launch failed:\n{(result.stdout + result.stderr)[-4000:]}")
    print(result.stdout[result.stdout.index("generation_bench:") :], end="")  # the report


if __name__ == "__main__":
    main()
