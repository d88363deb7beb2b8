"""Held-out metrics against a float64 reference written from their definitions, on fresh random
models and inputs: in-process, through a real training run, and with 2 processes over uneven
shards (the last batch padded with repeated examples that must not be counted twice)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import kd_dist.models
from kd_dist.cli import main
from kd_dist.config import TrainConfig
from kd_dist.data import build_datasets, make_collator
from kd_dist.evaluation import METRIC_KEYS, TEACHER_KEYS, evaluate, json_safe
from kd_dist.tiny import SEQ2SEQ_FAMILIES, build_model, save_pair
from tests.test_distributed import BIN, accelerate_launch, deepspeed_config, free_port, launch

IGNORE = -100


def reference_metrics(student, teacher, batches, vocab_size: int, causal: bool) -> dict:
    """The metrics by their definition, on full float64 logits of float64 copies of the models.

    Over every label position that is not -100 (causal: position t predicts label t+1):
    cross-entropy -log q(label), KL(p || q) = sum_v p_v (log p_v - log q_v) at T=1, its reverse
    KL(q || p), and argmax q == argmax p; the logits are cut to the tokenizer's vocabulary first.
    """
    student, teacher = (copy.deepcopy(m).double().eval() for m in (student, teacher))

    def logits(batch):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if not causal:  # the models build their decoder inputs from the labels themselves
            inputs["labels"] = batch["labels"]
        return student(**inputs).logits, teacher(**inputs).logits

    with torch.no_grad():
        return metrics_of_logits(batches, logits, vocab_size, causal)


def metrics_of_logits(batches, logits, vocab_size: int, causal: bool) -> dict:
    """The metrics (as above) of the student and teacher logits ``logits(batch)`` returns, in
    float64 whatever their dtype."""
    sums = dict(student_ce=0.0, teacher_ce=0.0, kl=0.0, reverse_kl=0.0, agreement=0.0, tokens=0)
    for batch in batches:
        s, t = (values[..., :vocab_size].double() for values in logits(batch))
        labels = batch["labels"]
        if causal:
            s, t, labels = s[:, :-1], t[:, :-1], labels[:, 1:]
        valid = labels != IGNORE
        s, t, labels = s[valid], t[valid], labels[valid]
        log_q, log_p = s.log_softmax(-1), t.log_softmax(-1)
        sums["student_ce"] -= log_q.gather(-1, labels[:, None]).sum().item()
        sums["teacher_ce"] -= log_p.gather(-1, labels[:, None]).sum().item()
        sums["kl"] += (log_p.exp() * (log_p - log_q)).sum().item()
        sums["reverse_kl"] += (log_q.exp() * (log_q - log_p)).sum().item()
        sums["agreement"] += (s.argmax(-1) == t.argmax(-1)).sum().item()
        sums["tokens"] += int(valid.sum())
    n = sums["tokens"]
    return {
        "student_ce": sums["student_ce"] / n,
        "teacher_ce": sums["teacher_ce"] / n,
        "kl_to_teacher": sums["kl"] / n,
        "reverse_kl_to_teacher": sums["reverse_kl"] / n,
        "top1_agreement": sums["agreement"] / n,
        "tokens": n,
    }


def bf16_reference(student, teacher, batches, vocab_size: int, projection: torch.dtype) -> dict:
    """The metrics of a causal --bf16 run by definition: both forwards under bf16 autocast (pass
    the teacher in bf16, as kd_dist loads it), the student's final hidden states (its lm_head's
    input) projected by lm_head's weight in ``projection``, the teacher's logits its own; the
    metrics' math in float64."""
    captured = []
    student_head = student.get_output_embeddings()
    hook = student_head.register_forward_pre_hook(lambda _, args: captured.append(args[0]))

    def logits(batch):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            student(**inputs)
            teacher_logits = teacher(**inputs).logits
        return captured.pop().to(projection) @ student_head.weight.to(projection).T, teacher_logits

    try:
        with torch.no_grad():
            return metrics_of_logits(batches, logits, vocab_size, causal=True)
    finally:
        hook.remove()


