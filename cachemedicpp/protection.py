"""A defense in the user's own code: `protect(model, run_dir=..., defense=...)` around `model.generate(...)`
(or any forward) runs the defense inside the model's attention for the span of the block.

    with cachemedicpp.protect(model, run_dir="runs/quickstart", defense="cachemedic"):
        out = model.generate(ids, max_new_tokens=32)

What it supports: defenses that act inside attention on every forward (`cachemedic`, the trained operator of
`run_dir`) and `no_defense` (the hook selected, nothing done: generation equals the stock model's token for
token). Defenses that act on a stored cache at rest (the calibrated baselines, recomputation) need the grid's
view of a corrupted cache and are refused here with the list of supported names.

What it checks before anything runs: the run dir's config and checkpoint (a missing, damaged or foreign file is
bad input naming it), the model against the run's (`model.name` resolved to its weights, and the operator's
shapes against the model's layers and heads), and that every layer's attention reaches the hook (the
fail-closed probe). The model's own attention implementation is selected again on exit. A detecting operator
(family D) warns once when it attends to a cache longer than the windows it was trained on.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


from cachemedicpp import defenses, hf, repair
from cachemedicpp.config import ConfigError, load_config
from cachemedicpp.results import NO_DEFENSE
from cachemedicpp.rundir import RunDir


def supported() -> list[str]:
    """The defense names `protect` runs: no_defense and every registered in-attention defense."""
    return [n for n in defenses.names() if n == NO_DEFENSE or defenses.get(n).in_attention]


def _same_weights(model, cfg) -> None:
    """The model must be the one the run trained on: its `name_or_path` against the run's model.name."""
    want, _ = hf.model_source(cfg.model.to_dict())
    have = str(getattr(model, "name_or_path", "") or "")
    if have and Path(have).expanduser().resolve() != Path(want).expanduser().resolve() and have != want:
        raise ConfigError(f"protect: the operator of this run dir was trained on model.name="
                          f"{cfg.model.name!r} ({want}), not on this model ({have})")


def operator(model, run_dir: str | Path, defense: str):
    """The trained operator of `run_dir` for `model` (checked), on the model's device and dtype."""
    from cachemedicpp.eval.stage import load_operator, resolve_checkpoint  # eval's checkpoint rules, one place

    rd = RunDir(run_dir)
    stored = rd.stored_config()
    if stored is None:
        raise ConfigError(f"protect: {rd.resolved_config_path} not found (run_dir must be a trained run dir)")
    cfg = load_config(data=stored)
    _same_weights(model, cfg)
    ckpt = resolve_checkpoint(cfg, rd, [defense])
    if ckpt["path"] is None:
        raise ConfigError(f"protect: {rd.path} has no repair checkpoint (run `python -m cachemedicpp.train` first)")
    op = load_operator(cfg, rd, ckpt, hf.arch_info(model))
    if hasattr(op, "trained_positions"):  # a detector: warn once beyond the windows it was trained on
        op.trained_positions = int(cfg.train.prefix_len) + int(cfg.train.cont_len)
    if hasattr(op, "incremental"):  # family E: a decode step repairs only what its memo does not hold
        op.incremental = True
    p = next(model.parameters())
    return op.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)


@contextlib.contextmanager
def protect(model, run_dir: str | Path | None = None, defense: str = "cachemedic") -> Iterator[None]:
    """Run `defense` inside `model`'s attention for the span of the block (see the module docstring)."""
    if defense not in supported():
        raise ConfigError(f"protect: defense {defense!r} does not act inside attention; supported: {supported()}")
    op = None
    if defense != NO_DEFENSE:
        if run_dir is None:
            raise ConfigError(f"protect: defense {defense!r} needs run_dir= (a run dir with its trained operator)")
        op = operator(model, run_dir, defense)
    plan = hf.HookPlan(repair=op) if op is not None else None
    with hf.hook_selected(model), hf.hooked(plan):
        yield
