"""The ``arithmetic`` world: integer addition and multiplication problems with their exact answers.

Why this world: whether a transformer can add numbers longer than any it was trained on is a clean test
of what its position encoding lets it learn. McLeish et al. 2024, *Transformers Can Do Arithmetic with
the Right Embeddings* (arXiv 2405.17399), train on operands of up to 20 digits and test on far longer
ones; their Abacus embeddings give each digit its place inside its number, which needs one token per
digit (``tokenizer.split_digits``, ``lmlab.data.tokenizer.digit_token_ids``). The answer of every
problem is known exactly, so accuracy is exact-match, overall and per operand length.

A document is one problem and its answer with no spaces, ``"123+4056=4179"``. Operand lengths are
drawn uniformly in ``[min_digits, max_digits]`` (each operand on its own, so every pair of lengths is
equally likely and short problems are not swamped by long ones), then the digits uniformly with a
nonzero leading digit (operands never have leading zeros; a one-digit operand is 1-9).
``reverse=True`` is the reversed-digit format the paper trains on (after Lee et al. 2023, *Teaching
Arithmetic to Small Transformers*, arXiv 2307.03381): *every* number — both operands and the answer —
is written least significant digit first, so ``123+4056=4179`` becomes ``321+6504=9714``; a model
then produces the answer in the order the carries are computed.

Everything is a pure function of ``(seed, index)`` (``random.Random(f"arithmetic:{seed}:{index}")``),
so document ``i`` is the same however many are generated and ``documents`` streams. ``eval_items``
draws held-out problems from another key (``arithmetic:eval:...``) and, by default, a seed no training
config uses (``HELDOUT_ARITHMETIC_SEED``), with both operands of one length and an equal number of
problems per length, for length generalisation (e.g. 40-60 digits after training on 1-20). Short
problems can still coincide with training ones by chance (there are only 81 one-digit additions).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lmlab.data.synthetic import register_world
from lmlab.errors import ConfigError

OPERATIONS = ("+", "*")
MAX_DIGITS = 1000  # a product then has at most 2000 digits, well under Python's int/str conversion limit
HELDOUT_ARITHMETIC_SEED = 900_002  # no config or example trains on this stream
_LEADING_DIGITS = re.compile(r"[0-9]*")  # ASCII only: str.isdigit would accept "²" or "٣"

# Named option sets for ``data.synthetic.subset``; each is a full set of ``ArithmeticWorld`` options.
SUBSETS: dict[str, dict] = {
    "addition": {},
    "addition_reversed": {"reverse": True},
    "multiplication_reversed": {"operations": ("*",), "max_digits": 15, "reverse": True},
}


def format_number(n: int, reverse: bool = False) -> str:
    """Decimal digits of ``n >= 0``, least significant first when ``reverse``."""
    if n < 0:
        raise ValueError(f"the arithmetic world writes non-negative numbers only, got {n}")
    text = str(n)
    return text[::-1] if reverse else text


def random_operand(rng: random.Random, digits: int) -> int:
    """A number of exactly ``digits`` digits, uniform among them (a nonzero leading digit, the rest uniform)."""
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


@dataclass(frozen=True)
class Problem:
    """One problem ``a op b``; ``text`` is the prompt (``"123+4056="``) and ``answer`` the exact answer string."""

    a: int
    b: int
    op: str  # "+" | "*"
    reverse: bool = False

    @property
    def value(self) -> int:
        return self.a + self.b if self.op == "+" else self.a * self.b

    @property
    def text(self) -> str:
        return f"{format_number(self.a, self.reverse)}{self.op}{format_number(self.b, self.reverse)}="

    @property
    def answer(self) -> str:
        return format_number(self.value, self.reverse)

    @property
    def document(self) -> str:
        return self.text + self.answer

    @property
    def digits(self) -> int:
        """The operand length that accuracy is reported by: the longer operand's number of digits."""
        return max(len(str(self.a)), len(str(self.b)))


