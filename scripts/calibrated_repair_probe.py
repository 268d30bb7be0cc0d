"""Probe the calibrated repairs on a config's model, outside the eval grid (minutes on CPU for SmolLM2).

    python scripts/calibrated_repair_probe.py rule    [--config configs/quickstart.yaml] [--windows 12] [--examples 6]
    python scripts/calibrated_repair_probe.py measure [--config configs/quickstart.yaml] [--windows 24]
                                                      [--cases clean,gaussian:0.64,dropout_zero:0.64]
                                                      [--defenses no_defense,calibrated_repair,...]
                                                      [--set baseline.repair_noise_margin=2 ...]

`rule` reproduces how the default margins of `calibrated_repair` are set: with the run's calibration (levels
from the selection windows and the first `level_examples` selection-split examples of each task), the entries
(range) and blocks (noise) each margin flags on further held-in clean caches: `--windows` training-corpus
windows after the calibration and selection windows, and the next `--examples` selection-split examples of each
task (as many as the split holds); the default is the smallest margin that flags none of them (a clean cache is
to be left alone). No test or validation example is read.

`measure` scores the wikitext protocol of the eval grid (windows of eval.max_seq_len tokens, the cache all
but the last eval.cont_len + 1, perplexity of the mean NLL over the last eval.cont_len), each case's
corruption drawn at rest by the corruption module (the config's region axes and seed), then defended.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import yaml

from cachemedicpp import calibration, corruption, data, defenses, hf, prior
from cachemedicpp.config import load_config

MARGINS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def _setup(config: str, overrides: dict):
    cfg = load_config(config, overrides)
    lm = hf.load_model(cfg.model.to_dict(), "cpu", cfg.dtype)
    t0 = time.perf_counter()
    cal = calibration.build(cfg, lm)
    print(f"calibration: {time.perf_counter() - t0:.0f} s, {cal.record['tokens']} tokens, "
          f"{len(cal.layers)} layers", flush=True)
    return cfg, lm, cal


def rule(config: str, n_windows: int, n_examples: int, overrides: dict) -> None:
    cfg, lm, cal = _setup(config, overrides)
    c = cfg.baseline.calibration
    text, _ = data.load_text(cfg.data.to_dict(), "train_corpus")
    skip = int(c.windows) + int(c.select_windows)
    wins = data.fixed_windows(data.tokenize_stream(lm.tokenizer, text), int(c.window_len), skip + n_windows)[skip:]
    held = [{l: hf.get_kv(cache, l) for l in cal.layers}
            for cache in (calibration.prefill(lm, w, int(c.cont_len)) for w in wins)]
    lengths = [w.numel() - int(c.cont_len) - 1 for w in wins]
    # the next n_examples examples of each task's selection split, after those the levels were set on
    task, task_lengths = calibration.selection_held_in(cfg, lm, cal.layers, n_examples, start=int(c.level_examples))
    held, lengths = held + task, lengths + task_lengths
    print(f"further held-in clean caches: {len(wins)} training-corpus windows, {len(task)} selection-split "
          "examples", flush=True)
    flagged = {"range": [0] * len(MARGINS), "noise": [0] * len(MARGINS)}
    units = {"range": 0, "noise": 0}
    for cache, T in zip(held, lengths):
        for l in cal.layers:
            for which, st in ((0, cal.kprior[l]), (1, cal.vprior[l])):
                x = cache[l][which].float()
                pos = torch.arange(T - x.shape[2], T)
                live = pos >= cal.sink
                xm = calibration.frames(cal.rope, l, pos)[which].model(x)
                far = prior.outside(xm, st["lo"], st["hi"])[..., live, :].amax(-1) / st["range_level"][None, :, None]
                noise = prior.relative_noise(xm, st, live, pos, cal.block)[..., live] / st["noise_level"][None, :, None]
                ids = prior.blocks(pos, live, cal.block)[live]
                first = torch.cat([torch.ones(1, dtype=torch.bool), ids[1:] != ids[:-1]])  # one position per block
                units["range"] += far.numel()
                units["noise"] += noise[..., first].numel()
                for i, m in enumerate(MARGINS):
                    flagged["range"][i] += int((far > m).sum())
                    flagged["noise"][i] += int((noise[..., first] > m).sum())
    for kind in ("range", "noise"):
        pick = next((m for m, f in zip(MARGINS, flagged[kind]) if f == 0), None)
        print(f"{kind}: flagged of {units[kind]} at margins {MARGINS}: " + ", ".join(map(str, flagged[kind]))
              + f" -> margin {pick if pick is not None else f'> {MARGINS[-1]:g}'}")


def _make(spec: str, baseline: dict) -> defenses.Defense:
    """A defense from `name` or `name@baseline_key=value@...` (a variant with other hyper-parameters)."""
    name, *sets = spec.split("@")
    return defenses.make(name, {**baseline, **{k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in sets)}})


def measure(config: str, n_windows: int, cases: list[tuple[str, float]], names: list[str],
            overrides: dict) -> None:
    cfg, lm, cal = _setup(config, overrides)
    ev = cfg.eval
    L, cont = int(ev.max_seq_len), int(ev.cont_len)
    text, _ = data.load_text(cfg.data.to_dict(), "wikitext2")
    wins = data.fixed_windows(data.tokenize_stream(lm.tokenizer, text), L, n_windows)
    layers = list(cal.layers)
    corruptor = corruption.Corruptor(cfg.corruption.to_dict(), layers, lm.arch.num_kv_heads, cfg.seed)
    dfns = {n: _make(n, cfg.baseline.to_dict()) for n in names}
    caches = [calibration.prefill(lm, w, cont) for w in wins]
    T = L - cont - 1
    nll: dict[tuple, list[float]] = {}
    t0 = time.perf_counter()
    for ctype, eps in cases:
        for name, dfn in dfns.items():
            vals = []
            for i, (w, cache) in enumerate(zip(wins, caches)):
                region = None if ctype == "clean" else corruptor.region(ctype, eps, T, "eval", i)

                def defend(l, k, v, pos, dfn=dfn, region=region, i=i, ctype=ctype, eps=eps):
                    if region is not None:
                        k, v = corruptor.apply(l, k, v, ctype, eps, region, "eval", i)
                    got = dfn.apply(k, v, defenses.LayerInput(l, pos, cal=cal))
                    return got.k, got.v, got.drop
                vals.append(calibration.window_nll(lm, w, cont, layers, defend, cache))
            nll[ctype, eps, name] = vals
            print(f"{ctype:>18s} {eps:<5g} {name:>18s}: ppl {math.exp(sum(vals) / len(vals)):9.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    clean = math.exp(sum(nll["clean", 0.0, names[0]]) / len(wins)) if ("clean", 0.0, names[0]) in nll else None
    if clean is None:
        return
    print(f"\nrecovered fraction of the log-perplexity damage (clean {names[0]}: {clean:.3f})")
    for ctype, eps in cases:
        if ctype == "clean":
            continue
        base = sum(nll[ctype, eps, names[0]]) / len(wins)
        for name in names[1:]:
            got = sum(nll[ctype, eps, name]) / len(wins)
            print(f"  {ctype} {eps:g} {name}: {(base - got) / (base - math.log(clean)):.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["rule", "measure"])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--examples", type=int, default=6, help="rule: further selection-split examples per task")
    p.add_argument("--cases", default="clean,gaussian:0.64,dropout_zero:0.64")
    p.add_argument("--defenses", default="no_defense,calibrated_repair",
                   help="names, or name@baseline_key=value variants (the first one is the reference)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    a = p.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    if a.what == "rule":
        rule(a.config, a.windows or 12, a.examples, overrides)
        return 0
    cases = [(c.split(":")[0], float(c.split(":")[1]) if ":" in c else 0.0) for c in a.cases.split(",")]
    measure(a.config, a.windows or 24, cases, a.defenses.split(","), overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
