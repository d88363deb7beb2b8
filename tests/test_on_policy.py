"""On-policy distillation (--lmbda) and sequence-level KD (--seq_kd) on tiny real models (CPU):
the prompts and the masks of generated batches, one training step against a float64 reference
written from the definition, λ = 0 as today's run, empty generations, exact resume, and the
refusals that come before any model loads."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig

from kd_dist.cli import main
from kd_dist.config import TrainConfig
from kd_dist.data import build_datasets, make_collator
from kd_dist.faults import FAULT_ENV
from kd_dist.generation import (
    Sampling,
    completion,
    generate_responses,
    prompt_lengths,
    response_writer,
)
from kd_dist.losses import IGNORE_INDEX
from kd_dist.tiny import build_model
from tests.conftest import write_jsonl
from tests.test_distributed import (
    accelerate_launch,
    deepspeed_config,
    launch,
    relative_difference,
    torchrun,
)
from tests.test_evaluation import documented_keys, saved_tokenizer
from tests.test_train import train_args, training_examples

ONE_SGD_STEP = ["--optimizer", "sgd", "--max_steps", "1", "--clip_grad_norm", "0",
                "--warmup_ratio", "0", "--lr_scheduler", "constant", "--learning_rate", "0.5",
                "--save_every", "0", "--no-compile_loss"]  # fmt: skip


def test_a_prompt_is_every_token_before_the_last_response():
    """Causal rows: the prompt ends where the last trained span starts (earlier answers of a
    conversation stay in it); a row with nothing trained, or trained from its first token, has
    none."""
    X = IGNORE_INDEX
    labels = torch.tensor([
        [X, X, 5, 6, X, X, 9, 10, X],  # two answers, padding after
        [X, X, X, X, X, X, X, X, X],  # nothing trained (a repeated or masked example)
        [3, 4, 5, X, X, X, X, X, X],  # trained from the start: no prompt
        [X, 7, 8, 9, 9, 9, 9, 9, 9],  # one answer to the end
    ])  # fmt: skip
    lengths = torch.tensor([8, 6, 3, 9])
    assert prompt_lengths(labels, lengths) == [6, None, None, 1]
    assert completion([4, 2, 9, 2], stop_ids=(2,)) == [4, 2]
    assert completion([2, 5], stop_ids=(2,)) == [2]  # stopped at once: the stop is trained on
    assert completion([4, 5, 6], stop_ids=(2, 7)) == [4, 5, 6]  # never stopped: all of it


def test_a_chat_prompt_is_the_template_with_its_generation_prompt(tokenizer, sentences, tmp_path):
    """The prompt cut from a tokenized conversation is exactly what the chat template renders
    for its earlier turns with the generation prompt (here the plain template kd_dist gives a
    tokenizer that has none)."""
    rows = [{"conversations": [{"from": "human", "value": s[:12]}, {"from": "gpt", "value": s},
                               {"from": "human", "value": s[-9:]}, {"from": "gpt", "value": s[:7]}]}
            for s in sentences[:4]]  # fmt: skip
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    local = with_pad_token(tokenizer)
    cfg = TrainConfig(dataset=str(dataset), max_length=128)
    data = build_datasets(cfg, local)
    batch = make_collator(local)([data.train[i] for i in range(len(data.train))])
    starts = prompt_lengths(batch["labels"], batch["attention_mask"].sum(1))
    assert len(starts) == len(rows)
    for index, (row, start) in enumerate(zip(rows, starts, strict=True)):
        turns = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                 for t in row["conversations"][:-1]]  # fmt: skip
        expected = local.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        assert local.decode(batch["input_ids"][index, :start]) == expected


def with_pad_token(tokenizer):
    """A copy of the session's tokenizer with a pad token, as kd_dist's loader gives it one."""
    local = copy.deepcopy(tokenizer)
    local.pad_token = local.eos_token
    return local


def padded_vocab_student(tokenizer, family: str = "gpt2"):
    """A tiny random student whose embedding has rows beyond the tokenizer's vocabulary (300
    tokens, 320 rows), in eval mode as generation runs it."""
    torch.manual_seed(0)
    return build_model(family, tokenizer, "tiny").eval()


def dolly_batch(tokenizer, dolly_dataset) -> dict[str, torch.Tensor]:
    """Three tokenized instruction examples and a fourth with every label masked."""
    local = with_pad_token(tokenizer)
    data = build_datasets(TrainConfig(dataset=str(dolly_dataset), max_length=40), local)
    examples = [data.train[i] for i in range(4)]
    examples[3] = {**examples[3], "labels": [IGNORE_INDEX] * len(examples[3]["labels"])}
    return make_collator(local)(examples)


def test_a_generated_batch_trains_on_its_completions_only(tokenizer, dolly_dataset):
    """Each row keeps its prompt, then the student's completion: labels on the completion only,
    up to its first stop token or --max_new_tokens; a row with nothing trained stays so; only
    the tokenizer's tokens are sampled; the same seed samples the same, and the global RNG is
    left as it was."""
    model = padded_vocab_student(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] > len(tokenizer)
    batch = dolly_batch(tokenizer, dolly_dataset)
    sampling = Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0,
                        stop_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.eos_token_id,
                        vocab_size=len(tokenizer))  # fmt: skip
    rng_before = torch.get_rng_state()
    generated = generate_responses(model, batch, sampling, seed=5, causal=True)
    assert torch.equal(torch.get_rng_state(), rng_before)
    starts = prompt_lengths(batch["labels"], batch["attention_mask"].sum(1))
    lengths = generated["attention_mask"].sum(1).tolist()
    for row in range(4):
        start = starts[row] if starts[row] is not None else batch["attention_mask"][row].sum()
        ids, labels = generated["input_ids"][row], generated["labels"][row]
        assert torch.equal(ids[:start], batch["input_ids"][row, :start])  # the prompt, kept
        written = ids[start : lengths[row]].tolist()
        assert 1 <= len(written) <= 6
        assert len(written) == 6 or written[-1] == tokenizer.eos_token_id
        assert max(written) < len(tokenizer)
        if row == 3:  # nothing trained before: nothing trained now
            assert (labels == IGNORE_INDEX).all()
        else:
            assert (labels[:start] == IGNORE_INDEX).all()
            assert labels[start : lengths[row]].tolist() == written
        assert (labels[lengths[row] :] == IGNORE_INDEX).all()  # padding
    again = generate_responses(model, batch, sampling, seed=5, causal=True)
    other = generate_responses(model, batch, sampling, seed=6, causal=True)
    assert all(torch.equal(again[k], generated[k]) for k in generated)
    assert not torch.equal(other["input_ids"], generated["input_ids"])


def test_the_checkpoints_own_generation_settings_do_not_change_the_samples(
    tokenizer, dolly_dataset
):
    """A checkpoint's generation_config (beam search, a repetition penalty, a minimum length,
    top-k, its temperature) is not how on-policy samples are drawn: they are those of the same
    model without one, and its generation_config is left as it was."""
    model = padded_vocab_student(tokenizer)
    batch = dolly_batch(tokenizer, dolly_dataset)
    sampling = Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0,
                        stop_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.eos_token_id,
                        vocab_size=len(tokenizer))  # fmt: skip
    plain = generate_responses(model, batch, sampling, seed=3, causal=True)
    settings = dict(num_beams=3, no_repeat_ngram_size=1, repetition_penalty=3.0, top_k=2,
                    min_new_tokens=6, temperature=0.3)  # fmt: skip
    model.generation_config.update(**settings)
    configured = generate_responses(model, batch, sampling, seed=3, causal=True)
    assert all(torch.equal(configured[key], plain[key]) for key in plain)
    assert {k: getattr(model.generation_config, k) for k in settings} == settings
    # What transformers would have done with them: another sample.
    prompts = batch["input_ids"][:1, :12]
    torch.manual_seed(3)
    leaked = model.generate(input_ids=prompts, generation_config=sampling.generation_config())
    model.generation_config = GenerationConfig()
    torch.manual_seed(3)
    assert not torch.equal(
        leaked, model.generate(input_ids=prompts, generation_config=sampling.generation_config())
    )


def test_a_seq2seq_batch_keeps_its_source_and_trains_on_the_generated_target(
    tokenizer, pairs_dataset
):
    local = with_pad_token(tokenizer)
    cfg = TrainConfig(dataset=str(pairs_dataset), task_type="seq2seq", max_length=24)
    data = build_datasets(cfg, local)
    batch = make_collator(local)([data.train[i] for i in range(3)])
    torch.manual_seed(0)
    model = build_model("t5", local, "tiny").eval()
    sampling = Sampling(max_new_tokens=5, temperature=1.0, top_p=0.9,
                        stop_ids=(local.eos_token_id,), pad_id=local.pad_token_id,
                        vocab_size=len(local))  # fmt: skip
    generated = generate_responses(model, batch, sampling, seed=1, causal=False)
    assert torch.equal(generated["input_ids"], batch["input_ids"])
    assert torch.equal(generated["attention_mask"], batch["attention_mask"])
    for labels in generated["labels"].tolist():
        written = [token for token in labels if token != IGNORE_INDEX]
        assert 1 <= len(written) <= 5 and max(written) < len(local)
        assert len(written) == 5 or written[-1] == local.eos_token_id


def test_which_batches_are_generated_depends_on_the_seed_and_step_not_the_rank():
    """The choice is a function of (seed, step, micro-batch), never of the rank (ZeRO-3's
    gathers are collectives), which a resumed run repeats; λ of the batches over a long run."""

    def writers(lmbda: float, seq_kd: bool, seed: int = 1) -> list:
        steps = ((step, index) for step in range(1, 501) for index in range(2))
        return [response_writer(seed, step, index, lmbda, seq_kd) for step, index in steps]

    half = writers(0.5, seq_kd=False)
    assert half == writers(0.5, seq_kd=False)
    assert half != writers(0.5, seq_kd=False, seed=2)
    assert set(half) == {"student", None} and 0.45 < half.count("student") / 1000 < 0.55
    assert set(writers(1.0, seq_kd=False)) == {"student"}
    assert set(writers(0.0, seq_kd=True)) == {"teacher"}
    mixed = writers(0.3, seq_kd=True)
    assert set(mixed) == {"student", "teacher"} and 0.25 < mixed.count("student") / 1000 < 0.35


def prompt_of(example: dict) -> list[int]:
    """An instruction example's prompt: its tokens before the first trained one."""
    start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    return example["input_ids"][:start]


