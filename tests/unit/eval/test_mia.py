"""Membership inference (issue 11, item 4; docs/science.md §15): every score and the ROC metrics on §15's test
vectors, Min-K%++ against the paper's formula, the gradient norm by hand and against ``backward``, batched scores
equal to each text alone, a tiny run that memorised its training texts (members detected, two unseen sets at
chance), and ``lmlab eval mia`` end to end with its one-line user errors."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.cli import main
from lmlab.eval.mia import (
    gradient_norm_score,
    loss_score,
    mia_report,
    mia_scores,
    min_k_plus_plus_score,
    min_k_score,
    pad_batch,
    reference_score,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
    zlib_entropy,
    zlib_score,
)
from lmlab.models.build import build_model
from lmlab.recipes.pretrain import PretrainRecipe
from lmlab.train.engine import execute
from lmlab.train.pretrained import load_model

from helpers import model_cfg, tiny_config

# ----------------------------------------------------------------------------------------------- §15 test vectors

LOGPS = torch.tensor([[-0.1, -2.0, -0.5, -3.0, -0.2]])
ALL = torch.ones_like(LOGPS, dtype=torch.bool)


def test_loss_and_min_k_vectors():
    assert loss_score(LOGPS, ALL).item() == pytest.approx(1.16)
    assert min_k_score(LOGPS, ALL, k=0.2).item() == pytest.approx(3.0)  # ⌊0.2·5⌋ = 1: the lowest, −3.0
    assert min_k_score(LOGPS, ALL, k=0.4).item() == pytest.approx(2.5)  # −(−3.0 − 2.0)/2
    assert min_k_score(LOGPS, ALL, k=1.0).item() == pytest.approx(1.16)  # every token: LOSS


def test_min_k_takes_at_least_one_token_and_ignores_padding():
    # Row 0 has 2 scored tokens: ⌊0.2·2⌋ = 0 (NaN in the reference code), OU's max(1, ·) takes the lowest.
    logps = torch.tensor([[-1.0, -4.0, -9.0, -9.0], [-0.1, -2.0, -0.5, -3.0]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    assert min_k_score(logps, mask, k=0.2).tolist() == pytest.approx([4.0, 3.0])
    assert min_k_score(logps, mask, k=0.5).tolist() == pytest.approx([4.0, 2.5])
    assert loss_score(logps, mask).tolist() == pytest.approx([2.5, 1.4])
    assert math.isnan(min_k_score(logps, torch.zeros_like(mask), k=0.5)[0])  # nothing scored
    with pytest.raises(ValueError, match="k must be in"):
        min_k_score(logps, mask, k=0.0)


LOGITS = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, -1.0], [1.0, 2.0, 0.5]]])
TARGETS = torch.tensor([[0, 1, 2, 1]])


def test_min_k_plus_plus_vectors():
    # With one position scored, the score is −z_t: z = [0.652054, 0 (σ² clamped), −4.701288, 0.744542].
    for t, z in enumerate([0.652054, 0.0, -4.701288, 0.744542]):
        one = torch.zeros(1, 4, dtype=torch.bool)
        one[0, t] = True
        assert -min_k_plus_plus_score(LOGITS, TARGETS, one, k=1.0).item() == pytest.approx(z, abs=1e-6)
    all4 = torch.ones(1, 4, dtype=torch.bool)
    assert min_k_plus_plus_score(LOGITS, TARGETS, all4, k=0.5).item() == pytest.approx(2.350644, abs=1e-6)
    assert min_k_plus_plus_score(LOGITS, TARGETS, all4, k=1.0).item() == pytest.approx(0.826173, abs=1e-6)


def test_min_k_plus_plus_equals_the_papers_moments():
    """The centred moments equal z = (log p(x) − E[log p]) / sqrt(E[(log p)²] − E[log p]²) of Zhang et al. Eq. 4."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, 11, (3, 7), generator=gen)
    mask = torch.rand(3, 7, generator=gen) < 0.8
    mask[:, 0] = True
    logp = torch.log_softmax(logits, -1)
    mu = (logp.exp() * logp).sum(-1)
    sigma = ((logp.exp() * logp.square()).sum(-1) - mu.square()).sqrt()
    z = (logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - mu) / sigma
    for k in (0.2, 0.5, 1.0):
        expected = []
        for row in range(3):
            values = z[row][mask[row]].sort().values
            expected.append(-values[: max(1, int(k * len(values)))].mean().item())
        assert min_k_plus_plus_score(logits, targets, mask, k).tolist() == pytest.approx(expected, rel=1e-5)


def test_zlib_vector():
    text = "hello hello hello hello"
    assert zlib_entropy(text) == 16
    assert zlib_score(2.0, text).item() == pytest.approx(0.125)
    assert zlib_score(torch.tensor([2.0, 1.0]), [text, "a"]).tolist() == pytest.approx([0.125, 1.0 / zlib_entropy("a")])


