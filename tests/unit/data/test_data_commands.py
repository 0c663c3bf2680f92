"""``lmlab tokenizer train``, ``lmlab data synth`` and ``lmlab data prepare`` through ``lmlab.cli.main``."""

from __future__ import annotations

import json

import pytest

from lmlab.cli import main
from lmlab.data.shards import TokenShards
from lmlab.data.synthetic import get_world
from lmlab.data.tokenizer import TextTokenizer


def test_synth_tokenizer_prepare(tmp_path, capsys):
    corpus = tmp_path / "stories.jsonl"
    assert main(["data", "synth", "--world", "stories", "--n-docs", "40", "--seed", "3", "--out", str(corpus)]) == 0
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert [r["text"] for r in rows] == list(get_world("stories").documents(3, 40))

    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    tok = TextTokenizer.load(tmp_path / "tok" / "tokenizer.json")
    assert tok.vocab_size == 300

    out = tmp_path / "prep"
    argv = ["data", "prepare", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(out)]
    assert main([*argv, "--val-fraction", "0.1", "--shard-tokens", "1000", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer_hash"] == tok.hash and m["shard_tokens"] == 1000
    assert f"train: {m['splits']['train']['documents']} documents, {m['splits']['train']['tokens']} tokens" in printed
    assert f"unigram entropy (train): {m['unigram_entropy']:.4f} nats/token" in printed
    assert len(TokenShards.open(out, "train")) == m["splits"]["train"]["tokens"]
    assert m["sources"][0]["documents"] == 40


def test_tokenizer_train_on_world(tmp_path):
    argv = ["tokenizer", "train", "--world", "stories", "--n-docs", "50", "--vocab-size", "320", "--out", str(tmp_path)]
    assert main(argv) == 0
    trained = TextTokenizer.load(tmp_path / "tokenizer.json")
    direct = TextTokenizer.train_bpe(get_world("stories").documents(0, 50), 320)
    assert trained.hash == direct.hash


def test_cli_errors(tmp_path, capsys):
    assert main(["data", "synth", "--world", "nope", "--n-docs", "3", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown synthetic world 'nope'" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    code = main(["data", "prepare", str(missing), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 1 and "tokenizer file not found" in capsys.readouterr().err
    TextTokenizer.train_bpe(["a b c"] * 3, 300).save(tmp_path / "tok")
    code = main(["data", "prepare", str(missing), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("lmlab data: error: data file not found") and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    code = main(["data", "prepare", str(bad), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o")])
    assert code == 1 and "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):  # argparse: files and --world together
        main(["tokenizer", "train", str(bad), "--world", "stories", "--vocab-size", "300", "--out", str(tmp_path)])


def test_prepare_refuses_to_replace_prepared_data_unless_overwrite(tmp_path, capsys):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps({"text": f"first corpus doc {i}"}) + "\n" for i in range(10)))
    second.write_text(
        "".join(json.dumps({"text": f"second doc {i} is longer than the first"}) + "\n" for i in range(10))
    )
    TextTokenizer.train_bpe(["first second corpus doc is longer than the"] * 5, 300).save(tmp_path / "tok")
    out = tmp_path / "prep"
    base = ["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--out", str(out), "--val-fraction", "0"]
    assert main([*base, str(first)]) == 0
    before = (out / "train_0000.bin").read_bytes()
    capsys.readouterr()
    assert main([*base, str(second)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        f"lmlab data: error: refusing to replace {out}: it already holds prepared data (manifest.json); "
        "pass --overwrite to replace it, or choose another output directory"
    )
    assert (out / "train_0000.bin").read_bytes() == before
    assert main([*base, str(second), "--overwrite"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"][0]["path"] == str(second) and (out / "train_0000.bin").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tokenizer_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a directory")
    argv = ["tokenizer", "train", "--world", "stories", "--n-docs", "5", "--vocab-size", "300"]
    assert main([*argv, "--out", str(tmp_path / "taken")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        f"lmlab tokenizer: error: --out {tmp_path / 'taken'}: {tmp_path / 'taken'} is a file, not a directory; "
        "give a directory to hold tokenizer.json"
    )
    assert main([*argv, "--out", str(tmp_path / "taken" / "sub")]) == 1
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "not a directory"
