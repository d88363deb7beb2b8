"""Flag parsing: the original toolkit's flags, YAML files and their precedence."""

import re
from pathlib import Path

import pytest

from kd_dist.cli import build_parser, config_from_args, main
from kd_dist.config import CONFIG_FIELDS, ConfigError, TrainConfig

# The original llm_kd.py flags with an example value each, and the value they must produce.
ORIGINAL_FLAGS = {
    "--teacher_model": ("gpt2-large", "gpt2-large"),
    "--student_model": ("distilgpt2", "distilgpt2"),
    "--task_type": ("seq2seq", "seq2seq"),
    "--dataset": ("databricks/databricks-dolly-15k", "databricks/databricks-dolly-15k"),
    "--max_length": ("256", 256),
    "--batch_size": ("4", 4),
    "--gradient_accumulation_steps": ("8", 8),
    "--optimizer": ("adafactor", "adafactor"),
    "--temperature": ("3.5", 3.5),
    "--epochs": ("2", 2),
    "--learning_rate": ("1e-4", 1e-4),
    "--warmup_ratio": ("0.05", 0.05),
    "--clip_grad_norm": ("0.5", 0.5),
    "--save_every": ("2", 2),
    "--output_dir": ("out/distilled", "out/distilled"),
    "--vocab_chunk_size": ("512", 512),
    "--alpha": ("0.3", 0.3),
    "--seed": ("7", 7),
    "--max_steps": ("100", 100),
    "--logging_steps": ("5", 5),
}


def parse(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_original_flag_is_accepted_with_its_meaning():
    argv = [item for flag, (value, _) in ORIGINAL_FLAGS.items() for item in (flag, value)]
    cfg = parse([*argv, "--fp16"])
    for flag, (_, expected) in ORIGINAL_FLAGS.items():
        assert getattr(cfg, flag[2:]) == expected, flag
    assert cfg.fp16 is True and cfg.bf16 is False


def test_seed_example_command_line():
    cfg = parse(
        "--teacher_model gpt2-large --student_model distilgpt2 --task_type causal "
        "--dataset wikitext --max_length 512 --batch_size 8 --epochs 3 --temperature 2.0 "
        "--fp16 --output_dir ./distilled".split()
    )
    assert (cfg.teacher_model, cfg.student_model, cfg.epochs, cfg.fp16) == (
        "gpt2-large",
        "distilgpt2",
        3,
        True,
    )


def test_defaults_are_the_dataclass_defaults():
    cfg = parse(["--teacher_model", "t", "--student_model", "s", "--dataset", "d"])
    assert cfg == TrainConfig(teacher_model="t", student_model="s", dataset="d")


def test_yaml_sets_flags_and_command_line_overrides(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(
        "teacher_model: big\nstudent_model: small\ndataset: data.jsonl\n"
        "temperature: 4.0\nbatch_size: 2\nbf16: true\n"
    )
    cfg = parse(["--config", str(run), "--temperature", "1.5", "--no-bf16"])
    assert cfg.teacher_model == "big" and cfg.batch_size == 2
    assert cfg.temperature == 1.5 and cfg.bf16 is False


def test_yaml_unknown_key_is_a_clear_error(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("teacher_model: big\ntemprature: 2\n")
    with pytest.raises(ConfigError, match="unknown keys temprature"):
        parse(["--config", str(run)])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--temperature", "-1"], "--temperature must be > 0"),
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--alpha", "1.5"], "--alpha must be in"),
        (["--fp16", "--bf16"], "exclusive"),
    ],
)
def test_invalid_values_fail_before_anything_loads(flags, message, capsys):
    argv = ["train", "--teacher_model", "t", "--student_model", "s", "--dataset", "d", *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_required_flags_are_named(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "--teacher_model is required" in err and "--dataset is required" in err


def test_readme_documents_every_flag():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [name for name in CONFIG_FIELDS if f"| `--{name}` |" not in readme]
    assert not missing, f"flags missing from README's flag table: {missing}"


def test_readme_states_the_shipped_temperature():
    """The default --temperature, chosen from the README's sweep, is the one it documents."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    default = TrainConfig(teacher_model="t", student_model="s", dataset="d").temperature
    assert f"| `--temperature` | `{default}` |" in readme
    assert f"The default, `--temperature {default}`" in readme


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('batch_size: "eight"', "batch_size: expected a whole number, got 'eight'"),
        ("max_length: 32.5", "max_length: expected a whole number, got 32.5"),
        ('bf16: "false"', "bf16: expected true or false, got 'false'"),
        ("temperature: [1, 2]", "temperature: expected a number"),
        ("optimizer: adam", "optimizer: expected one of adamw, sgd, adafactor"),
        ("output_dir: 5", "output_dir: expected a string (quote it), got 5"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_named(tmp_path, line, message):
    run = tmp_path / "run.yaml"
    run.write_text(f"teacher_model: t\n{line}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(["--config", str(run)])


def test_yaml_numbers_are_read_as_numbers(tmp_path):
    run = tmp_path / "run.yaml"
    # PyYAML reads 5e-5 as a string and 3.0 as a float: both are what the user meant.
    run.write_text("learning_rate: 5e-5\nepochs: 3.0\nmax_steps: null\n")
    cfg = parse(["--config", str(run)])
    assert cfg.learning_rate == 5e-5 and cfg.epochs == 3 and cfg.max_steps is None
