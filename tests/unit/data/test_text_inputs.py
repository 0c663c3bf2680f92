"""Plain-text corpora and chosen validation files: a ``.txt`` file is cut into documents (blank lines by default, a
separator line, chunks, or whole), one ``input.txt`` is enough to train on, and ``data.val_files`` /
``--val-files`` make the validation split, reported by name and size."""

from __future__ import annotations

import json

import pytest

from lmlab.cli import main as lmlab_main
from lmlab.data.prepare import TextSplit, read_documents
from lmlab.errors import ConfigError
from lmlab.recipes.pretrain import run_pretraining

from helpers import tiny_config

TEXT = "First para\nline two\n\n\nSecond\n---\nThird\n"


def test_each_way_of_cutting_a_text_file_by_hand():
    assert list(TextSplit().documents(TEXT)) == [(1, "First para\nline two"), (5, "Second\n---\nThird")]
    assert list(TextSplit("separator", "---").documents(TEXT)) == [
        (1, "First para\nline two\n\n\nSecond"),
        (7, "Third"),
    ]
    assert list(TextSplit("chunks", chunk_chars=12).documents(TEXT)) == [
        (1, "First para"), (2, "line two"), (5, "Second\n---"), (7, "Third"),
    ]  # fmt: skip
    assert list(TextSplit("file").documents(TEXT)) == [(1, TEXT)]
    assert list(TextSplit().documents("\n\n  \n")) == []


def test_documents_of_a_txt_file_carry_their_first_line(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    docs = list(read_documents([tmp_path / "a.txt"]))
    assert [(d.text.split("\n")[0], d.line) for d in docs] == [("First para", 1), ("Second", 5)]


def _corpus(path, n=40):
    lines = [f"the cat number {i} sat on the mat and looked at the dog.\n\n" for i in range(n)]
    path.write_text("".join(lines))
    return path


def test_one_input_txt_trains_and_the_split_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    corpus = _corpus(tmp_path / "input.txt", 80)
    cfg = tiny_config("data.source=files", f"data.files=[{corpus}]", "data.val_fraction=0.2")
    summary = run_pretraining(cfg, tmp_path / "run")
    assert summary["status"] == "finished"
    out = capsys.readouterr().out
    assert "data: train " in out and "from 20% of the documents (data.val_fraction)" in out
    manifest = json.loads(
        (tmp_path / "cache" / "data").glob("files-*").__next__().joinpath("manifest.json").read_text()
    )
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 80


def test_val_files_are_the_validation_split(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    train, val = _corpus(tmp_path / "train.txt", 30), _corpus(tmp_path / "val.txt", 8)
    cfg = tiny_config("data.source=files", f"data.files=[{train}]", f"data.val_files=[{val}]")
    run_pretraining(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert "data: train 30 documents" in out and "validation 8 documents" in out
    assert f"from data.val_files: {val}" in out


def test_data_prepare_with_val_files_and_txt_options(tmp_path, capsys):
    tok = tmp_path / "tok"
    corpus = tmp_path / "plays.txt"
    corpus.write_text("".join(f"ACT {i}\nthe king speaks to the queen.\n===\n" for i in range(12)))
    _corpus(tmp_path / "val.txt", 3)
    assert lmlab_main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tok)]) == 0
    argv = ["data", "prepare", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "shards")]
    argv += ["--txt-documents", "separator", "--txt-separator", "===", "--val-files", str(tmp_path / "val.txt")]
    assert lmlab_main(argv) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    # the separator cuts the validation file too: it has none, so it is one document
    assert (manifest["splits"]["train"]["documents"], manifest["splits"]["val"]["documents"]) == (12, 1)
    bad = ["data", "prepare", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit):
        lmlab_main([*bad, "--txt-documents", "separator"])
    assert "needs --txt-separator" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.source=files", "data.files=[a.txt]", "data.txt_documents=separator"], "needs data.txt_separator"),
        (["data.val_files=[v.txt]"], "data.val_files is for data.source=files"),
        (["data.txt_chunk_chars=0"], "data.txt_chunk_chars"),
    ],
)
def test_text_input_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)