def test_reference_is_the_loss_difference():
    assert reference_score(torch.tensor([2.0, 1.0]), torch.tensor([0.5, 1.5])).tolist() == [1.5, -0.5]


MEMBERS = [0.9, 0.8, 0.75, 0.4]  # §15 gives these as "higher = member"; the scores here are loss-like
NONMEMBERS = [0.7, 0.5, 0.3, 0.2, 0.1]


def test_auc_and_tpr_vectors():
    members, nonmembers = [-s for s in MEMBERS], [-s for s in NONMEMBERS]
    assert roc_auc(members, nonmembers) == pytest.approx(0.90)
    curve = roc_curve(members, nonmembers)
    assert tpr_at_fpr(curve, 0.0) == 0.75 and tpr_at_fpr(curve, 0.2) == 0.75
    assert tpr_at_fpr(curve, 0.4) == 1.0
    assert (curve.fpr[0], curve.tpr[0], curve.fpr[-1], curve.tpr[-1]) == (0, 0, 1, 1)
    assert curve.auc == pytest.approx(0.90)
    report = mia_report({"loss": members}, {"loss": nonmembers})["loss"]
    assert report == {
        "auc": pytest.approx(0.9),
        "tpr@0.1%": 0.75,
        "tpr@1%": 0.75,
        "tpr@5%": 0.75,
        "n_members": 4,
        "n_nonmembers": 5,
    }


def test_auc_ties_orientation_and_trapezoid():
    assert roc_auc([1.0, 2.0], [3.0, 4.0]) == 1.0  # members have the lower loss: perfectly separated
    assert roc_auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert roc_auc([1.0, 1.0], [1.0]) == 0.5  # ties count one half
    rng = random.Random(0)
    members = [round(rng.gauss(0, 1), 1) for _ in range(60)]  # rounded: many ties
    nonmembers = [round(rng.gauss(0.5, 1), 1) for _ in range(45)]
    curve = roc_curve(members, nonmembers)
    assert curve.auc == pytest.approx(roc_auc(members, nonmembers), abs=1e-12)
    assert all(tpr_at_fpr(curve, x) <= tpr_at_fpr(curve, y) for x, y in [(0.001, 0.01), (0.01, 0.05)])
    metrics = pytest.importorskip("sklearn.metrics")
    labels = [1] * len(members) + [0] * len(nonmembers)
    expected = metrics.roc_auc_score(labels, [-s for s in members + nonmembers])
    assert roc_auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([], [1.0])


# ----------------------------------------------------------------------------------------------- gradient norm