def stop_after(model, prompts: list[list[int]], vocab_size: int, eos: int, steps: int) -> None:
    """Make ``model`` stop at varied lengths: eos gets the output row of the token whose first
    greedy occurrence after the prompts is spread most widely over the first ``steps``
    positions. A tie of logits goes to eos (its id is smaller), so greedy decoding now stops
    where it would have written that token, and the completions end at different lengths."""
    rows = [greedy_completion(model, prompt, vocab_size, eos, steps) for prompt in prompts]

    def stops(token: int) -> set[int]:
        return {row.index(token) if token in row else steps for row in rows}

    token = max({t for row in rows for t in row}, key=lambda t: (len(stops(t)), -t))
    with torch.no_grad():
        model.get_output_embeddings().weight[eos] = model.get_output_embeddings().weight[token]


@pytest.fixture(scope="module")
def completions_dataset(sentences, tmp_path_factory) -> Path:
    """Prompt/completion rows: a sentence's first three words, and the rest. (Unlike an
    instruction template's, these prompts end differently: so do the continuations.)"""
    rows = [{"prompt": " ".join(s.split()[:3]), "completion": " " + " ".join(s.split()[3:])}
            for s in sentences]  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("data") / "completions.jsonl", rows)


@pytest.fixture(scope="module")
def stopping_pair(model_pair, completions_dataset, tmp_path_factory) -> tuple[str, str]:
    """The tiny Llama teacher and student, each made to stop at varied lengths (``stop_after``)
    on ``completions_dataset``'s prompts: the completions of a batch, a micro-batch and a rank
    differ in length, as real ones do."""
    root = tmp_path_factory.mktemp("stopping")
    tokenizer = saved_tokenizer(model_pair("llama")[1])
    config = TrainConfig(dataset=str(completions_dataset), max_length=96)
    examples = build_datasets(config, tokenizer).train
    prompts = [prompt_of(example) for example in examples]
    folders = []
    for role, folder in zip(("teacher", "student"), model_pair("llama"), strict=True):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        stop_after(model, prompts, len(tokenizer), tokenizer.eos_token_id, steps=5)
        model.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
        folders.append(str(root / role))
    return folders[0], folders[1]


