"""Turn rendered examples into token ids and labels.

(The module is not called ``tokenize`` so that it can never shadow the standard-library module.)

A causal example is rendered as ``(text, trained)`` pieces (prompt then response; or a chat
conversation's turns), joined and tokenized once, as the model will read it; a token is trained
on when its characters overlap a trained piece, so a token that straddles the boundary (" Paris"
after "Answer:") is never lost from the response. Special tokens the tokenizer adds itself (a
leading bos) are masked. Text and instruction examples end with a trained eos so that the student
learns to stop; chat templates write their own end-of-turn markers.

Seq2seq examples keep the source as ``input_ids`` and the target, tokenized as a target
(``text_target=``: Marian, mBART and NLLB then write the target language's tokens), as
``labels``. Labels are not shifted: the loss does that. Every example also carries a status
(kept, empty, no trainable label) and a truncation flag so that the dropped and truncated
examples can be counted after the (possibly multi-process) ``datasets.map``.

With --packing, causal examples (documents) are packed whole into blocks of --max_length tokens
(``pack_batch``), each block's ``position_ids`` restarting at 0 with every document.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, Features, List, Value

from kd_dist.config import ConfigError, TrainConfig
from kd_dist.data.chat import (
    Pieces,
    chat_examples,
    chat_pair,
    conversation_from_pair,
    normalise_conversation,
    plain_chat_template,
)
from kd_dist.data.formats import CHAT, TEXT, FormatSpec, render
from kd_dist.losses import IGNORE_INDEX

OK, EMPTY, NO_LABELS = "ok", "empty", "no_labels"
STATUS, TRUNCATED = "_status", "_truncated"

# Explicit output types: a batch of only empty examples would otherwise infer a null list type.
FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        "attention_mask": List(Value("int32")),
        "labels": List(Value("int32")),
        STATUS: Value("string"),
        TRUNCATED: Value("bool"),
    }
)


def _example(
    input_ids: list[int], labels: list[int], truncated: bool, status: str | None = None
) -> dict[str, Any]:
    if status is None:
        status = OK if any(label != IGNORE_INDEX for label in labels) else NO_LABELS
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        STATUS: status,
        TRUNCATED: truncated,
    }


EMPTY_EXAMPLE = _example([], [], False, status=EMPTY)


def _adds_token(tokenizer: Any, token_id: int | None, position: int) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[position] == token_id


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` starts with bos by itself (Llama) or not (GPT-2, T5)."""
    return _adds_token(tokenizer, tokenizer.bos_token_id, 0)