class Bigram(nn.Module):
    """Logits W[x_t] + b: the gradient of the mean NLL is (softmax − onehot)/T on the rows read."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(vocab, vocab))
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, ids):
        return self.table[ids] + self.bias


def test_gradient_norm_by_hand():
    # Sequence 0 1 2, V = 3, uniform predictions, T = 2: ∇W rows 0, 1 = ([⅓]·3 − e_next)/2, ∇b = [⅓, −⅙, −⅙].
    # ‖∇W‖₂ = √(1/3), ‖∇b‖₂ = √(1/6); ‖·‖₁ = 4/3 and 2/3; ‖·‖∞ = ⅓ and ⅓. The score is the mean of the two.
    model = Bigram(3).train()
    ids, mask = torch.tensor([[0, 1, 2, 0]]), torch.tensor([[True, True, False]])  # the last target is padding
    assert gradient_norm_score(model, ids, mask).item() == pytest.approx((math.sqrt(1 / 3) + math.sqrt(1 / 6)) / 2)
    assert gradient_norm_score(model, ids, mask, p=1).item() == pytest.approx(1.0)
    assert gradient_norm_score(model, ids, mask, p=math.inf).item() == pytest.approx(1 / 3)
    assert model.training and all(w.grad is None for w in model.parameters())  # mode restored, .grad untouched
    with pytest.raises(ValueError, match="p must be"):
        gradient_norm_score(model, ids, mask, p=3)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(model_cfg(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)).eval()


SEQUENCES = [[0, 5, 7, 9, 11, 3], [0, 2], [0, 8, 8, 8, 30, 1, 2, 39]]


def test_gradient_norm_matches_backward_and_padding():
    model = tiny_model()
    ids, _, mask = pad_batch(SEQUENCES, torch.device("cpu"))
    batched = gradient_norm_score(model, ids, mask)
    for row, seq in enumerate(SEQUENCES):
        model.zero_grad()
        x = torch.tensor([seq])
        F.cross_entropy(model(x[:, :-1])[0], x[0, 1:]).backward()
        expected = torch.stack([w.grad.norm() for w in model.parameters() if w.grad is not None]).mean()
        assert batched[row].item() == pytest.approx(expected.item(), rel=1e-5)
    model.zero_grad(set_to_none=True)


def test_padded_batches_score_each_text_as_alone():
    model = tiny_model()
    ids, targets, mask = pad_batch(SEQUENCES, torch.device("cpu"))
    assert mask.sum(-1).tolist() == [5, 1, 7] and targets.shape == (3, 7)
    with torch.no_grad():
        logits = model(ids).float()[:, :-1]
    logps = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    for row, seq in enumerate(SEQUENCES):
        x = torch.tensor([seq])
        with torch.no_grad():
            alone = model(x).float()[:, :-1]
        alone_logps = -F.cross_entropy(alone.transpose(1, 2), x[:, 1:], reduction="none")
        full = torch.ones_like(alone_logps, dtype=torch.bool)
        assert loss_score(logps, mask)[row].item() == pytest.approx(loss_score(alone_logps, full).item(), rel=1e-5)
        mkpp = min_k_plus_plus_score(logits, targets, mask, 0.4)[row]
        assert mkpp.item() == pytest.approx(min_k_plus_plus_score(alone, x[:, 1:], full, 0.4).item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------- a memorising run

NAMES = ["ann", "bob", "cat", "dan", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lou"]
THINGS = ["red ball", "blue cup", "green hat", "old book", "big box", "small key", "warm coat", "long rope"]
PLACES = ["park", "shop", "farm", "lake", "hill", "town", "barn", "yard"]


def stories(seed: int, n: int = 16) -> list[str]:
    """``n`` texts of three random sentences over one small vocabulary: members and non-members alike."""
    rng = random.Random(seed)
    sentence = lambda: f"{rng.choice(NAMES)} took the {rng.choice(THINGS)} to the {rng.choice(PLACES)}."  # noqa: E731
    return [" ".join(sentence() for _ in range(3)) for _ in range(n)]


def write_texts(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run trained 400 steps on 16 member texts (it memorises them), a reference run with its tokenizer trained
    briefly on other texts, a run with another tokenizer, one without a tokenizer, and the text files."""
    root = tmp_path_factory.mktemp("mia")
    members = write_texts(root / "members.jsonl", stories(1))
    write_texts(root / "nonmembers.jsonl", stories(2))
    val = write_texts(root / "val.jsonl", stories(3))
    (root / "nonmembers.txt").write_text("".join(t + "\n" for t in stories(4)))
    files = ["data.source=files", f"data.val_files=[{val}]", "train.eval_every=1000", "train.ckpt_every=1000"]
    memorise = [f"data.files=[{members}]", "train.steps=400", "optim.lr=3e-3", "schedule.warmup_steps=10"]
    execute(PretrainRecipe(), tiny_config(*files, *memorise), root / "run", quiet=True)
    other_texts = write_texts(root / "reference.jsonl", stories(6))
    reference = [f"data.files=[{other_texts}]", "train.steps=20", f"tokenizer.path={root / 'run' / 'tokenizer.json'}"]
    execute(PretrainRecipe(), tiny_config(*files, *reference), root / "ref", quiet=True)
    execute(PretrainRecipe(), tiny_config("train.steps=2", "tokenizer.vocab_size=330"), root / "other", quiet=True)
    shutil.copytree(root / "run", root / "no_tokenizer")
    (root / "no_tokenizer" / "tokenizer.json").unlink()
    (root / "empty.txt").write_text("\n\n")
    write_texts(root / "blank_text.jsonl", ["ann took the red ball to the park.", ""])
    return root


def test_members_of_a_memorising_run_are_detected(runs):
    model, _, tokenizer = load_model(runs / "run")
    members, nonmembers, unseen = stories(1), stories(2), stories(3)
    scores = {name: mia_scores(model, tokenizer, texts) for name, texts in (("m", members), ("n", nonmembers))}
    scores["u"] = mia_scores(model, tokenizer, unseen, attacks=["loss"])
    assert roc_auc(scores["m"]["loss"], scores["n"]["loss"]) >= 0.8
    for attack in ("zlib", "min_k", "min_k_plus_plus"):
        assert roc_auc(scores["m"][attack], scores["n"][attack]) >= 0.75, attack
    assert 0.3 <= roc_auc(scores["u"]["loss"], scores["n"]["loss"]) <= 0.7  # both unseen: chance


