"""--packing: a packed block trains exactly like its documents run one by one.

Real code path throughout: ``build_datasets`` packs real chat data, ``make_collator`` batches it,
``models.forward_hidden`` runs tiny real transformers models (fp32, CPU, dropout off) and
``fused_distillation_loss`` gives the loss whose value and student gradient are compared.
"""

from __future__ import annotations

import copy
import itertools

import datasets
import huggingface_hub.constants
import pytest
import torch

from kd_dist.config import ConfigError, TrainConfig
from kd_dist.data import build_datasets, make_collator
from kd_dist.data.tokenization import best_fit_decreasing
from kd_dist.losses import fused_distillation_loss, valid_mask, valid_rows
from kd_dist.models import check_packing, forward_hidden, output_head, packed_inputs
from kd_dist.tiny import build_model
from tests.conftest import make_sentences, write_jsonl

MAX_LENGTH = 160


@pytest.fixture(autouse=True)
def isolated_hf(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tok(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token  # as load_tokenizer does for GPT-2/Llama-like tokenizers
    return tok


def chat_rows(count: int) -> list[dict]:
    """Conversations of 1 or 2 turns, short and long answers mixed."""
    sentences = make_sentences(3 * count, seed=1)
    rows = []
    for i in range(count):
        messages = [
            {"role": "user", "content": sentences[3 * i][:20]},
            {"role": "assistant", "content": sentences[3 * i + 1][: 10 + 40 * (i % 2)]},
        ]
        if i % 4 == 0:
            messages += [
                {"role": "user", "content": "more"},
                {"role": "assistant", "content": sentences[3 * i + 2]},
            ]
        rows.append({"messages": messages})
    return rows


def chat_data(tok, tmp_path, packing: bool):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    cfg = TrainConfig(
        teacher_model="t", student_model="s", dataset=str(path), packing=packing,
        max_length=MAX_LENGTH,
    )  # fmt: skip
    return build_datasets(cfg, copy.deepcopy(tok)).train


def documents(block: dict) -> list[dict]:
    """A packed block cut back into its documents, where its position_ids restart at 0 (and
    only there: they count up by one inside each document)."""
    starts = [i for i, p in enumerate(block["position_ids"]) if p == 0]
    bounds = list(itertools.pairwise([*starts, len(block["input_ids"])]))
    assert block["position_ids"] == [p for a, b in bounds for p in range(b - a)]
    return [
        {key: block[key][a:b] for key in ("input_ids", "attention_mask", "labels")}
        for a, b in bounds
    ]


def test_packed_chat_keeps_prompts_masked_and_restarts_positions(tok, tmp_path):
    packed, unpacked = chat_data(tok, tmp_path, True), chat_data(tok, tmp_path, False)
    assert all(len(block["input_ids"]) <= MAX_LENGTH for block in packed)
    assert len(packed) < len(unpacked)  # several documents per block
    docs = [doc for block in packed for doc in documents(block)]
    for doc in docs:
        assert doc["labels"][0] == -100  # never predicted from the previous document

    # The same documents as unpacked, prompts masked the same way (the first label aside: an
    # unpacked example never predicts its first token either).
    def key(example):
        return (tuple(example["input_ids"]), tuple(example["labels"][1:]))

    assert sorted(map(key, docs)) == sorted(map(key, unpacked))
    masked_prompt = unpacked[0]["labels"].count(-100)
    assert 1 < masked_prompt < len(unpacked[0]["labels"])  # prompt masked, answer trained


def test_best_fit_decreasing_fills_the_fullest_bin_that_fits():
    lengths = [5, 9, 3, 4, 6, 2]
    bins = best_fit_decreasing(lengths, capacity=10)
    assert bins == [[1], [4, 3], [0, 2, 5]]  # 9 | 6+4 | 5+3+2
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))


