"""Load the raw dataset named by ``--dataset`` and pick its train and eval splits.

Every source is loaded as a ``DatasetDict`` so that split selection is the same for all of them;
a source with a single unnamed split (one file, a glob, a ``Dataset.save_to_disk`` folder)
becomes the ``--dataset_split`` split. A folder of data files gets its split names from the file
names, as on the hub (``train.jsonl``, ``validation.jsonl``, ``data/test-00000.parquet``...).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterable
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from kd_dist.config import ConfigError, TrainConfig

logger = logging.getLogger("kd_dist")

# File suffix -> the `datasets` builder that reads it. The text builder yields one row per line
# in a `text` column (blank lines are dropped later with the other empty examples).
FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}

# Splits used for evaluation when --eval_split is not given, in order of preference. A training
# split with a suffix looks for the same suffix first (ultrachat_200k: train_sft -> test_sft).
AUTO_EVAL_SPLITS = ("validation", "test")
# File names that look like a split: a glob matching them probably meant several splits.
SPLIT_LIKE_NAMES = ("validation", "valid", "val", "dev", "test", "eval")

FILE_TYPES = "/".join(suffix.lstrip(".") for suffix in FILE_BUILDERS)
ACCEPTED_FORMS = (
    f"--dataset accepts a local {FILE_TYPES} file, a glob of such files (quoted, e.g. "
    "'data/*.jsonl'), a folder of such files, a folder written by Dataset.save_to_disk or "
    "DatasetDict.save_to_disk, or the name of a hub dataset that is already in the local Hugging "
    "Face cache (set HF_HUB_OFFLINE=1 on machines without network)."
)

# Files that `save_to_disk` writes: a folder holding one of them is a saved dataset.
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)


def cache_dir(cfg: TrainConfig) -> Path:
    """The folder ``datasets`` writes the tokenized splits' cache files under: a save_to_disk
    folder's own (beside its arrow files), else the datasets cache (``HF_DATASETS_CACHE``), which
    holds the arrow files of data files and hub datasets."""
    path = Path(cfg.dataset).expanduser()
    return path if _is_saved_dataset(path) else Path(datasets.config.HF_DATASETS_CACHE)


def load_source(cfg: TrainConfig) -> DatasetDict:
    """All splits of ``cfg.dataset``: a file, a glob, a folder or a hub name."""
    path = Path(cfg.dataset).expanduser()
    # A .txt file is one example per line; packed, it is one document (its lines are not
    # separated by eos).
    text_options = {"sample_by": "document" if cfg.packing else "line"}
    if path.is_dir():
        if _is_saved_dataset(path):
            return _load_saved(path, cfg.dataset_split)
        return _load_data_folder(path, cfg.dataset_config, text_options)
    if path.is_file():
        return _load_files([path], cfg.dataset_split, str(path), text_options)
    if glob.has_magic(cfg.dataset):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise ConfigError(f"--dataset {cfg.dataset}: the pattern matches no file.")
        split_like = [f.name for f in files if f.stem.lower().startswith(SPLIT_LIKE_NAMES)]
        if split_like:
            logger.warning(
                "--dataset %s matches %s, named like an evaluation split, but a glob is one "
                "split (%s): point --dataset at the folder to take split names from file names.",
                cfg.dataset,
                ", ".join(split_like),
                cfg.dataset_split,
            )
        return _load_files(files, cfg.dataset_split, cfg.dataset, text_options)
    if path.suffix.lower() in FILE_BUILDERS or cfg.dataset.startswith((".", "/", "~")):
        # Clearly meant as a local path: don't make the user wait for a hub lookup.
        raise ConfigError(f"--dataset {cfg.dataset}: no such file or folder. {ACCEPTED_FORMS}")
    return _load_hub(cfg.dataset, cfg.dataset_config)


def _builder_for(files: Iterable[Path], what: str) -> str:
    """The one ``datasets`` builder that reads all of ``files``."""
    builders = {FILE_BUILDERS.get(f.suffix.lower()) for f in files}
    if None in builders:
        unsupported = sorted({f.suffix or f.name for f in files if f.suffix not in FILE_BUILDERS})
        raise ConfigError(
            f"--dataset {what}: unsupported file type {', '.join(unsupported)}. {ACCEPTED_FORMS}"
        )
    if len(builders) > 1:
        raise ConfigError(
            f"--dataset {what} mixes file types ({', '.join(sorted(map(str, builders)))}); "
            "point it at files of one type."
        )
    return builders.pop()


def _load_files(
    files: list[Path], split: str, what: str, text_options: dict[str, str]
) -> DatasetDict:
    builder = _builder_for(files, what)
    options = text_options if builder == "text" else {}
    try:
        return load_dataset(builder, data_files={split: [str(f) for f in files]}, **options)
    except Exception as error:  # datasets raises many types for unreadable or empty files
        raise ConfigError(
            f"--dataset {what}: could not read it as {builder} ({type(error).__name__}: {error}). "
            f"Check that the file is not empty and is valid {builder}."
        ) from None


def _load_saved(path: Path, split: str) -> DatasetDict:
    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(
            f"--dataset {path} looks like a save_to_disk folder (it holds "
            f"{' or '.join(SAVED_DATASET_MARKERS)}) but can't be loaded as one "
            f"({type(error).__name__}: {error})."
        ) from None
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({split: loaded})


def _load_data_folder(
    path: Path, config_name: str | None, text_options: dict[str, str]
) -> DatasetDict:
    """A folder of data files (a cloned hub dataset repository, say), splits from file names."""
    files = [
        f
        for f in path.rglob("*")
        if f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
        and f.suffix in FILE_BUILDERS  # exact case, as `datasets` matches them
    ]
    if not files:
        raise ConfigError(
            f"--dataset {path} is a folder without {FILE_TYPES} files and was not written by "
            f"save_to_disk. {ACCEPTED_FORMS}"
        )
    # Refuse mixed types: `datasets` would silently read only the most common one.
    options = text_options if _builder_for(files, str(path)) == "text" else {}
    try:
        return load_dataset(str(path), config_name, **options)
    except Exception as error:
        raise ConfigError(
            f"--dataset {path}: could not read the folder's files ({type(error).__name__}: "
            f"{error})."
        ) from None


def _load_hub(name: str, config_name: str | None) -> DatasetDict:
    try:
        loaded = load_dataset(name, config_name)
    except OSError as error:  # not found, or the hub can't be reached (offline)
        raise ConfigError(
            f"--dataset {name}: not a local file or folder, and not found as a hub dataset in "
            f"the local cache ({type(error).__name__}: {error}). {ACCEPTED_FORMS}"
        ) from error
    except ValueError as error:  # found, but not with this configuration
        config = f"configuration {config_name!r}" if config_name else "no --dataset_config"
        raise ConfigError(
            f"--dataset {name} is in the local cache, but can't be loaded with {config}: "
            f"{error}. Set --dataset_config to one of the cached configurations."
        ) from error
    if not isinstance(loaded, DatasetDict):
        raise ConfigError(f"--dataset {name}: expected a dataset with splits, got {type(loaded)}.")
    return loaded


def _split(splits: DatasetDict, name: str, flag: str) -> Dataset:
    if name not in splits:
        raise ConfigError(
            f"{flag} {name!r} is not a split of the dataset. "
            f"Available splits: {', '.join(splits) or '(none)'}."
        )
    return splits[name]


def select_splits(splits: DatasetDict, cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
    """The raw train split and the eval split (or None), capped by the max_*_samples flags.

    Eval is, in order: --eval_split; a validation/test split of the source; a --eval_ratio
    hold-out of the train split (deterministic for a given --seed); otherwise none.
    """
    train = _split(splits, cfg.dataset_split, "--dataset_split")
    if cfg.eval_split:
        eval_ = _split(splits, cfg.eval_split, "--eval_split")
        if cfg.eval_ratio > 0:
            logger.warning(
                "--eval_ratio %s is ignored: --eval_split %r is evaluated on instead. Drop one "
                "of the two flags.",
                cfg.eval_ratio,
                cfg.eval_split,
            )
    else:
        suffix = cfg.dataset_split.removeprefix("train")
        names = [s + suffix for s in AUTO_EVAL_SPLITS] + list(AUTO_EVAL_SPLITS)
        auto = [s for s in names if s in splits and s != cfg.dataset_split]
        if auto:
            eval_ = splits[auto[0]]
            # HF run_clm's rule (a held-out share only without a validation split), said aloud.
            if cfg.eval_ratio > 0:
                logger.warning(
                    "--eval_ratio %s is ignored: the dataset has a %r split, which is evaluated "
                    "on instead. Pass --eval_split to evaluate on another split (one of %s).",
                    cfg.eval_ratio,
                    auto[0],
                    ", ".join(splits),
                )
        elif cfg.eval_ratio > 0:
            train, eval_ = hold_out(train, cfg.eval_ratio, cfg.seed)
        else:
            eval_ = None
    train = first_n(train, cfg.max_train_samples)
    eval_ = first_n(eval_, cfg.max_eval_samples) if eval_ is not None else None
    return train, eval_


def hold_out(train: Dataset, ratio: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split ``ratio`` of ``train`` off for evaluation, the same way for the same seed."""
    try:
        parts = train.train_test_split(test_size=ratio, seed=seed)
    except ValueError as error:
        raise ConfigError(
            f"--eval_ratio {ratio} can't split the {len(train)} training examples ({error})."
        ) from error
    return parts["train"], parts["test"]


def first_n(split: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` examples (all of them when ``limit`` is None or larger)."""
    if limit is None or limit >= len(split):
        return split
    return split.select(range(limit))
