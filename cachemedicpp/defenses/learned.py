"""cachemedic, the learned repair operator: it leaves the stored cache alone and acts inside attention (the
grid runs its rows with the operator in the hook plan). Its family (repair.py) decides what it does there."""

from __future__ import annotations

from dataclasses import dataclass

from cachemedicpp import results
from cachemedicpp.defenses.base import NOWHERE, Defense, Needs, register_defense
from cachemedicpp.palette import BLUE


@register_defense
@dataclass
class Cachemedic(Defense):
    name = results.CACHEMEDIC
    group = results.GROUP_LEARNED
    style = (BLUE, "D")
    needs = Needs(operator=True)
    acts_on = NOWHERE
    in_attention = True