def tokenizer_adds_eos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` already ends with eos (T5, BART) or eos must be appended."""
    return _adds_token(tokenizer, tokenizer.eos_token_id, -1)


def ensure_chat_template(tokenizer: Any, task_type: str) -> str:
    """Give ``tokenizer`` the plain chat template unless it has one; say which is used.

    A causal example is tokenized without special tokens when a template renders it (the template
    writes them), so the plain template starts with bos for tokenizers that add one to text.
    """
    if tokenizer.chat_template:
        return "tokenizer"
    with_bos = task_type == "causal" and tokenizer_adds_bos(tokenizer)
    tokenizer.chat_template = plain_chat_template(with_bos)
    return "plain"


def trained_labels(
    input_ids: list[int], offsets: list[tuple[int, int]], pieces: Pieces, train_on_prompt: bool
) -> list[int]:
    """``input_ids`` with every token masked unless its characters overlap a trained piece."""
    spans, start = [], 0
    for text, trained in pieces:
        if trained or train_on_prompt:
            spans.append((start, start + len(text)))
        start += len(text)
    return [
        token
        if end > begin
        and any(begin < span_end and end > span_start for span_start, span_end in spans)
        else IGNORE_INDEX
        for token, (begin, end) in zip(input_ids, offsets, strict=True)
    ]


def added_suffix(tokenizer: Any, target: bool = False) -> list[int]:
    """The special tokens ``tokenizer`` ends a text with by itself, as a source or as a target
    (``text_target``): T5, BART, Marian ``[eos]``, mBART ``[eos, language code]``, GPT-2 none."""
    text = {"text_target" if target else "text": "a"}
    bare = tokenizer(**text, add_special_tokens=False)["input_ids"]
    full = tokenizer(**text)["input_ids"]
    starts = [i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare]
    return full[starts[0] + len(bare) :] if starts else []


@dataclass(frozen=True)
class Seq2SeqEnds:
    """How seq2seq sources and targets end, probed once per split: truncation keeps these
    tokens at the end, as the tokenizer's own truncation does."""

    source: tuple[int, ...]  # what the tokenizer puts after a source (mBART: eos, en_XX)
    appended: tuple[int, ...]  # (eos,) when the tokenizer ends targets without one, else ()
    target: tuple[int, ...]  # what ends a target: the tokenizer's end tokens, then `appended`


def seq2seq_ends(tokenizer: Any) -> Seq2SeqEnds:
    """A target the tokenizer ends without eos (a GPT-2-like one) gets eos appended, so that the
    student learns to stop."""
    eos = tokenizer.eos_token_id
    target = tuple(added_suffix(tokenizer, target=True))
    appended = (eos,) if eos is not None and eos not in target else ()
    return Seq2SeqEnds(tuple(added_suffix(tokenizer)), appended, target + appended)


def truncate(ids: list[int], limit: int, suffix: tuple[int, ...]) -> tuple[list[int], bool]:
    """Keep the first ``limit`` ids; a final ``suffix`` (the tokenizer's end tokens) stays final."""
    if len(ids) <= limit:
        return ids, False
    if suffix and len(suffix) < limit and tuple(ids[-len(suffix) :]) == suffix:
        return [*ids[: limit - len(suffix)], *suffix], True
    return ids[:limit], True


def seq2seq_example(
    source_ids: list[int],
    target_ids: list[int],
    ends: Seq2SeqEnds,
    max_length: int,
    max_target_length: int,
) -> dict[str, Any]:
    """Source as ``input_ids``, target as ``labels`` (eos-terminated), each cut to its limit."""
    target_ids = [*target_ids, *ends.appended]
    source_ids, source_cut = truncate(source_ids, max_length, ends.source)
    target_ids, target_cut = truncate(target_ids, max_target_length, ends.target)
    return _example(source_ids, target_ids, source_cut or target_cut)


def conversation(row: dict[str, Any], spec: FormatSpec, where: str) -> list[dict[str, Any]]:
    """A chat row's messages: its conversation column, or a conversational prompt/completion."""
    if spec.messages is not None:
        return normalise_conversation(row[spec.messages], where)
    return conversation_from_pair(row[spec.prompt], row[spec.response], where)


def render_causal(
    row: dict[str, Any], spec: FormatSpec, tokenizer: Any, train_on_prompt: bool, where: str
) -> list[Pieces]:
    """One row as examples of ``(text, trained)`` pieces for a causal model (one example, except
    chat rows whose template re-renders earlier turns: one per answer); ``[]`` when empty."""
    if spec.kind == CHAT:
        return chat_examples(conversation(row, spec, where), tokenizer, where, train_on_prompt)
    pair = render(row, spec, "causal")
    return [[(pair[0], False), (pair[1], True)]] if pair else []


def render_seq2seq(
    row: dict[str, Any], spec: FormatSpec, tokenizer: Any, where: str
) -> tuple[str, str] | None:
    """One row as ``(source, target)`` for an encoder-decoder model, or None when empty."""
    if spec.kind == CHAT:
        return chat_pair(conversation(row, spec, where), tokenizer, where)
    return render(row, spec, "seq2seq")


def _tokenize(tokenizer: Any, texts: list[str], target: bool = False) -> list[list[int]]:
    """Ids with the tokenizer's special tokens. Targets are tokenized as targets: Marian, mBART
    and NLLB tokenizers then write the target language's tokens, as the decoder must see them."""
    if not texts:
        return []
    return tokenizer(**{"text_target" if target else "text": texts})["input_ids"]


def encode_causal(
    examples: list[Pieces],
    *,
    chat: bool,
    tokenizer: Any,
    max_length: int | None,
    train_on_prompt: bool,
    eos_id: int | None,
    adds_eos: bool,
) -> list[dict[str, Any]]:
    """Tokenize rendered causal examples, label them, and cut them to ``max_length`` (None: not
    cut, for packing)."""
    if not examples:
        return []
    texts = ["".join(text for text, _ in pieces) for pieces in examples]
    # A chat template writes the special tokens into the text itself.
    encoded = tokenizer(texts, add_special_tokens=not chat, return_offsets_mapping=True)
    out = []
    for pieces, input_ids, offsets in zip(
        examples, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        labels = trained_labels(input_ids, offsets, pieces, train_on_prompt)
        if not chat and eos_id is not None:
            if adds_eos:  # the tokenizer's own eos ends the text: the stop signal is trained
                labels[-1] = eos_id
            else:
                input_ids, labels = [*input_ids, eos_id], [*labels, eos_id]
        truncated = max_length is not None and len(input_ids) > max_length
        out.append(_example(input_ids[:max_length], labels[:max_length], truncated))
    return out


def encode_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    spec: FormatSpec,
    task_type: str,
    tokenizer: Any,
    max_length: int | None,
    max_target_length: int,
    train_on_prompt: bool,
    adds_eos: bool,
    ends: Seq2SeqEnds | None,
    split_name: str,
) -> dict[str, list[Any]]:
    """The ``datasets.map`` function (batched, so the fast tokenizer works on whole batches).

    A row gives one example, except chat rows split per answer; an empty row gives one empty
    example so that it is counted."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    wheres = [f"{split_name} example {index}" for index in indices]
    eos_id = tokenizer.eos_token_id

    if task_type == "causal":
        per_row = [
            render_causal(row, spec, tokenizer, train_on_prompt, where)
            for row, where in zip(rows, wheres, strict=True)
        ]
        encoded = iter(
            encode_causal(
                [pieces for row_examples in per_row for pieces in row_examples],
                chat=spec.kind == CHAT,
                tokenizer=tokenizer,
                max_length=max_length,
                train_on_prompt=train_on_prompt,
                eos_id=eos_id,
                adds_eos=adds_eos,
            )
        )
        examples = [
            next(encoded) if row_examples else EMPTY_EXAMPLE
            for row_examples in per_row
            for _ in row_examples or [None]
        ]
    elif task_type == "seq2seq":
        pairs = [
            render_seq2seq(row, spec, tokenizer, w) for row, w in zip(rows, wheres, strict=True)
        ]
        source_ids = _tokenize(tokenizer, [p[0] if p else "" for p in pairs])
        target_ids = _tokenize(tokenizer, [p[1] if p else "" for p in pairs], target=True)
        assert max_length is not None and ends is not None  # seq2seq: never packed, ends probed
        examples = [
            seq2seq_example(s, t, ends, max_length, max_target_length) if pair else EMPTY_EXAMPLE
            for pair, s, t in zip(pairs, source_ids, target_ids, strict=True)
        ]
    else:
        raise ValueError(f"unknown task_type {task_type!r}")
    return {key: [example[key] for example in examples] for key in FEATURES}


def _is_kept(status: str) -> bool:
    return status == OK


def tokenize_split(
    split: Dataset, spec: FormatSpec, tokenizer: Any, cfg: TrainConfig, name: str
) -> tuple[Dataset, dict[str, int]]:
    """Tokenize one split, drop the unusable examples, and count what happened."""
    if cfg.task_type == "causal" and not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"The tokenizer of {cfg.student_model} is a slow (Python) tokenizer; kd_dist needs a "
            "fast one, whose character offsets place the loss mask. Save the model with its "
            "tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained)."
        )
    encoded = split.map(
        encode_batch,
        batched=True,
        with_indices=True,
        fn_kwargs=dict(
            spec=spec,
            task_type=cfg.task_type,
            tokenizer=tokenizer,
            # Packed text documents are split into blocks afterwards, not truncated; the other
            # formats are truncated as unpacked, so that no answer is cut from its prompt.
            max_length=None if cfg.packing and spec.kind == TEXT else cfg.max_length,
            max_target_length=cfg.max_target_length or cfg.max_length,
            train_on_prompt=cfg.train_on_prompt,
            adds_eos=tokenizer_adds_eos(tokenizer),
            ends=seq2seq_ends(tokenizer) if cfg.task_type == "seq2seq" else None,
            split_name=name,
        ),
        remove_columns=split.column_names,
        features=FEATURES,
        num_proc=cfg.num_proc,
        desc=f"Tokenizing {name}",
    )
    statuses = list(encoded[STATUS])
    counts = Counter(statuses)
    truncated = sum(1 for s, t in zip(statuses, encoded[TRUNCATED], strict=True) if t and s == OK)
    if counts[OK] < len(encoded):
        encoded = encoded.filter(
            _is_kept, input_columns=STATUS, num_proc=cfg.num_proc, desc=f"Filtering {name}"
        )
    encoded = encoded.remove_columns([STATUS, TRUNCATED])
    stats = {
        "examples": len(encoded),
        "truncated": truncated,
        "dropped_empty": counts[EMPTY],
        "dropped_no_labels": counts[NO_LABELS],
    }
    if cfg.packing:
        stats["packed_documents"] = len(encoded)
        encoded = encoded.map(
            pack_batch,
            batched=True,
            batch_size=PACKING_BATCH,
            fn_kwargs=dict(block_length=cfg.max_length),
            remove_columns=encoded.column_names,
            features=PACKED_FEATURES,
            # One process: workers' shards would end blocks at their own edges (other blocks).
            desc=f"Packing {name}",
        )
        stats["examples"] = len(encoded)
    return encoded, stats


# Documents packed per packing call: each call's last blocks may be less full.
PACKING_BATCH = 1000
PACKED_FEATURES = Features(
    {key: List(Value("int32")) for key in ("input_ids", "attention_mask", "labels", "position_ids")}
)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each holding at most ``capacity`` in total: the items, longest
    first, each go to the fullest bin that still has room for it (TRL's "bfd" strategy).
    Deterministic: ties go to the earlier item and the earlier bin. Every length <= capacity."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(room, (lengths[item], -1))
        if at == len(room):
            bins.append([])
            space, index = capacity, len(bins) - 1
        else:
            space, index = room.pop(at)
        bins[index].append(item)
        if space > lengths[item]:
            bisect.insort(room, (space - lengths[item], index))
    return bins


def document_pieces(
    input_ids: list[int], labels: list[int], block_length: int
) -> list[tuple[list[int], list[int]]]:
    """One document as pieces of at most ``block_length`` tokens, each with its first label
    masked: in a packed block the previous document's last token would otherwise predict it.
    Only a text document can be longer than a block (the other formats are truncated before,
    so that no answer is cut from its prompt); its pieces overlap by one token, which each
    next piece starts from, so that every token after the first is still predicted once. A
    piece with nothing to train on is dropped."""
    pieces = []
    for start in range(0, max(len(input_ids) - 1, 1), block_length - 1):
        piece_labels = [IGNORE_INDEX, *labels[start + 1 : start + block_length]]
        if any(label != IGNORE_INDEX for label in piece_labels):
            pieces.append((input_ids[start : start + block_length], piece_labels))
    return pieces


def pack_batch(batch: dict[str, list[list[int]]], block_length: int) -> dict[str, list[Any]]:
    """Pack the batch's documents (``document_pieces``) whole into blocks of at most
    ``block_length`` tokens, best fit decreasing, so that blocks need next to no padding.
    ``position_ids`` restart at 0 with every document, which is how the forward keeps each
    document's attention to itself (``models._forward``)."""
    pieces = [
        piece
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)
        for piece in document_pieces(ids, labels, block_length)
    ]
    blocks = best_fit_decreasing([len(ids) for ids, _ in pieces], block_length)
    packed: dict[str, list[list[int]]] = {key: [] for key in PACKED_FEATURES}
    for block in blocks:
        members = [pieces[i] for i in block]
        packed["input_ids"].append([token for ids, _ in members for token in ids])
        packed["labels"].append([label for _, labels in members for label in labels])
        packed["position_ids"].append([p for ids, _ in members for p in range(len(ids))])
        packed["attention_mask"].append([1] * len(packed["input_ids"][-1]))
    return packed


def render_example(tokenizer: Any, example: dict[str, Any], task_type: str) -> str:
    """One tokenized example as text for the start-up log, showing what the loss sees.

    Causal: runs of masked label positions are wrapped as ``[masked: ...]``, the trained part
    follows as is. Seq2seq: the encoder source, then the target.
    """

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    if task_type == "seq2seq":
        return f"[source: {decode(example['input_ids'])}]\n{decode(example['labels'])}"
    pieces, run, run_masked = [], [], None
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        masked = label == IGNORE_INDEX
        if run and masked != run_masked:
            pieces.append(f"[masked: {decode(run)}]" if run_masked else decode(run))
            run = []
        run.append(token)
        run_masked = masked
    if run:
        pieces.append(f"[masked: {decode(run)}]" if run_masked else decode(run))
    return "".join(pieces)
