"""The score `prune_structured` uses when `method` is None (the automatic choice).

With calibration batches: FLAP (fluctuation with bias compensation), the best measured score
(all-MiniLM-L6-v2, 25% / 50% of MLP neurons, embedding cosine to the dense model: magnitude
0.749 / 0.583, wanda 0.850 / 0.728, flap 0.950 / 0.849). Where FLAP cannot apply:

- a consumer without a bias whose config cannot add one (FLAP's `check_model`): Wanda. FLAP's
  Var(X_j) ranks a unit as if its mean output E[X_j] were moved into the bias; without that
  compensation a unit with a large steady mean would be removed as "unimportant". Wanda's
  ‖X_j‖₂² = N·(Var(X_j) + E[X_j]²) counts the mean the removal loses, and is the next best score
  measured above.
- with `new_parameters=False` (the caller's optimizer is built), a consumer without a bias: Wanda,
  as above. FLAP would add the bias after the optimizer was built: it would not train, and a
  checkpoint of the run would not load into the freshly built model a resume starts from.
  `StructuredPruning` avoids this: its `setup` adds the biases first (`add_structured_parameters`
  with `method=None`), so inside a fit FLAP applies, the best measured score above.
- Conv2d parts (filters; both activation scores refuse them): magnitude, the filter L1 of Li et
  al. 2016. Taylor is not chosen automatically: it needs a loss from the batches (labels) and a
  backward pass per batch, which plain calibration batches do not give.

Without calibration batches: magnitude (the only built-in score that needs no data). A fallback
is warned about and recorded in the report's notes; the choice and its reason are in
`StructuredReport.method` / `method_choice`. An explicit `method` is used as given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_prune.registry import STRUCTURED_SCORES
from lightning_prune.structured.groups import GroupSet
from lightning_prune.structured.scores import StructuredScore

GIVEN = "given"


@dataclass(frozen=True)
class ScoreChoice:
    """The automatic score, why it was chosen, and the fallback note (None when the first choice applied)."""

    score: StructuredScore
    reason: str
    fallback: str | None = None


def check_automatic_options(method: object, method_options: Mapping[str, Any] | None) -> None:
    """Refuse score options without a score: they belong to one score, and `method`=None chooses it."""
    if method is None and method_options:
        raise ValueError(
            f"`method_options`={dict(method_options)!r} needs an explicit `method` (they are one score's "
            "options; `method`=None chooses the score automatically): give e.g. method='flap'"
        )


def _score(name: str) -> StructuredScore:
    """The registered score `name` with its default options (found by name, as `method=` would be)."""
    score: StructuredScore = STRUCTURED_SCORES.create(name)
    return score


def _refusal(score: StructuredScore, groups: Sequence[GroupSet], config: object) -> str | None:
    """Why `score` cannot prune `groups` (its own pre-pruning checks), or None when it can."""
    try:
        for group in groups:
            score.check(group)
        score.check_model(groups, config)
    except ValueError as error:
        return str(error)
    return None


def _added_biases(groups: Sequence[GroupSet]) -> list[str]:
    """The consumers FLAP's compensation would give a new bias."""
    return [p.module_name for g in groups for p in g.consumers() if getattr(p.module, "bias", None) is None]


def choose_score(
    groups: Sequence[GroupSet], config: object, calibrated: bool, new_parameters: bool = True
) -> ScoreChoice:
    """The automatic score for `groups` (see the module docstring): FLAP with calibration where it applies.

    `new_parameters`=False: FLAP only where it adds no bias (the caller's optimizer is already built).
    """
    if not calibrated:
        return ScoreChoice(_score("magnitude"), "automatic: no calibration batches, so the weight-only 'magnitude'")
    flap = _score("flap")
    refused = _refusal(flap, groups, config)
    added = _added_biases(groups) if refused is None and not new_parameters else []
    if added:
        refused = (
            f"its bias compensation would add biases to {added[:2]}{' …' if len(added) > 2 else ''} after the fit's "
            "optimizer was built: they would not train, and the run's checkpoints would not load for a resume"
        )
    if refused is None:
        return ScoreChoice(flap, "automatic: calibration batches given, so 'flap' (the best measured score)")
    wanda = _score("wanda")
    if _refusal(wanda, groups, config) is None:
        choice, why = wanda, "it counts the mean output that FLAP would move into a bias"
    else:
        choice, why = _score("magnitude"), "the activation scores do not apply; 'taylor' needs a loss from the batches"
    note = (
        f"`method`=None: 'flap' cannot apply ({refused}); using {choice.name!r} instead ({why}). "
        f"Give `method` to choose the score yourself"
    )
    return ScoreChoice(choice, f"automatic: 'flap' cannot apply, so {choice.name!r}", note)
