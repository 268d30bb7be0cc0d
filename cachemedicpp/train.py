"""train: self-distillation of the repair operator (SPEC §6).

    python -m cachemedicpp.train --config <YAML> --run_dir <DIR> [--resume|--no-resume] [--set k=v]

One step: a batch of windows of prefix_len + cont_len training tokens; the prefix is prefilled clean
once; the teacher (frozen model, clean cache) and the student (same model, cache corrupted at rest,
repair active) both process the continuation; only the operator's fp32 parameters learn. Every draw
(data windows, clean/corrupt, type, ε, noise) derives from (seed, step[, row]), never from a shared
stream, so a resumed run is bit-identical to an uninterrupted one.

Pause (`control/pause.request`, SIGTERM, SIGINT), periodic saves and the end of the run share one save
path; a pause saves only the resumable state, so a paused-and-resumed run leaves exactly the files of
an uninterrupted one.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from cachemedicpp import calibration, corruption, data, hf, memory
from cachemedicpp.cli import run_phase
from cachemedicpp.config import Config, ConfigError
from cachemedicpp.corruption import Corruptor, Region
from cachemedicpp.seeding import torch_rng as rng
from cachemedicpp.repair import build_operator, detects, family, repair_checkpoint_payload
from cachemedicpp.repair_detect import set_threshold, training_caches
from cachemedicpp.cli import EXIT_OK
from cachemedicpp.fileio import atomic_torch_save, atomic_write_bytes, load_checkpoint, read_jsonl, truncate_jsonl
from cachemedicpp.phase import Done, Heartbeat, JsonlLog, PhaseSession, run_units
from cachemedicpp.rundir import RunDir

PHASE = "train"
STATE_FORMAT = "cachemedicpp.train_state/1"
LOSS_KEYS = ("loss_total", "loss_kd", "loss_id", "loss_contr", "rho_mean", "rho_p95", "loss_det", "loss_rec",
             "det_recall", "det_false_positive")


class Trainer:
    """The model, the operator, its optimizer, the training tokens and the corruptor of one run."""

    def __init__(self, cfg: Config, lm: hf.LoadedModel, cal=None):
        self.cfg, self.lm = cfg, lm
        t = cfg.train
        self.protect = list(cfg.repair.protect_layers)
        self.op = build_operator(cfg.repair.to_dict(), lm.arch, seed=cfg.seed).to(lm.device)
        self.opt = torch.optim.Adam(self.op.parameters(), lr=t.lr)
        self.window = t.prefix_len + t.cont_len
        if self.window > lm.arch.max_positions:
            raise ConfigError(f"train.prefix_len + train.cont_len = {self.window} exceeds the model window "
                              f"({lm.arch.max_positions})")
        text, self.data_source = data.load_text(cfg.data.to_dict(), "train_corpus")
        self.tokens = data.tokenize_stream(lm.tokenizer, text)
        if self.tokens.numel() <= self.window:
            raise ConfigError(f"training text ({self.data_source}) has {self.tokens.numel()} tokens, "
                              f"fewer than one window of {self.window}")
        donors = corruption.donors(cfg.corruption.params, lm, cfg.corruption.mixture, t.prefix_len, self.protect)
        self.corruptor = Corruptor(cfg.corruption.to_dict(), self.protect, lm.arch.num_kv_heads, cfg.seed, **donors)
        self.detecting = detects(self.op)
        rr = t.random_regions
        self.random_regions = self.detecting if rr == "auto" else bool(rr)
        self.threshold_caches: list | None = None
        if self.detecting:
            self.op.fit(self._clean_caches("detector-fit"))
        self.calibrated = family(self.op.family).calibrated
        if self.calibrated:  # family E: the clean-cache model it builds on, copied into the operator
            if cal is None:
                raise ConfigError(f"repair.family {self.op.family} builds on the run's calibration; none was given")
            self.op.attach(cal, float(cfg.baseline.repair_range_margin), float(cfg.baseline.repair_noise_margin))

    def _clean_caches(self, stream: str) -> list[dict]:
        return training_caches(self.cfg, self.lm, self.op, self.tokens, stream)

    def detector_threshold(self) -> tuple[dict, dict]:
        """Family D: the operator's state with τ set on fresh clean training windows (the training state
        keeps τ = 0), and the per-layer record of the rule."""
        if self.threshold_caches is None:
            self.threshold_caches = self._clean_caches("detector-threshold")
        tau = self.op.tau.clone()
        try:
            record = set_threshold(self.op, self.threshold_caches, float(self.cfg.repair.detector.threshold_margin))
            state = {k: v.detach().cpu().clone() for k, v in self.op.state_dict().items()}
        finally:
            self.op.tau.copy_(tau)
        return state, record

    def random_region(self, T: int, step: int, row: int) -> Region:
        """A per-(step, row) region: a random subset of the protected layers (each kept with a probability
        drawn in [0.25, 1]), all heads or a random subset, and the old region or a random time window
        (sometimes sparing the first positions). Drawn from (seed, step, row) only."""
        g = rng(self.cfg.seed, "train-region", step, row)
        u = torch.rand(8, generator=g, dtype=torch.float64).tolist()
        H = self.lm.arch.num_kv_heads
        p_layer = 0.25 + 0.75 * u[0]
        keep = torch.rand(len(self.protect), generator=g, dtype=torch.float64) < p_layer
        if not bool(keep.any()):
            keep[int(u[1] * len(self.protect)) % len(self.protect)] = True
        layers = tuple(l for l, k in zip(self.protect, keep.tolist()) if k)
        heads = {}
        for l in layers:
            h = torch.ones(H, dtype=torch.bool) if u[2] < 0.5 else torch.rand(H, generator=g) < 0.5
            if not bool(h.any()):
                h[int(torch.randint(0, H, (1,), generator=g))] = True
            heads[l] = h
        recent = int(self.cfg.corruption.axes.N_recent)
        time = torch.zeros(T, dtype=torch.bool)
        if u[3] < 0.3:
            time[: max(1, T - recent)] = True  # the evaluation's old region
        else:
            start = 0 if u[4] < 0.4 else int(u[5] * (T - 1))
            length = 1 + int(u[6] * (T - start - 1))
            time[start:start + length] = True
        return Region(layers, heads, time)

    def batch(self, step: int) -> torch.Tensor:
        """batch_size windows at positions drawn from (seed, step, row): no data cursor to save."""
        hi = self.tokens.numel() - self.window
        rows = []
        for b in range(self.cfg.train.batch_size):
            start = int(torch.randint(0, hi + 1, (1,), generator=rng(self.cfg.seed, "train-data", step, b)))
            rows.append(self.tokens[start:start + self.window])
        return torch.stack(rows).to(self.lm.device)

    def corrupt(self, clean: dict, ctype: str, eps: float, step: int) -> tuple[dict, dict]:
        """At-rest corruption of the clean prefix K/V; each batch row is its own example (own draws)."""
        rows, reports = [], []
        for b in range(next(iter(clean.values()))[0].shape[0]):
            kv = {l: (k[b:b + 1], v[b:b + 1]) for l, (k, v) in clean.items()}
            region = None
            T = int(self.cfg.train.prefix_len)  # the context; a sliding-window layer holds only its last ones
            if self.random_regions:
                region = self.random_region(T, step, b)
            out, rep = self.corruptor.apply_cache(kv, ctype, eps, "train", (step, b), region=region, T=T)
            rows.append(out)
            reports.append(rep.to_dict())
        merged = {l: (torch.cat([r[l][0] for r in rows]), torch.cat([r[l][1] for r in rows])) for l in clean}
        return merged, _merge_reports(reports)

    def step(self, step: int) -> dict:
        cfg, t, model = self.cfg, self.cfg.train, self.lm.model
        ids = self.batch(step)
        prefix, cont = ids[:, :t.prefix_len], ids[:, t.prefix_len:]
        ctype, eps = self.corruptor.sample("train", step, cfg.corruption.eps_grid, t.clean_batch_prob)
        with torch.no_grad():
            # only the cache is needed from the prefill: skip the vocabulary projection of the prefix
            _, cache = hf.forward(model, prefix, logits_to_keep=1)
            clean = {l: hf.get_kv(cache, l) for l in self.protect}  # the cache update concatenates: never mutated
            student = hf.clone_cache(cache)
            z_clean, _ = hf.forward(model, cont, cache)
        changed, on_read = None, None
        if ctype is not None:
            if cfg.corruption.persistence == "on_read":
                read = self.corruptor.on_read(ctype, eps, "train", step)
                # keys read are the last of prefix + continuation (all of them, or a sliding layer's window)
                on_read = lambda l, k, v: read(l, k, v, length=ids.shape[1])  # noqa: E731
            else:
                corrupted, changed = self.corrupt(clean, ctype, eps, step)
                for l, (k, v) in corrupted.items():
                    hf.set_kv(student, l, k, v)
        kd_base = None
        if ctype is not None and (step % t.log_every == 0 or step == t.steps):
            # on logged steps only: the same corrupted cache without repair, a paired baseline for L_KD
            with torch.no_grad():
                z_base, _ = hf.forward(model, cont, hf.clone_cache(student), hf.HookPlan(on_read=on_read))
                # a KL divergence is >= 0; where the corruption barely moves the logits, fp32 rounding leaves
                # a residue of about -1e-7, which is no information
                kd_base = max(0.0, float(kd_loss(z_clean, z_base, t.temperature)))
        seen: dict[int, tuple] = {}
        plan = hf.HookPlan(repair=self.op, on_read=on_read, record=lambda l, q, k, v: seen.__setitem__(l, (q, k, v)))
        z_rep, _ = hf.forward(model, cont, student, plan)

        kd = kd_loss(z_clean, z_rep, t.temperature)
        det = None
        gate = None
        if self.detecting:
            loss_id, det = self.detector_losses(seen, clean, plan.memo)
            loss_contr, rhos = torch.zeros((), device=kd.device), []
            loss = kd + t.lambda_id * loss_id + t.lambda_det * det["loss_det"] + t.lambda_rec * det["loss_rec"]
        elif self.calibrated:
            gate = self.op.gate_mean()  # the gates of this forward's flagged entries
            loss_id, loss_contr, rhos = torch.zeros((), device=kd.device), torch.zeros((), device=kd.device), []
            loss = kd + t.lambda_gate * gate
        else:
            loss_id, loss_contr, rhos = self.state_losses(seen, clean, corrupted=ctype is not None)
            loss = kd + t.lambda_id * loss_id + t.lambda_contr * loss_contr
        if t.lambda_w > 0:
            loss = loss + t.lambda_w * sum(p.pow(2).sum() for p in self.op.parameters())
        self.opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.op.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
            self.opt.step()
        else:  # family E on a cache it flags nowhere: the operator did not act, nothing to learn from this step
            grad_norm = torch.zeros(())
        rhos_t = torch.tensor(rhos) if rhos else None
        return {
            "loss_total": float(loss.detach()), "loss_kd": float(kd.detach()), "loss_id": float(loss_id.detach()),
            "loss_contr": float(loss_contr.detach()),
            "rho_mean": float(rhos_t.mean()) if rhos_t is not None else None,
            "rho_p95": float(torch.quantile(rhos_t, 0.95)) if rhos_t is not None else None,
            "loss_det": float(det["loss_det"].detach()) if det else None,
            "loss_rec": float(det["loss_rec"].detach()) if det else None,
            "det_recall": det["recall"] if det else None,
            "det_false_positive": det["false_positive"] if det else None,
            "gate_mean": float(gate.detach()) if gate is not None else None,
            "loss_kd_no_repair": kd_base,
            "grad_norm": float(grad_norm),
            "corruption": {"type": ctype or "clean", "epsilon": eps, "persistence": cfg.corruption.persistence,
                           "changed": changed},
            # processed tokens: prefill + teacher + student
            "tokens": int(ids.numel() + cont.numel()),
        }

    def state_losses(self, seen: dict, clean: dict, corrupted: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
        """L_id on clean steps, L_contr on corrupted ones (only over layers the corruption changed)."""
        t = self.cfg.train
        dev = self.lm.device
        loss_id, loss_contr, rhos = torch.zeros((), device=dev), torch.zeros((), device=dev), []
        for l in self.protect:
            q, k_read, v_read = seen[l]
            kc, vc = clean[l]
            dev_k = self.op.deviation(l, q, k_read, kc, "K")
            dev_v = self.op.deviation(l, q, v_read, vc, "V")
            if not corrupted:
                norm = _sq(kc) + _sq(vc)
                loss_id = loss_id + (dev_k + dev_v) / (norm + 1e-8)
                continue
            p = kc.shape[2]
            den = (_sq(k_read[:, :, :p] - kc).sqrt() + _sq(v_read[:, :, :p] - vc).sqrt()).detach()
            if den <= t.rho_min_denominator * (_sq(kc).sqrt() + _sq(vc).sqrt()):
                continue  # this layer was not changed by the corruption: ρ is undefined there
            rho = (dev_k.clamp_min(0).add(1e-12).sqrt() + dev_v.clamp_min(0).add(1e-12).sqrt()) / den
            rhos.append(float(rho.detach()))
            loss_contr = loss_contr + torch.relu(rho - t.alpha_contr).pow(2)
        return loss_id, loss_contr, rhos

    def detector_losses(self, seen: dict, clean: dict, memo: dict) -> tuple[torch.Tensor, dict]:
        """Family D. Over the prefix entries (sinks excluded) of every protected layer, with `changed` the
        entries the corruption altered (read vs clean, K or V):
        - L_det: balanced BCE of the detector score against `changed` (mean over changed + mean over
          untouched, halved; untouched only on clean steps);
        - L_rec: Σ‖X + ΔX − X_clean‖² / (Σ‖X − X_clean‖² + 0.01 Σ‖X_clean‖²) over changed finite entries
          (below its no-correction value: the correction moves them towards the clean cache; the floor keeps
          a barely changed entry from dominating);
        - L_id: Σ‖ΔX‖² / Σ‖X‖² over the untouched entries (corrupted and clean steps alike).
        Also the detector's recall and false-positive rate (fraction of changed / untouched entries gated)."""
        dev = self.lm.device
        s0 = self.op.sink
        scores, labels, gates = [], [], []
        rec_num = rec_den = rec_floor = id_num = id_den = torch.zeros((), device=dev)
        for l in self.protect:
            _, k_read, v_read = seen[l]
            kc, vc = clean[l]
            p = kc.shape[2]
            m = memo[l]
            kr, vr = k_read[:, :, s0:p].float(), v_read[:, :, s0:p].float()
            kc, vc = kc[:, :, s0:].float(), vc[:, :, s0:].float()
            changed = ((kr != kc) | (vr != vc)).any(-1)  # [B, H, p - s0] (NaN != NaN counts as changed)
            scores.append(m["score"][:, :, s0:p].reshape(-1))
            labels.append(changed.reshape(-1))
            gates.append(m["gate"][:, :, s0:p].detach().reshape(-1))
            dk = m["dk"][:, :, s0:p] if m["dk"] is not None else torch.zeros_like(kr)
            dv = m["dv"][:, :, s0:p] if m["dv"] is not None else torch.zeros_like(vr)
            fin = (torch.isfinite(kr).all(-1) & torch.isfinite(vr).all(-1))[..., None]
            ch = changed[..., None] & fin
            zero = torch.zeros((), device=dev)
            rec_num = rec_num + torch.where(ch, (kr + dk - kc).pow(2) + (vr + dv - vc).pow(2), zero).sum()
            rec_den = rec_den + torch.where(ch, (kr - kc).pow(2) + (vr - vc).pow(2), zero).sum().detach()
            rec_floor = rec_floor + torch.where(ch, kc.pow(2) + vc.pow(2), zero).sum().detach()
            un = ~changed[..., None]
            id_num = id_num + torch.where(un, dk.pow(2) + dv.pow(2), zero).sum()
            id_den = id_den + torch.where(un, kc.pow(2) + vc.pow(2), zero).sum().detach()
        s, y, g = torch.cat(scores), torch.cat(labels), torch.cat(gates)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        neg = bce(s[~y], torch.zeros_like(s[~y])) if bool((~y).any()) else torch.zeros((), device=dev)
        loss_det = 0.5 * (bce(s[y], torch.ones_like(s[y])) + neg) if bool(y.any()) else neg
        loss_rec = rec_num / (rec_den + 0.01 * rec_floor) if float(rec_den) > 0 else torch.zeros((), device=dev)
        loss_id = id_num / (id_den + 1e-8)
        return loss_id, {
            "loss_det": loss_det, "loss_rec": loss_rec,
            "recall": float((g[y] > 0).float().mean()) if bool(y.any()) else None,
            "false_positive": float((g[~y] > 0).float().mean()) if bool((~y).any()) else None}

    # -- state -------------------------------------------------------------------------------------
    def state(self, step: int, elapsed: float, chash: str) -> dict:
        return {"format": STATE_FORMAT, "step": step, "elapsed_sec": elapsed, "config_hash": chash,
                "operator": {k: v.detach().cpu().clone() for k, v in self.op.state_dict().items()},
                "optimizer": self.opt.state_dict(), "data_source": self.data_source,
                "rng": "stateless: every draw is seeded by (seed, step[, row])"}

    def load_state(self, state: dict, path: Path) -> None:
        try:
            self.op.load_state_dict(state["operator"])
            self.opt.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"train state {path} does not match the configured operator: {e}") from None