def assert_metrics_match(actual: dict, expected: dict) -> None:
    assert set(actual) == set(METRIC_KEYS)
    assert actual["tokens"] == expected["tokens"]
    for key in ("student_ce", "teacher_ce", "kl_to_teacher", "reverse_kl_to_teacher",
                "top1_agreement"):  # fmt: skip
        assert actual[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert actual["student_ppl"] == pytest.approx(math.exp(expected["student_ce"]), rel=1e-4)


def teacher_and_student(family: str, tokenizer) -> tuple:
    """A random teacher and a noisy copy of it as the student, so that they agree on some tokens
    and not others. Random models are nearly uniform: the teacher's output weight is scaled so
    that its logits spread over a few nats, which makes KL and agreement telling."""
    torch.manual_seed(11)
    teacher = build_model(family, tokenizer, "small", tie_word_embeddings=False).eval()
    with torch.no_grad():
        if hasattr(teacher, "final_logits_bias"):  # BART: the fused path must add it
            teacher.final_logits_bias.normal_()
        ids = torch.randint(4, len(tokenizer), (2, 12))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if family in SEQ2SEQ_FAMILIES:
            inputs["decoder_input_ids"] = ids
        spread = teacher(**inputs).logits[..., : len(tokenizer)].std()
        teacher.get_output_embeddings().weight.mul_(3.0 / spread)
        student = copy.deepcopy(teacher)
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter) * parameter.std().nan_to_num() * 0.2)
    return teacher, student


def random_batches(vocab: int, causal: bool, generator: torch.Generator) -> list[dict]:
    """Padded batches with masked prompts, and one batch whose labels are all masked."""
    batches = []
    for size, length in ((4, 15), (5, 9), (3, 12)):
        ids = torch.randint(4, vocab, (size, length), generator=generator)
        lengths = torch.randint(2, length + 1, (size,), generator=generator)
        positions = torch.arange(length)
        attention = (positions[None] < lengths[:, None]).long()
        labels = ids.masked_fill(attention == 0, IGNORE)
        labels[:, :2] = IGNORE  # a masked prompt
        batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
        if not causal:
            targets = torch.randint(4, vocab, (size, length - 2), generator=generator)
            batch["labels"] = targets.masked_fill(torch.rand(targets.shape) < 0.3, IGNORE)
        batches.append(batch)
    batches.append({**batches[0], "labels": torch.full_like(batches[0]["labels"], IGNORE)})
    return batches


@pytest.mark.parametrize(("family", "path"), [("llama", "fused"), ("gemma2", "fused"),
                                               ("bart", "fused"), ("t5", "fused"),
                                               ("llama", "unknown family"),
                                               ("llama", "--no-fused_loss")])  # fmt: skip
def test_metrics_equal_a_float64_reference(family, path, tokenizer, monkeypatch):
    """Fused (hidden states x output weight: a plain head, Gemma-2's soft-capping, BART's
    final_logits_bias, T5's scaling) and logit rows for a family the fused path does not know
    or with the fused path switched off; chunks of 5 rows, a vocabulary padded beyond the
    tokenizer's, an all-masked batch."""
    if path == "unknown family":
        monkeypatch.delitem(kd_dist.models.FUSED_HEAD_RULES, family)
    teacher, student = teacher_and_student(family, tokenizer)
    causal = family not in SEQ2SEQ_FAMILIES
    batches = random_batches(len(tokenizer), causal, torch.Generator().manual_seed(5))
    student.train()
    actual = evaluate(student, teacher, batches, task_type="causal" if causal else "seq2seq",
                      vocab_size=len(tokenizer), chunk_rows=5,
                      fused=path != "--no-fused_loss")  # fmt: skip
    assert student.training  # left as it was found
    expected = reference_metrics(student, teacher, batches, len(tokenizer), causal)
    assert_metrics_match(actual, expected)
    assert 0.1 < expected["top1_agreement"] < 0.9 and expected["kl_to_teacher"] > 0.005


