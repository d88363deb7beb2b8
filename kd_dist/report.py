"""``kd-dist report RUN_DIR``: plots of a run's ``metrics.jsonl`` and a Markdown summary.

Writes into ``RUN_DIR/report`` (or ``--output_dir``) one PNG per question a user asks of a
distillation run, and ``report.md`` with the before/after table of the held-out metrics:

    train_loss.png       the training loss and each of its terms (KD, cross-entropy)
    eval_kl.png          KL(teacher || student) on the eval split
    eval_agreement.png   top-1 agreement with the teacher
    eval_perplexity.png  the student's perplexity against the teacher's
    learning_rate.png    the schedule as run
    throughput.png       tokens and sequences per second

A run without a teacher (--alpha 1: plain fine-tuning) logs null teacher metrics: its report
has no KL or agreement plot, no teacher line on the perplexity plot and no teacher row.

matplotlib is an optional extra (``pip install 'kd_dist[report]'``); nothing else needs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kd_dist.checkpoint import EVAL_RECORD_KEY, METRICS_FILE, REPORT_DIR, read_metrics_records
from kd_dist.config import CONFIG_FILE_NAME, ConfigError
from kd_dist.evaluation import METRIC_KEYS, format_metric, has_teacher, metrics_table

REPORT_FILE = "report.md"
FIGURE_INCHES, FIGURE_DPI = (6.4, 4.0), 100  # every plot is 640 x 400 pixels
TEACHER_PLOTS = ("eval_kl.png", "eval_agreement.png")  # the student against its teacher
PERPLEXITY_PLOT = "eval_perplexity.png"
TRAIN_PLOTS = ("train_loss.png", "learning_rate.png", "throughput.png")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "kd-dist report draws its plots with matplotlib, which is not installed: "
            "pip install 'kd_dist[report]'"
        ) from None
    return plt


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of ``run_dir/metrics.jsonl``, in step order."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} holds no {METRICS_FILE}: pass the --output_dir of a kd-dist train run."
        )
    records = read_metrics_records(run_dir)
    train = [r for r in records if "loss" in r]
    # One evaluation per step, the last one logged (a resumed run may have repeated it).
    evals = list({r["step"]: r for r in records if EVAL_RECORD_KEY in r}.values())
    if not train and not evals:
        raise ConfigError(f"{path} is empty: the run logged no step yet.")
    return train, evals


def eval_metrics(record: dict) -> dict[str, float]:
    """An evaluation record's metrics without their ``eval_`` prefix (``evaluate``'s keys)."""
    return {key: record.get(f"eval_{key}") for key in METRIC_KEYS}  # (older runs: fewer keys)


def _plot(plt: Any, path: Path, title: str, ylabel: str, series: dict, **options: Any) -> None:
    """One line per entry of ``series`` (label -> (steps, values)), saved as a PNG."""
    figure, axes = plt.subplots(figsize=FIGURE_INCHES)
    for label, (steps, values) in series.items():
        axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                  label=label)  # fmt: skip
    for value, label in options.get("reference", []):
        axes.axhline(value, color="black", linestyle="--", linewidth=1, label=label)
    if options.get("log_y"):
        axes.set_yscale("log")
    axes.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)


def _column(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    kept = [r for r in records if r.get(key) is not None]
    return [r["step"] for r in kept], [r[key] for r in kept]


def draw_plots(plt: Any, train: list[dict], evals: list[dict], out: Path) -> list[str]:
    """The PNGs for whatever the run logged; returns their file names."""
    written = []
    if train:
        losses = {"total": _column(train, "loss")}
        terms = {"kd_loss": "distillation (KD) term", "ce_loss": "cross-entropy term"}
        for key, label in terms.items():
            steps, values = _column(train, key)
            if any(values):  # a term with zero weight is not computed: nothing to show
                losses[label] = (steps, values)
        _plot(plt, out / "train_loss.png", "Training loss by term", "loss per token", losses)
        _plot(plt, out / "learning_rate.png", "Learning rate", "learning rate",
              {"lr": _column(train, "lr")})  # fmt: skip
        _plot(plt, out / "throughput.png", "Throughput (all processes)", "per second",
              {"tokens/s": _column(train, "tokens_per_s"),
               "sequences/s": _column(train, "samples_per_s")}, log_y=True)  # fmt: skip
        written += TRAIN_PLOTS
    if evals and has_teacher(eval_metrics(evals[-1])):
        _plot(plt, out / "eval_kl.png", "Held-out KL(teacher || student), T = 1", "nats / token",
              {"student": _column(evals, "eval_kl_to_teacher")})  # fmt: skip
        _plot(plt, out / "eval_agreement.png", "Held-out top-1 agreement with the teacher",
              "fraction of tokens", {"student": _column(evals, "eval_top1_agreement")})  # fmt: skip
        written += TEACHER_PLOTS
    if evals:
        # The teacher's line where it has a finite perplexity (null: none, or an infinite one).
        teacher_ppl = evals[-1]["eval_teacher_ppl"]
        teacher = [] if teacher_ppl is None else [(teacher_ppl, f"teacher ({teacher_ppl:.3f})")]
        _plot(plt, out / PERPLEXITY_PLOT, "Held-out perplexity", "perplexity",
              {"student": _column(evals, "eval_student_ppl")}, reference=teacher,
              log_y=True)  # fmt: skip
        written.append(PERPLEXITY_PLOT)
    return written


def progress_sentence(first: dict, last: dict) -> str:
    """How the held-out metrics moved from the ``first`` evaluation record to the ``last``."""

    def change(key: str, spec: str) -> str:
        return f"from {format_metric(first[key], spec)} to {format_metric(last[key], spec)}"

    perplexity = change("eval_student_ppl", ".3f")
    if not has_teacher(eval_metrics(last)):
        return f"Perplexity went {perplexity} (no teacher: --alpha 1 is plain fine-tuning)."
    kl_start, kl_end = first["eval_kl_to_teacher"], last["eval_kl_to_teacher"]
    # A ratio to a start at (or within rounding of) zero says nothing.
    known = kl_start is not None and kl_end is not None and kl_start > 1e-6
    ratio = f" ({kl_end / kl_start:.0%} of its first value)" if known else ""
    teacher = format_metric(last["eval_teacher_ppl"], ".3f")
    return (
        f"KL to the teacher went {change('eval_kl_to_teacher', '.4f')}{ratio}; top-1 "
        f"agreement {change('eval_top1_agreement', '.1%')}; perplexity {perplexity} "
        f"(teacher {teacher})."
    )


def summary_markdown(
    run_dir: Path, train: list[dict], evals: list[dict], plots: list[str], config: dict
) -> str:
    """report.md: what ran, the before/after table, the verdict in numbers, the plots."""
    lines = [f"# Distillation report: `{run_dir}`", ""]
    if config:
        lines += [
            f"Teacher `{config['teacher_model']}`, student `{config['student_model']}`, "
            f"{config['task_type']}; loss `{config['loss']}` at temperature "
            f"{config['temperature']}, alpha {config['alpha']}; dataset `{config['dataset']}`.",
            "",
        ]
    lines += ["## Held-out metrics", ""]
    if not evals:
        lines += [
            "No evaluation was logged: the run had no eval split. Train with --eval_ratio or "
            "--eval_split (and --eval_steps for a curve).",
            "",
        ]
    else:
        first, last = evals[0], evals[-1]
        start = "before training" if first["step"] == 0 else "first evaluation"
        rows = {f"student, step {first['step']} ({start})": eval_metrics(first)}
        if last is not first:
            rows[f"student, step {last['step']} (last evaluation)"] = eval_metrics(last)
        lines += [metrics_table(rows, markdown=True), ""]
        if first["step"] != 0:
            lines += [
                "The first evaluation came after training began: pass --eval_before_training "
                "(or run `kd-dist eval` on the untrained student) for the starting point.",
                "",
            ]
        if last is not first:
            lines += [progress_sentence(first, last), ""]
    if train:
        final = train[-1]
        peak = max(r.get("peak_memory_mb", 0.0) for r in train)
        tokens_per_s = sorted(r["tokens_per_s"] for r in train)[len(train) // 2]
        lines += [
            "## Training",
            "",
            f"{final['step']} optimizer steps; final training loss {final['loss']:.4f} "
            f"(KD term {final['kd_loss']:.4f}, cross-entropy term {final['ce_loss']:.4f}); "
            f"median {tokens_per_s:,.0f} tokens/s; peak memory {peak:,.0f} MiB "
            "(main process).",
            "",
        ]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{name.removesuffix('.png')}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, output_dir: str | Path | None = None) -> Path:
    """Write the plots and report.md for ``run_dir``; returns the report's folder."""
    run_dir = Path(run_dir)
    plt = _pyplot()  # before reading anything: a missing extra is the first thing to report
    train, evals = read_metrics(run_dir)
    config_path = run_dir / CONFIG_FILE_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    out = Path(output_dir) if output_dir is not None else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(plt, train, evals, out)
    (out / REPORT_FILE).write_text(summary_markdown(run_dir, train, evals, plots, config))
    return out