def kd_loss(z_clean: torch.Tensor, z_rep: torch.Tensor, temp: float) -> torch.Tensor:
    """T² · KL(softmax(z_clean/T) ‖ softmax(z_rep/T)) in fp32, averaged over rows and positions."""
    logp_clean = torch.log_softmax(z_clean.float() / temp, dim=-1)
    logp_rep = torch.log_softmax(z_rep.float() / temp, dim=-1)
    return temp**2 * (logp_clean.exp() * (logp_clean - logp_rep)).sum(-1).mean()


def _sq(x: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm with the batch convention of RepairOperator.deviation: mean_b ‖x_b‖²."""
    return x.float().pow(2).sum(dim=tuple(range(1, x.dim()))).mean()


def _merge_reports(reports: list[dict]) -> dict:
    """One change report for a batch: norms add in quadrature over rows, fractions are averaged."""
    if len(reports) == 1:
        return reports[0]
    out = {k: reports[0][k] for k in ("type", "epsilon", "severity")}
    out["dK"] = math.sqrt(sum(r["dK"] ** 2 for r in reports))
    out["dV"] = math.sqrt(sum(r["dV"] ** 2 for r in reports))
    out["frac_changed"] = sum(r["frac_changed"] for r in reports) / len(reports)
    out["exposure"] = sum(r["exposure"] for r in reports) / len(reports)
    out["evicted"] = sum(r["evicted"] for r in reports) / len(reports)
    out["per_layer"] = {
        l: {"dK": math.sqrt(sum(r["per_layer"][l]["dK"] ** 2 for r in reports)),
            "dV": math.sqrt(sum(r["per_layer"][l]["dV"] ** 2 for r in reports)),
            "frac_changed": sum(r["per_layer"][l]["frac_changed"] for r in reports) / len(reports),
            "exposure": sum(r["per_layer"][l]["exposure"] for r in reports) / len(reports),
            "evicted": sum(r["per_layer"][l]["evicted"] for r in reports) / len(reports)}
        for l in reports[0]["per_layer"]}
    return out


# --------------------------------------------------------------------------------------------------
# run directory bookkeeping


def read_state(path: Path, chash: str | None = None) -> dict:
    """A train state file, checked; a damaged or foreign file is bad input naming the file."""
    state = _intact_state(path)
    _check_owner(state, path, chash)
    return state


def _intact_state(path: Path) -> dict:
    """A state file that loads and is a training state; ConfigError (naming the file) when it is damaged."""
    state = load_checkpoint(path, "train state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConfigError(f"train state {path}: not a cachemedicpp training state; delete it or rerun with --no-resume")
    return state


def _check_owner(state: dict, path: Path, chash: str | None) -> None:
    if chash is not None and state.get("config_hash") != chash:
        raise ConfigError(f"train state {path} belongs to config {state.get('config_hash')}, not {chash}")


@dataclass
class ResumePoint:
    """The state a run resumes from, and why it is not train_state_latest.pt when it is not."""

    path: Path
    state: dict
    fallback: str | None = None  # what was wrong with the newer states; None when latest was used

    @property
    def step(self) -> int:
        return int(self.state["step"])


def resume_point(rd: RunDir, chash: str | None = None) -> ResumePoint | None:
    """The newest intact training state: train_state_latest.pt, or, when that is missing or unreadable
    (a torn file must not end the run), the newest periodic state that loads. Each candidate is verified
    by loading it. None when the run has no state at all; bad input when states exist but none is intact,
    or when the one found belongs to another config (that is not damage: never skipped)."""
    latest = rd.train_state()
    periodic = [p for _, p in sorted(rd.periodic_states().items(), reverse=True)]
    candidates = ([latest] if latest.is_file() else []) + periodic
    if not candidates:
        return None
    damaged: list[str] = [] if latest.is_file() else [f"{latest.name} missing"]
    for path in candidates:
        try:
            state = _intact_state(path)
        except ConfigError as e:
            damaged.append(f"{path.name} unreadable: {_first_line(e)}")
            continue
        _check_owner(state, path, chash)
        return ResumePoint(path, state, "; ".join(damaged) if path != latest else None)
    tried = ", ".join(p.name for p in periodic) or "none"
    raise ConfigError(f"no intact training state to resume from in {rd.checkpoints}: {latest} "
                      f"{'is missing' if not latest.is_file() else 'is corrupted or unreadable'} and no periodic "
                      f"state loads (tried: {tried}; {'; '.join(damaged)}); delete them or rerun with --no-resume")


def _first_line(e: ConfigError, limit: int = 160) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fall_back(rd: RunDir, point: ResumePoint, hb: Heartbeat) -> str:
    """Resume from an older state than train_state_latest.pt: say so (stderr, and every heartbeat of this
    session), and make the resume point whole again before any work, so that a pause right away, or the
    next resume, finds an intact latest state."""
    atomic_write_bytes(rd.train_state(), point.path.read_bytes())
    why = f"resume from {rd.rel(point.path)} ({point.fallback})"
    hb.extra = {"resumed_from": rd.rel(point.path), "resume_fallback": point.fallback}
    print(f"train: {why}; the steps after {point.step} are recomputed", file=sys.stderr)
    return why


def _clear_previous(rd: RunDir) -> None:
    for p in rd.training_files():
        p.unlink()


# --------------------------------------------------------------------------------------------------
# the phase


def run(cfg: Config, run_dir: str | Path, *, resume: bool = True, config_path: str | None = None,
        sweep_pause: Path | None = None) -> int:
    t = cfg.train
    latest = RunDir(run_dir).train_state()
    if resume:
        resume_point(RunDir(run_dir))  # no intact state: refused before anything in the run dir is touched
    with PhaseSession(cfg, run_dir, PHASE, config_path, sweep_pause=sweep_pause) as s:
        rd = s.rd
        if not resume:
            _clear_previous(rd)
        point = resume_point(rd, cfg.hash) if resume else None
        state = point.state if point else None
        start, elapsed = (int(state["step"]), float(state["elapsed_sec"])) if state else (0, 0.0)
        truncate_jsonl(rd.log(PHASE), lambda r: r.get("step", 0) <= start)
        hb = s.heartbeat(t.steps, elapsed_before=elapsed)
        fallback = _fall_back(rd, point, hb) if point is not None and point.fallback else None
        hb.latest = {"checkpoint": rd.rel(rd.latest_repair_checkpoint()),
                     "state": rd.rel(latest if latest.is_file() else None)}
        s.step = start
        if start >= t.steps and rd.repair_checkpoint(t.steps).is_file():
            hb.beat("completed", start, reason="; ".join(filter(None, ["already complete", fallback])), force=True)
            _summary(rd, t.steps, elapsed)
            return EXIT_OK
        hb.beat("resumed" if start else "running", start, reason=(fallback or "resume") if start else "start",
                force=True)

        torch.manual_seed(cfg.seed)
        lm = hf.load_model(cfg.model.to_dict(), cfg.device, cfg.dtype)
        cal = calibration.obtain(cfg, lm, rd.calibration) if family(cfg.repair.family).calibrated else None
        trainer = Trainer(cfg, lm, cal)
        if state is not None:
            trainer.load_state(state, point.path)
        log = JsonlLog(rd.log(PHASE), s.run_id, PHASE)

        def save(step: int, repair: bool, periodic: bool) -> None:
            # order matters for a kill mid-save: outputs first, the resume point last
            st = trainer.state(step, hb.elapsed(), cfg.hash)
            if repair:
                rep = rd.repair_checkpoint(step)
                payload = repair_checkpoint_payload(trainer.op, step, cfg.hash, cfg.repair.to_dict())
                payload["data_source"] = trainer.data_source
                if trainer.detecting:
                    payload["state_dict"], payload["detector_threshold"] = trainer.detector_threshold()
                atomic_torch_save(rep, payload)
                hb.latest["checkpoint"] = rd.rel(rep)
            if periodic:
                atomic_torch_save(rd.train_state(step), st)
            atomic_torch_save(latest, st)
            hb.latest["state"] = rd.rel(latest)

        def one_step(step: int) -> Done:
            t0 = time.perf_counter()
            out = trainer.step(step)
            dt = time.perf_counter() - t0
            tps = out.pop("tokens") / dt if dt > 0 else None
            if step % t.log_every == 0 or step == t.steps:
                log.write(step, **out, tokens_per_sec=tps, peak_memory_mb=memory.peak_mib(lm.device),
                          memory_kind="cuda_max_allocated" if lm.device.type == "cuda" else "process_max_rss",
                          lr=trainer.opt.param_groups[0]["lr"], step_time_sec=dt)
            if step % t.save_every == 0 and step != t.steps:
                save(step, repair=True, periodic=True)
            return Done(tps, {"loss": f"{out['loss_total']:.4f}", "kd": f"{out['loss_kd']:.4f}"})

        code = run_units(s, range(start + 1, t.steps + 1), name=lambda step: f"step {step}", work=one_step,
                         save=lambda: save(s.step, repair=False, periodic=False), state=latest, total=t.steps,
                         unit="step")
        if code != EXIT_OK:
            return code
        save(t.steps, repair=True, periodic=True)
        hb.beat("completed", t.steps, reason="done", force=True)
        _summary(rd, t.steps, hb.elapsed())
        return EXIT_OK


def kd_trend(records: list[dict], frac: float = 0.2) -> dict:
    """Corrupted-step KD over the first and the last `frac` of the logged corrupted steps: the mean, and
    the paired ratio Σ KD(repair) / Σ KD(no repair) on the same draws (below 1: the repair helps)."""
    corr = [r for r in records if r.get("corruption", {}).get("type") not in (None, "clean")]
    n = max(1, int(len(corr) * frac))
    out = {"logged": len(corr)}
    for name, part in (("first", corr[:n]), ("last", corr[-n:])):
        out[f"kd_{name}"] = sum(r["loss_kd"] for r in part) / len(part) if part else math.nan
        paired = [r for r in part if r.get("loss_kd_no_repair") is not None]
        base = sum(r["loss_kd_no_repair"] for r in paired)
        out[f"ratio_{name}"] = sum(r["loss_kd"] for r in paired) / base if base > 0 else math.nan
    return out


def _summary(rd: RunDir, steps: int, elapsed: float) -> None:
    k = kd_trend(read_jsonl(rd.log(PHASE)))
    print(f"train: {steps} steps in {elapsed:.1f}s; corrupted-step KD {k['kd_first']:.4f} -> {k['kd_last']:.4f} "
          f"(first -> last fifth of {k['logged']} logged), with/without repair {k['ratio_first']:.3f} -> "
          f"{k['ratio_last']:.3f}; checkpoint {rd.repair_checkpoint(steps)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    return run_phase(PHASE, "Train the KV-cache repair operator by self-distillation.", argv,
                     lambda cfg, run_dir, a: run(cfg, run_dir, resume=a.resume, config_path=a.config))


if __name__ == "__main__":
    raise SystemExit(main())