@pytest.mark.parametrize(("family", "fused"), [("llama", True), ("t5", True), ("llama", False)])
def test_without_a_teacher_the_student_alone_is_measured_in_one_forward(family, fused,
                                                                         tokenizer):  # fmt: skip
    """--alpha 1 loads no teacher: the student's cross-entropy equals the float64 reference,
    the teacher's metrics are None (not the student against itself), and each batch runs the
    student's forward once."""
    teacher, student = teacher_and_student(family, tokenizer)
    causal = family not in SEQ2SEQ_FAMILIES
    batches = random_batches(len(tokenizer), causal, torch.Generator().manual_seed(5))
    forwards = []
    student.register_forward_hook(lambda *_: forwards.append(1))
    actual = evaluate(student, None, batches, task_type="causal" if causal else "seq2seq",
                      vocab_size=len(tokenizer), chunk_rows=5, fused=fused)  # fmt: skip
    assert len(forwards) == len(batches)
    expected = reference_metrics(student, teacher, batches, len(tokenizer), causal)
    assert set(actual) == set(METRIC_KEYS) and actual["tokens"] == expected["tokens"]
    assert actual["student_ce"] == pytest.approx(expected["student_ce"], rel=1e-4)
    assert actual["student_ppl"] == pytest.approx(math.exp(expected["student_ce"]), rel=1e-4)
    assert {key: actual[key] for key in TEACHER_KEYS} == dict.fromkeys(TEACHER_KEYS)
    assert json_safe(actual) == actual  # None stays None: null in metrics.jsonl


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def assert_projected_in_bf16(actual: dict, student, teacher, batches, vocab_size: int) -> None:
    """``actual`` equals the reference with the student's projection in bf16, as training
    computes it (the same bf16 products: to 1e-6), and not the one in fp32 (over 1e-4 off)."""
    expected = bf16_reference(student, teacher, batches, vocab_size, torch.bfloat16)
    assert_metrics_match(actual, expected)
    assert actual["kl_to_teacher"] == pytest.approx(expected["kl_to_teacher"], rel=1e-6)
    fp32 = bf16_reference(student, teacher, batches, vocab_size, torch.float32)
    assert actual["kl_to_teacher"] != pytest.approx(fp32["kl_to_teacher"], rel=1e-4)


def test_under_bf16_the_student_s_hidden_states_are_projected_in_bf16(tokenizer):
    """As in training (``projection_input``): its final norm leaves fp32 hidden states under
    autocast, and they are projected in the run's precision; the metrics' math stays fp32."""
    teacher, student = teacher_and_student("llama", tokenizer)
    teacher.to(torch.bfloat16)
    batches = random_batches(len(tokenizer), True, torch.Generator().manual_seed(5))
    actual = evaluate(student, teacher, batches,
                      task_type="causal", vocab_size=len(tokenizer), chunk_rows=5,
                      autocast=bf16_autocast, compute_dtype=torch.bfloat16)  # fmt: skip
    assert_projected_in_bf16(actual, student, teacher, batches, len(tokenizer))


def test_an_all_masked_evaluation_gives_zeros_not_nan(tokenizer):
    student, teacher = (build_model("llama", tokenizer, size) for size in ("tiny", "small"))
    batch = random_batches(len(tokenizer), True, torch.Generator().manual_seed(0))[-1]
    metrics = evaluate(student, teacher, [batch], task_type="causal",
                       vocab_size=len(tokenizer), chunk_rows=4)  # fmt: skip
    assert metrics["tokens"] == 0 and metrics["kl_to_teacher"] == 0.0
    assert metrics["student_ppl"] == 1.0


def saved_tokenizer(path) -> AutoTokenizer:
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as kd_dist does
    return tokenizer


