"""Repair operators R_phi: tiny query-gated low-rank corrections applied inside attention.

Families (SPEC §5), all with fp32 parameters, identity at initialisation, per-query causal gating and
GQA awareness (K/V arrive with H_kv heads; each query head's gate acts on its KV group):

- A: K̂ = K + ((K W_k) ⊙ α_k(q)) U_kᵀ (same for V), U zero-initialised, α ∈ (0, alpha_max)^r.
- B: X̂ = X − ((X B) ⊙ g(q)) Bᵀ with B orthonormal (QR of a free matrix) and g ∈ [0, alpha_max]^r, so the
     component in span(B) is scaled by (1 − g): never amplifies. A zero-initialised per-rank scale in
     [0, 1] multiplies g, making the untrained operator exactly the identity.
- C: A's form with one set of parameters shared by all protected layers, the gate also fed a learned
     layer embedding (and optionally a KV-head embedding).

Because the correction is low rank and linear in K and V, attention never materialises a per-query K̂
and never touches the cache: the correction moves onto the query and onto the attention output,
    q·K̂_sᵀ = q·K_sᵀ + ((q U_k) ⊙ α_k(q))·(K_s W_k)ᵀ = (q + ((q U_k) ⊙ α_k(q)) W_kᵀ)·K_sᵀ,
    Σ_s p_s V̂_s = o + ((o W_v) ⊙ α_v(q)) U_vᵀ  with o = Σ_s p_s V_s (the weights p sum V̂ linearly).
The model's own kernel (mask, scaling, softcap, GQA repeat) runs once on the unmodified K and V, so the
extra work is O(Tq·d·r) per layer whatever the cache length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from cachemedicpp import config
from cachemedicpp.config import ConfigError, lookup
from cachemedicpp.fileio import load_checkpoint
from cachemedicpp.repair_detect import DetectingOperator, reference_layer
from cachemedicpp.repair_prior import PriorOperator


@dataclass(frozen=True)
class Family:
    """A repair family: what its operator is and what it has (SPEC §5)."""

    name: str
    description: str
    detects: bool = False  # a per-entry detector: its gate, detect_recompute's alarm, the detection metrics
    shrinkage: bool = False  # B's bounded shrinkage in an orthonormal basis (else A's additive correction)
    shared: bool = False  # one set of factors for every protected layer, with layer (and head) embeddings
    calibrated: bool = False  # builds on the model of clean caches: training attaches the run's calibration
    build: Callable | None = None  # (resolved repair section, arch, layers, seed) -> operator; None: RepairOperator


FAMILIES: dict[str, Family] = {}


def register_family(fam: Family) -> Family:
    FAMILIES[fam.name] = fam
    return fam


def family(name: str) -> Family:
    """A registered family by name (unknown -> bad input listing the known ones)."""
    return lookup("family", name, FAMILIES, key="repair.family")


def get_family(name: str) -> str:
    return family(name).name


def detects(op) -> bool:
    """Whether an operator has a per-entry detector (its family says)."""
    return family(op.family).detects


class _Gate(nn.Module):
    """α(q) = alpha_max · sigmoid(W2 · gelu(W1 q + b1) + b2) ⊙ scale, batched over P parameter groups."""

    def __init__(self, groups: int, d_in: int, rank: int, alpha_max: float, init_std: float, zero_scale: bool):
        super().__init__()
        self.alpha_max = alpha_max
        self.w1 = nn.Parameter(torch.randn(groups, d_in, rank) / math.sqrt(d_in))
        self.b1 = nn.Parameter(torch.zeros(groups, rank))
        self.w2 = nn.Parameter(torch.randn(groups, rank, rank) * init_std)
        self.b2 = nn.Parameter(torch.zeros(groups, rank))
        # family B needs g = 0 exactly at init; a clamp passes gradient at 0, so it can still learn
        self.scale = nn.Parameter(torch.zeros(groups, rank)) if zero_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, P, n, d_in] -> [B, P, n, r]
        h = torch.nn.functional.gelu(torch.matmul(x, self.w1) + self.b1[:, None])
        a = self.alpha_max * torch.sigmoid(torch.matmul(h, self.w2) + self.b2[:, None])
        if self.scale is not None:
            a = a * self.scale.clamp(0.0, 1.0)[None, :, None]
        return a


class _Factors(nn.Module):
    """One low-rank correction (for K or for V): W, U of shape [P, d, r] and its gate."""

    def __init__(self, fam: Family, groups: int, d: int, d_in: int, rank: int, alpha_max: float, init_std: float):
        super().__init__()
        self.shrinkage = fam.shrinkage
        if fam.shrinkage:
            self.basis = nn.Parameter(torch.randn(groups, d, rank) / math.sqrt(d))
        else:
            self.w = nn.Parameter(torch.randn(groups, d, rank) / math.sqrt(d))
            self.u = nn.Parameter(torch.zeros(groups, d, rank))  # zero U: identity at initialisation
        self.gate = _Gate(groups, d_in, rank, alpha_max, init_std, zero_scale=fam.shrinkage)

    def wu(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shrinkage:
            basis = torch.linalg.qr(self.basis).Q  # orthonormal columns
            return basis, -basis
        return self.w, self.u


class RepairOperator(nn.Module):
    def __init__(self, family: str, layers: Sequence[int], head_dim: int, num_heads: int, num_kv_heads: int,
                 rank: int = 8, apply_to: str = "KV", alpha_max: float = 0.9, share_across_heads: bool = True,
                 conditioning: Mapping | None = None, init_std: float = 0.02, seed: int = 0):
        super().__init__()
        self.spec = family_spec = lookup("family", family, FAMILIES, key="repair.family")
        self.family = family_spec.name
        if apply_to not in ("K", "V", "KV"):
            raise ConfigError(f"repair.apply_to: {apply_to!r} is not one of K, V, KV")
        if num_heads % num_kv_heads:
            raise ConfigError(f"model has {num_heads} query heads, not a multiple of {num_kv_heads} KV heads")
        self.layers = tuple(sorted(set(int(l) for l in layers)))
        self.d, self.rank, self.apply_to = head_dim, rank, apply_to
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.groups = 1 if share_across_heads else num_kv_heads
        cond = dict(conditioning or {})
        self.use_layer_emb = family_spec.shared and cond.get("use_layer_embedding", True)
        self.use_head_emb = family_spec.shared and cond.get("use_head_embedding", False)
        e = int(cond.get("embed_dim", 8))
        d_in = head_dim + (e if self.use_layer_emb else 0) + (e if self.use_head_emb else 0)
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            make = lambda: nn.ModuleDict({  # noqa: E731
                w: _Factors(family_spec, self.groups, head_dim, d_in, rank, alpha_max, init_std) for w in apply_to})
            if family_spec.shared:
                self.shared = make()
                self.layer_emb = nn.Embedding(len(self.layers), e) if self.use_layer_emb else None
                self.head_emb = nn.Embedding(num_kv_heads, e) if self.use_head_emb else None
            else:
                self.per_layer = nn.ModuleDict({str(l): make() for l in self.layers})
        self.float()

    # ---------------------------------------------------------------------------------------------
    def factors(self, layer: int) -> nn.ModuleDict:
        """The K and V correction factors of `layer` ({"K"|"V": module with .wu() and .gate}); family C
        shares one set across the protected layers."""
        return self.shared if self.spec.shared else self.per_layer[str(layer)]

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Hq, T, d] -> [B, P, n, d] where P is the number of parameter groups."""
        b, hq, t, d = x.shape
        if self.groups == 1:
            return x.reshape(b, 1, hq * t, d)
        return x.reshape(b, self.num_kv_heads, (hq // self.num_kv_heads) * t, d)

    def _ungroup(self, x: torch.Tensor, hq: int, t: int) -> torch.Tensor:
        return x.reshape(x.shape[0], hq, t, x.shape[-1])

    def gates(self, layer: int, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-query gates {"K"|"V": [B, Hq, Tq, r]} (fp32). Position t's gate sees only q_t."""
        b, hq, t, _ = q.shape
        x = q.float()
        extra = []
        if self.spec.shared:
            if self.layer_emb is not None:
                idx = torch.tensor(self.layers.index(layer), device=q.device)
                extra.append(self.layer_emb(idx).expand(b, hq, t, -1))
            if self.head_emb is not None:
                kv_of_head = torch.arange(hq, device=q.device) // (hq // self.num_kv_heads)
                extra.append(self.head_emb(kv_of_head)[None, :, None, :].expand(b, hq, t, -1))
        if extra:
            x = torch.cat([x] + extra, dim=-1)
        xg = self._grouped(x)
        return {w: self._ungroup(f.gate(xg), hq, t) for w, f in self.factors(layer).items()}

    def _per_query_head(self, m: torch.Tensor, hq: int) -> torch.Tensor:
        """[P, d, r] -> [Hq, d, r] (each query head uses its KV group's parameters)."""
        if self.groups == 1:
            return m.expand(hq, *m.shape[1:])
        return m.repeat_interleave(hq // self.num_kv_heads, dim=0)

    def _per_kv_head(self, m: torch.Tensor) -> torch.Tensor:
        return m.expand(self.num_kv_heads, *m.shape[1:]) if self.groups == 1 else m

    # ---------------------------------------------------------------------------------------------
    def _fused(self, layer: int) -> dict | None:
        """Inference form of `layer`'s factors (families A and B, parameters shared across heads): the K and
        V gates' first layers and U_K in one [d, 3r] matrix, the gates' second layers block-diagonal, so a
        decode step runs about half the small kernels. Rebuilt when a parameter changes (its version)."""
        if self.spec.shared or self.groups != 1:
            return None
        facs = self.factors(layer)
        params = [p for f in facs.values() for p in f.parameters()]
        stamp = tuple((p.data_ptr(), p._version) for p in params)
        cache = self.__dict__.setdefault("_fused_cache", {})
        hit = cache.get(layer)
        if hit is not None and hit["stamp"] == stamp:
            return hit
        names, r = list(facs), self.rank
        g = [facs[w].gate for w in names]
        wu = {w: facs[w].wu() for w in names}
        cols = [x.w1[0] for x in g] + ([wu["K"][1][0]] if "K" in wu else [])
        w2 = torch.block_diag(*[x.w2[0] for x in g])
        ones = torch.ones(r, device=w2.device)
        mult = torch.cat([x.alpha_max * (x.scale[0].clamp(0.0, 1.0) if x.scale is not None else ones) for x in g])
        hit = {"stamp": stamp, "names": names, "in": torch.cat(cols, 1).detach(),
               "b1": torch.cat([x.b1[0] for x in g]).detach(), "w2": w2.detach(),
               "b2": torch.cat([x.b2[0] for x in g]).detach(), "mult": mult.detach(),
               "wk_t": wu["K"][0][0].T.detach() if "K" in wu else None,
               "wv": wu["V"][0][0].detach() if "V" in wu else None,
               "uv_t": wu["V"][1][0].T.detach() if "V" in wu else None}
        cache[layer] = hit
        return hit

    def _attend_fused(self, f: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Callable) -> torch.Tensor:
        """`attend` with the fused factors (the same arithmetic up to fp32 rounding; exact zeros stay zeros,
        so an identity operator is still bit-exact)."""
        r, n = self.rank, len(f["names"])
        pre = torch.matmul(q.float(), f["in"])  # [B, Hq, Tq, n·r (+ r: q U_K)]
        h = torch.nn.functional.gelu(pre[..., :n * r] + f["b1"])
        a = f["mult"] * torch.sigmoid(torch.matmul(h, f["w2"]) + f["b2"])
        at = {w: a[..., i * r:(i + 1) * r] for i, w in enumerate(f["names"])}
        if f["wk_t"] is not None:
            q = q + torch.matmul(pre[..., n * r:] * at["K"], f["wk_t"]).to(q.dtype)
        out = kernel(q, k, v)  # [B, Tq, Hq, d]
        if f["wv"] is not None:
            ow = torch.matmul(out.float(), f["wv"]) * at["V"].transpose(1, 2)
            out = out + torch.matmul(ow, f["uv_t"]).to(out.dtype)
        return out

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Attention with the repaired K/V in folded form; returns [B, Tq, Hq, d] like the kernel. Without
        gradients, families A and B take the fused form (`_fused`)."""
        if not torch.is_grad_enabled():
            f = self._fused(layer)
            if f is not None:
                return self._attend_fused(f, q, k, v, kernel)
        hq = q.shape[1]
        facs = self.factors(layer)
        alpha = self.gates(layer, q)  # {"K"|"V": [B, Hq, Tq, r]}
        if "K" in facs:
            w, u = facs["K"].wu()
            qu = torch.matmul(q.float(), self._per_query_head(u, hq)) * alpha["K"]  # [B, Hq, Tq, r]
            q = q + torch.matmul(qu, self._per_query_head(w, hq).transpose(-1, -2)).to(q.dtype)
        out = kernel(q, k, v)  # [B, Tq, Hq, d]
        if "V" in facs:
            w, u = facs["V"].wu()
            ow = torch.matmul(out.float().transpose(1, 2), self._per_query_head(w, hq)) * alpha["V"]
            out = out + torch.matmul(ow, self._per_query_head(u, hq).transpose(-1, -2)).transpose(1, 2).to(out.dtype)
        return out

    def is_identity(self, layer: int) -> bool:
        """True when every correction of `layer` is exactly zero (zero U, or zero B-gate scale). Then
        `attend` adds exact zeros to q and to the output, so it equals the bare kernel bit for bit."""
        for f in self.factors(layer).values():
            z = f.gate.scale if f.shrinkage else f.u
            if bool(z.detach().any()):
                return False
        return True

    def repaired(self, layer: int, q: torch.Tensor, x: torch.Tensor, which: str) -> torch.Tensor:
        """Materialised per-query X̂: [B, Hq, Tq, Tk, d] (reference path for tests and the naive benchmark)."""
        hq, g = q.shape[1], q.shape[1] // x.shape[1]
        xr = x.float().repeat_interleave(g, dim=1)  # [B, Hq, Tk, d]
        facs = self.factors(layer)
        if which not in facs:
            return xr[:, :, None].expand(-1, -1, q.shape[2], -1, -1)
        w, u = facs[which].wu()
        alpha = self.gates(layer, q)[which]  # [B, Hq, Tq, r]
        xw = torch.einsum("bhsd,hdr->bhsr", xr, self._per_query_head(w, hq))
        corr = torch.einsum("bhsr,bhtr,hdr->bhtsd", xw, alpha, self._per_query_head(u, hq))
        return xr[:, :, None] + corr

    def deviation(self, layer: int, q: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, which: str) -> torch.Tensor:
        """Mean over batch of Σ_kv-heads mean_(query heads in group, query positions) ‖X̂(q_t) − ref‖²_F,
        over the first ref.shape[2] positions, in closed form (no per-query X̂ is materialised)."""
        tr = ref.shape[2]
        x = x[:, :, :tr].float()
        dlt = x - ref.float()  # [B, Hkv, S, d]
        dd = dlt.pow(2).sum(dim=(-1, -2))  # [B, Hkv]
        facs = self.factors(layer)
        if which not in facs:
            return dd.sum(-1).mean()
        hq, hkv = q.shape[1], x.shape[1]
        g = hq // hkv
        w, u = facs[which].wu()
        w, u = self._per_kv_head(w), self._per_kv_head(u)
        a = torch.einsum("bhsd,hdr->bhsr", x, w)  # [B, Hkv, S, r]
        c = (a * torch.einsum("bhsd,hdr->bhsr", dlt, u)).sum(2)  # [B, Hkv, r]
        m = torch.einsum("hdr,hds->hrs", u, u)[None] * torch.einsum("bhsr,bhsq->bhrq", a, a)  # [B, Hkv, r, r]
        alpha = self.gates(layer, q)[which]  # [B, Hq, Tq, r]
        alpha = alpha.reshape(alpha.shape[0], hkv, g * alpha.shape[2], -1)  # [B, Hkv, n, r]
        lin = 2 * torch.einsum("bhnr,bhr->bhn", alpha, c)
        quad = torch.einsum("bhnr,bhrq,bhnq->bhn", alpha, m, alpha)
        return (dd + (lin + quad).mean(-1)).sum(-1).mean()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_operator(repair_cfg: Mapping, arch, seed: int = 0) -> RepairOperator:
    """Operator for a `repair` config section (schema defaults fill what it lacks) and an `hf.ArchInfo`."""
    repair_cfg = config.section_defaults("repair", repair_cfg)
    layers = list(repair_cfg["protect_layers"])
    bad = [l for l in layers if l >= arch.num_layers]
    if bad:
        raise ConfigError(f"repair.protect_layers: {bad} out of range for a {arch.num_layers}-layer model")
    if not layers:
        raise ConfigError("repair.protect_layers: empty")
    return (family(repair_cfg["family"]).build or _build_low_rank)(repair_cfg, arch, layers, seed)


def _build_low_rank(repair_cfg: Mapping, arch, layers: list[int], seed: int) -> RepairOperator:
    return RepairOperator(repair_cfg["family"], layers, arch.head_dim, arch.num_heads, arch.num_kv_heads,
                          rank=repair_cfg["rank"], apply_to=repair_cfg["apply_to"], alpha_max=repair_cfg["alpha_max"],
                          share_across_heads=repair_cfg["share_across_heads"], conditioning=repair_cfg["conditioning"],
                          init_std=repair_cfg["init_std"], seed=seed)


def _check_apply_to(repair_cfg: Mapping) -> None:
    """The per-entry families (D, E) correct K, V or both."""
    if repair_cfg["apply_to"] not in ("K", "V", "KV"):
        raise ConfigError(f"repair.apply_to: {repair_cfg['apply_to']!r} is not one of K, V, KV")


def _build_detecting(repair_cfg: Mapping, arch, layers: list[int], seed: int) -> DetectingOperator:
    det = repair_cfg["detector"]
    req = det["reference_layer"]
    if isinstance(req, str) and req != "auto":
        raise ConfigError(f"repair.detector.reference_layer: {req!r} is not auto, null or a layer index")
    ref = reference_layer(layers, arch, req)
    if ref is not None and (ref in layers or not 0 <= ref < arch.num_layers):
        raise ConfigError(f"repair.detector.reference_layer: {ref} must be an unprotected layer of the "
                          f"{arch.num_layers}-layer model")
    if ref is not None and ref in arch.sliding_layers:
        raise ConfigError(f"repair.detector.reference_layer: layer {ref} is a sliding-window layer (its cache "
                          "does not hold every position); name a full-attention layer or null")
    if arch.num_heads % arch.num_kv_heads:
        raise ConfigError(f"model has {arch.num_heads} query heads, not a multiple of {arch.num_kv_heads} KV heads")
    _check_apply_to(repair_cfg)
    return DetectingOperator(layers, arch.head_dim, arch.num_heads, arch.num_kv_heads, rank=repair_cfg["rank"],
                             apply_to=repair_cfg["apply_to"], hidden=int(det["hidden"]), reference_layer=ref,
                             sink_tokens=int(det["sink_tokens"]), ramp=float(det["ramp"]),
                             suppress=bool(det["suppress"]), correct=bool(det["correct"]),
                             score_block=int(det["score_block"]), seed=seed)


def _build_prior(repair_cfg: Mapping, arch, layers: list[int], seed: int) -> PriorOperator:
    sliding = sorted(set(layers) & set(arch.sliding_layers))
    if sliding:
        raise ConfigError(f"repair.family E: protected layers {sliding} hold a sliding window (the positions of "
                          "their entries are not known to the operator); protect full-attention layers only")
    _check_apply_to(repair_cfg)
    return PriorOperator(layers, arch.head_dim, arch.num_heads, arch.num_kv_heads, rank=repair_cfg["rank"],
                         apply_to=repair_cfg["apply_to"], seed=seed)


register_family(Family("A", "query-gated low-rank additive correction"))
register_family(Family("B", "bounded shrinkage in a learned orthonormal basis", shrinkage=True))
register_family(Family("C", "one operator of A's form shared by the protected layers, with layer embeddings",
                       shared=True))
register_family(Family("D", "a per-entry detector gating a correction (and an attention bias)", detects=True,
                       build=_build_detecting))
register_family(Family("E", "calibrated_repair with a learned harm-aware gate and low-rank residual",
                       calibrated=True, build=_build_prior))


def expected_params(name: str, d: int, r: int, n_layers: int, apply_to: str = "KV", groups: int = 1,
                    embed: int = 0) -> int:
    """Closed-form parameter count (the SPEC's ≈ 6dr + 2r² per layer for KV, plus gate biases)."""
    fam = family(name)
    per = 2 * d * r + r * r + 3 * r if fam.shrinkage else 3 * d * r + r * r + 2 * r
    if fam.shared:  # one set for every layer; the gate also reads the layer embedding
        return len(apply_to) * (per + embed * r) * groups
    return len(apply_to) * per * groups * n_layers


# --------------------------------------------------------------------------------------------------
# checkpoints: repair-only files `checkpoints/repair_step_<N>.pt`


def repair_checkpoint_payload(op: RepairOperator, step: int, config_hash: str, repair_cfg: Mapping) -> dict:
    return {"format": "cachemedicpp.repair/1", "step": int(step), "config_hash": config_hash,
            "repair": dict(repair_cfg), "state_dict": {k: v.detach().cpu().clone() for k, v in op.state_dict().items()}}


def load_repair_checkpoint(path, repair_cfg: Mapping, arch, seed: int = 0) -> tuple[RepairOperator, dict]:
    """Rebuild the operator from a repair checkpoint; a damaged or mismatched file is bad input."""
    payload = load_checkpoint(path, "repair checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != "cachemedicpp.repair/1":
        raise ConfigError(f"repair checkpoint {path}: not a cachemedicpp repair checkpoint")
    op = build_operator(repair_cfg, arch, seed)
    stored = (payload.get("repair") or {}).get("family")
    if stored is not None and stored != repair_cfg["family"]:
        raise ConfigError(f"repair checkpoint {path}: holds a family-{stored} operator, the config asks for "
                          f"repair.family={repair_cfg['family']}")
    try:
        op.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"repair checkpoint {path} does not match the configured operator: {e}") from None
    return op, payload
