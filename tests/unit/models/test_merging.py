"""Model merging: each method on hand-made tensors (numbers written out), then ``lmlab merge`` on run directories
(the merged run loads and generates; a greedy soup never scores worse than its best ingredient)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.cli import main as lmlab_main
from lmlab.config import load_config, save_config
from lmlab.data.tokenizer import TextTokenizer
from lmlab.models import merging
from lmlab.models.decoder import Decoder
from lmlab.train.checkpoint import list_checkpoints, save_checkpoint
from lmlab.train.pretrained import load_model


def sd(*values):
    return {"w": torch.tensor(values, dtype=torch.float32), "step": torch.tensor(7)}


def test_average_and_linear_by_hand():
    merged = merging.average([sd(1.0, 2.0), sd(3.0, 6.0)])
    assert merged["w"].tolist() == [2.0, 4.0] and merged["step"].item() == 7  # integers from the first
    assert merging.average([sd(1.0, 2.0), sd(3.0, 6.0)], [3, 1])["w"].tolist() == [1.5, 3.0]
    with pytest.raises(ValueError, match="non-negative"):
        merging.average([sd(1.0), sd(2.0)], [1.0, -1.0])


def test_slerp_by_hand():
    a, b = sd(1.0, 0.0), sd(0.0, 1.0)  # 90 degrees apart: halfway is (cos 45°, sin 45°)
    half = merging.slerp(a, b, 0.5)["w"]
    torch.testing.assert_close(half, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    assert merging.slerp(a, b, 0.0)["w"].tolist() == [1.0, 0.0]
    parallel = merging.slerp(sd(1.0, 1.0), sd(2.0, 2.0), 0.25)["w"]  # same direction: linear
    torch.testing.assert_close(parallel, torch.tensor([1.25, 1.25]))


def test_task_arithmetic_by_hand():
    base, a, b = sd(1.0, 1.0), sd(2.0, 1.0), sd(1.0, 3.0)  # task vectors (1, 0) and (0, 2)
    assert merging.task_arithmetic(base, [a, b], scale=0.5)["w"].tolist() == [1.5, 2.0]


def test_ties_by_hand():
    """Task vectors τ1 = (4, −1, 2, 0.5), τ2 = (−3, 2, 1, −0.2), τ3 = (1, −3, 0.1, 0.3) over a zero base.
    Trim to density 0.5 (two largest of four): τ1 → (4, 0, 2, 0), τ2 → (−3, 2, 0, 0), τ3 → (1, −3, 0, 0).
    Elected signs of the sums (2, −1, 2, 0): (+, −, +, 0). Agreeing entries: column 0 {4, 1} → 2.5,
    column 1 {−3} → −3, column 2 {2} → 2, column 3 none → 0."""
    base = sd(0.0, 0.0, 0.0, 0.0)
    tasks = [sd(4.0, -1.0, 2.0, 0.5), sd(-3.0, 2.0, 1.0, -0.2), sd(1.0, -3.0, 0.1, 0.3)]
    assert merging.ties(base, tasks, density=0.5)["w"].tolist() == [2.5, -3.0, 2.0, 0.0]
    assert merging.trim(torch.tensor([1.0, -5.0, 3.0, 0.5]), 0.5).tolist() == [0.0, -5.0, 3.0, 0.0]


def test_greedy_soup_adds_only_what_helps():
    """Scores are the distance to 2.0: models at 1.0 (score 1), 3.4 (1.4) and 9.0 (7). Start from 1.0; adding
    3.4 gives 2.2 (0.2, better), adding 9.0 to those gives 4.47 (2.47, worse): the soup is {1.0, 3.4}."""
    states = [sd(3.4), sd(9.0), sd(1.0)]
    soup, chosen, own = merging.greedy_soup(states, lambda s: abs(float(s["w"][0]) - 2.0))
    assert chosen == [2, 0] and soup["w"].tolist() == pytest.approx([2.2])
    assert own == pytest.approx([1.4, 7.0, 1.0])


def test_mismatched_models_are_refused():
    with pytest.raises(ValueError, match="has other weights"):
        merging.check_compatible([sd(1.0), {"v": torch.zeros(1)}], ["a", "b"])
    with pytest.raises(ValueError, match="has shape"):
        merging.check_compatible([sd(1.0), sd(1.0, 2.0)], ["a", "b"])


TEXTS = ["hello there, how are you today? I am fine, thank you."] * 20


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base run and three 'fine-tuned' runs (the base plus noise), one with three checkpoints."""
    root = tmp_path_factory.mktemp("merge")
    tok = TextTokenizer.train_bpe(TEXTS, 300)
    cfg = load_config(
        None, ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", f"model.vocab_size={tok.vocab_size}"]
    )
    torch.manual_seed(0)
    base = Decoder(cfg.model)
    out = {}
    for name, noise in (("base", 0.0), ("a", 0.01), ("b", 0.02), ("c", 0.05)):
        run = root / name
        gen = torch.Generator().manual_seed(len(out))
        state = {k: v + noise * torch.randn(v.shape, generator=gen) for k, v in base.state_dict().items()}
        for step in (1, 2, 3) if name == "a" else (1,):
            save_checkpoint(run, step, {k: v + 0.001 * step for k, v in state.items()}, model_cfg=cfg.model)
        save_config(cfg, run / "config.yaml")
        tok.save(run / "tokenizer.json")
        out[name] = run
    (root / "val.jsonl").write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": t}]})
                + "\n" for t in ("I am fine, thank you.", "how are you today?"))
    )  # fmt: skip
    out["val"] = root / "val.jsonl"
    return out


