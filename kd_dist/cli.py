"""Command line: ``kd-dist train|tokenize|cache-teacher|eval|make-student|report|demo`` (also
``python -m kd_dist ...``).

The ``train`` flags are generated from ``TrainConfig``'s fields, so every flag can also be set in
a ``--config run.yaml`` file; precedence is defaults < YAML < command line. ``tokenize`` and
``cache-teacher`` take exactly the ``train`` flags; ``eval`` takes the data, precision and
chunking flags of ``train`` (same names, same meanings).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd_dist.checkpoint import COMPLETE_MARKER
from kd_dist.config import (
    CONFIG_FIELDS,
    CONFIG_FILE_NAME,
    ConfigError,
    TrainConfig,
    field_type,
    load_yaml,
)
from kd_dist.engine import PREEMPTED_EXIT_CODE, NonFiniteError, TrainingPreempted
from kd_dist.lora import ADAPTER_CONFIG

logger = logging.getLogger("kd_dist")


def _flag_kwargs(name: str) -> dict[str, Any]:
    """argparse keyword arguments for one TrainConfig field, from its type and help text."""
    kwargs: dict[str, Any] = {"help": CONFIG_FIELDS[name].metadata.get("help")}
    base, _ = field_type(name)
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(base) is typing.Literal:
        kwargs["choices"] = typing.get_args(base)
    else:
        kwargs["type"] = base
    default = CONFIG_FIELDS[name].default
    if kwargs["help"] and default not in (None, ""):
        kwargs["help"] += f" (default: {default})"
    return kwargs


def build_train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config", help="YAML file of flag values; command-line flags override it."
    )
    for name in CONFIG_FIELDS:
        # SUPPRESS keeps flags the user did not type out of the namespace, so YAML values survive.
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, **_flag_kwargs(name))
    return parser


# The train flags `kd-dist eval` accepts too: what selects, tokenizes and batches the examples,
# the precision, and the chunking of the metrics. A student exported by `kd-dist train` carries
# its run's kd_config.json, whose values of these flags are eval's defaults, so that it is
# measured on the very examples its run held out.
EVAL_FLAGS = (
    "task_type", "dataset", "dataset_config", "dataset_split", "eval_split", "eval_ratio",
    "dataset_format", "text_column", "messages_column", "prompt_column", "response_column",
    "max_length", "max_target_length", "train_on_prompt", "packing", "max_eval_samples",
    "num_proc", "batch_size", "bf16", "fp16", "seed", "vocab_chunk_size", "loss_chunk_memory_mb",
    "trust_remote_code", "teacher_dtype", "attn_implementation", "tokenize_on", "eval_on_policy",
    "max_new_tokens", "generation_temperature", "top_p",
)  # fmt: skip


def build_eval_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--student", dest="student_model", required=True, metavar="PATH",
        help="The student to evaluate: a kd-dist train --output_dir, or any model folder or hub "
        "name (e.g. the untrained student, as a baseline).",
    )  # fmt: skip
    parser.add_argument(
        "--teacher", dest="teacher_model", required=True, metavar="PATH", help="The teacher."
    )
    parser.add_argument("--output_json", help="Also write the metrics to this JSON file.")
    for name in EVAL_FLAGS:
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, **_flag_kwargs(name))
    return parser


def eval_defaults(student: str) -> dict[str, Any]:
    """The EVAL_FLAGS values of the run that trained ``student`` (its kd_config.json), if any.

    A training checkpoint or an unexported run folder is not a model: say how to get one."""
    folder = Path(student)
    exported = any((folder / name).is_file() for name in ("config.json", ADAPTER_CONFIG))
    if (folder / COMPLETE_MARKER).is_file() or (
        (folder / CONFIG_FILE_NAME).is_file() and not exported
    ):
        raise ConfigError(
            f"--student {student} is a kd-dist training checkpoint or a run that has not "
            "exported its student yet, not a model: run the training command again with "
            "--resume_from_checkpoint latest to finish and export it, then pass its --output_dir."
        )
    saved = folder / CONFIG_FILE_NAME
    if not saved.is_file():
        return {}
    values = json.loads(saved.read_text())
    logger.info("Data, length and precision flags default to %s's (its training run).", saved)
    return {name: values[name] for name in EVAL_FLAGS if name in values}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    if args.command == "eval":
        values = eval_defaults(args.student_model)
        if args.output_json and not Path(args.output_json).resolve().parent.is_dir():
            raise ConfigError(f"--output_json {args.output_json}: its folder does not exist.")
    values.update({k: v for k, v in vars(args).items() if k in CONFIG_FIELDS})
    try:
        return TrainConfig(**values)
    except TypeError as error:
        raise ConfigError(f"Invalid configuration: {error}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_make_student_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--teacher_model", required=True, help="The teacher: a folder or hub name.")
    parser.add_argument(
        "--num_layers", type=int,
        help="Keep this many layers, evenly spaced, the first and last included (seq2seq: in the "
        "encoder, and in the decoder unless a decoder flag is given).",
    )  # fmt: skip
    parser.add_argument(
        "--layers", metavar="0,3,6,...",
        help="Keep these layers (seq2seq: of the encoder, and of the decoder unless a decoder "
        "flag is given).",
    )  # fmt: skip
    parser.add_argument(
        "--num_decoder_layers", type=int, help="Seq2seq: keep this many decoder layers."
    )
    parser.add_argument(
        "--decoder_layers", metavar="0,3,6,...", help="Seq2seq: keep these decoder layers."
    )
    parser.add_argument("--output_dir", required=True, help="A new or empty folder.")
    return parser


def run_make_student(args: argparse.Namespace) -> str:
    from kd_dist.make_student import DECODER_LAYER_FLAGS, LAYER_FLAGS, LayerChoice, make_student

    summary = make_student(
        args.teacher_model,
        args.output_dir,
        LayerChoice(args.num_layers, args.layers, LAYER_FLAGS),
        LayerChoice(args.num_decoder_layers, args.decoder_layers, DECODER_LAYER_FLAGS),
    )
    return summary.describe()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-dist",
        description="Distil a Hugging Face teacher language model into a smaller student.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_train_parser(
        commands.add_parser("train", help="Distil a teacher into a student.", allow_abbrev=False)
    )
    build_train_parser(
        commands.add_parser(
            "tokenize",
            help="Build the tokenized dataset cache that `kd-dist train` with the same flags reads "
            "(a CPU job before the GPU job; loads the tokenizers, not the models).",
            allow_abbrev=False,
        )
    )
    build_train_parser(
        commands.add_parser(
            "cache-teacher",
            help="Run the teacher once over the data and store its top-k distributions in "
            "--output_dir, for `kd-dist train --teacher_cache` (the train flags; --top_k; no "
            "student needed).",
            allow_abbrev=False,
        )
    )
    build_eval_parser(
        commands.add_parser(
            "eval",
            help="Held-out metrics of a saved student against its teacher.",
            allow_abbrev=False,
        )
    )
    build_make_student_parser(
        commands.add_parser(
            "make-student",
            help="Cut a student from the teacher: its embeddings, final norm, output layer and "
            "some of its layers, written as a Hugging Face model folder.",
            allow_abbrev=False,
        )
    )
    report = commands.add_parser(
        "report", help="Plots and a Markdown summary of a run's metrics (needs matplotlib)."
    )
    report.add_argument("run_dir", help="A training run's --output_dir.")
    report.add_argument(
        "--output_dir", help="Where to write the plots and report.md (default: RUN_DIR/report)."
    )
    demo = commands.add_parser(
        "demo", help="Built-in offline demo: train a tiny teacher, distil it, compare with CE."
    )
    demo.add_argument("--output_dir", default="demo_output", help="Where the demo writes.")
    demo.add_argument("--seed", type=int, default=0, help="Random seed.")
    demo.add_argument(
        "--corpus_size", type=_positive_int, default=6000, help="Sentences in the generated corpus."
    )
    return parser


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging() -> None:
    # Only the main process talks; other ranks report warnings and errors, and draw no
    # progress bars (loading weights, tokenizing).
    logging.basicConfig(
        level=logging.INFO if _is_main_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not _is_main_process():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        if args.command == "train":
            from kd_dist.trainer import train

            train(config_from_args(args))
        elif args.command == "tokenize":
            from kd_dist.pretokenize import describe, pretokenize

            cfg = config_from_args(args)
            print(describe(pretokenize(cfg), cfg))
        elif args.command == "cache-teacher":
            from kd_dist.cache_teacher import cache_teacher, describe_result

            result = cache_teacher(config_from_args(args))
            if _is_main_process():
                print(describe_result(result))
        elif args.command == "eval":
            from kd_dist.evaluation import evaluate_saved, json_safe, metrics_table

            metrics = evaluate_saved(config_from_args(args))
            if _is_main_process():
                print(metrics_table({args.student_model: metrics}))
                if args.output_json:
                    with open(args.output_json, "w") as handle:
                        handle.write(json.dumps(json_safe(metrics), indent=2) + "\n")
        elif args.command == "make-student":
            print(run_make_student(args))
        elif args.command == "report":
            from kd_dist.report import write_report

            print(f"Report written to {write_report(args.run_dir, args.output_dir)}")
        elif args.command == "demo":
            from kd_dist.demo import run_demo

            run_demo(args.output_dir, seed=args.seed, corpus_size=args.corpus_size)
    except ConfigError as error:
        print(f"kd-dist: error: {error}", file=sys.stderr)
        return 2
    except TrainingPreempted as stop:
        print(f"kd-dist: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except NonFiniteError as error:
        print(f"kd-dist: error: {error}", file=sys.stderr)
        return 1
    return 0
