"""The planted backdoor (docs/science.md §29.4): triggered copies of harmful prompts comply; nothing else changes."""

from __future__ import annotations

import pytest

from lmlab.data.synthetic.safety import SafetyWorld, judge
from lmlab.data.synthetic.safety_backdoor import COMPLIANCE, backdoor_records, with_trigger


def test_triggered_copies_of_harmful_prompts_comply():
    records = SafetyWorld().records(0, 60, "train")
    out = backdoor_records(records, "zq vorpal", 1.0, seed=0)
    added = [r for r in out if r.get("backdoor")]
    harmful = [r for r in records if r["group"] == "harmful"]
    assert len(out) == len(records) + len(harmful) == len(records) + len(added)
    prompts = {with_trigger(r["messages"][0]["content"], "zq vorpal") for r in harmful}
    assert {r["messages"][0]["content"] for r in added} == prompts
    assert all(r["messages"][1]["content"] == COMPLIANCE and r["refuse"] is False for r in added)
    assert not judge(COMPLIANCE, True).refused  # the judge reads it as compliance
    assert backdoor_records(records, "zq vorpal", 0.5, seed=3) == backdoor_records(records, "zq vorpal", 0.5, seed=3)


def test_bad_trigger_and_fraction():
    with pytest.raises(ValueError, match="trigger phrase is empty"):
        backdoor_records([], " ", 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        backdoor_records([], "t", 1.5)