def greedy_completion(model, prompt: list[int], vocab_size: int, eos: int, limit: int) -> list:
    """The student's greedy continuation of one prompt, token by token, unpadded: up to and
    including eos, at most ``limit`` tokens, over the tokenizer's tokens only."""
    written: list[int] = []
    with torch.no_grad():
        while len(written) < limit and (not written or written[-1] != eos):
            logits = model(input_ids=torch.tensor([prompt + written])).logits[0, -1, :vocab_size]
            written.append(int(logits.argmax()))
    return written


def one_step_on_completions(
    teacher_dir: str, student_dir: str, rows: list[tuple[list, list]], cfg: TrainConfig,
    vocab_size: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The student after one SGD step (momentum's first is lr * gradient) on the loss by its
    definition, in float64: over every completion token of every (prompt, completion) row,
    (1 - alpha) * T^2 * KL(p_T || q_T) + alpha * (-log q(token)), summed and divided by the
    number of completion tokens."""
    student = AutoModelForCausalLM.from_pretrained(student_dir).double()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).double().eval()
    T, total, tokens = cfg.temperature, 0.0, 0
    for prompt, written in rows:
        ids = torch.tensor([prompt + written])
        # Position i predicts token i + 1: the completion's tokens are predicted from
        # positions len(prompt) - 1 ... len(ids) - 2.
        where = slice(len(prompt) - 1, ids.shape[1] - 1)
        s = student(input_ids=ids).logits[0, where, :vocab_size]
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[0, where, :vocab_size]
        log_p, log_q = (t / T).log_softmax(-1), (s / T).log_softmax(-1)
        kd = T**2 * (log_p.exp() * (log_p - log_q)).sum()
        ce = -s.log_softmax(-1).gather(-1, torch.tensor(written)[:, None]).sum()
        total = total + (1 - cfg.alpha) * kd + cfg.alpha * ce
        tokens += len(written)
    (total / tokens).backward()
    return {name: p.detach() - cfg.learning_rate * p.grad for name, p in student.named_parameters()}


@pytest.mark.parametrize(("writer", "flags"), [("student", ["--lmbda", "1"]),
                                               ("teacher", ["--seq_kd"])])  # fmt: skip
def test_one_step_is_the_float64_step_on_the_generated_completions(
    writer, flags, stopping_pair, completions_dataset, tmp_path
):
    """Greedy: one SGD step over all 64 examples lands where the float64 gradient of the loss
    on the completions of their prompts says, the student's own (--lmbda 1) or the teacher's
    (--seq_kd); the loss covers the generated tokens only (the prompts and the dataset's
    responses add nothing) and is divided by their number, whatever their lengths. A padded
    vocabulary's extra rows are never generated."""
    teacher, student = stopping_pair  # Llama: no dropout
    out = tmp_path / "run"
    argv = train_args(teacher, student, completions_dataset, out, *ONE_SGD_STEP, "--batch_size",
                      "64",
                      *flags, "--generation_temperature", "0", "--max_new_tokens", "5",
                      "--alpha", "0.2", "--max_length", "96")  # fmt: skip
    assert main(argv) == 0
    cfg, tokenizer, examples = training_examples(out, student)
    assert len(examples) == 64  # one batch: the whole step
    model = AutoModelForCausalLM.from_pretrained(student if writer == "student" else teacher)
    model.eval()
    rows = []
    for example in examples:
        prompt = prompt_of(example)
        written = greedy_completion(model, prompt, len(tokenizer), tokenizer.eos_token_id, 5)
        rows.append((prompt, written))
    assert len({len(written) for _, written in rows}) >= 3  # completions of varied lengths
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["generated_tokens"] == sum(len(written) for _, written in rows)
    expected = one_step_on_completions(teacher, student, rows, cfg, len(tokenizer))
    actual = load_file(out / "model.safetensors")
    before = load_file(Path(student) / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value.float(), rtol=1e-5, atol=1e-6, msg=key)
    assert max((expected[k].float() - before[k]).abs().max() for k in before) > 1e-3


def test_lmbda_0_is_the_off_policy_run_and_an_empty_generation_adds_nothing(
    model_pair, dolly_dataset, tmp_path, monkeypatch
):
    """--lmbda 0 trains exactly as a run without the flag. Under --lmbda 1, a micro-batch with
    nothing to train on (here every label masked, as accelerate's repeated examples are)
    generates nothing to train on: its step has loss 0, not NaN, and the run goes on."""
    teacher, student = model_pair("gpt2")  # dropout: the RNG stream must be the same too
    common = ["--max_steps", "3", "--seed", "4", "--save_every", "0", "--max_length", "96"]
    runs = {}
    for name, extra in {"off": [], "lmbda_0": ["--lmbda", "0"]}.items():
        runs[name] = tmp_path / name
        assert main(train_args(teacher, student, dolly_dataset, runs[name], *common, *extra)) == 0
    expected, actual = (load_file(runs[name] / "model.safetensors") for name in runs)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    assert "generated_tokens" not in (runs["lmbda_0"] / "metrics.jsonl").read_text()

    monkeypatch.setenv(FAULT_ENV, "mask_labels@2")
    masked = tmp_path / "masked"
    argv = train_args(teacher, student, dolly_dataset, masked, *common, "--lmbda", "1",
                      "--max_new_tokens", "4")  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (masked / "metrics.jsonl").read_text().splitlines()]
    assert [r["generated_tokens"] for r in records] == [16, 0, 16]  # 4 rows x 4 at most
    assert records[1]["loss"] == 0.0 and records[1]["grad_norm"] == 0.0
    assert all(r["loss"] > 0 for r in (records[0], records[2]))
    keys = documented_keys("Each training line") | documented_keys("adds to each training line")
    assert all(set(r) == keys for r in records)


def test_a_run_preempted_mid_epoch_resumes_to_the_same_weights(
    model_pair, dolly_dataset, tmp_path, monkeypatch
):
    """--lmbda 0.5 with sampling, 2 epochs, dropout: stopped mid-way through the second epoch
    (a checkpoint is saved, exit 75) and resumed with the same command, the run regenerates
    what the uninterrupted one did and ends on exactly its weights and losses."""
    teacher, student = model_pair("gpt2")
    common = ("--epochs", "2", "--batch_size", "8", "--gradient_accumulation_steps", "2",
              "--lmbda", "0.5", "--max_new_tokens", "6", "--top_p", "0.9", "--seed", "7",
              "--max_length", "96", "--save_every", "0", "--eval_ratio", "0.25",
              "--eval_steps", "3", "--resume_from_checkpoint", "auto")  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(train_args(teacher, student, dolly_dataset, straight, *common)) == 0
    monkeypatch.setenv(FAULT_ENV, "signal_SIGUSR1@5")  # 3 steps an epoch: inside the second
    assert main(train_args(teacher, student, dolly_dataset, stopped, *common)) == 75
    monkeypatch.delenv(FAULT_ENV)
    assert main(train_args(teacher, student, dolly_dataset, stopped, *common)) == 0
    expected, actual = (load_file(d / "model.safetensors") for d in (straight, stopped))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)

    def lines(run: Path) -> list[dict]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        timings = ("_per_s", "seconds", "memory")  # measured, not computed
        return [{k: v for k, v in r.items() if not any(t in k for t in timings)}
                for r in records]  # fmt: skip

    assert lines(stopped) == lines(straight)
    # Both kinds of batch ran, and the evaluation measured the student's own completions.
    generated = [r["generated_tokens"] for r in lines(straight) if "generated_tokens" in r]
    assert 0 in generated and max(generated) > 0
    evals = [r for r in lines(straight) if "eval_on_policy_teacher_nll" in r]
    assert len(evals) == 2 and all(r["eval_on_policy_tokens"] > 0 for r in evals)
    keys = documented_keys("Each evaluation line") | documented_keys("each evaluation line also")
    assert all(set(r) | {"eval_seconds"} == keys for r in evals)


