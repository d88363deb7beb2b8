"""The run configuration: one typed dataclass, loadable from YAML, validated before any model loads.

Every field is a command-line flag of the same name (``cli.py`` builds the parser from these
fields), so a YAML file and the command line can set exactly the same things.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import yaml

from kd_dist.losses import HiddenLoss, LossSpec, Objective, auto_chunk_rows, free_memory

TaskType = Literal["causal", "seq2seq"]
OptimizerName = Literal["adamw", "sgd", "adafactor"]
SchedulerName = Literal["linear", "cosine", "constant"]
DatasetFormat = Literal["auto", "text", "instruction", "chat", "seq2seq"]
TeacherPlacement = Literal["auto", "replicate", "zero3", "zero3_offload"]
TeacherDtype = Literal["auto", "bfloat16", "float16", "float32"]
AttnImplementation = Literal["auto", "sdpa", "flash_attention_2", "eager"]
PreemptionSignal = Literal["SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT"]
ReportTo = Literal["none", "tensorboard", "wandb"]
TokenizeOn = Literal["auto", "main", "local_main"]
GenerationBackend = Literal["transformers", "vllm"]

CONFIG_FILE_NAME = "kd_config.json"


class ConfigError(ValueError):
    """A problem with the user's configuration: the message names the problem and the fix."""


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    # --- models -----------------------------------------------------------------------------
    teacher_model: str = field(
        default="", metadata=_help("Teacher: hub name or local folder (frozen, eval mode).")
    )
    student_model: str = field(
        default="", metadata=_help("Student to train: hub name or local folder.")
    )
    task_type: TaskType = field(
        default="causal",
        metadata=_help("causal (GPT-2, OPT, Llama, Qwen...) or seq2seq (T5, BART)."),
    )
    teacher_placement: TeacherPlacement = field(
        default="auto",
        metadata=_help(
            "replicate: a full frozen teacher on every process; zero3: the teacher sharded by its "
            "own DeepSpeed ZeRO-3 inference engine (needs a DeepSpeed launch); zero3_offload: the "
            "same with its shards in CPU memory; auto: zero3 under DeepSpeed when the teacher "
            "would take over half the free GPU memory, else replicate."
        ),
    )
    teacher_dtype: TeacherDtype = field(
        default="auto",
        metadata=_help(
            "The dtype the frozen teacher is stored and run in: auto is bfloat16 under --bf16, "
            "float16 under --fp16, and otherwise the checkpoint's own dtype (or float32)."
        ),
    )
    attn_implementation: AttnImplementation = field(
        default="auto",
        metadata=_help(
            "Attention kernel of both models: sdpa, flash_attention_2 (needs the flash-attn "
            "package and a CUDA GPU) or eager; auto: sdpa where the model supports it, else eager."
        ),
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("Allow model code from the hub (off unless you ask).")
    )
    teacher_cache: str | None = field(
        default=None,
        metadata=_help(
            "Train from a teacher cache written by `kd-dist cache-teacher` instead of a live "
            "teacher: no --teacher_model is needed and none is loaded (given one, evaluation "
            "measures the student against it; otherwise against the cache's eval split)."
        ),
    )
    top_k: int = field(
        default=64,
        metadata=_help(
            "kd-dist cache-teacher: the teacher tokens stored per trained position (their "
            "log-probabilities at --temperature, plus the log of the rest's mass)."
        ),
    )
    cache_shard_size: int = field(
        default=1000,
        metadata=_help(
            "kd-dist cache-teacher: examples per shard of the cache, the unit a killed job "
            "resumes from (a shard's rows are held in memory until written: about "
            "examples x tokens x (6 x --top_k + 4) bytes)."
        ),
    )

    # --- LoRA students -----------------------------------------------------------------------
    lora_r: int = field(
        default=0,
        metadata=_help(
            "Train LoRA adapters of this rank on the frozen student (peft: pip install "
            "'kd_dist[peft]'); 0: train the whole student."
        ),
    )
    lora_alpha: float = field(
        default=16.0, metadata=_help("LoRA scaling: the adapters' update is scaled by alpha / r.")
    )
    lora_dropout: float = field(
        default=0.05, metadata=_help("Dropout on the LoRA adapters' input.")
    )
    lora_target_modules: str = field(
        default="all-linear",
        metadata=_help(
            "Comma-separated names of the student's modules to adapt (e.g. q_proj,v_proj); "
            "all-linear: every linear layer of the blocks (peft's, the output layer excluded)."
        ),
    )
    lora_modules_to_save: str | None = field(
        default=None,
        metadata=_help(
            "Comma-separated modules trained in full beside the adapters and saved with them "
            "(e.g. lm_head, to train the output layer too; default: none, it stays frozen)."
        ),
    )
    load_in_4bit: bool = field(
        default=False,
        metadata=_help(
            "QLoRA: store the frozen student in 4-bit NF4 (bitsandbytes: pip install "
            "'kd_dist[qlora]'; needs a CUDA GPU) and train LoRA adapters on it."
        ),
    )
    merge_lora: bool = field(
        default=False,
        metadata=_help(
            "Export the student with its adapters merged into the weights (a plain Hugging Face "
            "model) instead of the adapters alone (peft's format)."
        ),
    )

    # --- data -------------------------------------------------------------------------------
    dataset: str = field(
        default="",
        metadata=_help(
            "A json/jsonl/csv/parquet/txt file, a quoted glob of them, a folder of them, a "
            "save_to_disk folder, or a hub dataset name (from the local cache)."
        ),
    )
    dataset_config: str | None = field(
        default=None, metadata=_help("Configuration name of a hub dataset.")
    )
    dataset_split: str = field(default="train", metadata=_help("Split to train on."))
    eval_split: str | None = field(
        default=None,
        metadata=_help("Split to evaluate on (default: validation/test when present)."),
    )
    eval_ratio: float = field(
        default=0.0,
        metadata=_help(
            "Hold out this fraction of the training split for evaluation (by seed), when there "
            "is no --eval_split and no validation/test split (ignored, with a warning, otherwise)."
        ),
    )
    dataset_format: DatasetFormat = field(
        default="auto", metadata=_help("Override the format detected from the columns.")
    )
    text_column: str | None = field(default=None, metadata=_help("Column holding plain text."))
    messages_column: str | None = field(
        default=None,
        metadata=_help("Column holding chat conversations ({role, content} or {from, value})."),
    )
    prompt_column: str | None = field(
        default=None, metadata=_help("Column holding the prompt/instruction/source.")
    )
    response_column: str | None = field(
        default=None, metadata=_help("Column holding the response/output/target.")
    )
    max_length: int | None = field(
        default=None,
        metadata=_help(
            "Maximum tokens per example (seq2seq: of the source). Default: 512, or the smaller "
            "model's position limit when that is lower."
        ),
    )
    max_target_length: int | None = field(
        default=None, metadata=_help("seq2seq: maximum target tokens (default: max_length).")
    )
    train_on_prompt: bool = field(
        default=False,
        metadata=_help(
            "Include prompt tokens (chat: every turn, not only the assistant's) in the loss."
        ),
    )
    packing: bool = field(
        default=False,
        metadata=_help(
            "Causal data (text, instruction, chat): pack whole examples into blocks of at most "
            "--max_length tokens, padding-free; attention and positions stay within each "
            "example, prompts stay masked. Text longer than a block is split, other examples "
            "are truncated."
        ),
    )
    group_by_length: bool = field(
        default=False,
        metadata=_help(
            "Unpacked data: batch examples of similar lengths together (Hugging Face Trainer's "
            "length-grouped sampling: shuffled megabatches of 50 batches, each sorted by "
            "length), to cut padding."
        ),
    )
    max_train_samples: int | None = field(
        default=None, metadata=_help("Use at most this many training examples.")
    )
    max_eval_samples: int | None = field(
        default=None, metadata=_help("Use at most this many evaluation examples.")
    )
    num_proc: int | None = field(
        default=None,
        metadata=_help(
            "Processes that tokenize a split (datasets.map). Default: the CPUs this process may "
            "use, at most 16; 1 for splits under 5,000 rows."
        ),
    )
    tokenize_on: TokenizeOn = field(
        default="auto",
        metadata=_help(
            "Which process tokenizes while the others wait for its datasets cache: main (once "
            "overall: a cache folder all nodes share), local_main (once per node: node-local "
            "caches), auto (main when every process sees a file the main process writes there)."
        ),
    )

    # --- optimisation -----------------------------------------------------------------------
    output_dir: str = field(
        default="./distilled_model", metadata=_help("Where checkpoints and the student go.")
    )
    batch_size: int = field(default=8, metadata=_help("Micro-batch size per process."))
    gradient_accumulation_steps: int = field(
        default=1, metadata=_help("Micro-batches per optimizer step.")
    )
    optimizer: OptimizerName = field(default="adamw", metadata=_help("adamw, sgd or adafactor."))
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate."))
    weight_decay: float = field(
        default=0.0,
        metadata=_help(
            "Weight decay (AdamW, SGD, Adafactor) of linear layers' matrices only: never biases, "
            "norms or embeddings."
        ),
    )
    warmup_ratio: float = field(
        default=0.1, metadata=_help("Fraction of steps with linear warm-up.")
    )
    lr_scheduler: SchedulerName = field(
        default="linear", metadata=_help("Decay after warm-up: linear, cosine or constant.")
    )
    epochs: int = field(default=3, metadata=_help("Passes over the training data."))
    max_steps: int | None = field(
        default=None, metadata=_help("Stop after this many optimizer steps (overrides epochs).")
    )
    clip_grad_norm: float = field(
        default=1.0, metadata=_help("Clip the gradient norm to this (0 disables).")
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help(
            "Recompute the student's layer activations in the backward pass instead of keeping "
            "them (HF's non-reentrant checkpointing): far less activation memory for about "
            "one more forward of the student per step."
        ),
    )
    fp16: bool = field(default=False, metadata=_help("fp16 mixed precision (GPU)."))
    bf16: bool = field(default=False, metadata=_help("bf16 mixed precision."))
    seed: int = field(default=42, metadata=_help("Random seed (data order, dropout, init)."))
    logging_steps: int = field(default=10, metadata=_help("Log every this many steps."))
    eval_steps: int = field(
        default=0,
        metadata=_help(
            "Evaluate on the eval split every N optimizer steps (0: only at the end of the run)."
        ),
    )
    eval_before_training: bool = field(
        default=False,
        metadata=_help("Also evaluate the student before the first step (the starting point)."),
    )
    report_to: ReportTo = field(
        default="none",
        metadata=_help(
            "Also send the logged metrics to tensorboard or wandb (Accelerate's trackers; needs "
            "pip install 'kd_dist[tensorboard]' or 'kd_dist[wandb]')."
        ),
    )
    save_every: int = field(
        default=1, metadata=_help("Save a resumable checkpoint every N epochs (0 disables).")
    )
    save_steps: int = field(
        default=0, metadata=_help("Also save a resumable checkpoint every N steps (0 disables).")
    )
    save_total_limit: int | None = field(
        default=None, metadata=_help("Keep only the newest N checkpoints (default: all).")
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help(
            "Train into a non-empty output_dir (files of the same names are replaced; a previous "
            "run's checkpoints and metrics are removed)."
        ),
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata=_help(
            "Checkpoint folder to continue from; 'latest': output_dir's newest; 'auto': the "
            "newest if there is one, else start fresh (for requeued jobs)."
        ),
    )
    allow_resume_mismatch: bool = field(
        default=False,
        metadata=_help(
            "Resume a checkpoint saved with other models, data, batch size, accumulation, seed, "
            "optimizer, precision or number of processes (refused by default: it cannot resume "
            "exactly)."
        ),
    )

    # --- reliability ------------------------------------------------------------------------
    preemption_signal: PreemptionSignal = field(
        default="SIGUSR1",
        metadata=_help(
            "Signal that, like SIGTERM, makes the run save a checkpoint at the next step and exit "
            "75 (SLURM's early warning: #SBATCH --signal=B:USR1@300)."
        ),
    )
    skip_nonfinite: int = field(
        default=0,
        metadata=_help(
            "Skip up to this many batches whose loss (or steps whose gradient norm) is not finite "
            "(0: stop the run at the first)."
        ),
    )
    dist_timeout: int = field(
        default=1800,
        metadata=_help(
            "Seconds a collective operation may wait for the other processes before the run "
            "fails with an error (a hung or dead process)."
        ),
    )

    # --- distillation loss ------------------------------------------------------------------
    loss: Objective = field(
        default="forward_kl",
        metadata=_help(
            "Divergence between teacher p and student q: forward_kl KL(p||q), reverse_kl "
            "KL(q||p), jsd (generalized, --jsd_beta), skew_forward_kl / skew_reverse_kl "
            "(--skew_alpha), tvd."
        ),
    )
    temperature: float = field(
        default=1.0,
        metadata=_help(
            "Softmax temperature T of both distributions; the KD term is scaled by T^2. 1 keeps "
            'the models\' own distributions (README: "Choosing the temperature").'
        ),
    )
    alpha: float = field(
        default=0.0,
        metadata=_help(
            "Weight of ground-truth cross-entropy: (1-alpha)*KD + alpha*CE; 1 is plain "
            "fine-tuning and the teacher is not loaded."
        ),
    )
    jsd_beta: float = field(
        default=0.5,
        metadata=_help("jsd: mixture weight beta of the teacher (0 = forward KL, 1 = reverse KL)."),
    )
    skew_alpha: float = field(
        default=0.1, metadata=_help("skew_*_kl: weight of the skewed-towards distribution.")
    )
    fused_loss: bool = field(
        default=True,
        metadata=_help(
            "Compute the loss from final hidden states and the output weights chunk by chunk, "
            "never making the full logits (off: from the models' logits)."
        ),
    )
    compile_loss: bool = field(
        default=True,
        metadata=_help(
            "torch.compile the loss's per-chunk math (falls back to eager, with a warning, where "
            "compilation is unavailable)."
        ),
    )
    vocab_chunk_size: int | None = field(
        default=None,
        metadata=_help(
            "Token positions whose full-vocabulary distributions the loss processes at once "
            "(default: sized from the vocabulary and the memory, see --loss_chunk_memory_mb)."
        ),
    )
    loss_chunk_memory_mb: float | None = field(
        default=None,
        metadata=_help(
            "Memory for one loss chunk (its logits and temporaries), sizing the default "
            "--vocab_chunk_size (default: 256 on a CPU; on a GPU 1/8 of its free memory, "
            "1024-8192 positions)."
        ),
    )

    # --- hidden-state distillation ----------------------------------------------------------
    hidden_loss_weight: float = field(
        default=0.0,
        metadata=_help(
            "Weight w of a loss matching the student's block outputs to the teacher's: the loss "
            "is (1-alpha)*KD + alpha*CE + w*hidden (0: off). Needs a live teacher."
        ),
    )
    hidden_layer_map: str | None = field(
        default=None,
        metadata=_help(
            "Student block -> teacher block pairs, 0-based, e.g. '0:1,1:3' (default: every "
            "student block i, matched to teacher block max(1, (i+1)*Lt // Ls) - 1, the same "
            "relative depth; Ls, Lt the models' block counts)."
        ),
    )
    hidden_loss: HiddenLoss = field(
        default="cosine",
        metadata=_help(
            "The hidden-state loss per position: cosine (1 - cosine similarity) or mse (mean "
            "squared error over the teacher's width)."
        ),
    )

    # --- on-policy distillation -------------------------------------------------------------
    lmbda: float = field(
        default=0.0,
        metadata=_help(
            "On-policy distillation (GKD): the fraction of batches whose responses the student "
            "generates from the batch's prompts; the teacher scores them and the loss covers the "
            "generated tokens only (0: the dataset's responses, off-policy)."
        ),
    )
    seq_kd: bool = field(
        default=False,
        metadata=_help(
            "Sequence-level KD: the teacher generates the responses of the batches the student "
            "does not (--lmbda)."
        ),
    )
    max_new_tokens: int = field(
        default=128, metadata=_help("Tokens a generated response may have at most.")
    )
    generation_temperature: float = field(
        default=1.0,
        metadata=_help(
            "Sampling temperature of generated responses (1: the model's own distribution; "
            "0: greedy)."
        ),
    )
    top_p: float = field(
        default=1.0, metadata=_help("Nucleus sampling of generated responses (1: off).")
    )
    generation_backend: GenerationBackend = field(
        default="transformers",
        metadata=_help(
            "What generates the student's responses (--lmbda): transformers (generate with "
            "the KV cache), or vllm (an engine colocated on each process's GPU, given the "
            "trained weights after each optimizer step; needs kd_dist[vllm] and a CUDA GPU)."
        ),
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata=_help(
            "--generation_backend vllm: the share of the GPU's memory its engine may take "
            "(weights and KV cache), beside the training."
        ),
    )
    eval_on_policy: bool | None = field(
        default=None,
        metadata=_help(
            "Also evaluate on the student's own sampled completions of the held-out prompts: "
            "the teacher's mean NLL of them and the reverse KL there (default: when the run "
            "generates, --lmbda > 0 or --seq_kd)."
        ),
    )

    # ----------------------------------------------------------------------------------------
    @property
    def loss_spec(self) -> LossSpec:
        return LossSpec(self.loss, self.temperature, self.alpha, self.jsd_beta, self.skew_alpha)

    @property
    def generates(self) -> bool:
        """Whether training generates responses (--lmbda > 0 or --seq_kd)."""
        return self.lmbda > 0 or self.seq_kd

    @property
    def measures_on_policy(self) -> bool:
        """Whether the evaluation measures the student's own completions (--eval_on_policy)."""
        return self.generates if self.eval_on_policy is None else self.eval_on_policy

    @property
    def mixed_precision(self) -> str:
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "no"

    def chunk_rows(
        self,
        vocab_size: int,
        device: torch.device,
        compute_dtype: torch.dtype,
        teacher_logits: bool = True,
    ) -> int:
        """Rows per loss/metrics chunk: --vocab_chunk_size, else sized from the vocabulary, the
        dtype and --loss_chunk_memory_mb or the device's free memory (``auto_chunk_rows``;
        ``teacher_logits=False``: a chunk holds no teacher logits, the teacher is a cache's
        top-k); the trainer agrees on the smallest over the ranks."""
        return self.vocab_chunk_size or auto_chunk_rows(
            vocab_size, device.type, compute_dtype=compute_dtype, free_bytes=free_memory(device),
            memory_budget_mb=self.loss_chunk_memory_mb, teacher_logits=teacher_logits,
        )  # fmt: skip

    def validate(self, command: str = "train") -> None:
        """Check everything that can be checked without loading a model or a dataset, for
        ``command``: train (and tokenize, eval) or cache-teacher (which runs no student)."""
        problems = []
        required = ["dataset"]
        if command == "cache-teacher":
            required.append("teacher_model")
            if self.output_dir == CONFIG_FIELDS["output_dir"].default:
                problems.append(
                    "--output_dir is required: the folder `kd-dist cache-teacher` writes the "
                    "cache to (then `kd-dist train --teacher_cache` that folder)."
                )
            if self.teacher_cache:
                problems.append(
                    "--teacher_cache is what `kd-dist train` reads; `kd-dist cache-teacher` "
                    "writes a cache to --output_dir: drop --teacher_cache."
                )
        else:
            required.append("student_model")
            if not self.teacher_cache:
                required.append("teacher_model")
        for name in required:
            if not getattr(self, name):
                problems.append(f"--{name} is required.")
        for name in ("top_k", "cache_shard_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1 (got {getattr(self, name)}).")
        for name, kind in (
            ("task_type", TaskType),
            ("optimizer", OptimizerName),
            ("lr_scheduler", SchedulerName),
            ("dataset_format", DatasetFormat),
            ("loss", Objective),
            ("teacher_placement", TeacherPlacement),
            ("teacher_dtype", TeacherDtype),
            ("attn_implementation", AttnImplementation),
            ("preemption_signal", PreemptionSignal),
            ("report_to", ReportTo),
            ("tokenize_on", TokenizeOn),
            ("generation_backend", GenerationBackend),
            ("hidden_loss", HiddenLoss),
        ):
            allowed = get_args(kind)
            if getattr(self, name) not in allowed:
                problems.append(
                    f"--{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}."
                )
        if self.temperature <= 0:
            problems.append(
                f"--temperature must be > 0 (got {self.temperature}); 1.0 (the default) leaves "
                "the distributions unchanged."
            )
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"--alpha must be in [0, 1] (got {self.alpha}).")
        for name in ("batch_size", "gradient_accumulation_steps", "epochs"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1 (got {getattr(self, name)}).")
        if self.vocab_chunk_size is not None and self.vocab_chunk_size < 1:
            problems.append("--vocab_chunk_size must be at least 1 (omit it to size it by memory).")
        if self.loss_chunk_memory_mb is not None and self.loss_chunk_memory_mb <= 0:
            problems.append("--loss_chunk_memory_mb must be > 0 (omit it to size it by memory).")
        if not 0.0 <= self.jsd_beta <= 1.0:
            problems.append(f"--jsd_beta must be in [0, 1] (got {self.jsd_beta}).")
        if not 0.0 <= self.skew_alpha < 1.0:
            problems.append(f"--skew_alpha must be in [0, 1) (got {self.skew_alpha}).")
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"--max_length must be at least 2 (got {self.max_length}).")
        if self.max_target_length is not None and self.max_target_length < 1:
            problems.append("--max_target_length must be at least 1.")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("--max_steps must be at least 1 (omit it to train for --epochs).")
        if self.learning_rate <= 0:
            problems.append(f"--learning_rate must be > 0 (got {self.learning_rate}).")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"--warmup_ratio must be in [0, 1) (got {self.warmup_ratio}).")
        if not 0.0 <= self.eval_ratio < 1.0:
            problems.append(f"--eval_ratio must be in [0, 1) (got {self.eval_ratio}).")
        if self.clip_grad_norm < 0:
            problems.append("--clip_grad_norm must be >= 0 (0 disables clipping).")
        for name in ("max_train_samples", "max_eval_samples", "num_proc"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name} must be at least 1 (got {value}; omit it for all).")
        if self.logging_steps < 1:
            problems.append("--logging_steps must be at least 1.")
        if self.eval_steps < 0:
            problems.append("--eval_steps must be >= 0 (0 evaluates only at the end).")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            problems.append(
                f"--report_to {self.report_to} needs the {self.report_to} package: "
                f"pip install 'kd_dist[{self.report_to}]' (or pass --report_to none)."
            )
        if self.save_every < 0:
            problems.append("--save_every must be >= 0 (0 disables epoch checkpoints).")
        if self.save_steps < 0:
            problems.append("--save_steps must be >= 0 (0 disables step checkpoints).")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append("--save_total_limit must be at least 1 (omit it to keep all).")
        if self.packing and self.task_type == "seq2seq":
            problems.append(
                "--packing packs causal documents into blocks; seq2seq examples are "
                "(source, target) pairs and can't be packed: drop --packing."
            )
        if self.packing and self.group_by_length:
            problems.append(
                "--group_by_length groups unpacked examples by length; packed blocks are all "
                "about --max_length long already: drop one of --packing and --group_by_length."
            )
        if self.skip_nonfinite < 0:
            problems.append("--skip_nonfinite must be >= 0 (0 stops at the first NaN).")
        if self.dist_timeout < 1:
            problems.append(f"--dist_timeout must be at least 1 second (got {self.dist_timeout}).")
        if self.fp16 and self.bf16:
            problems.append("--fp16 and --bf16 are exclusive: choose one.")
        other_half = {"bfloat16": self.fp16, "float16": self.bf16}.get(self.teacher_dtype)
        if other_half:
            problems.append(
                f"--teacher_dtype {self.teacher_dtype} with --{self.mixed_precision}: a run "
                "computes in one half precision (DeepSpeed refuses two); pass --teacher_dtype "
                "auto (the run's) or float32."
            )
        if self.attn_implementation == "flash_attention_2" and self.mixed_precision == "no":
            problems.append(
                "--attn_implementation flash_attention_2 computes in fp16 or bf16 only: pass "
                "--bf16 (or --fp16), or use sdpa."
            )
        problems += self.lora_problems()
        problems += self.generation_problems(command)
        problems += self.hidden_loss_problems(command)
        if problems:
            raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))

    @property
    def lora(self) -> bool:
        """Whether the student trains LoRA adapters (--lora_r > 0) instead of its weights."""
        return self.lora_r > 0

    def lora_problems(self) -> list[str]:
        """What keeps the LoRA flags from running as asked."""
        problems = []
        if self.lora_r < 0:
            problems.append(f"--lora_r must be >= 0 (got {self.lora_r}; 0 turns LoRA off).")
        if not self.lora:
            given = [f"--{name}" for name in LORA_ONLY_FLAGS
                     if getattr(self, name) != CONFIG_FIELDS[name].default]  # fmt: skip
            if given:
                problems.append(
                    f"{', '.join(given)} only apply to LoRA students: pass --lora_r (e.g. 16), "
                    "or drop them."
                )
            return problems
        if self.lora_alpha <= 0:
            problems.append(f"--lora_alpha must be > 0 (got {self.lora_alpha}).")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout}).")
        if not split_names(self.lora_target_modules):
            problems.append(
                "--lora_target_modules names no module: pass all-linear or names like "
                "q_proj,v_proj."
            )
        if importlib.util.find_spec("peft") is None:
            problems.append(
                "--lora_r needs the peft package: pip install 'kd_dist[peft]' (or drop --lora_r)."
            )
        if self.generation_backend == "vllm":
            problems.append(
                "--generation_backend vllm is given the student's full weights, not LoRA "
                "adapters: pass --generation_backend transformers, or drop --lora_r."
            )
        return problems

    def generation_flags(self) -> list[str]:
        """The flags that make this run generate responses (in training or its evaluation)."""
        flags = (("--lmbda", self.lmbda > 0), ("--seq_kd", self.seq_kd),
                 ("--eval_on_policy", self.eval_on_policy))  # fmt: skip
        return [flag for flag, on in flags if on]

    def generation_problems(self, command: str) -> list[str]:
        """What keeps --lmbda, --seq_kd and --eval_on_policy from running as asked."""
        problems = []
        if not 0.0 <= self.lmbda <= 1.0:
            problems.append(f"--lmbda must be in [0, 1] (got {self.lmbda}).")
        if self.max_new_tokens < 1:
            problems.append(f"--max_new_tokens must be at least 1 (got {self.max_new_tokens}).")
        if self.generation_temperature < 0:
            problems.append(
                f"--generation_temperature must be >= 0 (got {self.generation_temperature}; "
                "0 is greedy)."
            )
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"--top_p must be in (0, 1] (got {self.top_p}; 1 turns it off).")
        if not 0.0 < self.vllm_gpu_memory_utilization < 1.0:
            problems.append(
                "--vllm_gpu_memory_utilization must be in (0, 1) (got "
                f"{self.vllm_gpu_memory_utilization})."
            )
        if self.generation_backend == "vllm" and self.task_type == "seq2seq":
            problems.append(
                "--generation_backend vllm runs causal students only (vLLM has no "
                "encoder-decoder models): pass --generation_backend transformers."
            )
        if self.generation_backend == "vllm" and self.lmbda == 0:
            problems.append(
                "--generation_backend vllm writes the student's responses, and --lmbda 0 "
                "generates none: pass --lmbda > 0, or drop --generation_backend."
            )
        if self.seq_kd and self.lmbda == 1:
            problems.append(
                "--seq_kd has the teacher answer the batches the student does not, and "
                "--lmbda 1 leaves it none: lower --lmbda, or drop --seq_kd."
            )
        if not self.generation_flags():
            return problems
        flags = " and ".join(self.generation_flags())
        if self.dataset_format == "text":
            problems.append(
                f"{flags} generate responses to the dataset's prompts, and --dataset_format "
                "text has none: use instruction, chat or seq2seq data, or drop them."
            )
        if command == "cache-teacher":
            problems.append(
                f"{flags} generate responses while training; a cache stores the teacher's "
                "distributions of the dataset's responses: drop them from cache-teacher."
            )
        elif self.teacher_cache:
            problems.append(
                f"{flags} need the teacher to score responses the models write, which no "
                "--teacher_cache holds: pass --teacher_model instead of --teacher_cache."
            )
        if self.alpha == 1.0:
            problems.append(
                f"--alpha 1 trains on the ground truth alone and loads no teacher to score "
                f"generated responses: lower --alpha or drop {flags}."
            )
        if self.packing:
            problems.append(
                f"{flags} generate a response per example from its prompt; --packing joins "
                "examples into blocks: drop --packing."
            )
        if self.train_on_prompt:
            problems.append(
                f"{flags} train on the generated responses only; --train_on_prompt would hide "
                "where each prompt ends: drop --train_on_prompt."
            )
        return problems

    def hidden_loss_problems(self, command: str) -> list[str]:
        """What keeps --hidden_loss_weight from running: it needs the teacher's own forward."""
        problems = []
        if self.hidden_loss_weight < 0:
            problems.append(f"--hidden_loss_weight must be >= 0 (got {self.hidden_loss_weight}).")
        if self.hidden_layer_map is not None:
            try:
                parse_layer_map(self.hidden_layer_map)
            except ConfigError as error:
                problems.append(str(error))
            if self.hidden_loss_weight == 0:
                problems.append(
                    "--hidden_layer_map pairs blocks for the hidden-state loss, which "
                    "--hidden_loss_weight 0 turns off: pass --hidden_loss_weight > 0, or drop "
                    "--hidden_layer_map."
                )
        default_loss = CONFIG_FIELDS["hidden_loss"].default
        if self.hidden_loss != default_loss and self.hidden_loss_weight == 0:
            problems.append(
                f"--hidden_loss {self.hidden_loss} chooses the hidden-state loss, which "
                "--hidden_loss_weight 0 turns off: pass --hidden_loss_weight > 0, or drop "
                "--hidden_loss."
            )
        if self.hidden_loss_weight == 0 or command == "cache-teacher":
            return problems
        if self.teacher_cache:
            problems.append(
                "--hidden_loss_weight matches the teacher's hidden states, which no "
                "--teacher_cache holds: pass --teacher_model instead of --teacher_cache, or "
                "drop --hidden_loss_weight."
            )
        if self.alpha == 1.0:
            problems.append(
                "--alpha 1 trains on the ground truth alone and loads no teacher, whose hidden "
                "states --hidden_loss_weight matches: lower --alpha or drop --hidden_loss_weight."
            )
        return problems

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the resolved configuration as JSON beside the run's outputs."""
        path = Path(directory) / CONFIG_FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a kill mid-write must not leave a truncated file that the
        # next start (which reads it) would choke on.
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(temporary, path)
        return path


