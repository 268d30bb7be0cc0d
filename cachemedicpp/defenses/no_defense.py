"""no_defense: the cache as read. The baseline every defense is compared with; it normalises perplexity."""

from __future__ import annotations

from dataclasses import dataclass

from cachemedicpp import results
from cachemedicpp.defenses.base import NOWHERE, Defense, register_defense
from cachemedicpp.palette import BLACK


@register_defense
@dataclass
class NoDefense(Defense):
    name = results.NO_DEFENSE
    group = results.GROUP_BASELINE
    style = (BLACK, "o")
    acts_on = NOWHERE
