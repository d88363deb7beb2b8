"""Responses the models write themselves: on-policy distillation and sequence-level KD.

Off-policy distillation trains the student on the dataset's responses, text it will never write
itself. With --lmbda a share of the batches is answered by the student instead (GKD, Agarwal et
al. 2024; MiniLLM): its own completions of the batch's prompts, which the teacher then scores
like any other batch. With --seq_kd the teacher writes the other batches' responses (Kim & Rush
2016). Either way a generated batch has the layout of a tokenized one (``prompt + completion``,
labels on the completion only), so that the teacher's forward, the fused loss, the token
normalisation and the evaluation read it unchanged.

- The prompt of a causal example is every token before its last response (the last trained
  span): for chat data the template's rendering of the earlier turns with its generation prompt,
  for instruction data the rendered instruction. A seq2seq example's prompt is its source.
- A completion ends with its first stop token (eos, or the chat template's end of turn), which is
  trained on, so that the student learns to stop; a row with nothing to train on (accelerate's
  repeated examples, a masked batch) keeps nothing to train on, and an empty completion adds no
  token: its loss is an exact 0, never NaN.
- Which batches are generated, and the sampling, are functions of (--seed, step, micro-batch,
  rank), drawn from their own RNG: a resumed run regenerates exactly what the interrupted one
  would have, and dropout's stream is untouched. The choice of batch does not depend on the
  rank, so that every rank generates together (ZeRO-3's gathers are collectives).
- Generation runs the unwrapped model in eval mode (no dropout) with its KV cache. A ZeRO-3
  student is gathered once per optimizer step and generates without ZeRO's per-module hooks
  (DeepSpeed's ``unwrap_model_for_generation``); a ZeRO-3-sharded teacher, which need not fit on
  one device, generates with its shards gathered layer by layer (``synced_gpus``). With
  --generation_backend vllm the student's completions come from a vLLM engine colocated on
  each process's GPU instead (``VllmStudent``).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from accelerate import Accelerator
from deepspeed import DeepSpeedEngine
from deepspeed.runtime.zero import GatheredParameters
from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kd_dist.config import ConfigError, TrainConfig
from kd_dist.data.collate import pad
from kd_dist.losses import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled: --max_new_tokens, --generation_temperature, --top_p."""

    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    stop_ids: tuple[int, ...]  # eos, and the chat template's end of turn
    pad_id: int
    vocab_size: int  # the tokenizer's: rows of a padded embedding beyond it are never sampled

    def generation_config(self) -> GenerationConfig:
        """The settings ``sample`` generates with (and nothing from the checkpoint's)."""
        sampled = self.temperature > 0
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sampled,
            temperature=self.temperature if sampled else None,
            top_p=self.top_p if sampled else None,
            top_k=0 if sampled else None,
            repetition_penalty=1.0,
            eos_token_id=list(self.stop_ids),
            pad_token_id=self.pad_id,
            use_cache=True,
        )


class TokenizerVocabulary(LogitsProcessor):
    """Only the tokenizer's tokens can be generated: the extra rows a checkpoint pads its
    embedding with (Qwen2, Llama-3, ...) get a zero probability, as the loss gives them."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(
            -1, torch.arange(self.vocab_size, scores.shape[-1], device=scores.device), -math.inf
        )


def prompt_lengths(labels: torch.Tensor, lengths: torch.Tensor) -> list[int | None]:
    """Causal rows ([B, L] labels, [B] real lengths): the length of each row's prompt, every
    token before its last trained span; None for a row with nothing trained, or no prompt."""
    prompts: list[int | None] = []
    for row, length in zip(labels.tolist(), lengths.tolist(), strict=True):
        trained = [i for i in range(length) if row[i] != IGNORE_INDEX]
        start = trained[-1] if trained else 0
        while start > 0 and row[start - 1] != IGNORE_INDEX:
            start -= 1
        prompts.append(start or None)
    return prompts


def completion(tokens: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """A generated row up to and including its first stop token; a row that never stopped
    fills --max_new_tokens (generate pads a row only after its stop)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1]
    return tokens