def parse_layer_map(text: str) -> list[tuple[int, int]]:
    """--hidden_layer_map "0:1,1:3" -> [(0, 1), (1, 3)]: (student block, teacher block) pairs,
    0-based, each student block at most once. (Their range is checked against the models, in
    ``models.check_models``.)"""
    pairs = []
    for item in text.split(","):
        student, colon, teacher = item.strip().partition(":")
        if not (colon and student.strip().isdigit() and teacher.strip().isdigit()):
            raise ConfigError(
                f"--hidden_layer_map {text!r}: {item.strip()!r} is not a pair of block numbers "
                "'student:teacher' (0-based); write e.g. '0:1,1:3'."
            )
        pairs.append((int(student), int(teacher)))
    students = [student for student, _ in pairs]
    if len(set(students)) != len(students):
        raise ConfigError(
            f"--hidden_layer_map {text!r} names a student block twice: match each student "
            "block to one teacher block."
        )
    return pairs


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# The flags that mean nothing without --lora_r.
LORA_ONLY_FLAGS = ("lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
                   "load_in_4bit", "merge_lora")  # fmt: skip


def split_names(names: str | None) -> list[str]:
    """A comma-separated list of names (--lora_target_modules): "q_proj, v_proj" -> [...]."""
    return [name.strip() for name in (names or "").split(",") if name.strip()]


