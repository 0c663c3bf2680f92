"""Every reader of users' text turns bytes that are not UTF-8 into one ``DataError`` naming file and line."""

from __future__ import annotations

import gzip
import json

import pytest

from lmlab.cli import main
from lmlab.data.chat import read_records
from lmlab.data.preference import load_preference_file
from lmlab.data.prepare import read_documents
from lmlab.data.textio import decode_text, iter_lines
from lmlab.errors import DataError
from lmlab.eval.memorization import read_documents as memorization_documents

LATIN1 = "café".encode("latin-1")  # b"caf\xe9": \xe9 starts a 3-byte sequence that "\"" cannot continue


def _jsonl_with_bad_line(path, good: list[dict], bad_line: int = 3):
    """``good`` rows as JSONL with a Latin-1 row at ``bad_line`` (1-based); its bad byte is byte 14 of the line."""
    lines = [json.dumps(r).encode() for r in good]
    lines.insert(bad_line - 1, b'{"text": "' + LATIN1 + b'"}')
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _message(path, line: int, byte: int = 14, reason: str = "invalid continuation byte") -> str:
    return rf"^{path}:{line}: not valid UTF-8 \({reason} at byte {byte} of the line\); re-encode"


def test_line_reader_names_line_and_byte(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(b"ok\r\nfine\n\xffbad\n")
    lines = iter_lines(path)
    assert next(lines) == (1, "ok") and next(lines) == (2, "fine")
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8 \(invalid start byte at byte 1 of the line\)"):
        next(lines)
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8 \(invalid start byte at byte 4 of the line\)"):
        decode_text(b"one\ntwo\xff\n", path)


def test_prepare_reader_jsonl_and_txt(tmp_path):
    bad = _jsonl_with_bad_line(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}])
    docs = read_documents([bad])
    assert [next(docs).text, next(docs).text] == ["a", "b"]  # the lines before the bad one are read
    with pytest.raises(DataError, match=_message(bad, 3)):
        next(docs)
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"first line\nsecond " + LATIN1 + b" line\n")
    with pytest.raises(DataError, match=_message(txt, 2, byte=11)):
        list(read_documents([txt]))


def test_sft_records(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = _jsonl_with_bad_line(tmp_path / "sft.jsonl", [row, row, row], bad_line=2)
    with pytest.raises(DataError, match=_message(bad, 2)):
        read_records(bad)


def test_preference_file(tmp_path, bpe):
    pair = {"prompt": "a", "chosen": "good", "rejected": "bad"}
    bad = tmp_path / "pairs.jsonl"
    bad.write_bytes(json.dumps(pair).encode() + b'\n{"prompt": "' + LATIN1 + b'", "chosen": "x", "rejected": "y"}\n')
    with pytest.raises(DataError, match=_message(bad, 2, byte=16)):
        load_preference_file(bad, bpe)
    binary = tmp_path / "pairs.jsonl.gz"  # e.g. a compressed file passed as is
    binary.write_bytes(gzip.compress(json.dumps(pair).encode()))
    with pytest.raises(DataError, match=rf"^{binary}:1: not valid UTF-8 \(invalid start byte at byte 2 of the line\)"):
        load_preference_file(binary, bpe)
    # U+2028 is valid unescaped inside a JSON string and no line break of the file
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({**pair, "prompt": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert len(load_preference_file(ok, bpe)) == 1


def test_memorization_documents(tmp_path):
    bad = _jsonl_with_bad_line(tmp_path / "mem.jsonl", [{"text": "a"}], bad_line=2)
    with pytest.raises(DataError, match=_message(bad, 2)):
        memorization_documents(bad)
    txt = tmp_path / "mem.txt"
    txt.write_bytes(b"one\r\n\r\ntwo  \n" + LATIN1 + b"\n")
    with pytest.raises(DataError, match=_message(txt, 4, byte=4, reason="unexpected end of data")):
        memorization_documents(txt)
    txt.write_bytes(b"one\r\n\r\ntwo  \n")
    assert memorization_documents(txt) == ["one", "two  "]


def test_cli_prints_one_line(tmp_path, capsys):
    bad = _jsonl_with_bad_line(tmp_path / "bad.jsonl", [{"text": "some words here"}] * 4)
    code = main(["tokenizer", "train", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "tok")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert (
        err.strip()
        == f"lmlab tokenizer: error: {bad}:3: not valid UTF-8 (invalid continuation byte at byte 14 of the line); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"doc {i} of words"}) + "\n" for i in range(20)))
    assert main(["tokenizer", "train", str(good), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    code = main(["data", "prepare", str(bad), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"lmlab data: error: {bad}:3: not valid UTF-8") and "Traceback" not in err
    assert not (tmp_path / "o").exists()