def test_scores_do_not_depend_on_the_batch(runs):
    model, _, tokenizer = load_model(runs / "run")
    texts = stories(5, 5) + ["kim took the old book."]  # lengths differ: padded next to longer texts
    one = mia_scores(model, tokenizer, texts, batch_size=1)
    many = mia_scores(model, tokenizer, texts, batch_size=4)
    assert set(one) == {"loss", "zlib", "min_k", "min_k_plus_plus", "gradient_norm"}
    for attack in one:
        assert many[attack] == pytest.approx(one[attack], rel=1e-4), attack
    ids = tokenizer.encode_document(texts[0])
    x = torch.tensor([ids])
    with torch.no_grad():
        nll = F.cross_entropy(model(x)[0, :-1].float(), x[0, 1:])
    assert one["loss"][0] == pytest.approx(nll.item(), rel=1e-5)
    assert one["zlib"][0] == pytest.approx(nll.item() / zlib_entropy(texts[0]), rel=1e-5)


# ----------------------------------------------------------------------------------------------- the command


def mia_argv(runs, *extra: str, members="members.jsonl", nonmembers="nonmembers.jsonl") -> list[str]:
    files = ["--members", str(runs / members), "--nonmembers", str(runs / nonmembers)]
    return ["eval", "mia", str(runs / "run"), *files, *extra]


def test_command_writes_report_scores_and_plot(runs, capsys):
    out = runs / "out"
    argv = mia_argv(runs, nonmembers="nonmembers.txt") + ["--reference", str(runs / "ref"), "--out", str(out)]
    assert main(argv + ["--batch-size", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "mia.json").read_text())
    attacks = report["attacks"]
    assert list(attacks) == ["loss", "zlib", "min_k", "min_k_plus_plus", "reference", "gradient_norm"]
    assert attacks["loss"]["n_members"] == attacks["loss"]["n_nonmembers"] == 16
    assert attacks["loss"]["auc"] >= 0.8
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["set"] for r in rows] == ["member"] * 16 + ["nonmember"] * 16
    by_set = {s: [r["reference"] for r in rows if r["set"] == s] for s in ("member", "nonmember")}
    assert attacks["reference"]["auc"] == pytest.approx(roc_auc(by_set["member"], by_set["nonmember"]))
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_default_out_and_attack_subset(runs, capsys):
    assert main(mia_argv(runs, "--attacks", "loss,min_k", "--k", "0.2")) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["attacks"]) == ["loss", "min_k"] and report["k"] == 0.2
    assert {p.name for p in (runs / "run" / "mia").iterdir()} == {"mia.json", "scores.jsonl", "roc.png"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--members", "{root}/missing.jsonl"], "--members {root}/missing.jsonl: file not found"),
        (["--nonmembers", "{root}/empty.txt"], "{root}/empty.txt: no documents"),
        (["--members", "{root}/blank_text.jsonl"], "--members {root}/blank_text.jsonl: text 2 has no token to score"),
        (["--k", "0"], "--k must be in (0, 1], got 0.0"),
        (["--k", "1.5"], "--k must be in (0, 1], got 1.5"),
        (["--attacks", "loss,bogus"], "--attacks must be a comma list of"),
        (["--attacks", "reference"], "--attacks reference needs --reference"),
        (["--reference", "{root}/other"], "uses a different tokenizer"),
        (["--reference", "{root}/nowhere"], "--reference: run directory does not exist"),
        (["run", "{root}/no_tokenizer"], "the run has no tokenizer.json"),
    ],
    ids=[
        "missing-file",
        "empty-file",
        "empty-text",
        "k-zero",
        "k-above-one",
        "unknown-attack",
        "reference-without-model",
        "tokenizer-mismatch",
        "missing-reference",
        "no-tokenizer",
    ],
)
def test_command_user_errors_are_one_line(runs, capsys, extra, message, tmp_path):
    options = {"--members": str(runs / "members.jsonl"), "--nonmembers": str(runs / "nonmembers.jsonl")}
    run = str(runs / "run")
    for flag, value in zip(extra[::2], extra[1::2]):
        value = value.format(root=runs)
        if flag == "run":
            run = value
        else:
            options[flag] = value
    argv = ["eval", "mia", run, "--out", str(tmp_path / "out")] + [x for pair in options.items() for x in pair]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message.format(root=runs) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_long_texts_are_cut_to_the_context(runs):
    model, cfg, tokenizer = load_model(runs / "run")
    text = " ".join(stories(7, 6))
    ids = tokenizer.encode_document(text)
    assert len(ids) > cfg.model.max_seq_len
    kept = ids[: cfg.model.max_seq_len]  # the EOS and the first max_seq_len - 1 tokens
    scores = mia_scores(model, tokenizer, [text], attacks=["loss", "zlib"])
    x = torch.tensor([kept])
    with torch.no_grad():
        nll = F.cross_entropy(model(x)[0, :-1].float(), x[0, 1:])
    assert scores["loss"][0] == pytest.approx(nll.item(), rel=1e-5)
    assert scores["zlib"][0] == pytest.approx(nll.item() / zlib_entropy(tokenizer.decode(kept[1:])), rel=1e-5)
