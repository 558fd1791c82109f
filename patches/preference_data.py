"""Preference records from a file or folder: JSON Lines, JSON, Parquet, or a ``datasets`` folder.

- ``*.json``: a JSON array of records, or JSON Lines (what ``datasets``' ``to_json`` writes);
- ``*.parquet``: one record per row (read with ``pyarrow``, which ``datasets`` brings);
- a folder written by ``datasets``' ``save_to_disk``: a ``Dataset``, or a ``DatasetDict`` with one split (needs
  ``datasets``);
- any other file: JSON Lines, one record per line (:func:`load_preference_jsonl`).

Every record is checked (:func:`check_record`) in any layout it accepts. Records are numbered for
error messages: JSON Lines by line (1-based), the others by row (0-based, ``dataset[row]``): ``file:row 17: ...``.
"""
import codecs
import io
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from patches.preference_layouts import explicit_prompt

Numbered = List[Tuple[Union[int, str], Dict[str, Any]]]
#: what marks a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
DATASET_FOLDER_FILES = ("state.json", "dataset_dict.json")


class PreferenceDataError(ValueError):
    """A preference record is malformed; the message names the file and line."""


def check_record(record: Any) -> None:
    """Raise ``ValueError`` saying what is wrong with one preference record; silent when it is valid."""
    explicit_prompt(record)


def _text_lines(text: str) -> List[str]:
    """``text`` split as a file opened in text mode splits it: universal newlines (``\\n``, ``\\r\\n``, ``\\r``)."""
    return io.StringIO(text, newline=None).readlines()


def read_utf8(path: Path) -> str:
    """The file's text, decoded as UTF-8 with a leading byte order mark dropped (editors on Windows write one).

    Raises :class:`PreferenceDataError` naming ``path:line`` and the column of the first byte that is not UTF-8.
    """
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        # Everything before the bad byte decodes: count its lines the way the records' lines are counted.
        before = _text_lines(data[:error.start].decode("utf-8")) or [""]
        line_number, column = len(before), len(before[-1]) + 1
        if before[-1].endswith("\n"):
            line_number, column = line_number + 1, 1
        raise PreferenceDataError(f"{path}:{line_number}: not UTF-8 text (byte 0x{data[error.start]:02x} at column "
                                  f"{column}); save the file as UTF-8") from None


def load_preference_jsonl(path) -> List[Tuple[int, Dict[str, Any]]]:
    """Read a UTF-8 JSONL preference file into ``[(line_number, record), ...]`` (1-based; blank lines skipped).

    A UTF-8 byte order mark at the start of the file is accepted. Raises :class:`PreferenceDataError` naming
    ``path:line`` for bytes that are not UTF-8, invalid JSON or a malformed record, and for a missing or
    empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such file")
    return _jsonl_records(path, read_utf8(path))


def _jsonl_records(path: Path, text: str) -> List[Tuple[int, Dict[str, Any]]]:
    """:func:`load_preference_jsonl` of the file's decoded ``text``."""
    def parsed_lines():
        for line_number, line in enumerate(_text_lines(text), start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                raise PreferenceDataError(
                    f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno})") from None

    return checked_records(path, parsed_lines(), "no records (expected one JSON object per line)")


def checked_records(path, labelled_records, when_empty: str) -> list:
    """``[(label, record)]`` of ``(label, record)`` pairs, each checked by :func:`check_record`; an error names
    ``path:label``, and no record at all is the error ``path: when_empty``."""
    records = []
    for label, record in labelled_records:
        try:
            check_record(record)
        except ValueError as error:
            raise PreferenceDataError(f"{path}:{label}: {error}") from None
        records.append((label, record))
    if not records:
        raise PreferenceDataError(f"{path}: {when_empty}")
    return records


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

    path = Path(path)
    problem = data_path_problem(path)
    if problem is not None:
        raise PreferenceDataError(f"{path}: {problem}")
    if path.is_dir():
        rows = _dataset_folder_rows(path)
    elif path.suffix.lower() == ".parquet":
        rows = _parquet_rows(path)
    elif path.suffix.lower() == ".json":
        text = read_utf8(path)  # a byte that is not UTF-8 is named by line and column, as in a JSONL file
        rows = _json_rows(path, text)
        if rows is None:  # JSON Lines under a .json name
            return _jsonl_records(path, text)
    else:
        return load_preference_jsonl(path)
    return _checked(path, rows)


def _checked(path: Path, rows: Iterable[Any]) -> Numbered:
    return checked_records(path, ((f"row {index}", record) for index, record in enumerate(rows)), "no records")


def _json_rows(path: Path, text: str) -> Optional[list]:
    """The records of the JSON array ``text`` (one object: one record); ``None`` for JSON Lines."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # a first value parsed, then more: one value per line
            return None
        raise PreferenceDataError(f"{path}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno})")
    return value if isinstance(value, list) else [value]


def _parquet_rows(path: Path) -> list:
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
