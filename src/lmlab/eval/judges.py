"""Judges for pairwise comparison: ``judge(prompt, first, second) -> P(first answer better)`` in [0, 1].

Three kinds, chosen by ``load_judge(spec)``:

* ``preferences``: the ``preferences`` synthetic world's own judge (``preference_world.judge``): a correct
  answer beats a wrong one, then an unpadded one a padded one, then the shorter the longer.
* ``module:function``: any ``function(prompt, answer) -> score`` (higher is better; a number, or a tuple
  compared element by element); the answer with the higher score wins, equal scores tie.
* a run directory (an lmlab run, or a Hugging Face model brought in with ``lmlab import-hf``): an LM judge
  prompted with both answers and asked which is better; P(first better) is the softmax of the model's
  log-probabilities of " A" and " B" after the prompt, so the two orders of a pair average cleanly
  (comparative assessment with an LLM, Liusie et al. 2024, arXiv 2307.07889).

Programmatic judges return a hard 1, 0 or 0.5; the LM judge a probability.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from lmlab.data.synthetic.preference_world import judge as judge_preference_answer
from lmlab.errors import UserError
from lmlab.eval.user_code import import_function
from lmlab.train.pretrained import load_model

COMPARISON_TEMPLATE = (
    "{prompt}\n\nAnswer A: {answer_a}\n\nAnswer B: {answer_b}\n\nWhich answer is better, A or B? Answer:"
)
"""The LM judge's default prompt; ``{prompt}``, ``{answer_a}`` and ``{answer_b}`` are filled in (answers
stripped of surrounding whitespace) and the model's next words " A" and " B" are compared."""

PLACEHOLDERS = ("{prompt}", "{answer_a}", "{answer_b}")
CHOICES = (" A", " B")


class Judge(Protocol):
    """``judge(prompt, first, second)``: P(first answer better) in [0, 1]; ``name`` goes into the summary."""

    name: str

    def __call__(self, prompt: str, first: str, second: str) -> float: ...


def preference_score(prompt: str, answer: str) -> tuple[int, int, int]:
    """Score of ``answer`` in the ``preferences`` world: correct first, then unpadded, then fewer words."""
    verdict = judge_preference_answer(prompt, answer)
    return int(verdict.correct), -int(verdict.padded), -verdict.words


BUILTIN_SCORES: dict[str, Callable[[str, str], Any]] = {"preferences": preference_score}


class ScoreJudge:
    """Compares two answers by a score function of (prompt, answer): 1 if the first scores higher, 0 if
    lower, 0.5 if equal."""

    def __init__(self, score: Callable[[str, str], Any], name: str):
        self.score = score
        self.name = name

    def __call__(self, prompt: str, first: str, second: str) -> float:
        a, b = self.score(prompt, first), self.score(prompt, second)
        return 1.0 if a > b else 0.0 if a < b else 0.5


class LMJudge:
    """A language model asked "which answer is better?": P(first) = softmax(log p(" A"), log p(" B"))[0].

    The text follows lmlab's plain-prompt convention (EOS, the document separator, then the prompt). A
    prompt longer than the model's context keeps its last tokens (the question at the end survives);
    ``truncated`` counts such prompts.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, template: str = COMPARISON_TEMPLATE):
        check_template(template, name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.template = template
        self.max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
        self.choices = [tokenizer.encode(c) for c in CHOICES]
        if not all(self.choices):
            raise UserError(f"judge {name}: its tokenizer encodes {CHOICES} to no tokens")
        self.truncated = 0

    def render(self, prompt: str, first: str, second: str) -> str:
        filled = {"{prompt}": prompt, "{answer_a}": first.strip(), "{answer_b}": second.strip()}
        text = self.template
        for key, value in filled.items():  # str.replace: braces inside answers stay literal
            text = text.replace(key, value)
        return text

    @torch.no_grad()
    def choice_logprobs(self, text: str) -> list[float]:
        """log p(choice | text) of each of ``CHOICES`` (summed over the choice's tokens)."""
        context = [self.tokenizer.eos_id, *self.tokenizer.encode(text)]
        longest = max(len(c) for c in self.choices)
        if self.max_len is not None and len(context) + longest > self.max_len:
            context = context[len(context) + longest - self.max_len :]
            self.truncated += 1
        rows = [context + c for c in self.choices]
        width = max(len(r) for r in rows)
        device = next(self.model.parameters()).device
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)  # [2, T]
        logp = self.model(ids).float().log_softmax(dim=-1)  # [2, T, V]
        out = []
        for row, choice in enumerate(self.choices):
            positions = torch.arange(len(context) - 1, len(context) - 1 + len(choice), device=device)
            targets = torch.tensor(choice, dtype=torch.long, device=device)
            out.append(float(logp[row, positions, targets].sum()))
        return out

    def __call__(self, prompt: str, first: str, second: str) -> float:
        lp = torch.tensor(self.choice_logprobs(self.render(prompt, first, second)))
        return float(lp.softmax(dim=0)[0])


def check_template(template: str, where: str) -> None:
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise UserError(f"{where}: the judge template lacks {', '.join(missing)}; it needs {', '.join(PLACEHOLDERS)}")


def import_score(spec: str) -> Callable[[str, str], Any]:
    """The function named by ``module:function`` (the user's own code, named on the command line)."""
    return import_function(spec, "--judge")


def load_judge(spec: str, device: str | torch.device = "cpu", template: str = COMPARISON_TEMPLATE) -> Judge:
    """A judge from ``--judge``: a run directory, a built-in name (``preferences``) or ``module:function``."""
    path = Path(spec)
    if path.is_dir():
        model, _, tokenizer = load_model(path, device=device)
        if tokenizer is None:
            raise UserError(f"--judge {spec}: the run has no tokenizer.json")
        return LMJudge(model, tokenizer, str(spec), template)
    if spec in BUILTIN_SCORES:
        return ScoreJudge(BUILTIN_SCORES[spec], spec)
    if ":" in spec:
        return ScoreJudge(import_score(spec), spec)
    raise UserError(
        f"--judge {spec!r} is not a run directory, a built-in judge ({', '.join(BUILTIN_SCORES)}) or module:function"
    )
