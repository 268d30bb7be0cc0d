"""Config loading: YAML -> overrides -> schema validation -> defaults -> resolution -> typed view.

One schema (`schemas/config.schema.json`) is the single source of keys and defaults. Every problem is
collected and reported together, each naming its dotted key; unknown keys get a suggestion.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jsonschema
import yaml

from cachemedicpp.schema import (CONFIG_DIR, SCHEMA_DIR, ConfigError, fill_defaults, load_schema,  # noqa: F401
                                 lookup, read_yaml, resolve_path, section_defaults)

# Keys that name where something lives or how the work is spread rather than what is computed: excluded
# from the config hash so that moving a sweep or a split file does not orphan its runs, and a run paused
# with some eval worker processes resumes with another number of them.
HASH_EXCLUDE = ("eval.ood_splits_path", "stability.paired_run_dir", "eval.workers")
# Keys the two runs of a contraction ablation pair may differ in: where things live, and the ablated weight.
PAIRING_IGNORED = HASH_EXCLUDE + ("train.lambda_contr",)
# The corruption registry's name lists (cachemedicpp.corruption owns them), read through this module too
_REGISTRY_NAMES = ("CORRUPTION_TYPES", "STATISTICAL_TYPES", "FAULT_TYPES")


def __getattr__(name: str) -> Any:
    """CORRUPTION_TYPES, STATISTICAL_TYPES, FAULT_TYPES: the corruption registry's, current when asked."""
    if name in _REGISTRY_NAMES:
        return getattr(_corruption(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _corruption():
    # imported when a config is resolved, not with this module: the corruption family imports torch, which
    # commands that only read the schema or a run's files (plots, results --check, watch) never need
    from cachemedicpp import corruption

    return corruption


# --------------------------------------------------------------------------------------------------
# overrides (shared with the sweep)


def parse_set_args(items: Iterable[str]) -> dict[str, Any]:
    """`a.b.c=VALUE` strings -> {dotted key: YAML-typed value}."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. train.steps=50)")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key] = value
    return out


def apply_overrides(data: dict, overrides: Mapping[str, Any]) -> dict:
    """Apply {dot.key: value} overrides to a nested dict (copy). List items are addressed by index."""
    data = copy.deepcopy(data) if data else {}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, dotted)
                continue
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], (dict, list)):
                raise ConfigError(f"override {dotted}: {'.'.join(parts[: i + 1])} is not a section")
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            idx = _index(node, last, dotted)
            node[idx] = copy.deepcopy(value)
        else:
            node[last] = copy.deepcopy(value)
    return data


def _index(lst: list, part: str, dotted: str) -> int:
    if not part.isdigit() or int(part) >= len(lst):
        raise ConfigError(f"override {dotted}: {part!r} is not a valid index (list has {len(lst)} items)")
    return int(part)


def _list_item(lst: list, part: str, dotted: str) -> Any:
    return lst[_index(lst, part, dotted)]


# --------------------------------------------------------------------------------------------------
# validation and defaults


def _unknown_keys(schema: dict, data: Any, prefix: str = "") -> list[str]:
    problems = []
    if not isinstance(data, dict) or schema.get("type") not in ("object", None) or "properties" not in schema:
        if isinstance(data, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(data):
                problems += _unknown_keys(schema["items"], item, f"{prefix}{i}.")
        return problems
    props = schema["properties"]
    for key, value in data.items():
        if key not in props:
            if schema.get("additionalProperties", True) is False:
                close = difflib.get_close_matches(str(key), list(props), n=1, cutoff=0.5)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid keys: {', '.join(props)})"
                problems.append(f"unknown key {prefix}{key}{hint}")
            continue
        problems += _unknown_keys(props[key], value, f"{prefix}{key}.")
    return problems


def validate(data: Any, schema: dict, what: str = "config") -> None:
    """Raise ConfigError listing every unknown key and schema violation, each by dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: top level must be a mapping, got {type(data).__name__}")
    problems = _unknown_keys(schema, data)
    validator = jsonschema.Draft202012Validator(schema)
    for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        if err.validator == "additionalProperties":
            continue  # reported above with a suggestion
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        problems.append(f"{key}: {err.message}")
    if problems:
        raise ConfigError([f"{what}: {p}" for p in problems])


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of a nested mapping (an empty mapping is a leaf)."""
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def pairing_differences(ours: Mapping, theirs: Mapping) -> list[tuple[str, Any, Any]]:
    """(key, ours, theirs) for every resolved-config key two runs of an ablation pair may not differ in."""
    a, b = flatten(dict(ours)), flatten(dict(theirs))
    missing = "<absent>"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if not any(k == i or k.startswith(i + ".") for i in PAIRING_IGNORED) and a.get(k, missing) != b.get(k, missing)]


# --------------------------------------------------------------------------------------------------
# resolution: mixture, OOD split


def load_ood_split(name: str, path: str | None, base: Path | None = None) -> dict:
    split_path = resolve_path(path, base) if path else CONFIG_DIR / "corruption" / "ood_splits.yaml"
    doc = read_yaml(split_path, "OOD splits")
    splits = (doc or {}).get("splits", doc) if isinstance(doc, dict) else None
    if not isinstance(splits, dict):
        raise ConfigError(f"OOD splits file {split_path}: expected a mapping of split names")
    split = lookup("split", name, dict(sorted(splits.items())), key="eval.ood_protocol")
    train_types, test_type = split.get("train_types"), split.get("test_type")
    if not isinstance(train_types, list) or not isinstance(test_type, str):
        raise ConfigError(f"OOD split {name} in {split_path}: needs train_types (list) and test_type")
    if test_type in train_types:
        raise ConfigError(f"OOD split {name}: test_type {test_type} is also a train type")
    return {"name": name, "train_types": list(train_types), "test_type": test_type}


def resolve(data: dict, base: Path | None = None) -> dict:
    """Fill defaults and resolve the mixture and the OOD split. Idempotent on its own output."""
    schema = load_schema("config")
    validate(data, schema)
    # params the user set explicitly win over a mixture file's params, which win over schema defaults
    user_params = set(((data.get("corruption") or {}).get("params") or {}))
    data = fill_defaults(schema, copy.deepcopy(data))
    corr, ev = data["corruption"], data["eval"]
    corruption = _corruption()
    weights, mix_params = corruption.load_mixture(corr["mixture"], base)
    for k, v in mix_params.items():
        if k not in corr["params"]:
            raise ConfigError(f"corruption mixture params: unknown key {k}; known: {sorted(corr['params'])}")
        if k not in user_params:
            corr["params"][k] = v
    if ev["ood_protocol"]:
        split = load_ood_split(ev["ood_protocol"], ev["ood_splits_path"], base)
        ev["ood_split"] = split
        corr["train_types"] = split["train_types"]
        ev["corruption_eval"]["types"] = [split["test_type"]]
    corr["mixture"] = corruption.normalise_weights(weights, corr["train_types"])
    known = corruption.CORRUPTION_TYPES
    bad = [t for t in ev["corruption_eval"]["types"] if t not in known]
    if bad:
        raise ConfigError(f"eval.corruption_eval.types: unknown type(s) {bad}; known: {list(known)}")
    if corr["params"]["targeted_base"] not in known:
        raise ConfigError(f"corruption.params.targeted_base: unknown type {corr['params']['targeted_base']!r}")
    corruption.check_params(corr["params"], data["dtype"])
    _check_bit_classes(ev, corruption.BIT_CLASSES)
    validate(data, schema)
    return data


def _check_bit_classes(ev: dict, known: Sequence[str]) -> None:
    """eval.bit_classes (known, each once) and a positive severity for them (figure E)."""
    classes = list(ev["bit_classes"])
    for c in classes:
        lookup("bit class", c, known, key="eval.bit_classes")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise ConfigError(f"eval.bit_classes: class(es) {dup} listed twice")
    if classes and ev["bit_class_eps"] is None and not any(float(e) > 0 for e in ev["corruption_eval"]["eps"]):
        raise ConfigError("eval.bit_class_eps: null takes the largest eval eps, but eval.corruption_eval.eps has "
                          "none above 0; set a severity")


def config_hash(data: dict) -> str:
    d = copy.deepcopy(data)
    for dotted in HASH_EXCLUDE:
        node = d
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# typed view


class Section:
    """Read-only attribute view over a resolved config mapping (cfg.train.steps)."""

    def __init__(self, data: Mapping[str, Any], path: str = ""):
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name: str) -> Any:
        try:
            value = self._data[name]
        except KeyError:
            raise AttributeError(f"config has no key {self._path}{name}") from None
        return Section(value, f"{self._path}{name}.") if isinstance(value, Mapping) else value

    def __getitem__(self, name: str) -> Any:
        return self.__getattr__(name)

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self._data else default

    def keys(self):
        return self._data.keys()

    def items(self):
        return [(k, self[k]) for k in self._data]

    def values(self):
        return [self[k] for k in self._data]

    def __eq__(self, other) -> bool:
        if isinstance(other, Section):
            other = other._data
        return dict(self._data) == other

    def __repr__(self) -> str:
        return f"Section({dict(self._data)!r})"

    def __setattr__(self, name, value):
        raise AttributeError("config is read-only; use overrides")

    def to_dict(self) -> dict:
        return copy.deepcopy(dict(self._data))


class Config(Section):
    def __init__(self, data: dict, source: str | None = None):
        super().__init__(data)
        object.__setattr__(self, "hash", config_hash(data))
        object.__setattr__(self, "source", source)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                data: dict | None = None) -> Config:
    """Load + override + resolve. Raises ConfigError (exit 2) with every problem listed."""
    base = None
    if data is None:
        if path is None:
            raise ConfigError("no config given")
        raw = read_yaml(path)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        base = Path(path).resolve().parent
    else:
        raw = data
    raw = apply_overrides(raw, overrides or {})
    return Config(resolve(raw, base), str(path) if path else None)


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)