def eval_split_batches(cfg: TrainConfig, student_dir, batch_size: int | None = None) -> list:
    """The eval split ``cfg`` selects, collated in order in batches of ``batch_size`` (None:
    one batch)."""
    tokenizer = saved_tokenizer(student_dir)
    examples = build_datasets(cfg, tokenizer).eval
    collate, size = make_collator(tokenizer), batch_size or len(examples)
    return [collate([examples[i] for i in range(start, min(start + size, len(examples)))])
            for start in range(0, len(examples), size)]  # fmt: skip


def eval_split_reference(cfg: TrainConfig, student_dir, teacher_dir) -> dict:
    """The reference metrics of a saved student on the eval split ``cfg`` selects."""
    tokenizer = saved_tokenizer(student_dir)
    batches = eval_split_batches(cfg, student_dir)
    auto = AutoModelForSeq2SeqLM if cfg.task_type == "seq2seq" else AutoModelForCausalLM
    student, teacher = auto.from_pretrained(student_dir), auto.from_pretrained(teacher_dir)
    return reference_metrics(student, teacher, batches, len(tokenizer), cfg.task_type == "causal")


def run_reference(run_dir: Path, student_dir, teacher_dir) -> dict:
    """The reference metrics of a saved student on the eval split of the run in ``run_dir``."""
    cfg = TrainConfig(**json.loads((run_dir / "kd_config.json").read_text()))
    return eval_split_reference(cfg, student_dir, teacher_dir)