def causal_prompts(batch: Batch) -> tuple[list[list[int]], list[int | None]]:
    """Each causal row's prompt (token ids) and where it starts to be trained (None: nothing
    trained; such a row is generated for too, from its whole text, and stays masked)."""
    lengths = batch["attention_mask"].sum(1)
    starts = prompt_lengths(batch["labels"], lengths)
    rows = zip(batch["input_ids"].tolist(), starts, lengths.tolist(), strict=True)
    prompts = [row[: start or length] for row, start, length in rows]
    return prompts, starts


def with_completions(
    prompts: list[list[int]],
    starts: list[int | None],
    completions: list[list[int]],
    sampling: Sampling,
    device: torch.device,
) -> Batch:
    """A causal batch of prompt + completion rows, right-padded, labels on the completions
    (cut at their first stop token) of the rows that were trained."""
    rows, labels = [], []
    for prompt, start, tokens in zip(prompts, starts, completions, strict=True):
        written = completion(tokens, sampling.stop_ids)
        rows.append(prompt + written)
        labels.append(
            [IGNORE_INDEX] * len(prompt) + (written if start else [IGNORE_INDEX] * len(written))
        )
    batch = {
        "input_ids": pad(rows, sampling.pad_id),
        "attention_mask": pad([[1] * len(row) for row in rows], 0),
        "labels": pad(labels, IGNORE_INDEX),
    }
    return {key: value.to(device) for key, value in batch.items()}


# How a model starts a sequence: kept from the checkpoint's generation_config while it samples.
STRUCTURAL_IDS = ("bos_token_id", "decoder_start_token_id", "forced_bos_token_id")


def sample(
    model: PreTrainedModel, sampling: Sampling, sharded: bool, **inputs: torch.Tensor
) -> torch.Tensor:
    """``model.generate(**inputs)`` with ``sampling``'s settings alone. transformers fills
    whatever a call leaves unset from the checkpoint's generation_config (its beams, top-k,
    temperature, repetition penalty, minimum length, forced eos...): it is set aside for the
    call, but for how the model starts a sequence, so that the samples are of the model's own
    distribution. A ZeRO-3-sharded model gathers each layer's weights from every rank at each
    of its forwards (``synced_gpus``): every rank runs as many as the longest generation needs.
    A LoRA student (a PeftModel) reads its base model's generation_config, so that one is set
    aside (the wrapper holds none of its own)."""
    holder = model.get_base_model() if hasattr(model, "get_base_model") else model
    checkpoint = holder.generation_config
    clean = GenerationConfig(**{name: getattr(checkpoint, name, None) for name in STRUCTURAL_IDS})
    holder.generation_config = clean
    try:
        return model.generate(
            **inputs, generation_config=sampling.generation_config(), synced_gpus=sharded,
            logits_processor=LogitsProcessorList([TokenizerVocabulary(sampling.vocab_size)]),
        )  # fmt: skip
    finally:
        holder.generation_config = checkpoint


