"""The steps of a whole run (`tessera all`) and the config section each one needs."""
from __future__ import annotations

STEPS = ("curate", "stage1", "stage2", "sample", "eval")
# The section a step reads; curate reads `source`, which every config has.
SECTIONS = {"curate": "source", "stage1": "stage1", "stage2": "stage2", "sample": "sample", "eval": "eval"}


def has_section(cfg, step: str) -> bool:
    return getattr(cfg, SECTIONS[step]) is not None


def runnable_steps(cfg, asked: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(the steps to run, in order; the steps left out because the config has no section for them).
    Steps asked for by name are run as asked: a missing section is the caller's error to report."""
    if asked:
        return [s for s in STEPS if s in asked], []
    return [s for s in STEPS if has_section(cfg, s)], [s for s in STEPS if not has_section(cfg, s)]
