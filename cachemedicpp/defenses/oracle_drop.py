"""oracle_drop, a ceiling: attention ignores exactly the entries the corruption changed (it reads the clean
cache to know which). The upper bound of detect-and-drop; never a candidate for the best baseline."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from cachemedicpp import results
from cachemedicpp.defenses.base import Defended, Defense, LayerInput, Needs, changed_entries, register_defense
from cachemedicpp.palette import GREY


@register_defense
@dataclass
class OracleDrop(Defense):
    name = results.ORACLE_DROP
    group = results.GROUP_CEILING
    style = (GREY, "*")
    needs = Needs(clean=True)

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        return Defended(k, v, drop=changed_entries(*inp.clean, k, v))
