"""Every command in a ```bash block of README.md and docs/*.md runs as written.

Each command line is classified: one of the two set-up scripts (run by CI and the fresh-clone check, listed in
SETUP), or `python -m cachemedicpp.<module> ...`, which this test runs as written (argv split with shlex,
`python` replaced by this interpreter) in a temporary working directory. Allowed substitutions: a
`configs/*.yaml` the line names is a tiny-model copy of the shipped file (the shipped file itself in the slow
tier); an lm-eval `--tasks` value is the local test task (the hub is unreachable); a run dir or record the line
needs is prepared first on the tiny model. A command line of any other kind, or of a module without a runner
here, fails the test naming it: a new command block cannot slip in untested.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cachemedicpp import ROOT
from cachemedicpp.plots import publish
from conftest import tiny_config

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# the set-up commands: not run here (they install into .venv), but by these checks
SETUP = {
    "scripts/test.sh": ".ci/run runs `bash scripts/test.sh` (the CI job; extra arguments go to pytest)",
    "scripts/quickstart.sh": "the fresh-clone check runs `bash scripts/quickstart.sh` (its run dir is what "
                             "docs/results/quickstart.json is published from)",
}
LMEVAL_TASK = "cm_tiny_mc"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
CONFIG_PATH = re.compile(r"^configs/[\w./-]+\.ya?ml$")


@dataclass(frozen=True)
class Line:
    doc: str  # path relative to the repository root
    lineno: int  # where the command starts in the document
    text: str  # the command, continuation lines joined, comment stripped
    block: int  # index of its ```bash block in the document

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.lineno}"

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def command_lines(path: Path) -> list[Line]:
    """The command lines of every ```bash block of `path` (backslash continuations joined)."""
    out, block, inside, pending, start = [], -1, False, "", 0
    doc = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if not inside:
            if stripped.startswith("```bash") or stripped.startswith("```sh"):
                inside, block = True, block + 1
            continue
        if stripped.startswith("```"):
            inside = False
            continue
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        if shlex.split(text, comments=True):
            out.append(Line(doc, start, shlex.join(shlex.split(text, comments=True)), block))
    return out


ALL_LINES = [line for doc in DOCS for line in command_lines(doc)]


def kind(line: Line) -> str:
    """'setup', 'module:<name>' or 'unknown'."""
    argv = line.argv
    if len(argv) >= 2 and argv[0] == "bash" and argv[1] in SETUP:
        return "setup"
    if len(argv) >= 3 and argv[:2] == ["python", "-m"] and argv[2].startswith("cachemedicpp."):
        return f"module:{argv[2]}"
    return "unknown"


# --------------------------------------------------------------------------------------------------
# preparing the working directory


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Workdir:
    """A temporary working directory in which a block's lines run in order."""

    def __init__(self, path: Path, slow: bool, tiny_model_dir, task_dir_fn):
        self.path, self.slow, self.tiny_model_dir, self.task_dir_fn = path, slow, tiny_model_dir, task_dir_fn

    def config(self, rel: str) -> Path:
        """`rel` (a shipped configs/*.yaml) in the working directory: the shipped file in the slow tier, else a
        tiny-model copy of it (model.name = a tiny random model, sizes shrunk)."""
        shipped, dest = ROOT / rel, self.path / rel
        assert shipped.is_file(), f"{rel}: named by a documented command but not shipped"
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            if self.slow:
                shutil.copyfile(shipped, dest)
            else:
                tiny = _deep_merge(yaml.safe_load(shipped.read_text()), tiny_config(self.tiny_model_dir("llama")))
                dest.write_text(yaml.safe_dump(tiny))
        return dest

    def run_dir(self, rel: str, extra: dict | None = None) -> Path:
        """An evaluated run dir at `rel`: train and eval of a tiny copy of the quickstart config (with `extra`
        merged in)."""
        from cachemedicpp import eval as ev
        from cachemedicpp import train

        rd = self.path / rel
        if not (rd / "metrics" / "task_metrics.json").is_file():
            cfg = self.path / "prepared" / f"{rd.name}.yaml"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            data = _deep_merge(_deep_merge(yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text()),
                                           tiny_config(self.tiny_model_dir("llama"))), extra or {})
            cfg.write_text(yaml.safe_dump(data))
            for stage in (train, ev):
                assert stage.main(["--config", str(cfg), "--run_dir", str(rd)]) == 0, f"preparing {rel}: {stage}"
        return rd

    def doc(self, rel: str) -> Path:
        """A documentation file copied into the working directory (the publish command rewrites it)."""
        dest = self.path / rel
        if not dest.is_file():
            assert (ROOT / rel).is_file(), f"{rel}: named by a documented command but not in the repository"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / rel, dest)
        return dest


def _option(argv: list[str], name: str) -> list[str]:
    """The values after option `name` up to the next option."""
    if name not in argv:
        return []
    vals = []
    for a in argv[argv.index(name) + 1:]:
        if a.startswith("--"):
            break
        vals.append(a)
    return vals