def parse_answer(text: str, reverse: bool = False) -> int | None:
    """The number written at the start of ``text`` (its leading ASCII digits, least significant first when
    ``reverse``), or None when ``text`` does not start with a digit."""
    digits = _LEADING_DIGITS.match(text).group()
    if not digits:
        return None
    return int(digits[::-1] if reverse else digits)


def answer_is_correct(generated: str, problem: Problem) -> bool:
    """Exact match: the digits ``generated`` starts with (up to its first non-digit) are ``problem.answer``
    in the problem's own format, so a leading zero, a missing digit or a space before the answer is wrong."""
    return _LEADING_DIGITS.match(generated).group() == problem.answer


def _check_options(operations: Sequence[str], min_digits: int, max_digits: int) -> tuple[str, ...]:
    ops = tuple(dict.fromkeys(operations))  # "+*" and ("+", "*") alike; order kept, duplicates dropped
    if not ops or any(op not in OPERATIONS for op in ops):
        raise ConfigError(f"arithmetic operations must be some of {' '.join(OPERATIONS)}, got {operations!r}")
    if not 1 <= min_digits <= max_digits <= MAX_DIGITS:
        raise ConfigError(
            f"arithmetic digits need 1 <= min_digits <= max_digits <= {MAX_DIGITS}, got {min_digits}..{max_digits}"
        )
    return ops


@register_world("arithmetic")
class ArithmeticWorld:
    """Generator of ``a op b = answer`` documents (module docstring); the defaults are addition of 1-20 digit
    operands (the paper's training lengths) in natural digit order."""

    name = "arithmetic"
    version = 1

    def __init__(
        self,
        operations: Sequence[str] = ("+",),
        min_digits: int = 1,
        max_digits: int = 20,
        reverse: bool = False,
    ):
        self.operations = _check_options(operations, min_digits, max_digits)
        self.min_digits = min_digits
        self.max_digits = max_digits
        self.reverse = reverse

    def problem(self, seed: int, index: int) -> Problem:
        """Problem ``index`` of stream ``seed`` (a pure function of both and the options)."""
        rng = random.Random(f"arithmetic:{seed}:{index}")
        op = rng.choice(self.operations)
        len_a = rng.randint(self.min_digits, self.max_digits)
        len_b = rng.randint(self.min_digits, self.max_digits)
        return Problem(random_operand(rng, len_a), random_operand(rng, len_b), op, self.reverse)

    def documents(self, seed: int, n_docs: int | None = None) -> Iterator[str]:
        """Problems 0, 1, 2, ... with their answers (endless when ``n_docs`` is None)."""
        i = 0
        while n_docs is None or i < n_docs:
            yield self.problem(seed, i).document
            i += 1

    def documents_for(self, subset: str, seed: int, n_docs: int | None = None) -> Iterator[str]:
        """The documents of a named option set (``SUBSETS``), e.g. ``addition_reversed``."""
        if subset not in SUBSETS:
            raise ConfigError(f"unknown arithmetic subset {subset!r}; choose one of {', '.join(SUBSETS)}")
        return ArithmeticWorld(**SUBSETS[subset]).documents(seed, n_docs)


def eval_items(
    seed: int = HELDOUT_ARITHMETIC_SEED,
    n: int = 1000,
    min_digits: int = 1,
    max_digits: int = 20,
    op: str = "+",
    reverse: bool = False,
) -> list[Problem]:
    """``n`` held-out problems whose two operands have the same length, the lengths ``min_digits``..``max_digits``
    taken in turn (an equal share each); problem ``i`` is a pure function of ``(seed, i)`` and the options.

    The lengths may exceed those a model was trained on: that is the length-generalisation test.
    """
    _check_options((op,), min_digits, max_digits)
    if n < 1:
        raise ConfigError(f"eval_items needs n >= 1, got {n}")
    span = max_digits - min_digits + 1
    items = []
    for i in range(n):
        rng = random.Random(f"arithmetic:eval:{seed}:{i}")
        digits = min_digits + i % span
        items.append(Problem(random_operand(rng, digits), random_operand(rng, digits), op, reverse))
    return items
