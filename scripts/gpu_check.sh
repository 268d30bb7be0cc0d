#!/usr/bin/env bash
# The GPU check, for a CUDA machine set up with the README's commands (nothing else installed): the tests
# of the device and dtype paths on CUDA in bfloat16, a trimmed quickstart on cuda, and bench's decode and
# eval-grid rows; one JSON summary at runs/gpu_check/summary.json (or under the folder given as $1).
# Sized to finish within 8 minutes on one H100; each step has its own time limit and a failed step is
# recorded in the summary, never hidden.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_check}"
mkdir -p "$OUT"
bash scripts/setup.sh || exit 2
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device ($($PY -c 'import torch; print(torch.__version__)')); nothing to check" >&2
    exit 2
fi

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, record rc and seconds in $OUT/steps.jsonl
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '{"step": "%s", "rc": %d, "seconds": %d, "log": "%s"}\n' "$name" "$rc" "$((SECONDS - t0))" \
        "$OUT/$name.log" >> "$OUT/steps.jsonl"
    echo "gpu_check: $name exited $rc"
}

rm -f "$OUT/steps.jsonl"
step tests 150 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml "$OUT/tests.xml"
step quickstart 300 $PY -m cachemedicpp.pipeline --config configs/quickstart.yaml --run_dir "$OUT/quickstart" \
    --no-resume --set device=cuda --set dtype=bfloat16 --set train.steps=60 --set train.save_every=30 \
    --set stability.num_prompts=2
step bench 120 $PY -m cachemedicpp.bench --device cuda --quick --only decode,eval_grid --memory off \
    --out "$OUT/bench.json"
$PY - "$OUT" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

out = Path(sys.argv[1])
steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l.strip()]
summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "steps": steps, "total_seconds": round(sum(s["seconds"] for s in steps), 1)}
if (out / "tests.xml").is_file():
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
task = out / "quickstart" / "metrics" / "task_metrics.json"
if task.is_file():
    m = json.loads(task.read_text())["metrics"]
    summary["quickstart"] = {"robustness_auc": m.get("robustness_auc"), "clean_metrics": m.get("clean_metrics"),
                             "best_baseline": m.get("best_heuristic_name")}
if (out / "bench.json").is_file():
    summary["bench"] = json.loads((out / "bench.json").read_text()).get("summary")
summary["passed"] = all(s["rc"] == 0 for s in steps) and not summary.get("tests", {}).get("failures", 1) \
    and not summary.get("tests", {}).get("errors", 1)
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
sys.exit(0 if summary["passed"] else 1)
PYEOF
