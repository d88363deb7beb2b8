"""Hidden-state distillation (--hidden_loss_weight): the loss against a float64 reference written
from its definition, the trainer's micro-step against the models' own hidden states, and real
runs: fused and logits paths alike, an exact resume with the projections, an export without
them, and 2 ZeRO-3 processes equal to one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kd_dist.checkpoint import TrainerState, resume_mismatches
from kd_dist.cli import main
from kd_dist.config import TrainConfig
from kd_dist.engine import accelerator_session
from kd_dist.losses import hidden_distillation_loss, valid_rows
from kd_dist.models import (
    HIDDEN_PROJECTIONS,
    decoder_inputs,
    default_layer_map,
    hidden_projections,
    load_models,
    load_tokenizer,
)
from kd_dist.teacher_signal import LiveTeacher
from kd_dist.tiny import build_model, save_pair
from kd_dist.trainer import make_micro_step
from tests.test_distributed import accelerate_launch, deepspeed_config, launch, relative_difference
from tests.test_model_options import token_batch
from tests.test_train import train_args


def reference_block_sum(s: torch.Tensor, t: torch.Tensor, projection, kind: str) -> torch.Tensor:
    """The definition, in float64: s' = P s; cosine: sum_rows 1 - s'.t / (|s'| |t|); mse:
    sum_rows mean_features (s' - t)^2."""
    s = s if projection is None else s @ projection.T
    if kind == "cosine":
        return (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).sum()
    return ((s - t) ** 2).sum(-1).div(t.shape[-1]).sum()


@pytest.mark.parametrize("kind", ["cosine", "mse"])
@pytest.mark.parametrize("widths", [(5, 6), (6, 6)])
def test_hidden_loss_and_gradients_match_the_float64_definition(kind, widths):
    """Two matched blocks, the mean over blocks, normalised by num_tokens: values and the
    gradients of the student's states and of the projection (None when the widths agree)."""
    hs, ht = widths
    generator = torch.Generator().manual_seed(0)
    students = [torch.randn(7, hs, generator=generator, requires_grad=True) for _ in range(2)]
    teachers = [torch.randn(7, ht, generator=generator) for _ in range(2)]
    projections = [
        torch.randn(ht, hs, generator=generator, requires_grad=True) if hs != ht else None
        for _ in range(2)
    ]
    loss, total = hidden_distillation_loss(students, teachers, projections, kind, num_tokens=11)
    loss.backward()

    leaves64 = [s.detach().double().requires_grad_() for s in students]
    projections64 = [None if p is None else p.detach().double().requires_grad_()
                     for p in projections]  # fmt: skip
    blocks = [reference_block_sum(s, t.double(), p, kind)
              for s, t, p in zip(leaves64, teachers, projections64, strict=True)]  # fmt: skip
    expected = (blocks[0] + blocks[1]) / 2 / 11
    expected.backward()
    assert loss.dtype == torch.float32 and not total.requires_grad
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total.double(), expected.detach() * 11, rtol=1e-5, atol=1e-6)
    ours = [*students, *(p for p in projections if p is not None)]
    references = [*leaves64, *(p for p in projections64 if p is not None)]
    for leaf, reference in zip(ours, references, strict=True):
        torch.testing.assert_close(leaf.grad.double(), reference.grad, rtol=1e-5, atol=1e-7)


def test_an_all_masked_batch_gives_an_exact_zero_and_no_nan():
    labels = torch.full((2, 5), -100)
    for kind in ("cosine", "mse"):
        states = torch.randn(2, 5, 4, requires_grad=True)  # [B, L, H]
        projection = torch.randn(6, 4, requires_grad=True)
        s, t, _ = valid_rows(states, torch.randn(2, 5, 6), labels, causal=True)
        loss, total = hidden_distillation_loss([s], [t], [projection], kind, num_tokens=0)
        loss.backward()
        assert loss.item() == 0.0 and total.item() == 0.0
        assert torch.equal(states.grad, torch.zeros_like(states))
        assert torch.equal(projection.grad, torch.zeros_like(projection))


def test_the_default_map_pairs_blocks_at_the_same_relative_depth():
    assert default_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert default_layer_map(3, 4) == [(0, 0), (1, 1), (2, 3)]
    assert default_layer_map(10, 30)[0] == (0, 2) and default_layer_map(10, 30)[-1] == (9, 29)
    assert default_layer_map(4, 2) == [(0, 0), (1, 0), (2, 0), (3, 1)]  # a deeper student
    assert default_layer_map(3, 3) == [(0, 0), (1, 1), (2, 2)]


def test_a_resume_keeps_the_map_and_the_loss_on_or_off():
    """The student's saved state holds the projections of its run's map: another map, or the
    loss turned on or off, cannot resume exactly (a new weight can)."""
    run = TrainConfig(hidden_loss_weight=0.5, hidden_layer_map="0:1")
    saved, state = run.to_dict(), TrainerState(world_size=1)
    assert resume_mismatches(saved, replace(run, hidden_loss_weight=2.0), state, 1) == []
    for changed, named in ((replace(run, hidden_layer_map="0:0"), "--hidden_layer_map"),
                           (replace(run, hidden_loss_weight=0.0, hidden_layer_map=None),
                            "the hidden-state loss on or off")):  # fmt: skip
        assert named in "; ".join(resume_mismatches(saved, changed, state, 1))


def three_block_pair(family: str, tokenizer, root: Path) -> tuple[str, str]:
    """Teacher (width 64) and student (width 32), 3 blocks each, no dropout."""
    blocks = {
        "llama": {"num_hidden_layers": 3},
        "t5": {"num_layers": 3, "num_decoder_layers": 3, "dropout_rate": 0.0},
    }[family]
    teacher = save_pair(root / "teacher", build_model(family, tokenizer, "small", **blocks),
                        tokenizer)  # fmt: skip
    student = save_pair(root / "student", build_model(family, tokenizer, "tiny", **blocks),
                        tokenizer)  # fmt: skip
    return teacher, student


@pytest.mark.parametrize(("family", "task_type"), [("llama", "causal"), ("t5", "seq2seq")])
def test_the_micro_step_matches_the_models_own_hidden_states(family, task_type, tokenizer,
                                                            tmp_path):  # fmt: skip
    """The trainer's micro-step, on a crossed map of inner blocks ("0:1,1:0"): its hidden sum is
    the float64 reference computed from the models' output_hidden_states (the decoder's, for
    seq2seq) on the valid positions, and the projections' gradients are w times the reference's
    gradient (the KD and CE terms do not reach them)."""
    teacher_dir, student_dir = three_block_pair(family, tokenizer, tmp_path)
    cfg = TrainConfig(
        teacher_model=teacher_dir, student_model=student_dir, dataset="unused",
        task_type=task_type, max_length=32, alpha=0.3, hidden_loss_weight=0.5,
        hidden_layer_map="0:1,1:0", hidden_loss="mse", output_dir=str(tmp_path / "out"),
        compile_loss=False,
    )  # fmt: skip
    batch = token_batch(tokenizer, task_type)
    with accelerator_session(cfg) as accelerator:
        models = load_models(cfg, load_tokenizer(cfg))
        assert models.hidden_pairs == [(0, 1), (1, 0)]
        student, teacher = models.student, models.teacher
        signal = LiveTeacher(teacher, task_type, fused=True, blocks=[1, 0])
        step = make_micro_step(cfg, accelerator, student, signal, len(tokenizer), chunk_rows=8,
                               fused=True, hidden_pairs=models.hidden_pairs)  # fmt: skip
        num_tokens = torch.tensor(13.0)
        sums, skipped = step(batch, num_tokens, 1.0, 1)
    assert not skipped

    def decoder_states(model) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            seq2seq = task_type == "seq2seq"
            extra = {"decoder_input_ids": decoder_inputs(model, batch["labels"])} if seq2seq else {}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True, **extra)  # fmt: skip
        return out.decoder_hidden_states if task_type == "seq2seq" else out.hidden_states

    student_states, teacher_states = decoder_states(student), decoder_states(teacher)
    causal = task_type == "causal"
    labels = batch["labels"][:, 1:] if causal else batch["labels"]
    valid = labels != -100  # [B, L'], position t predicting label t + 1 (causal)
    projections = [layer.weight.detach().double().requires_grad_()
                   for layer in hidden_projections(student, 2)]  # fmt: skip
    blocks = []
    for (s_block, t_block), projection in zip(models.hidden_pairs, projections, strict=True):
        # hidden_states[0] is the embeddings: block b's output is hidden_states[b + 1].
        s = student_states[s_block + 1][:, : valid.shape[1]][valid].double()
        t = teacher_states[t_block + 1][:, : valid.shape[1]][valid].double()
        blocks.append(reference_block_sum(s, t, projection, "mse"))
    reference_sum = torch.stack(blocks).mean()
    (cfg.hidden_loss_weight * reference_sum / num_tokens).backward()
    assert sums[2].item() == pytest.approx(reference_sum.item(), rel=1e-5)
    for layer, reference in zip(hidden_projections(student, 2), projections, strict=True):
        torch.testing.assert_close(layer.weight.grad.double(), reference.grad, rtol=1e-4,
                                   atol=1e-8)  # fmt: skip


