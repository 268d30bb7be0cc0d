"""Bad input and the config schema: the one error every bad input raises, lookup by name in a registry,
the schema's defaults and where user paths resolve.

These are what every module that reads a config needs. They live apart from `config` because resolving
a config checks it against the corruption family's registry, and the corruption family itself needs
these: kept here, the dependency runs one way (config -> corruption -> schema).
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from cachemedicpp import ROOT

SCHEMA_DIR = ROOT / "schemas"
CONFIG_DIR = ROOT / "configs"


class ConfigError(Exception):
    """Bad input. Carries every problem found; the CLI prints them and exits 2."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def lookup(kind: str, name: Any, table: Mapping[str, Any] | Sequence[str], *, key: str = "",
           known: str = "known", note: str = "", error: type[ConfigError] | None = None) -> Any:
    """A registry entry by name (the name itself where `table` is a sequence of names). An unknown name is
    bad input: one message naming the config key, the closest known name and all known names."""
    if name in table:
        return table[name] if isinstance(table, Mapping) else name
    close = difflib.get_close_matches(str(name), [str(k) for k in table], n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise (error or ConfigError)(f"{key + ': ' if key else ''}unknown {kind} {name!r}{hint}; {known}: {list(table)}{note}")


def load_schema(name: str) -> dict:
    path = SCHEMA_DIR / f"{name}.schema.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_path(p: str | Path, base: Path | None = None) -> Path:
    """Resolve a user path: absolute, relative to `base` (a config's folder), cwd, or the repo root."""
    p = Path(p).expanduser()
    if p.is_absolute():
        return p
    for cand in ([base / p] if base else []) + [Path.cwd() / p, ROOT / p]:
        if cand.exists():
            return cand.resolve()
    return (ROOT / p).resolve()


def read_yaml(path: str | Path, what: str = "config") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {path} is not valid YAML: {e}") from None


def section_defaults(section: str, data: Mapping | None = None) -> dict:
    """One config section with every schema default filled in (for callers given a partial section)."""
    return fill_defaults(load_schema("config")["properties"][section], copy.deepcopy(dict(data or {})))


def fill_defaults(schema: dict, data: Any) -> Any:
    if isinstance(data, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in data and "default" in sub:
                data[key] = copy.deepcopy(sub["default"])
            if key in data:
                data[key] = fill_defaults(sub, data[key])
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        data = [fill_defaults(schema["items"], item) for item in data]
    return data
