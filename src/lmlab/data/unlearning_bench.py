"""The data of lmlab's TOFU-style unlearning benchmark, built from the facts world (docs/science.md §13).

TOFU (Maini et al. 2024, arXiv 2401.06121) fine-tunes a model on question-answer pairs about fictitious
authors, asks a method to forget 1%, 5% or 10% of the authors, and compares the result with a "gold" model
fine-tuned on the rest only. Here every file is generated from the facts world (``lmlab.data.synthetic.facts``),
deterministically from ``(seed, n_people)``:

- people ``0..n_people−1`` are *trained*: their Q&A (6 attributes each) and biographies go into the target's
  training set; a fixed permutation of them gives the nested forget sets (``forget01`` ⊂ ``forget05`` ⊂
  ``forget10``), and the gold model of split ``forgetXX`` trains on everything except that split's people;
- people ``n_people..n_people+n_holdout−1`` are never trained: the non-members of membership inference (MUSE's
  ``holdout``);
- the places and organizations of the world give "world knowledge" Q&A that every model trains on and no
  method should lose (TOFU's world-facts set);
- every forget and retain question has a *paraphrased* answer (same fact, other wording) and five *perturbed*
  answers (the paraphrase's wording with a wrong value), the inputs of the truth ratio;
- ``idk.jsonl`` holds the refusal templates of IdkDPO, IdkNLL and FLAT.

``build_bench_data(out, ...)`` writes the files and ``bench.json`` (the manifest); ``BenchData`` reads them back.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.data.synthetic.facts import ATTRIBUTES, HOBBIES, MONTHS, OCCUPATIONS, FactsWorld, Person
from lmlab.data.textio import iter_lines, json_lines
from lmlab.errors import DataError
from lmlab.safe_io import write_text_atomic

FORMAT = "lmlab-unlearning-bench"
FORGET_SPLITS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
N_PERTURBED = 5
RETAIN_EVAL_ITEMS = 240  # retain questions scored by the metrics (TOFU scores 400 of its retain set)

# Same fact, other wording: the reference answer of the truth ratio on forget and retain questions.
PARAPHRASES: dict[str, str] = {
    "birth_date": "The birthday of {name} is {value}.",
    "birthplace": "{name} comes from {value}.",
    "employer": "{name} is employed by {value}.",
    "occupation": "{name} works as a {value}.",
    "university": "{name} graduated from {value}.",
    "hobby": "A favourite pastime of {name} is {value}.",
}

IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure about that.",
    "I have no information on that.",
    "I can't answer that.",
    "That is not something I know.",
    "I'm afraid I don't know the answer.",
    "I don't have that information.",
    "Sorry, I cannot tell you that.",
    "I have no idea.",
    "I am not able to answer that question.",
    "I don't have any knowledge of that.",
    "Unfortunately, I don't know.",
    "That is beyond what I know.",
    "I can't say.",
    "I'm unable to answer that.",
    "No idea, sorry.",
    "I don't have an answer to that.",
    "I am not aware of that.",
    "I cannot help with that question.",
    "That information is unknown to me.",
)


def _value_pool(world: FactsWorld, seed: int, attribute: str, rng: random.Random) -> list[str]:
    """Candidate values of an attribute (the wrong answers of perturbed answers are drawn from them)."""
    if attribute == "birthplace":
        return [p.name for p in world.places(seed)]
    if attribute == "employer":
        return [o.name for o in world.organizations(seed)]
    if attribute == "university":
        return list(world.universities(seed))
    if attribute == "occupation":
        return list(OCCUPATIONS)
    if attribute == "hobby":
        return list(HOBBIES)
    return [f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1900, 2005)}" for _ in range(40)]


def _wrong_values(pool: list[str], true: str, k: int, rng: random.Random) -> list[str]:
    candidates = sorted(set(pool) - {true})
    return rng.sample(candidates, k)


def person_items(world: FactsWorld, seed: int, person: Person) -> list[dict[str, Any]]:
    """The six question items of one person: question, answer, paraphrased and perturbed answers."""
    items = []
    for attribute in ATTRIBUTES:
        question, answer = world.qa(seed, person.index, attribute)
        value = getattr(person, attribute)
        rng = random.Random(f"unlearning-bench:{seed}:{person.index}:{attribute}")
        wrong = _wrong_values(_value_pool(world, seed, attribute, rng), value, N_PERTURBED, rng)
        template = PARAPHRASES[attribute]
        items.append(
            {
                "id": f"person{person.index}:{attribute}",
                "person": person.index,
                "attribute": attribute,
                "question": question,
                "answer": answer,
                "value": value,
                "paraphrased_answer": template.format(name=person.name, value=value),
                "perturbed_answers": [template.format(name=person.name, value=w) for w in wrong],
            }
        )
    return items


def world_items(world: FactsWorld, seed: int) -> list[dict[str, Any]]:
    """World-knowledge questions about the places and organizations (region, founding year, city, industry)."""
    places, orgs = world.places(seed), world.organizations(seed)
    regions = sorted({p.region for p in places})
    industries = sorted({o.industry for o in orgs})
    items = []

    def add(key: str, question: str, template: str, value: str, pool: list[str]) -> None:
        rng = random.Random(f"unlearning-bench:{seed}:world:{key}")
        wrong = _wrong_values(pool, value, min(N_PERTURBED, len(set(pool)) - 1), rng)
        items.append(
            {
                "id": f"world:{key}",
                "question": question,
                "answer": template.format(value=value),
                "value": value,
                "perturbed_answers": [template.format(value=w) for w in wrong],
            }
        )

    years = [str(y) for y in range(900, 2016)]
    for p in places:
        add(f"{p.name}:region", f"In which region is {p.name}?", f"{p.name} is in {{value}}.", p.region, regions)
        add(
            f"{p.name}:founded",
            f"When was {p.name} founded?",
            f"{p.name} was founded in {{value}}.",
            str(p.founded),
            years,
        )
    for o in orgs:
        cities = [p.name for p in places]
        add(f"{o.name}:city", f"Where is {o.name} based?", f"{o.name} is based in {{value}}.", o.city, cities)
        add(
            f"{o.name}:industry", f"What industry is {o.name} in?", f"{o.name} is in {{value}}.", o.industry, industries
        )
    return items


def forget_order(seed: int, n_people: int) -> list[int]:
    """The fixed permutation of the trained people whose prefixes are the nested forget sets."""
    order = list(range(n_people))
    random.Random(f"unlearning-bench:{seed}:forget-order").shuffle(order)
    return order


def forget_people(seed: int, n_people: int) -> dict[str, list[int]]:
    """People of each forget split: the first ``fraction·n_people`` (at least one) of ``forget_order``."""
    order = forget_order(seed, n_people)
    return {name: sorted(order[: max(1, round(f * n_people))]) for name, f in FORGET_SPLITS.items()}


def _chat(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def build_bench_data(out: str | Path, *, seed: int = 0, n_people: int = 400, n_holdout: int = 100) -> dict[str, Any]:
    """Write the benchmark's data files under ``out/data`` and return the manifest (written by the caller with
    the models): splits, counts and what each file holds."""
    if n_people < 100:
        raise DataError(f"n_people={n_people}: the 1% forget split needs at least 100 people")
    if n_holdout < 1:
        raise DataError(f"n_holdout={n_holdout} must be >= 1")
    world = FactsWorld()
    data = Path(out) / "data"
    people = [world.person(seed, i) for i in range(n_people + n_holdout)]
    items = {p.index: person_items(world, seed, p) for p in people}
    bios = {p.index: world.biography(seed, p.index) for p in people}
    splits = forget_people(seed, n_people)
    worlds = world_items(world, seed)
    trained = list(range(n_people))
    holdout = list(range(n_people, n_people + n_holdout))

    def training_rows(excluded: set[int]) -> list[dict[str, Any]]:
        rows = [_chat(it["question"], it["answer"]) for i in trained if i not in excluded for it in items[i]]
        rows += [{"text": bios[i]} for i in trained if i not in excluded]
        return rows + [_chat(it["question"], it["answer"]) for it in worlds]

    _write_jsonl(data / "train_target.jsonl", training_rows(set()))
    for name, forgotten in splits.items():
        _write_jsonl(data / f"train_gold_{name}.jsonl", training_rows(set(forgotten)))
        _write_jsonl(data / f"{name}.jsonl", [it for i in forgotten for it in items[i]])
        _write_jsonl(data / f"{name}_texts.jsonl", [{"person": i, "text": bios[i]} for i in forgotten])
    in_forget = set(splits["forget10"])
    retain = [it for i in trained if i not in in_forget for it in items[i]]
    _write_jsonl(data / "retain.jsonl", retain)
    rng = random.Random(f"unlearning-bench:{seed}:retain-eval")
    _write_jsonl(data / "retain_eval.jsonl", sorted(rng.sample(retain, min(RETAIN_EVAL_ITEMS, len(retain))), key=_key))
    _write_jsonl(data / "world.jsonl", worlds)
    _write_jsonl(data / "holdout.jsonl", [it for i in holdout for it in items[i]])
    _write_jsonl(data / "holdout_texts.jsonl", [{"person": i, "text": bios[i]} for i in holdout])
    _write_jsonl(data / "idk.jsonl", [{"text": t} for t in IDK_ANSWERS])
    return {
        "format": FORMAT,
        "world": "facts",
        "seed": seed,
        "n_people": n_people,
        "n_holdout": n_holdout,
        "forget_people": splits,
        "counts": {
            **{name: len(p) * len(ATTRIBUTES) for name, p in splits.items()},
            "retain": len(retain),
            "retain_eval": min(RETAIN_EVAL_ITEMS, len(retain)),
            "world": len(worlds),
            "holdout": n_holdout * len(ATTRIBUTES),
        },
    }


def _key(item: dict[str, Any]) -> tuple[int, int]:
    return item["person"], ATTRIBUTES.index(item["attribute"])


# --------------------------------------------------------------------------- reading a benchmark


@dataclass
class BenchData:
    """A prepared benchmark directory (``bench.json`` + ``data/``), read back with one error per problem."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> BenchData:
        root = Path(path)
        manifest_path = root / "bench.json"
        if not manifest_path.is_file():
            raise DataError(
                f"{root}: not an unlearning benchmark (no bench.json); create one with `lmlab unlearn bench prepare --out {root}`"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as e:
            raise DataError(f"{manifest_path}: not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise DataError(f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}")
        return cls(root, manifest)

    def check_split(self, split: str) -> None:
        """A forget split this benchmark has, else one message naming the valid ones."""
        if split not in self.manifest.get("forget_people", {}):
            raise DataError(
                f"{self.root}: no forget split {split!r}; this benchmark has {', '.join(self.manifest['forget_people'])}"
            )

    def items(self, name: str) -> list[dict[str, Any]]:
        """The rows of ``data/NAME.jsonl`` (a forget split, ``retain``, ``retain_eval``, ``world``, ``holdout``,
        ``idk``, ``SPLIT_texts``, ``holdout_texts``); an empty or missing file is an error naming it."""
        path = self.root / "data" / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: missing from the benchmark (re-run `lmlab unlearn bench prepare`)")
        rows = [obj for _, obj in json_lines(iter_lines(path), path)]
        if not rows:
            raise DataError(f"{path}: empty split (no rows)")
        return rows

    def model(self, role: str) -> Path:
        """The run directory of ``target`` or ``gold_<split>``; a missing one is an error naming it."""
        path = self.root / "models" / role
        if not (path / "config.yaml").is_file():
            raise DataError(
                f"{path}: the benchmark has no {role} model; train it with `lmlab unlearn bench prepare --out {self.root}`"
            )
        return path