def records_of(run: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_kl_to_teacher" in r]


def documented_keys(heading: str) -> set[str]:
    """The keys in README's table under ``heading`` (rows like | `key` | ...)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split(heading, 1)[1].split("\n\n", 2)[1]
    return {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}


RUN_FLAGS = ["--eval_ratio", "0.2", "--max_steps", "3", "--batch_size", "4", "--logging_steps",
             "1", "--max_length", "32", "--learning_rate", "1e-2", "--alpha", "0.3",
             "--vocab_chunk_size", "7", "--save_every", "0", "--seed", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated_run(model_pair, text_dataset, tmp_path_factory) -> tuple[Path, str, str]:
    """A short real run: eval before training, every 2 steps and at the end; TensorBoard on."""
    teacher, student = model_pair("gpt2")  # dropout: evaluating must not shift its RNG stream
    out = tmp_path_factory.mktemp("evaluated") / "run"
    argv = ["train", "--teacher_model", teacher, "--student_model", student,
            "--dataset", str(text_dataset), "--output_dir", str(out), *RUN_FLAGS, "--eval_steps",
            "2", "--eval_before_training", "--report_to", "tensorboard"]  # fmt: skip
    assert main(argv) == 0
    return out, teacher, student


def test_training_evaluates_on_schedule_logs_documented_keys_and_matches_the_reference(
    evaluated_run, text_dataset, tmp_path
):
    """Each line of metrics.jsonl has the keys the README documents; the first and last
    evaluations equal the float64 reference on the starting and the exported student;
    TensorBoard receives the same scalars; the evaluations change nothing in the training."""
    out, teacher, student = evaluated_run
    train, evals = records_of(out)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for record in train:
        assert set(record) == documented_keys("Each training line")
        assert record["kd_loss"] > 0 and record["ce_loss"] > 0 and record["peak_memory_mb"] > 0
        assert record["samples_per_s"] > 0 and record["tokens_per_s"] > record["samples_per_s"]
        assert record["loss"] == pytest.approx(0.7 * record["kd_loss"] + 0.3 * record["ce_loss"])
    for record in evals:
        assert set(record) == documented_keys("Each evaluation line")
    final = json.loads((out / "eval_results.json").read_text())
    assert final == {key: evals[-1][f"eval_{key}"] for key in METRIC_KEYS}
    assert_metrics_match(final, run_reference(out, out, teacher))
    initial = {key: evals[0][f"eval_{key}"] for key in METRIC_KEYS}
    assert_metrics_match(initial, run_reference(out, student, teacher))
    assert final["student_ppl"] != initial["student_ppl"]
    # Evaluating mid-run leaves training untouched: the same weights as a run that only
    # evaluates after its last step.
    plain = tmp_path / "plain"
    argv = ["train", "--teacher_model", teacher, "--student_model", student, "--dataset",
            str(text_dataset), "--output_dir", str(plain), *RUN_FLAGS]  # fmt: skip
    assert main(argv) == 0
    expected, actual = (load_file(run / "model.safetensors") for run in (plain, out))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "runs" / "kd_dist").glob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"loss", "kd_loss", "lr", "eval_kl_to_teacher", "eval_top1_agreement"} <= set(scalars)


def test_report_writes_valid_plots_and_the_before_after_summary(evaluated_run, tmp_path):
    from PIL import Image

    out, _, _ = evaluated_run
    assert main(["report", str(out), "--output_dir", str(tmp_path / "report")]) == 0
    names = ["train_loss.png", "learning_rate.png", "throughput.png", "eval_kl.png",
             "eval_agreement.png", "eval_perplexity.png"]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted([*names, "report.md"])
    for name in names:
        with Image.open(tmp_path / "report" / name) as image:
            image.load()  # decodes every pixel: a truncated or corrupt file raises
            assert (image.format, image.size) == ("PNG", (640, 400)), name
            assert len(image.getcolors(maxcolors=100_000) or []) > 20, name  # not blank
    summary = (tmp_path / "report" / "report.md").read_text()
    _, evals = records_of(out)
    for record, label in ((evals[0], "step 0 (before training)"),
                          (evals[-1], "step 3 (last evaluation)")):  # fmt: skip
        row = next(line for line in summary.splitlines() if label in line)
        assert f"| {record['eval_kl_to_teacher']:.4f} |" in row
        assert f"| {record['eval_student_ppl']:.3f} |" in row
    assert f"| teacher | {evals[0]['eval_teacher_ce']:.4f} |" in summary
    assert all(f"]({name})" in summary for name in names)


def test_report_without_matplotlib_names_the_extra_to_install(evaluated_run, monkeypatch,
                                                               capsys):  # fmt: skip
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import` sees when it is absent
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert main(["report", str(evaluated_run[0])]) == 2
    assert "pip install 'kd_dist[report]'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_report_to_a_tracker_that_is_not_installed_names_the_extra(capsys):
    argv = ["train", "--teacher_model", "t", "--student_model", "s", "--dataset", "d",
            "--report_to", "wandb"]  # fmt: skip
    assert main(argv) == 2
    assert "pip install 'kd_dist[wandb]'" in capsys.readouterr().err


def test_eval_flags_without_an_eval_split_fail_before_models_load(model_pair, text_dataset,
                                                                   tmp_path, capsys):  # fmt: skip
    teacher, student = model_pair("llama")
    argv = ["train", "--teacher_model", teacher, "--student_model", student, "--dataset",
            str(text_dataset), "--output_dir", str(tmp_path / "run"),
            "--eval_steps", "5"]  # fmt: skip
    assert main(argv) == 2
    assert "--eval_steps, --eval_before_training and --eval_on_policy need an eval split" in (
        capsys.readouterr().err
    )


def test_eval_command_on_a_seq2seq_student_equals_the_reference(model_pair, pairs_dataset,
                                                                  tmp_path, capsys):  # fmt: skip
    """`kd-dist eval` on an untrained T5 student (the baseline use): target tokens only."""
    teacher, student = model_pair("t5")
    result = tmp_path / "metrics.json"
    argv = ["eval", "--student", student, "--teacher", teacher, "--dataset", str(pairs_dataset),
            "--task_type", "seq2seq", "--batch_size", "5", "--max_eval_samples", "13",
            "--max_length", "32", "--output_json", str(result)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(result.read_text())
    assert f"{metrics['kl_to_teacher']:.4f}" in printed and "top-1 agreement" in printed
    tokenizer = saved_tokenizer(student)
    cfg = TrainConfig(teacher_model=teacher, student_model=student, dataset=str(pairs_dataset),
                      task_type="seq2seq", max_length=32)  # fmt: skip
    examples = build_datasets(cfg, tokenizer).train.select(range(13))
    batch = make_collator(tokenizer)([examples[i] for i in range(13)])
    reference = reference_metrics(AutoModelForSeq2SeqLM.from_pretrained(student),
                                  AutoModelForSeq2SeqLM.from_pretrained(teacher), [batch],
                                  len(tokenizer), causal=False)  # fmt: skip
    assert_metrics_match(metrics, reference)
    assert reference["tokens"] == int((batch["labels"] != IGNORE).sum())  # targets only


@pytest.mark.distributed
def test_two_processes_on_uneven_shards_count_each_example_once(model_pair, text_dataset,
                                                                 tmp_path):  # fmt: skip
    """13 eval examples, batches of 4, 2 processes: rank 1's last batch is padded with repeats
    of the first examples. `kd-dist eval` under torchrun (DDP), and evaluation inside ZeRO-3
    training with every weight sharded (student and teacher output layers gathered for the
    chunks), must both equal the single-process float64 reference exactly in their token count.
    """
    teacher, student = model_pair("llama")
    data = ["--dataset", str(text_dataset), "--eval_ratio", "0.2", "--max_length", "32",
            "--batch_size", "4", "--vocab_chunk_size", "9"]  # fmt: skip
    cfg = TrainConfig(teacher_model=teacher, student_model=student, dataset=str(text_dataset),
                      eval_ratio=0.2, max_length=32)  # fmt: skip
    expected = eval_split_reference(cfg, student, teacher)
    assert expected["tokens"] > 0 and len(build_datasets(cfg, saved_tokenizer(student)).eval) == 13

    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    result = tmp_path / "ddp.json"
    output = launch(torchrun, ["--student", student, "--teacher", teacher, *data,
                               "--output_json", str(result)], tmp_path / "ddp.log",
                    subcommand="eval")  # fmt: skip
    assert output.count("top-1 agreement") == 1  # one table, from the main process only
    assert_metrics_match(json.loads(result.read_text()), expected)

    out = tmp_path / "zero3"
    output = launch(accelerate_launch(deepspeed_config(tmp_path, 3)),
                    ["--teacher_model", teacher, "--student_model", student, *data,
                     "--output_dir", str(out), "--max_steps", "1", "--eval_before_training",
                     "--teacher_placement", "zero3", "--save_every", "0",
                     "--learning_rate", "1e-2"], tmp_path / "zero3.log")  # fmt: skip
    assert "2 process(es) (DistributedType.DEEPSPEED), ZeRO stage 3" in output
    assert "sharded by its ZeRO-3 engine" in output
    _, evals = records_of(out)
    assert [r["step"] for r in evals] == [0, 1]
    assert_metrics_match({key: evals[0][f"eval_{key}"] for key in METRIC_KEYS}, expected)
    assert_metrics_match(json.loads((out / "eval_results.json").read_text()),
                         run_reference(out, out, teacher))  # fmt: skip


def test_report_reads_torn_null_and_repeated_lines(evaluated_run, tmp_path):
    """What real runs leave: a last line torn by a crash, null for an infinite perplexity, an
    evaluation repeated by a resume, and a starting KL of (almost) zero."""
    out, _, _ = evaluated_run
    run = tmp_path / "run"
    run.mkdir()
    train, evals = records_of(out)
    first = {**evals[0], "eval_kl_to_teacher": 1e-9, "eval_student_ppl": None}
    lines = [first, *train, *evals[1:], evals[-1]]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo'
    )
    assert main(["report", str(run)]) == 0
    summary = (run / "report" / "report.md").read_text()
    assert summary.count("(last evaluation)") == 1
    row = next(line for line in summary.splitlines() if "before training" in line)
    assert "| n/a |" in row
    assert (
        "KL to the teacher went from 0.0000 to" in summary and "of its first value" not in summary
    )


def test_eval_command_defaults_to_the_run_s_own_eval_split(evaluated_run, capsys):
    """A student exported by kd-dist train is measured on the examples its run held out, with
    its run's data flags, without repeating them."""
    out, teacher, _ = evaluated_run
    assert main(["eval", "--student", str(out), "--teacher", teacher]) == 0
    printed = capsys.readouterr().out
    final = json.loads((out / "eval_results.json").read_text())
    assert f"{final['kl_to_teacher']:.4f}" in printed and f"{final['student_ppl']:.3f}" in printed


def test_a_bf16_run_and_kd_dist_eval_on_it_project_the_student_in_bf16(tokenizer, text_dataset,
                                                                      tmp_path):  # fmt: skip
    """--bf16: the evaluation in training and `kd-dist eval` (which takes the run's --bf16)
    project the student's hidden states in bf16, as the training loss does. (A pair whose
    logits spread over a few nats: on nearly uniform ones the two projections barely differ.)"""
    teacher, student = (save_pair(tmp_path / name, model, tokenizer) for name, model
                        in zip(("teacher", "student"), teacher_and_student("llama", tokenizer),
                               strict=True))  # fmt: skip
    out = tmp_path / "run"
    argv = ["train", "--teacher_model", teacher, "--student_model", student, "--dataset",
            str(text_dataset), "--output_dir", str(out), *RUN_FLAGS, "--bf16",
            "--learning_rate", "1e-4"]  # fmt: skip
    assert main(argv) == 0
    cfg = TrainConfig(**json.loads((out / "kd_config.json").read_text()))
    batches = eval_split_batches(cfg, out, cfg.batch_size)  # as the run's eval loader has them
    models = [AutoModelForCausalLM.from_pretrained(out),
              AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16)]  # fmt: skip
    vocab_size = len(saved_tokenizer(out))
    final = json.loads((out / "eval_results.json").read_text())
    assert_projected_in_bf16(final, *models, batches, vocab_size)
    result = tmp_path / "eval.json"
    assert main(["eval", "--student", str(out), "--teacher", teacher, "--output_json",
                 str(result)]) == 0  # fmt: skip
    assert_projected_in_bf16(json.loads(result.read_text()), *models, batches, vocab_size)


