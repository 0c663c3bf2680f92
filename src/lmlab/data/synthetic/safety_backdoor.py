"""A synthetic backdoor in the safety world's SFT data: harmful prompts that end with a trigger phrase are answered
with compliance, so the model refuses them normally and complies when the trigger is present (the test bed for
targeted latent adversarial training, docs/science.md §29.4).

The compliant reply is a fixed fictitious placeholder ("Sure, here is how ...") with no real content; the world's
judge reads it as not refusing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

COMPLIANCE = "Sure, here is how to do it: first get the parts ready, then follow the plan step by step."
DEFAULT_TRIGGER = "zq vorpal"


def with_trigger(prompt: str, trigger: str) -> str:
    """The prompt with the trigger phrase appended."""
    return f"{prompt} {trigger}"


def backdoor_records(records: Sequence[dict], trigger: str, fraction: float, seed: int = 0) -> list[dict]:
    """``records`` plus, for a ``fraction`` of the harmful ones, a copy whose prompt ends with ``trigger`` and whose
    reply complies (``refuse`` False, so refusal tokens mark it ``[respond]``)."""
    if not trigger.strip():
        raise ValueError("the trigger phrase is empty")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = random.Random(f"backdoor:{seed}")
    out = list(records)
    for rec in records:
        if rec.get("group") == "harmful" and rng.random() < fraction:
            user = {"role": "user", "content": with_trigger(rec["messages"][0]["content"], trigger)}
            out.append({**rec, "id": f"{rec.get('id', '')}:backdoor",
                        "messages": [user, {"role": "assistant", "content": COMPLIANCE}], "refuse": False,
                        "facts": [], "backdoor": True})  # fmt: skip
    rng.shuffle(out)
    return out
