"""One input layer for fine-tuning and preference data: the same records from JSONL, JSON, CSV, parquet, a
``datasets`` ``save_to_disk`` folder and a local ``datasets.load_dataset`` folder, with column mapping; errors name
the file and the line or row."""

from __future__ import annotations

import csv
import json

import pytest

from lmlab.data.chat import read_records
from lmlab.data.preference import load_preference_file
from lmlab.data.rows import read_rows, source_sha256
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError

ROWS = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(5)]


def write_all(root):
    """The same rows in every supported form; returns ``{form: source}``."""
    datasets = pytest.importorskip("datasets")
    root.mkdir(exist_ok=True)
    out = {"jsonl": root / "d.jsonl", "json": root / "d.json", "csv": root / "d.csv"}
    out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out["json"].write_text(json.dumps(ROWS))
    with out["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(ROWS)
    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(root / "d.parquet"))
    out["parquet"] = root / "d.parquet"
    table.save_to_disk(str(root / "saved"))
    out["save_to_disk"] = root / "saved"
    datasets.DatasetDict({"train": table}).save_to_disk(str(root / "saved_dict"))
    out["save_to_disk_dict"] = root / "saved_dict"
    (root / "folder").mkdir()
    (root / "folder" / "train.jsonl").write_text(out["jsonl"].read_text())
    out["load_dataset_folder"] = root / "folder"
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("rows"))


def test_every_form_gives_the_same_rows(sources):
    for form, source in sources.items():
        rows = [row for _, row in read_rows(source)]
        assert rows == ROWS, form


def test_rows_say_where_they_come_from(sources):
    assert [where for where, _ in read_rows(sources["jsonl"])][1] == f"{sources['jsonl']}:2"
    assert [where for where, _ in read_rows(sources["csv"])][1] == f"{sources['csv']}:3"  # after the header
    assert [where for where, _ in read_rows(sources["parquet"])][1] == f"{sources['parquet']}:row 2"


def test_columns_are_mapped_and_a_missing_one_is_named(sources):
    mapped = [row for _, row in read_rows(sources["csv"], columns={"question": "prompt", "answer": "completion"})]
    assert mapped[0] == {"prompt": "What is 0 plus 0?", "completion": "It is 0."}
    with pytest.raises(DataError, match=r"d.jsonl:1: no column 'prompt' to read as 'messages'"):
        list(read_rows(sources["jsonl"], columns={"prompt": "messages"}))


def test_sft_records_and_preference_pairs_from_any_form(sources, tmp_path):
    columns = {"question": "prompt", "answer": "completion"}
    for form in ("csv", "save_to_disk", "load_dataset_folder"):
        records = read_records(sources[form], columns)
        assert [m["content"] for m in records[1].messages] == ["What is 1 plus 1?", "It is 2."]
    tok = TextTokenizer.train_bpe([r["question"] + r["answer"] for r in ROWS] * 10, 300)
    pairs = [{"q": r["question"], "good": r["answer"], "bad": "No."} for r in ROWS]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "pairs"))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    mapping = {"q": "prompt", "good": "chosen", "bad": "rejected"}
    from_disk = load_preference_file(tmp_path / "pairs", tok, columns=mapping)
    from_jsonl = load_preference_file(tmp_path / "pairs.jsonl", tok, columns=mapping)
    assert [p.chosen_ids for p in from_disk.pairs] == [p.chosen_ids for p in from_jsonl.pairs]
    assert from_disk.sha256 == source_sha256(tmp_path / "pairs") != from_jsonl.sha256


def test_bad_sources_are_one_message(tmp_path):
    (tmp_path / "a.csv").write_text("question,answer\nx,y,z\n")
    with pytest.raises(DataError, match=r"a.csv:2: more values than the 2 header columns"):
        list(read_rows(tmp_path / "a.csv"))
    (tmp_path / "b.json").write_text("[{")
    with pytest.raises(DataError, match=r"b.json: not valid JSON"):
        list(read_rows(tmp_path / "b.json"))
    (tmp_path / "c.json").write_text("[1]")
    with pytest.raises(DataError, match=r"c.json:row 1: expected a JSON object, got int"):
        list(read_rows(tmp_path / "c.json"))
    with pytest.raises(DataError, match="SFT data file not found: .*missing.jsonl"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="could not be read with datasets.load_dataset"):
        list(read_rows("lmlab-test/no-such-dataset"))


def test_pretraining_reads_text_from_json_csv_and_saved_datasets(sources):
    from lmlab.data.prepare import expand_paths, read_documents

    for form in ("json", "csv", "save_to_disk"):
        assert expand_paths([sources[form]]) == [sources[form]]
        docs = list(read_documents([sources[form]], text_field="answer"))
        assert [d.text for d in docs] == [r["answer"] for r in ROWS] and docs[1].line == 2
    with pytest.raises(DataError, match=r"d.csv:2: no field 'text'"):
        list(read_documents([sources["csv"]]))


def test_a_datasets_id_is_a_pretraining_source_read_by_datasets():
    """``data.files`` may name a datasets id; offline and not cached, reading it is one message naming it."""
    from lmlab.data.prepare import expand_paths, read_documents

    assert [str(p) for p in expand_paths(["lmlab-test/no-such-corpus"])] == ["lmlab-test/no-such-corpus"]
    with pytest.raises(DataError, match="lmlab-test/no-such-corpus: could not be read with datasets.load_dataset"):
        list(read_documents(["lmlab-test/no-such-corpus"]))


def cache_hub_dataset(cache_dir, repo_id: str, rows: list[dict]) -> None:
    """Write ``rows`` where ``datasets.load_dataset(repo_id)`` keeps a Hub dataset it has downloaded and prepared
    (``HF_DATASETS_CACHE/<org>___<name>/<config>/<version>/<hash>/``), so it is read offline, as after a first
    download; nothing is fetched."""
    import shutil

    datasets = pytest.importorskip("datasets")
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, name = repo_id.split("/")
    source = cache_dir / "source.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(source))
    builder = Parquet(
        cache_dir=str(cache_dir), dataset_name=name, config_name="default", hash="0" * 16,
        data_files=DataFilesDict.from_patterns({"train": [str(source)]}),
    )  # fmt: skip
    builder.download_and_prepare()
    prepared = next((cache_dir / name).iterdir())  # default-<hash of the data files>
    target = cache_dir / f"{org}___{name}" / "default"
    target.parent.mkdir()
    shutil.move(str(prepared), str(target))
    shutil.rmtree(cache_dir / name)


def test_a_cached_hub_dataset_is_read_offline(tmp_path, monkeypatch):
    """A Hub dataset id in the ``datasets`` cache (``HF_DATASETS_OFFLINE``, as tests run) is read by every consumer:
    rows, SFT records with a column mapping, and pretraining documents; one not in the cache is one message."""
    datasets = pytest.importorskip("datasets")
    from lmlab.data.prepare import read_documents

    cache = tmp_path / "datasets-cache"
    cache.mkdir()
    cache_hub_dataset(cache, "lmlab-test/tiny-qa", ROWS)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    assert [row for _, row in read_rows("lmlab-test/tiny-qa")] == ROWS
    records = read_records("lmlab-test/tiny-qa", columns={"question": "prompt", "answer": "completion"})
    assert [r.messages[-1]["content"] for r in records] == [r["answer"] for r in ROWS]
    assert [d.text for d in read_documents(["lmlab-test/tiny-qa"], text_field="answer")] == [r["answer"] for r in ROWS]
    with pytest.raises(DataError, match="lmlab-test/other: could not be read with datasets.load_dataset"):
        list(read_rows("lmlab-test/other"))
