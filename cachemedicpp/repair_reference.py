"""Reference forms of the repair operator's attention, for tests and the decode benchmark.

`RepairOperator.attend` computes attention over the repaired K̂, V̂ in folded form (the correction
moves onto q and onto the attention output). The forms here compute the same thing the long way, so
tests can check `attend` against them and `python -m cachemedicpp.bench` can show what the folded form
saves. Both are objects the attention hook accepts as `hf.HookPlan.repair` (`layers` and `attend`),
and both use only the operator's public attributes and methods.

- `NaiveRepair`: attention over materialised per-query K̂, V̂ (`reference_attention`);
  O(Tq·Tk·d) memory per head, and it ignores the model's kernel.
- `AugmentedRepair`: the earlier exact factored form, r columns appended to q, K and V.
- `causal_attention`: plain causal attention with the GQA repeat, a stand-in for a model's eager
  kernel when a test calls `attend` directly.
"""

from __future__ import annotations

from typing import Callable

import torch

from cachemedicpp.repair import RepairOperator

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_attention(scaling: float) -> Kernel:
    """kernel(q [B, Hq, Tq, d], k, v [B, Hkv, Tk, d]) -> [B, Tq, Hq, d]; the queries are the last Tq
    positions (like a model's eager kernel during decoding)."""

    def kernel(q, k, v):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = (q @ k.transpose(-1, -2)) * scaling
        tq, tk = q.shape[2], k.shape[2]
        allowed = torch.arange(tk)[None] <= torch.arange(tq)[:, None] + (tk - tq)
        return (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2)

    return kernel


class NaiveRepair:
    """Attention over materialised per-query K̂, V̂ (`reference_attention`, causal for queries
    that are the last Tq positions); ignores the model's kernel."""

    def __init__(self, op: RepairOperator, scaling: float):
        self.op, self.layers, self.scaling = op, op.layers, scaling

    def attend(self, layer: int, q, k, v, kernel: Kernel) -> torch.Tensor:
        return reference_attention(self.op, layer, q, k, v, self.scaling)


class AugmentedRepair:
    """The earlier factored form: r columns appended to q, K and V of every protected layer,
        q·K̂ᵀ = [q, (qU_k) ⊙ α_k]·[K, K W_k]ᵀ,   Σ p V̂ = (p·[V, V W_v]) folded back through U_v.
    Exact, but every decoding step recomputes `K W` over the whole cache and copies K and V into wider
    tensors, so its cost grows with the cache length; `RepairOperator.attend` moves the correction onto
    q and the attention output instead and leaves the cache alone."""

    def __init__(self, op: RepairOperator):
        self.op, self.layers = op, op.layers

    def attend(self, layer: int, q, k, v, kernel: Kernel) -> torch.Tensor:
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
        alpha = self.op.gates(layer, q)  # {"K"|"V": [B, Hq, Tq, r]}
        if "K" in alpha:
            w, u = factors(self.op, layer, "K")
            kw = torch.matmul(k.float(), per_head(w, hkv))
            qu = torch.matmul(q.float(), per_head(u, hq)) * alpha["K"]
            q, k = torch.cat([q, qu.to(q.dtype)], dim=-1), torch.cat([k, kw.to(k.dtype)], dim=-1)
        if "V" in alpha:
            w, u = factors(self.op, layer, "V")
            v = torch.cat([v, torch.matmul(v.float(), per_head(w, hkv)).to(v.dtype)], dim=-1)
        out = kernel(q, k, v)  # [B, Tq, Hq, d (+ r)]
        if "V" not in alpha:
            return out[..., :d]
        pvw = out[..., d:].float().transpose(1, 2) * alpha["V"]  # [B, Hq, Tq, r]
        corr = torch.matmul(pvw, per_head(u, hq).transpose(-1, -2)).transpose(1, 2)
        return out[..., :d] + corr.to(out.dtype)


def factors(op: RepairOperator, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, U) of the K or V correction of `layer`, each [P, d, r] for the operator's P parameter groups.
    Family C shares one set of factors across the protected layers; family B's pair is (B, −B)."""
    return op.factors(layer)[which].wu()


def per_head(m: torch.Tensor, heads: int) -> torch.Tensor:
    """[P, d, r] -> [heads, d, r]: one group's parameters for every head (P = 1), else each KV group's
    parameters for each of its heads (P = number of KV heads, `heads` a multiple of it)."""
    if m.shape[0] == 1:
        return m.expand(heads, *m.shape[1:])
    return m if m.shape[0] == heads else m.repeat_interleave(heads // m.shape[0], dim=0)


def reference_attention(op: RepairOperator, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scaling: float, causal_offset: int | None = None) -> torch.Tensor:
    """Naive attention over materialised per-query K̂, V̂ (causal, queries are the last Tq positions).
    Returns [B, Tq, Hq, d]. O(Tq·Tk·d) memory per head: what the factored form avoids."""
    tq, tk = q.shape[2], k.shape[2]
    kh, vh = op.repaired(layer, q, k, "K"), op.repaired(layer, q, v, "V")  # [B, Hq, Tq, Tk, d]
    scores = torch.einsum("bhtd,bhtsd->bhts", q.float(), kh) * scaling
    off = tk - tq if causal_offset is None else causal_offset
    allowed = torch.arange(tk)[None, :] <= (torch.arange(tq)[:, None] + off)
    scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhts,bhtsd->bhtd", p, vh)
    return out.transpose(1, 2).to(q.dtype)
