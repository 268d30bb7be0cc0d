"""Crash-safe file I/O shared by every stage.

Every JSON/YAML/checkpoint write goes to a temp file in the same folder and is renamed into place, so a
kill at any instant leaves the old or the new file, never a truncated one. JSONL files are append-only; a
torn last line (kill mid-append) is cut off on reopen. A missing or damaged input file is bad input
(`ConfigError`, exit 2) naming the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import jsonschema

from cachemedicpp.config import ConfigError, load_schema


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------------
# atomic writes


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    import torch  # here, not at the top: watch and plots read run files through this module without torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read JSON; a missing or corrupted file is bad input (exit 2) naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is corrupted ({e}); delete it or rerun with --no-resume") from None


def file_sha256(path: str | Path) -> str:
    """The first 16 hex digits of a file's sha256: how runs identify a checkpoint they used."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    import torch  # here, not at the top: watch and plots read run files through this module without torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged zip/pickle
        raise ConfigError(f"{what} {path} is corrupted or unreadable ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------
# JSONL


def repair_jsonl_tail(path: Path) -> None:
    """Cut a torn last line left by a kill during an append."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line from a kill mid-append
    return out


def append_jsonl(path: str | Path, record: Mapping) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()


def truncate_jsonl(path: str | Path, keep) -> None:
    """Rewrite a JSONL keeping records for which keep(record) is true (used on resume)."""
    path = Path(path)
    if path.is_file():
        recs = [r for r in read_jsonl(path) if keep(r)]
        atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in recs))


def validate_records(records: Iterable[Mapping], schema_name: str) -> list[str]:
    """Schema problems of records (empty when all valid)."""
    v = jsonschema.Draft202012Validator(load_schema(schema_name))
    return [f"record {i}: {e.message}" for i, r in enumerate(records) for e in v.iter_errors(r)]