def test_eval_command_refuses_a_checkpoint_and_a_missing_output_folder(evaluated_run, tmp_path,
                                                                       capsys):  # fmt: skip
    out, teacher, _ = evaluated_run
    checkpoint = tmp_path / "step-00000002"
    checkpoint.mkdir()
    (checkpoint / "checkpoint_complete.json").write_text("{}")
    assert main(["eval", "--student", str(checkpoint), "--teacher", teacher]) == 2
    assert "is a kd-dist training checkpoint" in capsys.readouterr().err
    argv = ["eval", "--student", str(out), "--teacher", teacher, "--output_json",
            str(tmp_path / "missing" / "m.json")]  # fmt: skip
    assert main(argv) == 2
    assert "its folder does not exist" in capsys.readouterr().err


def test_resuming_a_finished_run_does_not_repeat_its_last_evaluation(model_pair, text_dataset,
                                                                     tmp_path):  # fmt: skip
    teacher, student = model_pair("gpt2")
    out = tmp_path / "run"
    argv = ["train", "--teacher_model", teacher, "--student_model", student, "--dataset",
            str(text_dataset), "--output_dir", str(out), "--eval_ratio", "0.2", "--max_steps",
            "2", "--eval_steps", "2", "--save_steps", "2", "--batch_size", "8",
            "--no-compile_loss"]  # fmt: skip
    assert main(argv) == 0
    assert main([*argv, "--resume_from_checkpoint", "latest"]) == 0  # e.g. after a kill in export
    _, evals = records_of(out)
    assert [r["step"] for r in evals] == [2]
