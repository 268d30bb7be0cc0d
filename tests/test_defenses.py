"""Heuristic defenses: act only inside the mask, never a no-op on clean inputs, exact formulas."""

from __future__ import annotations

import pytest
import torch

from cachemedicpp import defenses as D
from cachemedicpp.config import ConfigError
from cachemedicpp.results import GROUP_BASELINE, GROUP_REFERENCE

SHAPE = (2, 3, 40, 16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BASELINE = {"smoothing_beta": 0.3, "dropout_p": 0.2, "clip_val": 1.5, "target_rms": 1.0}
HEURISTICS = ("reset_clear", "smoothing", "masking_dropout", "clipping_renorm")


def apply_defense(name, k, v, mask, baseline, gen=None):
    """One layer defended by the registered defense `name` (hyper-parameters from `baseline`) in `mask`."""
    got = D.make(name, baseline).apply(k, v, D.LayerInput(0, torch.arange(k.shape[2]), region=mask, gen=gen))
    return got.k, got.v


def kv_pair(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=g) * 3).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)


def region_mask():
    heads = torch.tensor([True, False, True]).view(1, -1, 1, 1)
    time = (torch.arange(SHAPE[2]) < 28).view(1, 1, -1, 1)
    return heads & time


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", HEURISTICS)
def test_defense_acts_only_inside_the_mask(name, dtype):
    k, v = kv_pair(dtype)
    before = (k.clone(), v.clone())
    mask = region_mask()
    k2, v2 = apply_defense(name, k, v, mask, BASELINE)
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])  # pure
    m = mask.expand(SHAPE)
    for x, x2 in ((k, k2), (v, v2)):
        assert x2.dtype == dtype and x2.shape == x.shape
        assert torch.equal(x2[~m], x[~m])
        assert not torch.equal(x2[m], x[m])  # clean inputs are acted on too: never a silent no-op


def test_no_defense_returns_inputs():
    k, v = kv_pair()
    k2, v2 = apply_defense("no_defense", k, v, region_mask(), BASELINE)
    assert k2 is k and v2 is v


def test_reset_clear_zeroes_the_region():
    k, v = kv_pair()
    k2, v2 = apply_defense("reset_clear", k, v, region_mask(), BASELINE)
    m = region_mask().expand(SHAPE)
    assert (k2[m] == 0).all() and (v2[m] == 0).all()


def naive_ema(x: torch.Tensor, beta: float) -> torch.Tensor:
    y = torch.empty_like(x)
    y[:, :, 0] = x[:, :, 0]
    for t in range(1, x.shape[2]):
        y[:, :, t] = beta * y[:, :, t - 1] + (1 - beta) * x[:, :, t]
    return y


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9, 1.0])
def test_smoothing_matches_the_recurrence(beta):
    k, v = kv_pair()
    mask = region_mask()
    k2, v2 = apply_defense("smoothing", k, v, mask, {**BASELINE, "smoothing_beta": beta})
    m = mask.expand(SHAPE)
    for x, x2 in ((k, k2), (v, v2)):
        ref = torch.where(m, naive_ema(x.double(), beta).float(), x)
        assert torch.allclose(x2, ref, atol=1e-5, rtol=1e-5)
    if beta == 0.0:
        assert torch.allclose(k2, k)


def test_smoothing_weights_are_lower_triangular():
    w = D.ema_weights(6, 0.5)
    assert torch.equal(w, torch.tril(w))
    assert torch.allclose(w.sum(dim=1), torch.ones(6))  # an average: constants pass through


def test_clipping_renorm_hits_target_rms():
    k, v = kv_pair()
    mask = region_mask()
    base = {**BASELINE, "target_rms": 0.7}
    k2, v2 = apply_defense("clipping_renorm", k, v, mask, base)
    m = mask.expand(SHAPE)[..., 0]
    for x2 in (k2, v2):
        rms = x2.pow(2).mean(dim=-1).sqrt()
        assert torch.allclose(rms[m], torch.full_like(rms[m], 0.7), atol=1e-5)
    # clamp first: within a vector, values beyond clip_val all map to the same magnitude
    x = torch.tensor([10.0, -20.0, 0.5, 1.0]).view(1, 1, 1, 4)
    y, _ = apply_defense("clipping_renorm", x, x, torch.ones(1, 1, 1, 1, dtype=torch.bool),
                           {"clip_val": 1.0, "target_rms": 1.0})
    c = torch.tensor([1.0, -1.0, 0.5, 1.0])
    assert torch.allclose(y.flatten(), c / c.pow(2).mean().sqrt())
    z, _ = apply_defense("clipping_renorm", torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4),
                           torch.ones(1, 1, 2, 1, dtype=torch.bool), BASELINE)
    assert torch.equal(z, torch.zeros(1, 1, 2, 4))  # a zero vector stays finite


def test_masking_dropout_is_seeded_and_has_rate_p():
    k, v = kv_pair()
    mask = torch.ones(1, SHAPE[1], SHAPE[2], 1, dtype=torch.bool)
    a = apply_defense("masking_dropout", k, v, mask, BASELINE)
    b = apply_defense("masking_dropout", k, v, mask, BASELINE)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # default generator is deterministic
    c = apply_defense("masking_dropout", k, v, mask, BASELINE, torch.Generator().manual_seed(5))
    assert not torch.equal(a[0], c[0])
    dropped = (a[0] == 0).float().mean().item()
    assert 0.15 < dropped < 0.25
    assert torch.all((a[0] == k) | (a[0] == 0))


def test_defaults_fill_missing_baseline_keys():
    k, v = kv_pair()
    k2, _ = apply_defense("clipping_renorm", k, v, region_mask(), {})
    m = region_mask().expand(SHAPE)[..., 0]
    assert torch.allclose(k2.pow(2).mean(dim=-1).sqrt()[m], torch.ones(int(m.sum())), atol=1e-5)


def test_registry_and_unknown_names():
    assert {n for n in D.names() if D.group(n) in (GROUP_BASELINE, GROUP_REFERENCE)} == {"no_defense", *HEURISTICS}
    assert all(D.get(n).needs.region for n in HEURISTICS) and not D.get("no_defense").needs.region
    assert "oracle" in D.ORACLE_NOTE
    with pytest.raises(ConfigError, match="known: .*no_defense.*clipping_renorm"):
        D.get("median_filter")
    # the learned operator is a defense that acts inside attention, never on the stored cache
    learned = D.get("cachemedic")
    assert learned.in_attention and learned.acts_on == D.NOWHERE and learned.needs.operator
