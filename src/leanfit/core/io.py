"""Atomic file writes, JSON lines and content hashes.

Every file leanfit writes goes through a temporary file in the same folder and an ``os.replace``, so a run killed
at any moment leaves either the old file or the new one, never a torn one. Temporary names are unique per writer
(process id and a random part), and files and folders are created with the mode the process umask allows (0644
and 0755 under the usual 022), so teammates on a shared machine can read the outputs.

JSON is written strictly: a non-finite float (NaN, infinity) is written as ``null`` (see :func:`finite_json`), so
every file parses with any JSON reader. Reading a damaged file raises :class:`UnreadableFileError` naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from leanfit.core.errors import UnreadableFileError

__all__ = [
    "append_jsonl",
    "atomic_dir",
    "atomic_save_tensors",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_yaml",
    "finite_json",
    "read_csv",
    "read_json",
    "read_jsonl",
    "read_yaml",
    "rewrite_jsonl",
    "sha256_bytes",
    "sha256_file",
    "sha256_tree",
]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def _temp_name(path: Path) -> Path:
    """A sibling temporary name unique to this writer: two processes never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (mode 0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``rows`` as CSV; the columns are every key in order of first appearance (a missing value is empty)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV file with a header line (values as text), as :func:`atomic_write_csv` writes them."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def finite_json(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every non-finite float replaced by ``None``, and the dotted paths where that happened.

    Numpy and torch scalars and arrays are converted to Python numbers and lists first."""
    bad: list[str] = []

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            bad.append(path or "<value>")
            return None
        if isinstance(value, Mapping):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, bool | int | str) or value is None:
            return value
        return clean(_json_default(value), path)

    return clean(obj, where), bad


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(finite_json(obj)[0], allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON; a non-finite float becomes ``null`` (:func:`finite_json`)."""
    return atomic_write_text(path, _dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, Any]) -> Path:
    """Save a dict of tensors as safetensors, atomically."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` (any old folder is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    tmp.mkdir(mode=0o777)  # less the umask, as any folder the user makes
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unreadable(path: str | os.PathLike, what: str, detail: str) -> UnreadableFileError:
    exc = UnreadableFileError(
        f"{str(path)!r} is not readable {what} ({detail}); it may be torn or not a file leanfit wrote: "
        "restore it, or delete it and rerun"
    )
    exc.detail = detail  # type: ignore[attr-defined]
    return exc


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a damaged one raises :class:`UnreadableFileError` naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise _unreadable(path, "JSON", f"line {exc.lineno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise _unreadable(path, "JSON", "not UTF-8 text") from None
    except IsADirectoryError:
        raise _unreadable(path, "JSON", "a folder, not a file") from None


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file with ``yaml.safe_load``; a damaged one raises :class:`UnreadableFileError` naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _unreadable(path, "YAML", "not UTF-8 text") from None
    except IsADirectoryError:
        raise _unreadable(path, "YAML", "a folder, not a file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        detail = f"line {mark.line + 1}: {getattr(exc, 'problem', 'syntax error')}" if mark else "syntax error"
        raise _unreadable(path, "YAML", detail) from None


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON record as a line and fsync it (a torn last line is skipped by :func:`read_jsonl`)."""
    line = _dumps(record) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read JSON lines; a last line torn by a kill mid-write is dropped, a torn line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise _unreadable(path, "JSON lines", "not UTF-8 text") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise _unreadable(path, "JSON lines", f"line {i + 1}: {exc.msg}") from None
        if not isinstance(record, dict):
            raise _unreadable(path, "JSON lines", f"line {i + 1} is not a JSON object")
        records.append(record)
    return records


def rewrite_jsonl(path: str | os.PathLike, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Atomically rewrite ``path`` keeping the records for which ``keep`` is true; returns how many were kept."""
    records = [r for r in read_jsonl(path) if keep(r)]
    atomic_write_text(path, "".join(_dumps(r) + "\n" for r in records))
    return len(records)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` keyed by its relative POSIX path (names in ``exclude`` skipped)."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in exclude
    }


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
