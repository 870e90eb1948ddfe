"""The fast engine's per-layer rules: one file per layer type, registered by importing it.

:data:`RULES` maps a layer class (exactly; not its subclasses) to its
:class:`~common.privacy.engines.rules.base.LayerRule`. Adding a layer type means adding a
file here and importing it below.
"""

from common.privacy.engines.rules import embedding, linear  # noqa: F401  (register their rules)
from common.privacy.engines.rules.base import RULES, LayerRule, PersonGroups, register_rule

__all__ = ["RULES", "LayerRule", "PersonGroups", "register_rule"]