def _publish_args(argv: list[str]) -> argparse.Namespace:
    """The publish command's arguments, parsed as it parses them."""
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="*")
    p.add_argument("--out", required=True)
    p.add_argument("--name")
    p.add_argument("--docs", nargs="*", default=[])
    p.add_argument("--check", action="store_true")
    p.add_argument("--selection")
    return p.parse_args(argv[3:])


def prepare_publish(argv: list[str], wd: Workdir) -> list[str]:
    args = _publish_args(argv)
    out = wd.path / args.out
    for run in args.runs:
        wd.run_dir(run)
    for doc in map(wd.doc, args.docs):
        # a record a block reads that no earlier line of the block wrote: published from a tiny run
        for m in publish.BLOCK.finditer(doc.read_text()):
            name = m["name"].replace("*", "tiny")  # a pattern over records: one tiny record that matches it
            if (out / f"{name}.json").is_file() or ("*" in m["name"] and list(out.glob(f"{m['name']}.json"))):
                continue
            if m["table"] == "selection":  # a one-run selection sweep of the tiny run
                publish.publish_selection(_selection_sweep(wd, m["name"]), out, m["name"])
            elif m["table"] in ("recompute", "heldout"):  # a tiny run that scores the recomputing defenses
                # (detect_recompute raises the alarm of a family-D detector)
                publish.publish(wd.run_dir(f"prepared_runs/{name}", {"repair": {"family": "D"}, "eval": {"defenses": [
                    "no_defense", "checksum_recompute", "detect_recompute", "cachemedic"]}}), out, name)
            else:
                publish.publish(wd.run_dir(f"prepared_runs/{m['name']}"), out, m["name"])
    return argv


def _selection_sweep(wd: Workdir, name: str) -> Path:
    """A sweep dir holding the tiny run, its validation grid relabelled as the selection split."""
    sweep = wd.path / "prepared_sweeps" / name
    run = sweep / "only"
    if not run.is_dir():
        shutil.copytree(wd.run_dir(f"prepared_runs/{name}"), run)
        path = run / "metrics" / "task_metrics.json"
        task = json.loads(path.read_text())
        task["settings"]["validation"]["split"] = "selection"
        path.write_text(json.dumps(task))
        (sweep / "summary.json").write_text(json.dumps({"sweep_name": name, "runs": [
            {"name": "only", "run_dir": "only", "overrides": {}}]}))
    return sweep


def check_publish(argv: list[str], wd: Workdir) -> None:
    args = _publish_args(argv)
    out = wd.path / args.out
    for name in [args.name] if args.name and not args.selection else [Path(r).name for r in args.runs]:
        rec = json.loads((out / f"{name}.json").read_text())
        assert rec["format"] == publish.FORMAT and rec["task_metrics"]["robustness_auc"]
    docs = [wd.path / d for d in args.docs]
    for doc in docs:
        blocks = list(publish.BLOCK.finditer(doc.read_text()))
        assert blocks, f"{doc.name}: --docs names a file without published blocks"
        assert all(b["body"].strip() for b in blocks), f"{doc.name}: a published block left empty"
    assert publish.render_docs(docs, out, check=True) == []


