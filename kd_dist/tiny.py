"""Tiny tokenizers and models built in-process, for the demo and the tests (nothing downloaded).

They are real Hugging Face objects saved with ``save_pretrained``, so everything downstream loads
them by path exactly as it would load a hub model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "eos_token": "</s>",
    "bos_token": "<s>",
    "unk_token": "<unk>",
}

CAUSAL_FAMILIES = ("gpt2", "opt", "llama", "qwen2")
SEQ2SEQ_FAMILIES = ("t5", "bart")


def build_tokenizer(
    corpus: Iterable[str], vocab_size: int = 256, with_pad: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``; ``with_pad=False`` mimics GPT-2/Llama."""
    specials = {name: token for name, token in SPECIAL_TOKENS.items()}
    if not with_pad:
        del specials["pad_token"]
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def model_config(family: str, vocab_size: int, size: str = "small", **overrides: object):
    """A transformers config of ``family`` with a few layers; ``size`` is "small" or "tiny"."""
    hidden, layers, heads = (64, 2, 4) if size == "small" else (32, 1, 2)
    common = dict(vocab_size=vocab_size, **overrides)
    if family == "gpt2":
        kwargs = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512)
    elif family == "opt":
        kwargs = dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=hidden * 4,
            word_embed_proj_dim=hidden,
            max_position_embeddings=512,
        )
    elif family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "cohere"):
        kwargs = dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=512,
        )
    elif family == "t5":
        kwargs = dict(
            d_model=hidden,
            d_kv=hidden // heads,
            d_ff=hidden * 2,
            num_layers=layers,
            num_decoder_layers=layers,
            num_heads=heads,
        )
    elif family == "bart":
        kwargs = dict(
            d_model=hidden,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=hidden * 2,
            decoder_ffn_dim=hidden * 2,
            max_position_embeddings=512,
        )
    else:
        raise ValueError(f"unknown tiny model family {family!r}")
    return AutoConfig.for_model(family, **{**kwargs, **common})


def build_model(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    size: str = "small",
    pad_vocab_to: int = 64,
    **overrides: object,
) -> PreTrainedModel:
    """A randomly initialised tiny model of ``family`` whose special tokens match ``tokenizer``.

    Its embedding matrix is padded to a multiple of ``pad_vocab_to`` rows, as real checkpoints
    often are (Qwen2, Llama-3 and others have more rows than their tokenizer has tokens).
    """
    ids = {
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if family in SEQ2SEQ_FAMILIES:
        ids["decoder_start_token_id"] = ids["pad_token_id"]
    vocab_rows = -(-len(tokenizer) // pad_vocab_to) * pad_vocab_to
    config = model_config(family, vocab_rows, size, **{**ids, **overrides})
    auto = AutoModelForSeq2SeqLM if family in SEQ2SEQ_FAMILIES else AutoModelForCausalLM
    return auto.from_config(config)


def save_pair(
    directory: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> str:
    """Save a model and its tokenizer like a hub checkpoint; return the folder as a string."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
