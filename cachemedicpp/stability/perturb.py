"""What the sensitivity curves and the amplification map share for one prompt: its clean state, the
perturbation added to a row of a batched cache, and the drift of the last token's logits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cachemedicpp import hf
from cachemedicpp.stability.setup import Setup


@dataclass
class CleanState:
    """The clean state S of one prompt: the KV cache of a clean prefill of prompt[:-1]."""

    cache: Any
    token: torch.Tensor  # the last prompt token, processed over S (or a perturbed copy) for z(S)
    time: dict[int, torch.Tensor]  # per stability layer: bool [cached positions], the segment it holds
    rms: dict[int, tuple[float, float]]  # per stability layer: RMS of its whole K and of its whole V
    length: int = 0  # cached positions (a sliding layer holds only the last of them)


@dataclass
class Reference:
    """The clean logits of one prompt that drifts are measured against."""

    clean: torch.Tensor  # z(S): clean, undefended
    topk: torch.Tensor  # indices of its top-k logits, the ones drift is measured over
    repaired: torch.Tensor  # z(S) with the repair active


def clean_state(lm: hf.LoadedModel, s: Setup, ids: torch.Tensor) -> CleanState:
    T = ids.numel() - 1
    # only the cache is needed from the prefill: skip the vocabulary projection of the prefix
    _, cache = hf.forward(lm.model, ids[:-1].view(1, -1).to(lm.device), logits_to_keep=1)
    time, rms = {}, {}
    for l in s.layers:
        k, v = hf.get_kv(cache, l)
        time[l] = s.time_mask(T, k.shape[2])
        rms[l] = (float(k.float().pow(2).mean().sqrt()), float(v.float().pow(2).mean().sqrt()))
    return CleanState(cache, ids[-1], time, rms, T)


def segment(num_kv_heads: int, heads: Sequence[int], time: torch.Tensor) -> torch.Tensor:
    """bool [1, H, T, 1]: the given KV heads at the segment's positions."""
    head_mask = torch.zeros(num_kv_heads, dtype=torch.bool)
    head_mask[list(heads)] = True
    return head_mask.view(1, -1, 1, 1) & time.view(1, 1, -1, 1)


def direction(gen: torch.Generator, shape, mask: torch.Tensor, target: float) -> torch.Tensor:
    """Gaussian noise inside `mask`, rescaled to Frobenius norm `target` exactly (fp32, CPU); zero when
    the mask is empty (a sliding-window layer may no longer hold the segment)."""
    n = torch.randn(shape, generator=gen, dtype=torch.float32) * mask
    norm = float(n.norm())
    return n * (target / norm) if norm > 0 else torch.zeros(shape)


def perturb_row(s: Setup, k: torch.Tensor, v: torch.Tensor, r: int, mask: torch.Tensor, rms: tuple[float, float],
                delta: float, key: tuple) -> float:
    """Add in place to row r of a layer's K and V a direction inside `mask` of Frobenius norm
    delta * delta_scale * rms * sqrt(#masked entries), drawn from `s.rng(*key, "K" or "V")`.
    Returns the norm of the whole perturbation (K and V together; 0 for an empty mask)."""
    count = int(mask.sum()) * k.shape[-1]
    targets = []
    for x, tag, size in ((k, "K", rms[0]), (v, "V", rms[1])):
        target = delta * s.delta_scale * size * math.sqrt(count)
        x[r] += direction(s.rng(*key, tag), (1,) + tuple(x.shape[1:]), mask, target)[0].to(x.device, x.dtype)
        targets.append(target)
    return math.sqrt(targets[0] ** 2 + targets[1] ** 2) if count else 0.0


def last_logits(lm: hf.LoadedModel, token: torch.Tensor, cache, plan: hf.HookPlan | None) -> torch.Tensor:
    """fp32 [rows, vocab]: the logits of `token` processed over every row of `cache` (consumed)."""
    n = hf.get_kv(cache, 0)[0].shape[0]
    ids = token.view(1, 1).expand(n, 1).to(lm.device)
    logits, _ = hf.forward(lm.model, ids, cache, plan=plan, logits_to_keep=1)
    return logits[:, -1].float()


def drift(z: torch.Tensor, ref: torch.Tensor, idx: torch.Tensor) -> list[float]:
    """Per row of z: the L2 distance to `ref` over the logits `idx` (the top-k of the clean logits)."""
    return (z[:, idx] - ref[idx]).norm(dim=-1).tolist()