_TYPE_HINTS = typing.get_type_hints(TrainConfig)


def field_type(name: str) -> tuple[Any, bool]:
    """(the field's base type, whether it may be None): ``int | None`` -> (int, True)."""
    hint = _TYPE_HINTS[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None)), True
    return hint, False


def coerce(name: str, value: Any) -> Any:
    """A YAML value converted to the field's type, or a ConfigError saying what was expected.

    YAML is looser than the command line: ``5e-5`` is a string to PyYAML, ``"false"`` is a
    true-ish string, and a list or a float can land anywhere.
    """
    base, optional = field_type(name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required (got null).")
    if typing.get_origin(base) is typing.Literal:
        if value in typing.get_args(base):
            return value
        expected = "one of " + ", ".join(map(str, typing.get_args(base)))
    elif base is bool:
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        expected = "a whole number"
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        expected = "a number"
    else:  # str
        if isinstance(value, str):
            return value
        expected = "a string (quote it)"
    raise ConfigError(f"{name}: expected {expected}, got {value!r}.")


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML run file: a mapping of flag names to values. Unknown keys are an error."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file.") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag names to values.")
    unknown = sorted(set(data) - set(CONFIG_FIELDS))
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown keys {', '.join(unknown)}. "
            "Use the flag names without dashes (see `kd-dist train --help`)."
        )
    try:
        return {name: coerce(name, value) for name, value in data.items()}
    except ConfigError as error:
        raise ConfigError(f"--config {path}: {error}") from None