def transformers_completions(
    model: PreTrainedModel,
    prompts: list[list[int]],
    sampling: Sampling,
    sharded: bool,
    device: torch.device,
) -> list[list[int]]:
    """``model.generate``'s new tokens after each (causal) prompt, in one left-padded batch
    [B, width]: generation continues every row from its last real token."""
    width = max(len(prompt) for prompt in prompts)
    left = torch.full((len(prompts), width), sampling.pad_id, dtype=torch.long)
    left_mask = torch.zeros_like(left)
    for i, prompt in enumerate(prompts):
        left[i, width - len(prompt) :] = torch.as_tensor(prompt)
        left_mask[i, width - len(prompt) :] = 1
    out = sample(model, sampling, sharded, input_ids=left.to(device),
                 attention_mask=left_mask.to(device))  # fmt: skip
    return out[:, width:].tolist()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Sampling inside draws from the RNG seeded with ``seed``; the global RNG (dropout's
    stream) is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    batch: Batch,
    sampling: Sampling,
    seed: int,
    causal: bool,
    sharded: bool = False,
) -> Batch:
    """``batch`` with its responses replaced by ``model``'s completions of its prompts, in the
    layout of a tokenized batch: right-padded, labels on the completions only (a row with
    nothing trained keeps nothing trained). ``model`` is unwrapped and in eval mode; the
    sampling draws from the RNG seeded with ``seed``, and leaves the global RNG as it was."""
    device = batch["input_ids"].device
    if causal:
        prompts, starts = causal_prompts(batch)
        with seeded(seed, device):
            completions = transformers_completions(model, prompts, sampling, sharded, device)
        return with_completions(prompts, starts, completions, sampling, device)
    # seq2seq: the source is the prompt; the decoder writes the completion.
    with seeded(seed, device):
        out = sample(model, sampling, sharded, input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"])  # fmt: skip
    trained = (batch["labels"] != IGNORE_INDEX).any(1).tolist()
    labels = [
        completion(tokens, sampling.stop_ids) if keep else [IGNORE_INDEX]
        for tokens, keep in zip(out[:, 1:].tolist(), trained, strict=True)  # after the start
    ]
    return {**batch, "labels": pad(labels, IGNORE_INDEX).to(device)}


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (a sharded teacher)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def generating(accelerator: Accelerator, model: torch.nn.Module) -> Iterator[PreTrainedModel]:
    """The unwrapped ``model`` (as prepared: DDP or DeepSpeed) in eval mode, under the run's
    autocast. A ZeRO-3 student is gathered whole once, and generates without ZeRO's
    per-module hooks: a gather per layer and per generated token would be the bottleneck."""
    module = accelerator.unwrap_model(model)
    zero3 = isinstance(model, DeepSpeedEngine) and model.zero_optimization_stage() == 3
    was_training = module.training
    module.eval()
    try:
        with (
            unwrap_model_for_generation(model) if zero3 else contextlib.nullcontext(),
            accelerator.autocast(),
        ):
            yield module
    finally:
        module.train(was_training)


def sample_seed(*parts: object) -> int:
    """A seed for one generation, a pure function of ``parts`` (the run's seed, the step, the
    micro-batch, the rank): a resumed run samples exactly what the interrupted one would."""
    return random.Random(":".join(map(str, parts))).getrandbits(63)


def response_writer(seed: int, step: int, index: int, lmbda: float, seq_kd: bool) -> str | None:
    """Who writes micro-batch ``index`` of optimizer step ``step``: "student" (with probability
    ``lmbda``), else "teacher" under --seq_kd, else None (the dataset). A function of the seed,
    the step and the micro-batch, never of the rank: a rank that generated alone would wait
    forever for the others in a ZeRO-3 gather."""
    if random.Random(f"lmbda:{seed}:{step}:{index}").random() < lmbda:
        return "student"
    return "teacher" if seq_kd else None


class ResponseSource(Protocol):
    """Where each micro-batch's responses come from: the dataset, or the models."""

    generates: bool  # whether the labels of a batch may change here (tokens are counted after)

    def fill(self, window: list[Batch], step: int) -> list[Batch]:
        """The optimizer step's micro-batches, their responses written where they should be."""
        ...

    def report(self) -> dict[str, float]:
        """Generation figures since the last report, for metrics.jsonl (empty: none)."""
        ...


class DatasetResponses:
    """Off-policy distillation: every batch keeps the dataset's responses."""

    generates = False

    def fill(self, window: list[Batch], step: int) -> list[Batch]:
        return window

    def report(self) -> dict[str, float]:
        return {}


@dataclass
class GeneratedResponses:
    """--lmbda and --seq_kd: a micro-batch's responses are the student's completions with
    probability --lmbda, else the teacher's under --seq_kd, else the dataset's."""

    accelerator: Accelerator
    student: torch.nn.Module  # as prepared
    teacher: PreTrainedModel | None  # needed for --seq_kd; replicated or ZeRO-3-sharded
    sampling: Sampling
    lmbda: float
    seq_kd: bool
    seed: int
    causal: bool
    vllm: VllmStudent | None = None  # --generation_backend vllm: the student's completions
    generates = True
    # Since the last report, on this rank: the generated tokens trained on (those of rows with
    # nothing to train on are not counted), and the time spent generating (the vLLM engine's
    # weight updates and the teacher's generations included).
    tokens: int = 0
    seconds: float = 0.0

    def fill(self, window: list[Batch], step: int) -> list[Batch]:
        start = time.perf_counter()
        writers = [
            response_writer(self.seed, step, index, self.lmbda, self.seq_kd)
            for index in range(len(window))
        ]
        filled = list(window)
        if "student" in writers and self.vllm is not None:
            self.vllm.load_weights(self.student, step)  # those of the last optimizer step
            self.write(self.vllm.responses, "student", writers, filled, step)
        elif "student" in writers:  # gathered whole under ZeRO-3: no per-layer gathers
            with generating(self.accelerator, self.student) as student:
                self.write(self.responder(student, sharded=False), "student", writers, filled,
                           step)  # fmt: skip
        if "teacher" in writers:  # frozen, in eval mode already
            with self.accelerator.autocast():
                respond = self.responder(self.teacher, sharded=is_sharded(self.teacher))
                self.write(respond, "teacher", writers, filled, step)
        self.seconds += time.perf_counter() - start
        return filled

    def responder(self, model: PreTrainedModel, sharded: bool) -> Callable[[Batch, int], Batch]:
        """``write``'s ``respond`` for a transformers model."""
        return lambda batch, seed: generate_responses(
            model, batch, self.sampling, seed, self.causal, sharded
        )

    def write(
        self,
        respond: Callable[[Batch, int], Batch],
        who: str,
        writers: list[str | None],
        filled: list[Batch],
        step: int,
    ) -> None:
        """Replace the responses of the micro-batches ``who`` writes, in place in ``filled``:
        ``respond(batch, seed)`` gives the batch with its completions."""
        for index, writer in enumerate(writers):
            if writer == who:
                seed = sample_seed(self.seed, step, index, self.accelerator.process_index)
                filled[index] = respond(filled[index], seed)
                self.tokens += int((filled[index]["labels"] != IGNORE_INDEX).sum())

    def report(self) -> dict[str, float]:
        record = {
            "generated_tokens": self.tokens,
            "generation_tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "generation_seconds": self.seconds,
        }
        self.tokens, self.seconds = 0, 0.0
        return record


class VllmStudent:
    """--generation_backend vllm: the student's completions from a vLLM engine colocated with
    the training on this process's GPU (vLLM's ``external_launcher``: one engine per process,
    no server), as TRL's colocate mode runs it. It starts from --student_model's checkpoint and
    takes the trained weights before the first generation after each optimizer step, one
    parameter at a time (gathered one at a time under ZeRO-3). Causal students only (vLLM runs
    no encoder-decoder models). Needs ``pip install 'kd_dist[vllm]'`` and a CUDA GPU; it is not
    exercised by the CPU tests (see ``test_vllm_completions_train_as_the_transformers_ones``)."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, sampling: Sampling) -> None:
        from vllm import LLM

        self.accelerator, self.sampling = accelerator, sampling
        # The external launcher joins this run's processes through torch.distributed's
        # environment, which a plain one-process start (`kd-dist train`) leaves unset.
        for name, value in (("RANK", accelerator.process_index),
                            ("LOCAL_RANK", accelerator.local_process_index),
                            ("WORLD_SIZE", accelerator.num_processes),
                            ("MASTER_ADDR", "127.0.0.1")):  # fmt: skip
            os.environ.setdefault(name, str(value))
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as free:
                free.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(free.getsockname()[1])
        self.llm = LLM(
            model=cfg.student_model,
            tensor_parallel_size=1,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            max_model_len=cfg.max_length + cfg.max_new_tokens,
            distributed_executor_backend="external_launcher",
            dtype="bfloat16" if cfg.bf16 else "float16" if cfg.fp16 else "auto",
            seed=cfg.seed + accelerator.process_index,
            trust_remote_code=cfg.trust_remote_code,
            # vLLM's memory profiling reserves room for this many tokens in one forward; its
            # default (tens of thousands) misjudges what is left beside the training.
            max_num_batched_tokens=4096,
        )
        self.weights_of_step: int | None = None  # the step whose weights the engine holds
        accelerator.wait_for_everyone()  # every engine is up before training goes on

    def load_weights(self, student: torch.nn.Module, step: int) -> None:
        """Give the engine the weights the student has before optimizer step ``step``."""
        if self.weights_of_step == step:
            return
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, parameter in self.accelerator.unwrap_model(student).named_parameters():
            with GatheredParameters([parameter]):  # a no-op without ZeRO-3
                engine_model.load_weights([(name, parameter.data)])
        self.llm.reset_prefix_cache()  # its cached keys and values are of the old weights
        self.weights_of_step = step

    def responses(self, batch: Batch, seed: int) -> Batch:
        """``generate_responses``'s batch, with vLLM's completions (request i seeded with
        ``seed + i``, so that a resumed run samples the same)."""
        from vllm import SamplingParams

        prompts, starts = causal_prompts(batch)
        sampling = self.sampling
        requests = [
            SamplingParams(
                n=1,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,  # 0: greedy
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                top_k=-1,
                repetition_penalty=1.0,
                seed=seed + i,
                stop_token_ids=list(sampling.stop_ids),
                allowed_token_ids=list(range(sampling.vocab_size)),
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": prompt} for prompt in prompts], requests, use_tqdm=False
        )
        completions = [list(output.outputs[0].token_ids) for output in outputs]
        return with_completions(prompts, starts, completions, self.sampling, batch["labels"].device)


def generated_batches(
    accelerator: Accelerator,
    student: torch.nn.Module,
    batches: Iterable[Batch],
    sampling: Sampling,
    seed: int,
    causal: bool,
) -> Iterator[Batch]:
    """The on-policy evaluation's batches: the student's own completions of ``batches``'
    prompts, sampled from (seed, batch, rank)."""
    for index, batch in enumerate(batches):
        batch_seed = sample_seed("eval", seed, index, accelerator.process_index)
        with generating(accelerator, student) as model:
            generated = generate_responses(model, batch, sampling, batch_seed, causal)
        yield generated  # outside: the student's ZeRO-3 hooks are back for the metrics' forward


def sampling_settings(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    end_of_turn: int | None,
    models: Iterable[PreTrainedModel],
) -> Sampling:
    """The run's sampling. A completion stops at the tokenizer's eos, the chat template's end of
    turn, or any eos the generating models' checkpoints list (Llama-3-Instruct's lists three)."""
    stops = [tokenizer.eos_token_id, end_of_turn]
    for model in models:
        listed = model.generation_config.eos_token_id if model.generation_config else None
        stops += listed if isinstance(listed, list) else [listed]
    return Sampling(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.generation_temperature,
        top_p=cfg.top_p, stop_ids=tuple(dict.fromkeys(t for t in stops if t is not None)),
        pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
    )  # fmt: skip


def check_prompts(cfg: TrainConfig, data_format: str) -> None:
    """Generated responses need prompts: refuse plain text data (before any model loads)."""
    if data_format == "text" and cfg.generation_flags():
        raise ConfigError(
            f"{' and '.join(cfg.generation_flags())} generate responses to the dataset's "
            f"prompts, and {cfg.dataset} is plain text, which has none: use instruction, "
            "prompt/completion, chat or seq2seq data (--dataset_format), or drop them."
        )