def _weights(run):
    model, _, _ = load_model(run)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_merge_command_writes_a_loadable_run(runs, tmp_path, capsys):
    assert lmlab_main(["merge", str(runs["a"]), str(runs["b"]), "--out", str(tmp_path / "soup")]) == 0
    soup, a, b = _weights(tmp_path / "soup"), _weights(runs["a"]), _weights(runs["b"])
    for key in soup:
        torch.testing.assert_close(soup[key], (a[key] + b[key]) / 2)
    assert lmlab_main(["generate", str(tmp_path / "soup"), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    argv = ["merge", str(runs["a"]), str(runs["b"]), str(runs["c"]), "--method", "ties", "--base", str(runs["base"])]
    assert lmlab_main([*argv, "--out", str(tmp_path / "ties")]) == 0
    meta = json.loads((list_checkpoints(tmp_path / "ties")[0] / "meta.json").read_text())
    assert meta["source"] == "merge" and meta["method"] == "ties" and meta["density"] == 0.2


def test_last_checkpoints_average(runs, tmp_path):
    assert lmlab_main(["merge", str(runs["a"]), "--last", "2", "--out", str(tmp_path / "avg")]) == 0
    checkpoints = list_checkpoints(runs["a"])
    two, three = _weights(checkpoints[1]), _weights(checkpoints[2])
    avg = _weights(tmp_path / "avg")
    for key in avg:
        torch.testing.assert_close(avg[key], (two[key] + three[key]) / 2)


def test_greedy_soup_is_never_worse_than_its_best_run(runs, tmp_path):
    argv = ["merge", str(runs["a"]), str(runs["b"]), str(runs["c"]), "--method", "greedy", "--val", str(runs["val"])]
    assert lmlab_main([*argv, "--out", str(tmp_path / "greedy")]) == 0
    record = json.loads((tmp_path / "greedy" / "merge.json").read_text())
    assert record["soup_val_loss"] <= min(record["val_loss"].values()) + 1e-6
    assert record["chosen"][0] == min(record["val_loss"], key=record["val_loss"].get)


def test_bad_merges_are_one_message(runs, tmp_path, capsys):
    def refused(argv, message):
        assert lmlab_main(["merge", *map(str, argv)]) == 1
        assert message in capsys.readouterr().err

    refused([runs["a"], runs["b"], "--method", "ties", "--out", tmp_path / "x"], "needs --base")
    refused([runs["a"], "--out", tmp_path / "y"], "at least two runs")
    refused([runs["a"], runs["b"], "--out", runs["b"], "--overwrite"], "is one of the runs being merged")
    assert (runs["b"] / "config.yaml").is_file()
    other = tmp_path / "other"
    cfg = load_config(None, ["model.d_model=64", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=300"])
    save_checkpoint(other, 1, Decoder(cfg.model), model_cfg=cfg.model)
    save_config(cfg, other / "config.yaml")
    (other / "tokenizer.json").write_text((runs["a"] / "tokenizer.json").read_text())
    refused([runs["a"], other, "--out", tmp_path / "z"], "another model section")
    assert not (tmp_path / "z").exists()
