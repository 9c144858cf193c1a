"""The user's own data: ``--data SPEC`` wherever a dataset is taken, read with the ``datasets`` library.

    FILE.jsonl | .json | .csv | .parquet | .txt   a local file (``.txt``: one row per line, column ``text``)
    DIR  (written by ``save_to_disk``)            ``datasets.load_from_disk``
    DIR  (one sub-folder per class of images)     ``datasets``' ``imagefolder``
    DIR  (data files named by split)              ``datasets.load_dataset(DIR)`` (train.csv, test.jsonl, ...)
    ORG/NAME[:CONFIG]                             a hub dataset, through ``datasets.load_dataset`` and its cache
                                                  (``HF_HUB_OFFLINE=1``: only what it prepared before)

Splits: the dataset's own ``validation`` (or ``val``/``valid``/``dev``) and ``test`` splits where it has them, else a
seeded ``val_fraction`` of the training rows for each missing one; the three never share a row. Columns: given
(``text_column``, ``label_column``, ``image_column``) or detected from the usual names, with an error listing the
columns when neither works. Labels: a ``ClassLabel`` feature's names, else the sorted distinct values of the
training split (strings or integers), so every split maps a label to the same class index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
VALIDATION_NAMES = ("validation", "val", "valid", "dev")
COLUMN_NAMES = {  # role -> the names a column of that role usually has, in order of preference
    "text": ("text", "sentence", "content", "document", "review", "question"),
    "label": ("label", "labels", "class", "category", "target"),
    "image": ("image", "img", "picture", "pixel_values"),
}
VAL_FRACTION = 0.1  # the share of the training rows held out for each split a dataset lacks
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Rows:
    """One split of a user dataset: the ``datasets.Dataset`` rows, what they were read from, the class names."""

    spec: str
    split: str
    rows: object  # datasets.Dataset
    classes: tuple[str, ...] = ()


def is_spec(name: str) -> bool:
    """Names a user dataset: an existing file or folder, or a hub id ``ORG/NAME[:CONFIG]``."""
    return Path(name).exists() or name.partition(":")[0].count("/") == 1


def read_splits(spec: str) -> dict:
    """The dataset SPEC names, as ``{split name: datasets.Dataset}`` with the splits it comes with."""
    import datasets

    path = Path(spec)
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"--data {spec}: unknown file type {path.suffix!r}; use one of "
                                f"{', '.join(FILE_BUILDERS)}, a folder, or a hub dataset id")  # fmt: skip
            loaded = datasets.load_dataset(builder, data_files={"train": str(path)})
        elif path.is_dir():
            loaded = _read_folder(path)
        else:
            loaded = _read_hub(spec)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise UserError(f"--data {spec}: {error}") from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if not splits or not any(len(rows) for rows in splits.values()):
        raise UserError(f"--data {spec} holds no rows")
    return splits


def _read_folder(path: Path):
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    subfolders = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if subfolders and all(_holds_images(p) or p.name in ("train", "test", *VALIDATION_NAMES) for p in subfolders):
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    return datasets.load_dataset(str(path))


def _holds_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file())


def _read_hub(spec: str):
    import datasets

    name, _, config = spec.partition(":")
    return datasets.load_dataset(name, config or None)


def pick_split(splits: dict, split: str, val_fraction: float, seed: int):
    """``train``/``val``/``test`` rows: the dataset's own split where it has one, else a seeded fraction of its
    training rows (val first, then test, from what is left); no row is in two splits."""
    if not 0 < val_fraction < 0.5:
        raise UserError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    own = {"val": next((splits[n] for n in VALIDATION_NAMES if n in splits), None), "test": splits.get("test")}
    train = splits.get("train", next(iter(splits.values())))
    order = np.random.default_rng(seed).permutation(len(train))
    for name in ("val", "test"):
        if own[name] is None:
            size = max(1, round(val_fraction * len(train)))
            if len(order) - size < 1:
                raise UserError(f"{len(train)} rows are too few to hold out a {name} split; add rows")
            own[name], order = train.select(np.sort(order[:size])), order[size:]
    own["train"] = train.select(np.sort(order)) if len(order) < len(train) else train
    return own[split]


def infer_task(rows) -> str:
    """What a dataset is for when nobody says: images -> image-classification, texts with labels ->
    text-classification, texts alone -> causal-lm."""
    columns = set(rows.column_names)
    if columns & set(COLUMN_NAMES["image"]):
        return "image-classification"
    return "text-classification" if columns & set(COLUMN_NAMES["label"]) else "causal-lm"


def find_column(rows, role: str, given: str | None, spec: str) -> str:
    """The column that holds ``role`` (text, label, image): ``given``, else the first usual name present."""
    columns = list(rows.column_names)
    if given is not None:
        if given not in columns:
            raise UserError(f"--data {spec} has no column {given!r}; its columns: {', '.join(columns)}")
        return given
    found = next((name for name in COLUMN_NAMES[role] if name in columns), None)
    if found is None:
        raise UserError(f"cannot tell which column of --data {spec} holds the {role}; its columns: "
                        f"{', '.join(columns)}; name it with --{role}-column")  # fmt: skip
    return found


def class_names(train_rows, column: str) -> tuple[str, ...]:
    """A ClassLabel feature's names, else the sorted distinct values of the training rows, as strings."""
    feature = train_rows.features[column]
    names = getattr(feature, "names", None)
    if names:
        return tuple(names)
    values = sorted(set(train_rows[column]), key=lambda v: (isinstance(v, str), v))
    return tuple(str(v) for v in values)


def label_ids(rows, column: str, classes: tuple[str, ...], spec: str) -> np.ndarray:
    """Each row's class index (int64 [N]); a label the training split never had is an error naming it."""
    feature = rows.features[column]
    if getattr(feature, "names", None):
        ids = np.asarray(rows[column], dtype=np.int64)
    else:
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({str(v) for v in rows[column]} - set(index))
        if unknown:
            raise UserError(f"--data {spec}: labels {unknown[:5]} are not in the training split's {len(classes)} "
                            "classes")  # fmt: skip
        ids = np.asarray([index[str(v)] for v in rows[column]], dtype=np.int64)
    if (ids < 0).any():
        raise UserError(f"--data {spec}: {int((ids < 0).sum())} rows have no label (-1); a held-out split needs "
                        "labels")  # fmt: skip
    return ids
