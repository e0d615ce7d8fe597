"""Structured pruning: coupled groups, group scores, one-shot selection and `compact` (physical removal)."""

from lightning_prune.structured.api import add_structured_parameters, prune_structured, resolve_score
from lightning_prune.structured.compact import compact
from lightning_prune.structured.expert_scores import ExpertScore, RoutingStats
from lightning_prune.structured.experts import prune_experts
from lightning_prune.structured.find import find_groups
from lightning_prune.structured.flap import FeatureMomentStats, GroupFluctuation
from lightning_prune.structured.groups import GroupSet, Part, removed_units
from lightning_prune.structured.report import StructuredReport
from lightning_prune.structured.scores import (
    BlockInfluence,
    GroupMagnitude,
    GroupTaylor,
    GroupWanda,
    StructuredScore,
)
from lightning_prune.structured.select import choose_removed, mask_units, prune_group

__all__ = [
    "BlockInfluence",
    "ExpertScore",
    "FeatureMomentStats",
    "GroupFluctuation",
    "GroupMagnitude",
    "GroupSet",
    "GroupTaylor",
    "GroupWanda",
    "Part",
    "RoutingStats",
    "StructuredReport",
    "StructuredScore",
    "add_structured_parameters",
    "choose_removed",
    "compact",
    "find_groups",
    "mask_units",
    "prune_experts",
    "prune_group",
    "prune_structured",
    "removed_units",
    "resolve_score",
]