def test_projections_only_where_the_widths_differ(model_pair, tokenizer):
    for overrides, expected in (({"n_layer": 2}, [(64, 32), (64, 32)]), ({"n_embd": 64}, [])):
        teacher, student = model_pair("gpt2", **overrides)
        cfg = TrainConfig(teacher_model=teacher, student_model=student, dataset="unused",
                          hidden_loss_weight=1.0)  # fmt: skip
        models = load_models(cfg, tokenizer)
        layers = getattr(models.student, HIDDEN_PROJECTIONS, [])
        assert [tuple(layer.weight.shape) for layer in layers] == expected
        assert models.hidden_pairs == ([(0, 0), (1, 1)] if expected else [(0, 1)])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def projection_keys(weights: dict) -> list[str]:
    return sorted(k for k in weights if k.startswith(HIDDEN_PROJECTIONS))


def test_runs_fused_and_logits_alike_resume_exactly_and_export_without_projections(
    model_pair, text_dataset, tmp_path
):
    """gpt2 (dropout on), 2 student blocks of width 32 matched to 2 teacher blocks of width 64:
    4 steps with checkpoints at 2 and 4. The logits path gives the same metrics and weights as
    the fused one; a resume from step 2 continues exactly, projections included (the checkpoint
    holds them); the export holds none and loads cleanly with from_pretrained."""
    teacher, student = model_pair("gpt2", n_layer=2)
    flags = ["--max_steps", "4", "--save_steps", "2", "--save_every", "0", "--alpha", "0.2",
             "--hidden_loss_weight", "0.5", "--hidden_loss", "mse", "--learning_rate", "1e-2",
             "--no-compile_loss"]  # fmt: skip
    fused, logits, resumed = tmp_path / "fused", tmp_path / "logits", tmp_path / "resumed"
    assert main(train_args(teacher, student, text_dataset, fused, *flags)) == 0
    assert main(train_args(teacher, student, text_dataset, logits, *flags,
                           "--no-fused_loss")) == 0  # fmt: skip
    checkpoint = fused / "checkpoints" / "step-00000002"
    assert main(train_args(teacher, student, text_dataset, resumed, *flags,
                           "--resume_from_checkpoint", str(checkpoint))) == 0  # fmt: skip

    straight = records(fused)
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    for record in straight:
        assert record["hidden_loss"] > 0
        assert record["loss"] == pytest.approx(
            0.8 * record["kd_loss"] + 0.2 * record["ce_loss"] + 0.5 * record["hidden_loss"]
        )
    # The logits path rounds differently (fp32 logits vs chunks of them); a resume does not.
    for other, steps, rel in ((logits, [1, 2, 3, 4], 1e-4), (resumed, [3, 4], 1e-6)):
        assert [r["step"] for r in records(other)] == steps
        for record in records(other):
            for key in ("loss", "kd_loss", "ce_loss", "hidden_loss"):
                assert record[key] == pytest.approx(straight[record["step"] - 1][key], rel=rel)

    saved = load_file(checkpoint / "model.safetensors")
    assert projection_keys(saved) == [f"{HIDDEN_PROJECTIONS}.0.weight",
                                      f"{HIDDEN_PROJECTIONS}.1.weight"]  # fmt: skip
    final = {run: load_file(run / "checkpoints" / "step-00000004" / "model.safetensors")
             for run in (fused, logits, resumed)}  # fmt: skip
    # (Adam's steps of 1e-2 amplify the logits path's rounding: 1e-5 at most, seen.)
    for run, rtol, atol in ((logits, 1e-4, 3e-5), (resumed, 1e-6, 1e-7)):
        assert final[run].keys() == final[fused].keys()
        for key in final[fused]:
            torch.testing.assert_close(final[run][key], final[fused][key], rtol=rtol, atol=atol,
                                       msg=key)  # fmt: skip

    exported = load_file(fused / "model.safetensors")
    assert projection_keys(exported) == []
    model, info = AutoModelForCausalLM.from_pretrained(fused, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    for name, tensor in model.state_dict().items():
        if name in final[fused]:
            torch.testing.assert_close(tensor, final[fused][name], msg=name)


@pytest.mark.distributed
def test_two_zero3_processes_take_the_single_process_steps(model_pair, text_dataset, tmp_path):
    """Student partitioned (every parameter, the projections too), the teacher sharded by its
    own ZeRO-3 engine, activations recomputed: 2 processes x batch 2 x accumulation 2 take the
    same 2 SGD steps as one process on batches of 8 (the second step's loss shows the first's
    update of the projections)."""
    teacher, student = model_pair("llama", num_hidden_layers=2)  # no dropout
    common = ["--teacher_model", teacher, "--student_model", student, "--dataset",
              str(text_dataset), "--optimizer", "sgd", "--max_steps", "2", "--clip_grad_norm",
              "0", "--warmup_ratio", "0", "--lr_scheduler", "constant", "--learning_rate", "0.5",
              "--alpha", "0.3", "--save_every", "0", "--max_length", "32", "--logging_steps",
              "1", "--hidden_loss_weight", "2", "--no-compile_loss"]  # fmt: skip
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(["train", *common, "--batch_size", "8", "--output_dir", str(single)]) == 0
    output = launch(
        accelerate_launch(deepspeed_config(tmp_path, 3)),
        [*common, "--batch_size", "2", "--gradient_accumulation_steps", "2",
         "--gradient_checkpointing", "--teacher_placement", "zero3", "--output_dir",
         str(sharded)],
        tmp_path / "sharded.log",
    )  # fmt: skip
    assert "2 process(es) (DistributedType.DEEPSPEED)" in output
    assert "Teacher loaded partitioned" in output and "Hidden-state loss (cosine" in output
    for one, two in zip(records(single), records(sharded), strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "hidden_loss"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), key
    start = load_file(Path(student) / "model.safetensors")
    expected, actual = (load_file(run / "model.safetensors") for run in (single, sharded))
    assert projection_keys(actual) == [] and actual.keys() == expected.keys()
    assert relative_difference(actual, expected, start) < 1e-3
