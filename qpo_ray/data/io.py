"""The dataset on disk: one Parquet file, the reward scale in its schema metadata.

Known columns are written with the types of `schema.ALL_COLUMNS` (so an all-empty
`demo_ids` column is still a list of lists of strings), other columns as pandas infers
them. Reading checks that the required columns are there and gives list columns back
as Python lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qpo_ray.common.atomic import atomic_file
from qpo_ray.data.rewards import RewardScale
from qpo_ray.data.schema import ALL_COLUMNS, PAIR_COLUMNS, REWARD_SCALE_KEY

ARROW_TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "list<bool>": pa.list_(pa.bool_()),
    "list<double>": pa.list_(pa.float64()),
    "list<list<string>>": pa.list_(pa.list_(pa.string())),
}
LIST_COLUMNS = [name for name, (kind, _) in ALL_COLUMNS.items() if kind.startswith("list")]


class DatasetFileError(ValueError):
    """A dataset file is missing, unreadable or lacks a column."""


def _to_arrow(df: pd.DataFrame, path: Path) -> pa.Table:
    arrays, fields = [], []
    for name in df.columns:
        values = df[name]
        kind = ALL_COLUMNS.get(name, (None, ""))[0]
        try:
            if kind is None:
                array = pa.array(values, from_pandas=True)
            else:
                if kind == "string":
                    values = values.map(lambda v: v if v is None or pd.isna(v) else str(v),
                                        na_action="ignore")
                array = pa.array(values.tolist(), type=ARROW_TYPES[kind], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DatasetFileError(f"{path}: column {name!r} does not fit type {kind}: "
                                   f"{exc}") from exc
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_dataset(df: pd.DataFrame, path: str | Path,
                  scale: Optional[RewardScale]) -> Path:
    """Write `df` to Parquet at `path` with `scale` under `REWARD_SCALE_KEY`."""
    path = Path(path)
    missing = [c for c in PAIR_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetFileError(f"{path}: refusing to write a dataset without column(s) "
                               f"{missing}")
    table = _to_arrow(df.reset_index(drop=True), path)
    metadata = dict(table.schema.metadata or {})
    if scale is not None:
        metadata[REWARD_SCALE_KEY.encode()] = json.dumps(scale.to_dict()).encode()
    table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A reader never sees half a file; a crash leaves the old dataset, fsynced and whole.
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_dataset(path: str | Path, required: Iterable[str] = tuple(PAIR_COLUMNS)
                 ) -> tuple[pd.DataFrame, Optional[RewardScale]]:
    """The dataset at `path` and its stored reward scale (None when it has none)."""
    path = Path(path)
    if not path.exists():
        raise DatasetFileError(f"{path}: dataset file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetFileError(f"{path}: not a readable Parquet file ({exc})") from exc
    for column in required:
        if column not in table.column_names:
            raise DatasetFileError(f"{path}: missing column {column!r} "
                                   f"(has {table.column_names})")
    metadata = table.schema.metadata or {}
    raw = metadata.get(REWARD_SCALE_KEY.encode())
    try:
        scale = RewardScale.from_dict(json.loads(raw)) if raw is not None else None
    except (ValueError, json.JSONDecodeError) as exc:
        raise DatasetFileError(f"{path}: bad {REWARD_SCALE_KEY} metadata ({exc})") from exc
    df = table.to_pandas()
    for column in LIST_COLUMNS:
        if column in df.columns:
            df[column] = df[column].map(_to_list, na_action="ignore")
    return df, scale


def _to_list(value: object) -> object:
    """numpy arrays (of arrays) from Parquet -> nested Python lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_to_list(v) for v in value]
    return value