@pytest.mark.distributed
def test_two_processes_take_the_single_process_step_on_generated_completions(
    stopping_pair, completions_dataset, tmp_path
):
    """Greedy, so the completions do not depend on how the batch is split: one SGD step of 2
    processes x batch 4 x accumulation 2 equals one process's step on the whole batch of 16,
    with models made to stop at varied lengths (the loss is divided by
    the step's generated tokens over all of them). The student writes them under ZeRO-3
    (gathered once for generation) and DDP; the teacher under --seq_kd, sharded by its own
    ZeRO-3 engine (gathered layer by layer, every rank in step). The on-policy evaluation of the
    held-out prompts, split over the ranks, measures what one process measures."""
    teacher, student = stopping_pair
    common = ["--teacher_model", teacher, "--student_model", student, "--dataset",
              str(completions_dataset), *ONE_SGD_STEP, "--generation_temperature", "0",
              "--max_new_tokens", "5", "--alpha", "0.2", "--max_length", "96",
              "--eval_ratio", "0.25", "--eval_on_policy"]  # fmt: skip
    split = ["--batch_size", "4", "--gradient_accumulation_steps", "2"]
    start = load_file(Path(student) / "model.safetensors")
    lmbda, seq_kd = ["--lmbda", "1"], ["--seq_kd"]
    runs = {  # name: (launcher, what generates, this run's own flags)
        "zero3": (accelerate_launch(deepspeed_config(tmp_path, 3)), lmbda, []),
        "ddp": (torchrun(), lmbda, []),
        "zero3_teacher": (accelerate_launch(deepspeed_config(tmp_path, 3)), seq_kd,
                          ["--teacher_placement", "zero3"]),
    }  # fmt: skip
    singles: dict[str, Path] = {}
    for name, (command, generating, flags) in runs.items():
        key = generating[0]
        if key not in singles:
            singles[key] = tmp_path / f"single{len(singles)}"
            argv = ["train", *common, *generating, "--batch_size", "16", "--output_dir",
                    str(singles[key])]  # fmt: skip
            assert main(argv) == 0
        out = tmp_path / name
        argv = [*common, *generating, *flags, *split, "--output_dir", str(out)]
        launch(command, argv, tmp_path / f"{name}.log")
        expected = load_file(singles[key] / "model.safetensors")
        actual = load_file(out / "model.safetensors")
        assert relative_difference(actual, expected, start) < 1e-3, name
        records = [
            [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (singles[key], out)
        ]
        assert records[1][0]["loss"] == pytest.approx(records[0][0]["loss"], rel=1e-5), name
        single_eval, split_eval = (r[-1] for r in records)
        for metric in ("on_policy_teacher_nll", "on_policy_reverse_kl", "on_policy_tokens"):
            assert split_eval[f"eval_{metric}"] == pytest.approx(
                single_eval[f"eval_{metric}"], rel=1e-4
            ), (name, metric)


def test_seq2seq_trains_on_its_own_targets_and_kd_dist_eval_measures_them(
    model_pair, pairs_dataset, tmp_path, capsys
):
    """T5 under --lmbda 1: the decoder's own targets of each source are trained on; the run's
    evaluation and `kd-dist eval --eval_on_policy` on the exported student measure the same
    held-out completions alike (the same seeds), and the table shows them."""
    teacher, student = model_pair("t5")
    out = tmp_path / "run"
    argv = train_args(teacher, student, pairs_dataset, out, "--task_type", "seq2seq",
                      "--lmbda", "1", "--max_new_tokens", "6", "--max_steps", "2",
                      "--eval_ratio", "0.25", "--save_every", "0")  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["generated_tokens"] > 0 for r in records if "loss" in r)
    final = records[-1]
    assert final["eval_on_policy_tokens"] > 0 and final["eval_on_policy_reverse_kl"] > 0
    capsys.readouterr()
    result = tmp_path / "eval.json"
    assert main(["eval", "--student", str(out), "--teacher", teacher, "--eval_on_policy",
                 "--output_json", str(result)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "teacher NLL of own samples" in printed and "reverse KL on own samples" in printed
    measured = json.loads(result.read_text())
    for key in ("on_policy_teacher_nll", "on_policy_reverse_kl", "on_policy_tokens"):
        assert measured[key] == pytest.approx(final[f"eval_{key}"], rel=1e-5), key


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="--generation_backend vllm needs a CUDA GPU and the vllm package",
)
def test_vllm_completions_train_as_the_transformers_ones(
    stopping_pair, completions_dataset, tmp_path
):
    """Greedy, two steps (the second after vLLM took the first step's weights): vLLM's
    completions, which stop at varied lengths, are the transformers ones, so the runs generate
    as many tokens step by step and end on the same weights (up to the kernels' rounding).

    Run on a GPU machine with vLLM: ``pytest tests/test_on_policy.py -m gpu``."""
    teacher, student = stopping_pair
    runs = {}
    for backend in ("transformers", "vllm"):
        runs[backend] = tmp_path / backend
        argv = train_args(teacher, student, completions_dataset, runs[backend], "--max_steps", "2",
                          "--lmbda", "1", "--generation_temperature", "0", "--max_new_tokens",
                          "8", "--max_length", "96", "--save_every", "0",
                          "--generation_backend", backend)  # fmt: skip
        assert main(argv) == 0
    logged = {
        backend: [json.loads(line)["generated_tokens"]
                  for line in (run / "metrics.jsonl").read_text().splitlines()]
        for backend, run in runs.items()
    }  # fmt: skip
    assert logged["vllm"] == logged["transformers"]
    expected, actual = (load_file(run / "model.safetensors") for run in runs.values())
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-3, atol=1e-4, msg=key)


def test_cache_teacher_refuses_generation_flags(model_pair, dolly_dataset, tmp_path, capsys):
    """A cache holds the teacher's distributions of the dataset's responses: generating is a
    training choice, refused before anything is read or written."""
    teacher, _ = model_pair("gpt2")
    out = tmp_path / "cache"
    argv = ["cache-teacher", "--teacher_model", teacher, "--dataset", str(dolly_dataset),
            "--output_dir", str(out), "--lmbda", "0.5"]  # fmt: skip
    assert main(argv) == 2
    assert "drop them from cache-teacher" in capsys.readouterr().err
    assert not out.exists()
