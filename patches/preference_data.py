"""Preference records from a file or folder: JSON Lines, JSON, Parquet, or a ``datasets`` folder.

- ``*.json``: a JSON array of records, or JSON Lines (what ``datasets``' ``to_json`` writes);
- ``*.parquet``: one record per row (read with ``pyarrow``, which ``datasets`` brings);
- a folder written by ``datasets``' ``save_to_disk``: a ``Dataset``, or a ``DatasetDict`` with one split (needs
  ``datasets``);
- any other file: JSON Lines, one record per line (:func:`patches.collator.load_preference_jsonl`).

Every record is checked (:func:`patches.collator.check_record`) in any layout it accepts. Records are numbered for
error messages: JSON Lines by line (1-based), the others by row (0-based, ``dataset[row]``): ``file:row 17: ...``.
"""
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

Numbered = List[Tuple[Union[int, str], Dict[str, Any]]]
#: what marks a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
DATASET_FOLDER_FILES = ("state.json", "dataset_dict.json")


def data_path_problem(path) -> Optional[str]:
    """Why ``path`` cannot hold preference records (``"no such file"``, ...), or ``None`` when it may."""
    path = Path(path)
    if path.is_file():
        return None
    if not path.exists():
        return "no such file"
    if path.is_dir() and any((path / name).is_file() for name in DATASET_FOLDER_FILES):
        return None
    if path.is_dir():
        return (f"not a file, nor a folder written by datasets' save_to_disk (it has no "
                f"{' or '.join(DATASET_FOLDER_FILES)})")
    return "not a file"


def load_preference_records(path) -> Numbered:
    """``[(line or "row N", record), ...]`` of a preference file or ``datasets`` folder (formats: module doc).

    Raises :class:`PreferenceDataError` naming the path (and the line or row) for anything unreadable or malformed.
    """
    # imported here: the CLI checks paths with data_path_problem before it imports torch (which the collator does)
    from patches.collator import PreferenceDataError, load_preference_jsonl

    path = Path(path)
    problem = data_path_problem(path)
    if problem is not None:
        raise PreferenceDataError(f"{path}: {problem}")
    if path.is_dir():
        rows = _dataset_folder_rows(path)
    elif path.suffix.lower() == ".parquet":
        rows = _parquet_rows(path)
    elif path.suffix.lower() == ".json":
        rows = _json_rows(path)
        if rows is None:  # JSON Lines under a .json name
            return load_preference_jsonl(path)
    else:
        return load_preference_jsonl(path)
    return _checked(path, rows)


def _checked(path: Path, rows: Iterable[Any]) -> Numbered:
    from patches.collator import checked_records

    return checked_records(path, ((f"row {index}", record) for index, record in enumerate(rows)), "no records")


def _json_rows(path: Path) -> Optional[list]:
    """The records of a JSON array (one object: one record); ``None`` for JSON Lines."""
    from patches.collator import PreferenceDataError, read_utf8

    text = read_utf8(path)  # a byte that is not UTF-8 is named by line and column, as in a JSONL file
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # a first value parsed, then more: one value per line
            return None
        raise PreferenceDataError(f"{path}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno})")
    return value if isinstance(value, list) else [value]


def _parquet_rows(path: Path) -> list:
    from patches.collator import PreferenceDataError

    try:
        import pyarrow.parquet
    except ImportError:
        raise PreferenceDataError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow (or datasets, "
                                  "which brings it)") from None
    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise PreferenceDataError(f"{path}: cannot read it as Parquet ({error})") from None


def _dataset_folder_rows(path: Path):
    from patches.collator import PreferenceDataError

    try:
        import datasets
    except ImportError:
        raise PreferenceDataError(f"{path}: reading a folder written by save_to_disk needs the datasets package: "
                                  "pip install datasets") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as error:
        raise PreferenceDataError(f"{path}: cannot load it with datasets.load_from_disk ({error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if len(splits) != 1:
            raise PreferenceDataError(f"{path}: a DatasetDict with splits {splits}; give the folder of one split "
                                      f"(e.g. {path / splits[0]})")
        dataset = dataset[splits[0]]
    return dataset