def _model_args(argv: list[str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in argv[argv.index("--model_args") + 1].split(","))


def prepare_lmeval(argv: list[str], wd: Workdir) -> list[str]:
    argv, args = list(argv), _model_args(argv)
    assert CONFIG_PATH.match(args["config"]), f"lm-eval example: config={args['config']} is not a shipped config"
    assert float(args.get("eps", 0)) > 0, "the lm-eval example should score a corrupted cache (eps > 0)"
    wd.config(args["config"])
    j = argv.index("--tasks")
    argv[j + 1] = LMEVAL_TASK  # the hub's tasks are unreachable here: the local test task instead
    return argv + ["--include_path", str(wd.task_dir_fn())]


def check_lmeval(argv: list[str], wd: Workdir) -> None:
    out = _option(argv, "--output_path")
    assert out, "the lm-eval example should write its results JSON (--output_path)"
    files = list((wd.path / out[0]).rglob("results_*.json"))
    assert len(files) == 1, files
    res = json.loads(files[0].read_text())
    assert res["config"]["model"] == "cachemedic"
    recorded = str(res["config"]["model_args"])  # the run used the example's model_args as written
    assert all(v in recorded for v in _model_args(argv).values()), recorded
    assert 0 <= res["results"][LMEVAL_TASK]["acc,none"] <= 1


def prepare_integrity(argv: list[str], wd: Workdir) -> list[str]:
    """The prompt file the line names, written if missing; the line runs as written (the embedded model)."""
    prompt = wd.path / _option(argv, "--prompt")[0]
    if not prompt.is_file():
        prompt.parent.mkdir(parents=True, exist_ok=True)
        prompt.write_text("The river keeps its own counsel through the valley, and the mill on its bank turns "
                          "whenever the spring floods come down from the hills above the old stone bridge.\n")
    return argv


def check_integrity(argv: list[str], wd: Workdir) -> None:
    if argv[3] == "record":
        out = wd.path / _option(argv, "--out")[0]
        assert sorted(p.name for p in out.iterdir()) == ["cache.pt", "tags.json"]
        assert json.loads((out / "tags.json").read_text())["format"] == "cachemedicpp.tags/1"


# module -> (prepare: argv, workdir -> argv to run; check: argv, workdir -> None, after exit 0)
RUNNERS = {
    "cachemedicpp.plots.publish": (prepare_publish, check_publish),
    "cachemedicpp.lmeval": (prepare_lmeval, check_lmeval),
    "cachemedicpp.integrity": (prepare_integrity, check_integrity),
}
SLOW_MODULES = {"cachemedicpp.lmeval"}  # run on the shipped config: the embedded model


def run_line(line: Line, wd: Workdir) -> None:
    argv = line.argv
    module = argv[2]
    if module not in RUNNERS:
        pytest.fail(f"{line.where}: `{line.text}` has no runner in tests/test_readme.py (add one)")
    prepare, check = RUNNERS[module]
    for a in argv[3:]:  # a shipped config named anywhere on the line (model_args included)
        for tok in a.split(","):
            path = tok.split("=", 1)[-1]
            if CONFIG_PATH.match(path):
                wd.config(path)
    argv = prepare(argv, wd)
    p = subprocess.run([sys.executable, *argv[1:]], cwd=wd.path, env=ENV, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, (f"{line.where}: `{line.text}` exited {p.returncode}\n"
                               f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    check(argv, wd)


# --------------------------------------------------------------------------------------------------
# the tests


def test_every_command_line_is_covered():
    assert ALL_LINES, "no ```bash block found: the parser is broken"
    unknown = [f"{ln.where}: `{ln.text}`" for ln in ALL_LINES if kind(ln) == "unknown"]
    assert not unknown, ("command lines this test neither runs nor lists as set-up (run them here, or drop "
                         "them from the document):\n" + "\n".join(unknown))
    missing = [f"{ln.where}: `{ln.text}` (module {ln.argv[2]})" for ln in ALL_LINES
               if kind(ln).startswith("module:") and ln.argv[2] not in RUNNERS]
    assert not missing, "documented commands without a runner in tests/test_readme.py:\n" + "\n".join(missing)


def test_the_set_up_commands_are_the_ones_ci_and_the_fresh_clone_check_run():
    setup = {ln.argv[1] for ln in ALL_LINES if kind(ln) == "setup"}
    assert setup == set(SETUP), f"README's set-up commands changed: {sorted(setup)} vs {sorted(SETUP)}"
    readme = [ln.text for ln in command_lines(ROOT / "README.md")]
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    quick = (ROOT / "scripts" / "quickstart.sh").read_text()
    assert "cachemedicpp.pipeline --config configs/quickstart.yaml" in quick and "runs/quickstart" in quick


def test_a_new_command_line_is_caught(tmp_path):
    doc = tmp_path / "new.md"
    doc.write_text("text\n```bash\nbash scripts/test.sh -m \"not slow\"   # fast tier\n"
                   "python -m cachemedicpp.watch --run_dir \\\n  runs/x --json\nls runs/\n```\n")
    lines = command_lines(doc)
    assert [ln.argv for ln in lines] == [["bash", "scripts/test.sh", "-m", "not slow"],
                                         ["python", "-m", "cachemedicpp.watch", "--run_dir", "runs/x", "--json"],
                                         ["ls", "runs/"]]
    assert [kind(ln) for ln in lines] == ["setup", "module:cachemedicpp.watch", "unknown"]
    assert lines[1].lineno == 4 and "cachemedicpp.watch" not in RUNNERS


@pytest.fixture
def task_dir(lmeval_task_dir) -> Path:
    return lmeval_task_dir


def _blocks() -> list:
    """One test per ```bash block holding runnable lines; the lines of a block run in order, in one directory."""
    blocks: dict[tuple[str, int], list[Line]] = {}
    for ln in ALL_LINES:
        if kind(ln).startswith("module:"):
            blocks.setdefault((ln.doc, ln.block), []).append(ln)
    params = []
    for lines in blocks.values():
        slow = any(ln.argv[2] in SLOW_MODULES for ln in lines)
        params.append(pytest.param(lines, id=lines[0].where, marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("lines", _blocks())
def test_documented_commands_run_as_written(lines, tmp_path, tiny_model_dir, request):
    if any(ln.argv[2] == "cachemedicpp.lmeval" for ln in lines):
        pytest.importorskip("lm_eval")
    slow = any(ln.argv[2] in SLOW_MODULES for ln in lines)
    wd = Workdir(tmp_path, slow, tiny_model_dir, lambda: request.getfixturevalue("task_dir"))
    for ln in lines:
        run_line(ln, wd)