def run_loss(student, teacher, batches, num_tokens, vocab_size):
    """Sum of the fused loss over ``batches`` (one backward each) and the student's gradient."""
    student.zero_grad(set_to_none=True)
    total = 0.0
    spec = TrainConfig(teacher_model="t", student_model="s", dataset="d").loss_spec
    for batch in batches:
        s = forward_hidden(student, student, batch, "causal")
        with torch.no_grad():
            t = forward_hidden(teacher, teacher, batch, "causal")
        s, t, labels = valid_rows(s, t, batch["labels"], causal=True)
        out = fused_distillation_loss(
            s, output_head(student), t, output_head(teacher), labels, spec,
            vocab_size=vocab_size, num_tokens=num_tokens, chunk_rows=16,
        )  # fmt: skip
        out.loss.backward()
        total += out.loss.item()
    return total, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def packed_and_one_by_one(family, attention, tok, tmp_path, device="cpu", dtype=torch.float32):
    """(loss, student gradient) of two packed blocks in one batch, of their documents run one
    by one, and of the packed batch run without its position_ids (documents attending to each
    other), all with the packed batch's normaliser."""
    torch.manual_seed(0)
    # eval: no dropout; on the device and in the dtype first, which flash-attention checks.
    models = [build_model(family, tok, size).eval().to(device, dtype) for size in ("small", "tiny")]
    for model in models:
        model.set_attn_implementation(attention)
    teacher, student = models
    collate = make_collator(tok)
    data = chat_data(tok, tmp_path, packing=True)
    blocks = data.select(range(len(data) - 2, len(data))).to_list()  # the least full ones
    packed = collate(blocks)  # two rows of different lengths: padding too
    assert packed["input_ids"].shape[0] == 2 and (packed["attention_mask"] == 0).any()
    one_by_one = [collate([doc]) for block in blocks for doc in documents(block)]
    assert len(one_by_one) > 2
    num_tokens = int(valid_mask(packed["labels"], causal=True).sum())
    assert num_tokens == sum(int(valid_mask(b["labels"], True).sum()) for b in one_by_one)
    crossing = {key: value for key, value in packed.items() if key != "position_ids"}

    def run(batches):
        batches = [{key: value.to(device) for key, value in b.items()} for b in batches]
        return run_loss(student, teacher, batches, num_tokens, len(tok))

    return run([packed]), run(one_by_one), run([crossing])


@pytest.mark.parametrize(
    "family, attention",
    [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("opt", "sdpa"), ("opt", "eager")],
)
def test_packed_block_equals_its_documents_one_by_one(family, attention, tok, tmp_path):
    (packed_loss, packed_grads), (loss, grads), (crossing_loss, _) = packed_and_one_by_one(
        family, attention, tok, tmp_path
    )
    assert packed_loss == pytest.approx(loss, rel=1e-5)
    assert packed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Without the packed inputs the documents would attend to each other: a different loss.
    assert abs(crossing_loss - loss) > 1e-3 * abs(loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attention needs a CUDA GPU")
def test_packed_block_with_flash_attention_equals_its_documents(tok, tmp_path):
    """flash_attention_2's variable-length path (bf16): the same check, to bf16 accuracy."""
    pytest.importorskip("flash_attn")
    (packed_loss, packed_grads), (loss, grads), (crossing_loss, _) = packed_and_one_by_one(
        "llama", "flash_attention_2", tok, tmp_path, device="cuda", dtype=torch.bfloat16
    )
    assert packed_loss == pytest.approx(loss, rel=2e-2)
    for name, grad in grads.items():
        similarity = torch.nn.functional.cosine_similarity(
            packed_grads[name].flatten().float(), grad.flatten().float(), dim=0
        )
        assert similarity > 0.99, name
    assert abs(crossing_loss - loss) > 2e-2 * abs(loss)


def test_flash_attention_gets_every_row_s_document_bounds(tok):
    """flash_attention_2 (no CUDA here to run it): the variable-length kernel's inputs cover the
    whole flattened [B, L] batch, a document where the positions restart (each padding token
    one of its own), and there is no mask to hide them."""
    model = build_model("llama", tok, "tiny")
    model.config._attn_implementation = "flash_attention_2"
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]])  # row 2: 2 tokens, 3 padding
    inputs = packed_inputs(model, positions)
    assert inputs["attention_mask"] is None and inputs["position_ids"] is positions
    assert inputs["cu_seq_lens_q"].tolist() == inputs["cu_seq_lens_k"].tolist()
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 8, 9, 10]
    assert int(inputs["max_length_q"]) == int(inputs["max_length_k"]) == 3


def test_packing_refuses_a_family_it_cannot_keep_apart(tok):
    config = build_model("t5", tok, "tiny").config  # no causal packing path known for it
    with pytest.raises(ConfigError, match=r"--packing: --student_model 'x' is a t5 model"):
        check_packing(config, "--student_model 'x'")
