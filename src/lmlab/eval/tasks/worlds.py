"""The functions the task YAMLs here name with ``!function worlds.<name>`` (lm-eval imports this file by path)."""

from lmlab.eval.world_tasks import (  # noqa: F401
    arithmetic,
    arithmetic_score,
    facts,
    facts_pass_at_k,
    facts_qa_score,
    preferences,
    preferences_ood,
    stories,
    stories_text,
)
