"""LoRA students through peft: the fused loss with a frozen output layer (float64), training
that moves the adapters only, fused and logits paths that agree, and exports (peft's adapter
format, or merged) that load with the ordinary Hugging Face and peft calls and give the trained
model's logits."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from kd_dist.cli import main
from kd_dist.config import TrainConfig
from kd_dist.data import build_datasets, make_collator
from kd_dist.generation import Sampling, generate_responses
from kd_dist.lora import check_lora, with_adapters
from kd_dist.losses import LossSpec, OutputHead, fused_distillation_loss
from kd_dist.models import (
    HIDDEN_PROJECTIONS,
    attach_hidden_projections,
    forward_hidden,
    meta_model,
    output_head,
)

from .test_losses import fused_reference, random_problem
from .test_on_policy import dolly_batch, padded_vocab_student, with_pad_token

peft = pytest.importorskip("peft")

# A few SGD steps that move tiny adapters visibly (SGD: AdamW's normalised update would turn the
# two paths' rounding differences in near-zero gradients into visible ones).
LORA_RUN = ["--max_steps", "3", "--max_length", "32", "--batch_size", "4", "--lora_r", "4",
            "--optimizer", "sgd", "--learning_rate", "0.5", "--lr_scheduler", "constant",
            "--warmup_ratio", "0", "--save_every", "0", "--no-compile_loss", "--lora_dropout", "0",
            "--alpha", "0.3"]  # fmt: skip


def fused_node(loss: torch.Tensor):
    """The fused loss's autograd node in ``loss``'s graph."""
    nodes = [loss.grad_fn]
    while nodes:
        node = nodes.pop()
        if "_FusedLinearLoss" in type(node).__name__:
            return node
        nodes += [following for following, _ in node.next_functions if following is not None]
    raise AssertionError("no fused loss in the graph")


def test_fused_loss_with_a_frozen_output_layer_matches_float64_and_keeps_no_weight_gradient():
    vocab = 53
    spec = LossSpec("forward_kl", temperature=1.5, alpha=0.2)
    s_hidden, s_head, t_hidden, t_head, labels = random_problem(vocab=vocab)
    frozen = OutputHead(s_head.weight.detach(), s_head.bias.detach(), s_head.transform)
    out = fused_distillation_loss(s_hidden, frozen, t_hidden, t_head, labels, spec,
                                  vocab_size=vocab, num_tokens=25, chunk_rows=6)  # fmt: skip
    # No [V_rows, H] gradient buffer was made for the frozen weight (nor the bias).
    assert fused_node(out.loss).saved_tensors[1:] == (None, None)
    out.loss.backward()
    expected, (hidden, _, _) = fused_reference(s_hidden, frozen, t_hidden, t_head, labels, spec,
                                               vocab, 25)  # fmt: skip
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    # (The loss computes in fp32, checked against the float64 definition as in test_losses.)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_hidden.grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
    assert frozen.weight.grad is None and frozen.bias.grad is None


@pytest.mark.parametrize("trained", [False, True], ids=["frozen", "trained"])
def test_the_fused_loss_reads_a_peft_students_output_layer(model_pair, trained):
    """Through the PeftModel wrapper, and through peft's trainable copy of the output layer
    (--lora_modules_to_save lm_head) when asked: the weight the model's logits use."""
    _, student = model_pair("llama")
    config = TrainConfig(student_model=student, lora_r=4,
                         lora_modules_to_save="lm_head" if trained else None)  # fmt: skip
    model = with_adapters(AutoModelForCausalLM.from_pretrained(student), config)
    head = output_head(model)
    assert head is not None and head.weight.requires_grad == trained
    ids = torch.tensor([[1, 5, 9, 4]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    hidden = forward_hidden(model, model, batch, "causal")
    expected = model(**batch).logits
    torch.testing.assert_close(hidden @ head.weight.t(), expected)
    assert type(model.get_output_embeddings()).__name__ == (
        "ModulesToSaveWrapper" if trained else "Linear"
    )


class TensorDevices(TorchDispatchMode):
    """The devices of every tensor the operations run inside make."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.devices |= {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        return out


def test_the_adapters_are_checked_on_the_meta_device_alone(model_pair):
    """check_lora adds the adapters (and the copies of --lora_modules_to_save) to a weightless
    student without making a tensor anywhere else: peft would first make them on the CPU."""
    _, student = model_pair("llama")
    cfg = TrainConfig(student_model=student, lora_r=4, lora_modules_to_save="lm_head")
    model = meta_model(cfg, AutoConfig.from_pretrained(student))
    with TensorDevices() as made:
        check_lora(cfg, model)
    assert made.devices == {"meta"}
    assert type(model.get_output_embeddings()).__name__ == "ModulesToSaveWrapper"


def train(out: Path, teacher: str, student: str, dataset: Path, *extra: str) -> Path:
    argv = ["train", "--teacher_model", teacher, "--student_model", student, "--dataset",
            str(dataset), "--output_dir", str(out), *LORA_RUN, *extra]  # fmt: skip
    assert main(argv) == 0
    return out


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_runs(model_pair, text_dataset, tmp_path_factory):
    """Runs of one LoRA student: fused with the adapter exported and a checkpoint, the same
    run merged, and the logits path; each with the output layer trained too."""
    teacher, student = model_pair("llama")  # untied output layer: it can be trained alone
    root = tmp_path_factory.mktemp("lora")
    runs = {}
    for head, extra in (("frozen", []), ("trained", ["--lora_modules_to_save", "lm_head"])):
        runs[head, "adapter"] = train(root / f"{head}-adapter", teacher, student, text_dataset,
                                      *extra, "--save_steps", "3")  # fmt: skip
        runs[head, "merged"] = train(root / f"{head}-merged", teacher, student, text_dataset,
                                     *extra, "--merge_lora")  # fmt: skip
        runs[head, "logits"] = train(root / f"{head}-logits", teacher, student, text_dataset,
                                     *extra, "--no-fused_loss")  # fmt: skip
    return student, runs


@pytest.mark.parametrize("head", ["frozen", "trained"])
def test_lora_exports_load_with_peft_and_transformers_and_give_the_trained_logits(
    lora_runs, tokenizer, head
):
    student, runs = lora_runs
    adapter_dir, merged_dir = runs[head, "adapter"], runs[head, "merged"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == student and config["r"] == 4
    assert {"adapter_model.safetensors", "tokenizer.json", "export_manifest.json"} <= {
        p.name for p in adapter_dir.iterdir()
    }
    assert not (adapter_dir / "model.safetensors").exists()
    manifest = json.loads((adapter_dir / "export_manifest.json").read_text())
    assert "adapter_model.safetensors" in manifest["files"]

    base = AutoModelForCausalLM.from_pretrained(student)
    start = {k: v.clone() for k, v in base.state_dict().items()}
    with_adapter = peft.PeftModel.from_pretrained(base, adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([tokenizer("the cat sees a dog in the park.")["input_ids"]])
    torch.testing.assert_close(logits(with_adapter, ids), logits(merged, ids), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    # The checkpoint of the last step (the trained PeftModel's state) is what the export loads.
    checkpoint = load_file(adapter_dir / "checkpoints" / "step-00000003" / "model.safetensors")
    loaded = with_adapter.state_dict()
    assert checkpoint.keys() == loaded.keys()
    for name, tensor in checkpoint.items():
        assert torch.equal(loaded[name], tensor), name
    # Only the adapters (and, asked for, the output layer) moved: the merged model's other
    # weights are the student's own.
    merged_state = merged.state_dict()
    moved = {k for k in start if not torch.equal(merged_state[k], start[k])}
    assert moved and all(k.endswith("proj.weight") or k == "lm_head.weight" for k in moved)
    assert ("lm_head.weight" in moved) == (head == "trained")


@pytest.mark.parametrize("head", ["frozen", "trained"])
def test_fused_and_logits_paths_train_a_lora_student_alike(lora_runs, head):
    _, runs = lora_runs
    fused = load_file(runs[head, "adapter"] / "adapter_model.safetensors")
    unfused = load_file(runs[head, "logits"] / "adapter_model.safetensors")
    assert fused.keys() == unfused.keys()
    assert any("lm_head" in key for key in fused) == (head == "trained")
    for key in fused:
        torch.testing.assert_close(fused[key], unfused[key], rtol=1e-4, atol=1e-6, msg=key)


def test_kd_dist_eval_takes_an_adapter_folder(lora_runs, model_pair, text_dataset, tmp_path):
    """An adapter folder evaluates as its merged export does (and unlike the untrained student)."""
    teacher, student = model_pair("llama")
    _, runs = lora_runs
    results = {}
    for name, folder in (("adapter", runs["frozen", "adapter"]),
                         ("merged", runs["frozen", "merged"]), ("untrained", student)):  # fmt: skip
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--student", str(folder), "--teacher", teacher, "--dataset",
                     str(text_dataset), "--max_length", "32", "--max_eval_samples", "8",
                     "--output_json", str(out)]) == 0  # fmt: skip
        results[name] = json.loads(out.read_text())
    assert results["adapter"] == pytest.approx(results["merged"], rel=1e-5)
    assert results["adapter"]["kl_to_teacher"] != results["untrained"]["kl_to_teacher"]


def test_an_adapter_names_its_base_folder_by_its_absolute_path(
    model_pair, text_dataset, tmp_path, monkeypatch
):
    """--student_model given relative to the working directory: the adapter loads from any
    other (peft's AutoPeftModel reads its base_model_name_or_path)."""
    teacher, student = model_pair("llama")
    monkeypatch.chdir(Path(student).parent)
    out = train(tmp_path / "run", teacher, Path(student).name, text_dataset, "--max_steps", "1")
    monkeypatch.chdir(tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(student).resolve())
    model = peft.AutoPeftModelForCausalLM.from_pretrained(out)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_a_lora_student_trains_under_bf16_as_in_fp32_up_to_its_rounding(
    model_pair, text_dataset, tmp_path
):
    """--bf16: the frozen student and its adapters keep fp32 weights and the forward autocasts;
    the losses follow the fp32 run's to bf16's precision, and the exported adapter is fp32."""
    teacher, student = model_pair("llama")
    runs = {precision: train(tmp_path / precision, teacher, student, text_dataset, *flags)
            for precision, flags in (("fp32", ()), ("bf16", ("--bf16",)))}  # fmt: skip
    losses = {
        precision: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()
                    if "loss" in json.loads(line)]
        for precision, run in runs.items()
    }  # fmt: skip
    assert losses["bf16"] and len(losses["bf16"]) == len(losses["fp32"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    adapter = load_file(runs["bf16"] / "adapter_model.safetensors")
    assert adapter and all(tensor.dtype == torch.float32 for tensor in adapter.values())


def test_a_seq2seq_lora_student_trains_on_its_own_samples_with_activation_checkpointing(
    model_pair, pairs_dataset, tmp_path
):
    """T5 (tied output layer, frozen): peft's seq2seq task type; --lmbda 1 samples one target
    per source, whatever the checkpoint's generation_config says; the layers' activations
    recomputed in the backward pass reach the adapters; the adapter loads onto the student."""
    teacher, original = model_pair("t5")
    student = str(tmp_path / "student")
    shutil.copytree(original, student)
    settings = Path(student, "generation_config.json")
    written = json.loads(settings.read_text())
    written.update(num_return_sequences=2, num_beams=2, min_length=5)
    settings.write_text(json.dumps(written))
    out = train(tmp_path / "t5", teacher, student, pairs_dataset, "--task_type", "seq2seq",
                "--gradient_checkpointing", "--lmbda", "1", "--max_new_tokens", "4")  # fmt: skip
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(tensor.abs().max() > 0 for key, tensor in adapter.items() if "lora_B" in key)
    model = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(student), out)
    assert isinstance(model, peft.PeftModelForSeq2SeqLM)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_a_lora_students_samples_ignore_its_checkpoints_generation_settings(
    family, tokenizer, dolly_dataset, pairs_dataset
):
    """--lmbda with a LoRA student: peft's generate reads the base model's generation_config
    (seq2seq) or copies the wrapper's over it (causal). The samples are those of the student
    without its checkpoint's settings (its adapters start as the identity: lora_B is 0), and
    the base model's generation_config is left as it was."""
    causal = family != "t5"
    local = with_pad_token(tokenizer)
    if causal:
        batch = dolly_batch(tokenizer, dolly_dataset)
    else:
        cfg = TrainConfig(dataset=str(pairs_dataset), task_type="seq2seq", max_length=24)
        data = build_datasets(cfg, local)
        batch = make_collator(local)([data.train[i] for i in range(3)])
    model = padded_vocab_student(tokenizer, family)
    sampling = Sampling(max_new_tokens=5, temperature=1.0, top_p=1.0,
                        stop_ids=(local.eos_token_id,), pad_id=local.pad_token_id,
                        vocab_size=len(local))  # fmt: skip
    plain = generate_responses(model, batch, sampling, seed=3, causal=causal)
    settings = dict(num_return_sequences=2, num_beams=2, min_length=5, repetition_penalty=3.0)
    model.generation_config.update(**settings)
    task_type = "causal" if causal else "seq2seq"
    cfg = TrainConfig(student_model="student", lora_r=4, task_type=task_type)
    student = with_adapters(model, cfg).eval()
    configured = generate_responses(student, batch, sampling, seed=3, causal=causal)
    assert all(torch.equal(configured[key], plain[key]) for key in plain)
    base = student.get_base_model().generation_config
    assert {k: getattr(base, k) for k in settings} == settings


def test_a_lora_student_trains_its_hidden_state_projections_and_exports_only_its_adapter(
    model_pair, text_dataset, tmp_path
):
    """LoRA with --hidden_loss_weight: the projections (a student submodule, attached after the
    adapters so that peft does not freeze them) train with the adapters and are checkpointed;
    the exported adapter holds neither them nor the frozen base."""
    teacher, student = model_pair("llama")  # widths 64 and 32: one projection per block pair
    seed = 7  # not the default: the projections' start below is drawn from the run's --seed
    out = train(tmp_path / "run", teacher, student, text_dataset, "--hidden_loss_weight", "1",
                "--save_steps", "3", "--seed", str(seed))  # fmt: skip
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    hidden = [line["hidden_loss"] for line in lines if "hidden_loss" in line]
    assert hidden and all(value > 0 for value in hidden)
    checkpoint = load_file(out / "checkpoints" / "step-00000003" / "model.safetensors")
    trained = {k: v for k, v in checkpoint.items() if HIDDEN_PROJECTIONS in k}
    # Where they started: attached to a fresh student from the run's seed, as the run did.
    fresh = AutoModelForCausalLM.from_pretrained(student)
    attach_hidden_projections(fresh, AutoModelForCausalLM.from_pretrained(teacher), 1, seed=seed)
    (start,) = getattr(fresh, HIDDEN_PROJECTIONS).parameters()
    (moved,) = trained.values()
    assert moved.shape == start.shape and not torch.equal(moved, start)
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="--load_in_4bit (QLoRA) needs a CUDA GPU and the bitsandbytes package",
)
def test_a_qlora_student_trains_and_exports_its_adapter_and_the_merged_model(
    model_pair, text_dataset, tmp_path, tokenizer
):
    """QLoRA: the student's base weights in 4-bit NF4 on the GPU, bf16 compute, adapters
    trained; the adapter (on the full-precision base) and the merged export give the same logits,
    and the run's losses are finite. Run on a GPU machine: ``pytest tests/test_lora.py -m gpu``."""
    teacher, student = model_pair("llama")
    adapter_dir = train(tmp_path / "adapter", teacher, student, text_dataset, "--load_in_4bit",
                        "--bf16")  # fmt: skip
    merged_dir = train(tmp_path / "merged", teacher, student, text_dataset, "--load_in_4bit",
                       "--bf16", "--merge_lora")  # fmt: skip
    for run in (adapter_dir, merged_dir):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(line["loss"]) for line in lines if "loss" in line)
    with_adapter = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(student), adapter_dir
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([tokenizer("the cat sees a dog in the park.")["input_ids"]])
    # (Two runs: a GPU's kernels may round them apart a little.)
    torch.testing.assert_close(logits(with_adapter, ids), logits(merged, ids), rtol=1e-3,
                               atol=1e-3)  # fmt: skip
