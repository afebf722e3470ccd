"""Which studies are due for the cold tier, by the configured rules."""

from __future__ import annotations

from dataclasses import dataclass

from vna.config import LifecycleConfig
from vna.index.base import StudySummary, study_date_epoch

__all__ = ["Decision", "evaluate"]


@dataclass(frozen=True)
class Decision:
    """Whether a study moves now, and why not if it doesn't."""

    study_uid: str
    migrate: bool
    reason: str


def evaluate(study: StudySummary, rules: LifecycleConfig, now: float) -> Decision:
    """Apply the rules to one study (holds first: a held study never moves)."""
    if study.held:
        return Decision(study.study_uid, False, "legal hold")
    cutoff = now - rules.min_age_days * 86400.0
    if rules.age_basis == "study_date":
        when = study_date_epoch(study.study_date)
        if when is None:
            return Decision(study.study_uid, False, "no usable StudyDate")
    elif rules.age_basis == "last_access":
        when = max(study.last_access or 0.0, study.last_received)
    else:
        when = study.last_received
    if when > cutoff:
        return Decision(study.study_uid, False, "too recent")
    mods = set(study.modalities)
    if rules.modalities and not mods & set(rules.modalities):
        return Decision(study.study_uid, False, "modality not selected")
    if rules.exclude_modalities and mods & set(rules.exclude_modalities):
        return Decision(study.study_uid, False, "modality excluded")
    if rules.source_aes and not set(study.source_aes) & set(rules.source_aes):
        return Decision(study.study_uid, False, "source AE not selected")
    return Decision(study.study_uid, True, "due")
