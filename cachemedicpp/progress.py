"""The progress file of a unit-resumable phase (eval, stability) and the repair-checkpoint record both
phases keep: one record layout, one reader, one resume policy.

A progress record holds `format`, `status`, `config_hash`, `config` (the flat {dotted key: value}
snapshot of the hashed config, so that a refusal can name the keys that changed), `total_units`,
`completed_units`, `elapsed_wall_sec`, `checkpoint` (the record below), the phase's own inputs, and one
or more unit mappings (unit key -> that unit's saved result).

Policy when a phase resumes and finds its progress file (`--no-resume` never reads it):
1. Unreadable (bad JSON, not an object, a unit mapping that is not one): bad input (exit 2) naming the
   file. The file is left as it is: a refusal loses nothing.
2. Written under another config (its config_hash differs): bad input naming the file and the changed
   keys, checked before the run dir is bound, so that the refusal writes nothing. The run dir's own
   config guard refuses first when config_resolved.yaml differs too; this check also catches a progress
   file that outlived or never shared its run dir's config (copied, or config_resolved.yaml removed).
3. Same config, but an input the config does not pin differs (the repair checkpoint, the examples or
   prompts a data source yields, the record's format): a warning, and every unit is recomputed; the file
   is overwritten at the first save. These inputs change legitimately (training went on, a hub dataset
   became reachable), so refusing would only make the user delete the file by hand.
4. Otherwise the saved units are kept; each phase then drops those its current units do not name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cachemedicpp.config import HASH_EXCLUDE, Config, ConfigError, flatten
from cachemedicpp.fileio import atomic_write_json, file_sha256, read_json
from cachemedicpp.rundir import RunDir

log = logging.getLogger("cachemedicpp")

FORMAT = "cachemedicpp.progress/1"
LOADED = "loaded"  # checkpoint status when its weights are used
CHECKPOINT_FIELDS = ("path", "step", "sha256", "status")
SHOWN_KEYS = 8  # changed keys named in a refusal; the rest are counted


# --------------------------------------------------------------------------------------------------
# the repair checkpoint a phase uses


def checkpoint_record(rd: RunDir, path: Path | None, status: str) -> dict:
    """{path (relative to the run dir), step, sha256 (first 16 hex digits), status} of a repair checkpoint,
    or of none (`path` None: every field but the status is null)."""
    if path is None:
        return {"path": None, "step": None, "sha256": None, "status": status}
    return {"path": rd.rel(path), "step": RunDir.checkpoint_step(path), "sha256": file_sha256(path), "status": status}


def latest_checkpoint(rd: RunDir, *, allow_missing: bool, missing: str, remedy: str) -> dict:
    """The record of the run's latest repair checkpoint. Without one it is bad input saying `remedy`, unless
    `allow_missing` (eval.allow_missing_checkpoint): then a record of none with status `missing`."""
    p = rd.latest_repair_checkpoint()
    if p is None and not allow_missing:
        raise ConfigError(f"no repair checkpoint in {rd.checkpoints}: {remedy}")
    return checkpoint_record(rd, p, LOADED if p is not None else missing)


# --------------------------------------------------------------------------------------------------
# the config a record was written with


def _hashed(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in HASH_EXCLUDE)


def snapshot(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of the config keys the hash covers, as JSON stores them."""
    flat = {k: v for k, v in flatten(cfg.to_dict()).items() if _hashed(k)}
    return json.loads(json.dumps(flat, default=str))


def changed_keys(saved: Any, cfg: Config) -> list[str]:
    """The keys whose value differs between a saved snapshot and `cfg` (empty when nothing tells)."""
    if not isinstance(saved, dict):
        return []
    now, absent = snapshot(cfg), object()
    return sorted(k for k in set(saved) | set(now) if saved.get(k, absent) != now.get(k, absent))


def _config_refusal(path: Path, doc: dict, cfg: Config) -> ConfigError:
    keys = changed_keys(doc.get("config"), cfg)
    if keys:
        more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
        what = f"changed: {', '.join(keys[:SHOWN_KEYS])}{more}"
    else:
        what = f"config {doc.get('config_hash')}, now {cfg.hash}; the file names no keys"
    return ConfigError(f"progress file {path} was written with a different config ({what}); rerun with "
                       "--no-resume or use another run dir")


def _corrupted(path: Path, why: str) -> ConfigError:
    return ConfigError(f"progress file {path} is corrupted ({why}); delete it or rerun with --no-resume")


def read(path: Path, cfg: Config) -> dict | None:
    """The saved record at `path`, refused when unreadable or written under another config (policy 1, 2);
    None when there is none."""
    if not path.is_file():
        return None
    doc = read_json(path, "progress file")
    if not isinstance(doc, dict):
        raise _corrupted(path, "not a JSON object")
    if not isinstance(doc.get("units", {}), dict):
        raise _corrupted(path, "units is not a mapping")
    if doc.get("config_hash") != cfg.hash:
        raise _config_refusal(path, doc, cfg)
    return doc


# --------------------------------------------------------------------------------------------------
# one phase's record


class Progress:
    """A phase's progress record and its file. `groups` name the record's unit mappings; `inputs` are what
    the units depend on beyond the config and the checkpoint, compared on resume (policy 3)."""

    def __init__(self, path: Path, cfg: Config, total: int, checkpoint: Mapping, inputs: Mapping[str, Any],
                 groups: Sequence[str] = ("units",)):
        self.path, self.groups = Path(path), tuple(groups)
        # compared with what JSON gives back: tuples become lists
        self.inputs = json.loads(json.dumps({"format": FORMAT,
                                             "checkpoint": {k: checkpoint[k] for k in CHECKPOINT_FIELDS},
                                             **inputs}))
        self.record: dict[str, Any] = {
            "format": FORMAT, "status": "running", "config_hash": cfg.hash, "config": snapshot(cfg),
            "total_units": int(total), "completed_units": 0, "elapsed_wall_sec": 0.0, **self.inputs,
            **{g: {} for g in self.groups}}

    def units(self, group: str = "units") -> dict:
        """The finished units of a group; a phase adds each result to this mapping before `save`."""
        return self.record[group]

    @property
    def elapsed(self) -> float:
        """Wall time saved so far: before this run's first save, that of the previous invocations."""
        return float(self.record["elapsed_wall_sec"])

    @property
    def completed(self) -> int:
        return sum(len(self.record[g]) for g in self.groups)

    def resume(self, saved: dict | None) -> bool:
        """Take the units and wall time of `saved` (a record `read` accepted) when it was computed from the
        same inputs; else warn and keep none (policy 3). True when units were taken."""
        if saved is None:
            return False
        changed = [k for k, v in self.inputs.items() if saved.get(k) != v]
        if changed:
            log.warning("%s: saved with another %s; recomputing every unit", self.path, ", ".join(changed))
            return False
        for g in self.groups:
            units = saved.get(g, {})
            if not isinstance(units, dict):
                raise _corrupted(self.path, f"{g} is not a mapping")
            self.record[g] = dict(units)
        self.record["elapsed_wall_sec"] = float(saved.get("elapsed_wall_sec") or 0.0)
        return True

    def keep(self, group: str, wanted: Callable[[str, Any], bool]) -> dict:
        """Drop the saved units of `group` that this run does not compute (policy 4); the kept mapping."""
        self.record[group] = {k: u for k, u in self.record[group].items() if wanted(k, u)}
        return self.record[group]

    def save(self, status: str, elapsed: float) -> None:
        self.record.update(status=status, completed_units=self.completed, elapsed_wall_sec=round(elapsed, 3))
        atomic_write_json(self.path, self.record)
