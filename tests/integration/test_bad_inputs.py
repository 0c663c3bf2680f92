"""The bad inputs of docs BAD-INPUTS.md, one row each: every one is refused with one line, no traceback.

Each row runs one ``lmlab`` command in-process, as a new user types it, against a private copy of a
workspace of tiny runs, data and malformed files (``bad_inputs_fixtures.py``; paths relative to it,
as in the catalogue). For a bad input it checks the exit code (2 for config errors), that stderr is
one line ``lmlab <command>: error: ...`` (or argparse's usage error) holding the words that say what
and where, that no exception escapes, and that no file that existed before was changed or removed.
Rows the catalogue marks ok-accepted must succeed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from integration.bad_inputs_fixtures import build_workspace

from lmlab.cli import main

LINE, ARGPARSE, USAGE = "line", "argparse", "usage"


@dataclass(frozen=True)
class Case:
    """One catalogue row: the command, its exit code and the words of its one-line message."""

    id: str
    argv: str | tuple[str, ...]  # a string is split like a shell command line
    code: int
    says: tuple[str, ...] = ()  # in the error line (case-insensitive)
    form: str = LINE  # LINE: one line "lmlab CMD: error: ..."; ARGPARSE: usage + error; USAGE: top-level usage
    unchanged: tuple[str, ...] = ()  # victims: bytes and mtime must stay the same
    absent: tuple[str, ...] = ()  # must not exist afterwards (exit-2 rows: their --out, automatically)
    late_check: bool = False  # an exit-2 row whose check needs the data (the --out may exist by then)
    not_says: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path], None] | None = None
    cwd: str = "."
    read_only: str | None = None  # a directory name whose creation fails with EROFS

    @property
    def args(self) -> list[str]:
        return shlex.split(self.argv) if isinstance(self.argv, str) else list(self.argv)


def mkdir(*paths: str) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        for p in paths:
            (root / p).mkdir(parents=True)

    return make


def copy_file(src: str, dst: str) -> Callable[[Path], None]:
    return lambda root: shutil.copy2(root / src, root / dst)


def huge_line(root: Path) -> None:
    """A 2 MB document on one line among ordinary ones (the catalogue's 60 MB, scaled to a test)."""
    words = " ".join(f"word{i % 97} and more text" for i in range(2_000_000 // 22))
    small = [json.dumps({"text": f"a short story number {i}."}) for i in range(20)]
    (root / "bad" / "hugeline.jsonl").write_text("\n".join([json.dumps({"text": words}), *small]) + "\n")


def run_dir_written(path: str) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        assert (root / path / "config.yaml").is_file(), f"{path} was not written"

    return check


def sanitized_run_name(root: Path) -> None:
    """C112: the run directory named from '🚀/../../../escape' is made inside runs/, nowhere else."""
    work = root / "w112"
    outside = [p for base in (root, root.parent, work) for p in base.glob("escape*")]
    assert not outside, f"run directory written outside runs/: {outside}"
    runs = [p.parent for p in work.rglob("config.yaml")]
    assert runs, "no run directory was written"
    inside = (work / "runs").resolve()
    assert all(inside in p.resolve().parents for p in runs), f"run directory outside runs/: {runs}"


DP = "data prepare"
TOK = "--tokenizer tok512"
TRAIN = "train cfg/tiny.yaml"
SFT = "sft cfg/sft.yaml"
ALIGN = "align cfg/align.yaml"
GEN = "generate runs/base1 --prompt hi"

CASES = [
    # ---------------------------------------------------------------- configs
    Case("C01", "train bad/nope.yaml --out runs/bi01", 2, ("bad/nope.yaml", "not found")),
    Case("C02", "config show bad/empty.yaml", 0),
    Case("C03", "config validate bad/binary.yaml", 2, ("bad/binary.yaml", "UTF-8")),
    Case("C04", "config validate bad/list.yaml", 2, ("bad/list.yaml", "mapping")),
    Case("C05", "config validate bad/badindent.yaml", 2, ("bad/badindent.yaml", "line 3")),
    Case("C06", "config validate bad/wrongtype.yaml", 2, ("train.steps", "int")),
    Case("C07", "config validate bad/wrongtype2.yaml", 2, ("train.steps", "int")),
    Case("C08", f"{TRAIN} --out runs/bi08 optim.lrr=1e-3", 2, ("optim.lrr", "optim.lr")),
    Case("C09", f"{TRAIN} --out runs/bi09 train.steps=abc", 2, ("train.steps", "abc")),
    Case("C10", f"{TRAIN} --out runs/bi10 optim.lr=nan --quiet", 2, ("optim.lr", "nan")),
    Case("C11", f"{TRAIN} --out runs/bi11 optim.lr=inf --quiet", 2, ("optim.lr", "inf")),
    Case("C12", f"{TRAIN} --out runs/bi12 optim.lr=-1", 2, ("optim.lr", "-1")),
    Case("C13", f"{TRAIN} --out runs/bi13 train.steps=0", 2, ("train.steps", "0")),
    Case("C14", f"{TRAIN} --out runs/bi14 train.seq_len=512", 2, ("train.seq_len", "model.max_seq_len")),
    Case("C15", f"{TRAIN} --out runs/bi15 train.micro_batch_size=1.5", 2, ("train.micro_batch_size", "int")),
    Case("C16", f"{TRAIN} --out runs/bi16 model.size=gigantic", 2, ("model.size", "gigantic")),
    Case(
        "C17",
        f"{TRAIN} --out runs/bi17 model.vocab_size=100 train.steps=5",
        2,
        ("model.vocab_size", "tokenizer"),
        late_check=True,  # the tokenizer's vocabulary is known once the data is prepared
    ),
    Case("C18", f"{TRAIN} --out runs/bi18 model.norm_eps=-1 train.steps=5 --quiet", 2, ("model.norm_eps",)),
    Case("C19", f"{TRAIN} --out runs/bi19 model.init_std=nan train.steps=5 --quiet", 2, ("model.init_std",)),
    Case("C20", f"{TRAIN} --out runs/bi20 optim.eps=-1 train.steps=5 --quiet", 2, ("optim.eps",)),
    Case("C21", f"{TRAIN} --out runs/bi21 sample.top_k=-5 train.steps=5 --quiet", 2, ("sample.top_k",)),
    Case("C22", f"{TRAIN} --out runs/bi22 foo", 2, ("'foo'", "key=value")),
    Case("C23", f"{TRAIN} --out runs/bi23 schedule.name=exotic", 2, ("schedule.name", "exotic")),
    Case(
        "C24",
        f"{TRAIN} --out runs/bi24 data.num_workers=-3 data.synthetic.n_docs=777 train.steps=5 --quiet",
        2,
        ("data.num_workers",),
    ),
    # ---------------------------------------------------------------- commands and run directories
    Case("C25", "trian cfg/tiny.yaml", 2, ("unknown command", "trian"), form=USAGE),
    Case("C26", "eval foo runs/base1", 2, ("invalid choice", "foo"), form=ARGPARSE),
    Case("C27", "generate runs/does_not_exist --prompt hi", 1, ("runs/does_not_exist", "does not exist")),
    Case("C28", "generate bad/afile.txt --prompt hi", 1, ("bad/afile.txt",)),
    Case("C29", "train --resume bad/afile.txt", 1, ("bad/afile.txt", "not a run directory")),
    Case(
        "C30", "train --resume runs/emptydir", 1, ("runs/emptydir", "not a run directory"), setup=mkdir("runs/emptydir")
    ),
    Case(
        "C31",
        f"{TRAIN} --out runs/base1",
        1,
        ("runs/base1", "--resume"),
        unchanged=("runs/base1/config.yaml", "runs/base1/metrics.jsonl", "runs/base1/summary.json"),
    ),
    Case("C32", f"{TRAIN} --out bad/afile.txt", 1, ("bad/afile.txt", "not a directory"), unchanged=("bad/afile.txt",)),
    Case("C33", f"{TRAIN} --out ro/run", 1, ("ro/run", "read-only"), read_only="ro", absent=("ro",)),
    Case(
        "C34",
        f"{TRAIN} --out runs/holds_run_nockpt train.steps=5 --quiet",
        1,
        ("runs/holds_run_nockpt", "--overwrite"),
        unchanged=("runs/holds_run_nockpt/metrics.jsonl", "runs/holds_run_nockpt/config.yaml"),
    ),
    Case(
        "C35",
        f"{SFT} --out runs/ref_train_300",
        1,
        ("runs/ref_train_300",),
        unchanged=("runs/ref_train_300/config.yaml", "runs/ref_train_300/metrics.jsonl"),
    ),
    # ---------------------------------------------------------------- data prepare, tokenizer train
    Case("C36", f"{DP} bad/nope.jsonl {TOK} --out data/bi36", 1, ("bad/nope.jsonl", "not found")),
    Case("C37", f"{DP} bad/empty.jsonl {TOK} --out data/bi37", 1, ("bad/empty.jsonl", "empty")),
    Case("C38", f"{DP} bad/binary.jsonl {TOK} --out data/bi38", 1, ("bad/binary.jsonl:1", "UTF-8")),
    Case("C39", f"{DP} bad/binary.txt {TOK} --out data/bi39", 1, ("bad/binary.txt", "UTF-8")),
    Case("C40", f"{DP} bad/malformed.jsonl {TOK} --out data/bi40", 1, ("bad/malformed.jsonl:2", "JSON")),
    Case("C41", f"{DP} bad/wrongfield.jsonl {TOK} --out data/bi41", 1, ("bad/wrongfield.jsonl:1", "'text'")),
    Case("C42", f"{DP} bad/wrongtype.jsonl {TOK} --out data/bi42", 1, ("bad/wrongtype.jsonl:1", "string")),
    Case("C43", f"{DP} bad/array.jsonl {TOK} --out data/bi43", 1, ("bad/array.jsonl:1", "object")),
    Case("C44", f"{DP} bad/blank.jsonl {TOK} --out data/bi44", 1, ("bad/blank.jsonl", "empty")),
    Case("C45", f"{DP} bad/hugeline.jsonl {TOK} --out data/bi45", 0, setup=huge_line),
    Case("C46", f"{DP} bad/unicode.jsonl {TOK} --out data/bi46", 0),
    Case("C47", f"{DP} data/stories.jsonl {TOK} --out runs/base1", 1, ("runs/base1",)),
    Case("C48", f"{DP} data/stories.jsonl --tokenizer tok_nope --out data/bi48", 1, ("tok_nope", "not found")),
    Case("C49", f"{DP} data/stories.jsonl --tokenizer bad/binary.jsonl --out data/bi49", 1, ("bad/binary.jsonl",)),
    Case("C50", f"{DP} data/stories.jsonl {TOK} --out data/bi50 --val-fraction nan", 1, ("fraction", "nan")),
    Case("C51", f"{DP} data/stories.jsonl {TOK} --out data/bi51 --shard-tokens 0", 1, ("shard",)),
    Case("C52", f"{DP} bad/unicode.jsonl {TOK} --out data/bi52 --workers 0", 0),
    Case("C53", f"{DP} bad/unicode.jsonl {TOK} --out data/prep512_copy", 1, ("data/prep512_copy", "--overwrite")),
    Case("C54", "tokenizer train bad/empty.jsonl --vocab-size 512 --out tok_bi54", 1, ("bad/empty.jsonl", "empty")),
    Case("C55", "tokenizer train bad/blank.txt --vocab-size 512 --out tok_bi55", 1, ("bad/blank.txt", "empty")),
    Case("C56", "tokenizer train data/stories.jsonl --vocab-size 10 --out tok_bi56", 1, ("vocab", "10")),
    Case("C57", "tokenizer train data/stories.jsonl --vocab-size 0 --out tok_bi57", 1, ("vocab", "0")),
    Case(
        "C58",
        "tokenizer train data/stories.jsonl --vocab-size 512 --out bad/afile.txt",
        1,
        ("bad/afile.txt",),
        unchanged=("bad/afile.txt",),
    ),
    Case("C59", "tokenizer train bad/binary.jsonl --vocab-size 512 --out tok_bi59", 1, ("bad/binary.jsonl:1", "UTF-8")),
    Case(
        "C60",
        f"{TRAIN} --out runs/bi60 data.source=prepared data.prepared_dir=data/prep512 tokenizer.path=tok600/tokenizer.json",
        1,
        ("data/prep512", "tokenizer"),
    ),
    # ---------------------------------------------------------------- sft, align, reward
    Case("C61", f"{SFT} --out runs/bi61 sft.train_file=bad/nope.jsonl", 1, ("bad/nope.jsonl", "not found")),
    Case("C62", f"{SFT} --out runs/bi62 sft.train_file=bad/malformed.jsonl", 1, ("bad/malformed.jsonl:2", "JSON")),
    Case("C63", f"{SFT} --out runs/bi63 sft.train_file=bad/sft_wrongfield.jsonl", 1, ("bad/sft_wrongfield.jsonl:1",)),
    Case("C64", f"{SFT} --out runs/bi64 sft.train_file=bad/binary.jsonl", 1, ("bad/binary.jsonl:1", "UTF-8")),
    Case(
        "C65", f"{SFT} --out runs/bi65 sft.train_file=bad/sft_badroles.jsonl", 1, ("bad/sft_badroles.jsonl:1", "wizard")
    ),
    Case("C66", f"{SFT} --out runs/bi66 init_from=runs/nope", 1, ("runs/nope",)),
    Case("C67", f"{SFT} --out runs/bi67 init_from=bad/afile.txt", 1, ("bad/afile.txt",)),
    Case("C68", f"{SFT} --out runs/bi68 tokenizer.path=tok600/tokenizer.json", 1, ("tok600/tokenizer.json", "600")),
    Case(
        "C69",
        f"{SFT} --out runs/bi69 sft.train_file=bad/unicode.jsonl train.steps=5 --quiet",
        0,
        check=run_dir_written("runs/bi69"),
    ),
    Case(
        "C70",
        f"{ALIGN} --out runs/bi70 align.train_file=bad/pref_missing.jsonl",
        1,
        ("bad/pref_missing.jsonl:1", "rejected"),
    ),
    Case(
        "C71",
        f"{ALIGN} --out runs/bi71 align.train_file=bad/pref_identical.jsonl",
        1,
        ("bad/pref_identical.jsonl", "identical"),
    ),
    Case(
        "C72", f"{ALIGN} --out runs/bi72 align.train_file=bad/pref_types.jsonl", 1, ("bad/pref_types.jsonl:1", "chosen")
    ),
    Case("C73", f"{ALIGN} --out runs/bi73 align.train_file=bad/binary.jsonl", 1, ("bad/binary.jsonl:1",)),
    Case("C74", f"{ALIGN} --out runs/bi74 init_from=runs/nope", 1, ("runs/nope",)),
    Case("C75", "reward train cfg/align.yaml", 2, ("--out",), form=ARGPARSE),
    Case("C76", "reward score runs/base1 --data data/pref.jsonl", 1, ("runs/base1", "reward")),
    Case("C77", "reward score runs/rm1 --data bad/malformed.jsonl", 1, ("bad/malformed.jsonl:1",)),
    Case("C78", "reward score runs/rm1 --data bad/nope.jsonl", 1, ("bad/nope.jsonl", "not found")),
    # ---------------------------------------------------------------- Hugging Face, export
    Case("C79", "import-hf hf/nope --out runs/bi79", 1, ("hf/nope", "not found")),
    Case(
        "C80", "import-hf hf/gpt2 --out runs/bi80", 1, ("hf/gpt2/config.json", "GPT2LMHeadModel"), absent=("runs/bi80",)
    ),
    Case("C81", "import-hf hf/badjson --out runs/bi81", 1, ("hf/badjson/config.json", "JSON"), absent=("runs/bi81",)),
    Case("C82", "import-hf hf/ptbin --out runs/bi82", 1, ("hf/ptbin", "safetensors"), absent=("runs/bi82",)),
    Case("C83", "import-hf hf/wrongshape --out runs/bi83", 1, ("hf/wrongshape", "shape"), absent=("runs/bi83",)),
    Case("C84", "import-hf hf/llama --out runs/base1", 1, ("runs/base1", "already holds")),
    Case(
        "C85",
        "export-hf runs/other_size hf/automap",
        1,
        ("hf/automap", "--overwrite"),
        unchanged=("hf/automap/config.json", "hf/automap/model.safetensors", "hf/automap/modeling_evil.py"),
    ),
    Case(
        "C86",
        "export runs/base1 --out runs/victim_export.txt",
        1,
        ("runs/victim_export.txt", "--overwrite"),
        unchanged=("runs/victim_export.txt",),
        setup=copy_file("bad/afile.txt", "runs/victim_export.txt"),
    ),
    Case("C87", "export runs/nope", 1, ("runs/nope", "does not exist")),
    # ---------------------------------------------------------------- generate, eval
    Case("C88", f"{GEN} --max-new-tokens -1", 1, ("--max-new-tokens",)),
    Case("C89", f"{GEN} --temperature -1", 1, ("--temperature",)),
    Case("C90", f"{GEN} --top-p 0", 1, ("--top-p",)),
    Case("C91", ("generate", "runs/base1", "--prompt", "word " * 400, "--max-new-tokens", "5"), 0),
    Case("C92", ("generate", "runs/base1", "--prompt", "🚀 日本語 \u200b", "--max-new-tokens", "5"), 0),
    Case("C93", f"{GEN} --num-samples 0", 1, ("--num-samples",)),
    Case("C94", "eval perplexity runs/base1 --data data/nope", 1, ("data/nope", "not found")),
    Case("C95", "eval perplexity runs/base1 --data data/prep600", 1, ("data/prep600", "tokenizer")),
    Case("C96", "eval memorization runs/base1 --data bad/malformed.jsonl", 1, ("bad/malformed.jsonl:2", "JSON")),
    Case("C97", "eval memorization runs/base1 --data bad/binary.jsonl", 1, ("bad/binary.jsonl:1", "UTF-8")),
    Case("C98", "eval perplexity runs/base1 --tokens 0", 0),
    # ---------------------------------------------------------------- sweep, fit, predict, report
    Case("C99", "sweep bad/nope.yaml --out runs/sw99", 2, ("bad/nope.yaml", "not found")),
    Case("C100", "sweep bad/sweep_badkey.yaml --out runs/sw100 --dry-run", 2, ("model.d_modell",)),
    Case(
        "C101", "sweep bad/sweep_nobase.yaml --out runs/sw101 --dry-run", 2, ("bad/sweep_nobase.yaml", "nothere.yaml")
    ),
    Case(
        "C102",
        "fit chinchilla runs/emptysweep --out runs/emptysweep/fit",
        1,
        ("runs/emptysweep",),
        setup=mkdir("runs/emptysweep"),
    ),
    Case("C103", "fit chinchilla runs/onerun --out runs/onerun/fit", 1, ("runs/onerun",)),
    Case("C104", "fit annealing bad --out runs/fit104", 1, ("bad", "finished")),
    Case("C105", "predict loss runs/base1 --params 1e6 --tokens 1e9", 1, ("runs/base1", "fit.json")),
    Case("C106", "predict curve runs/nofit --schedule wsd --steps 100 --lr 1e-3", 1, ("runs/nofit", "fit.json")),
    Case("C107", "predict curve runs/fitok --schedule wsd --steps -5 --lr nan", 1, ("steps", "-5")),
    Case("C108", "report runs/nope", 1, ("runs/nope",)),
    Case("C109", "report bad/afile.txt", 1, ("bad/afile.txt",)),
    Case("C110", "report runs/emptyrep", 1, ("runs/emptyrep",), setup=mkdir("runs/emptyrep")),
    # ---------------------------------------------------------------- odd names, resume, combinations
    Case("C111", ("config", "show", "cfg/tiny.yaml", "name=🚀日本"), 0),
    Case(
        "C112",
        ("train", "../cfg/tiny.yaml", "name=🚀/../../../escape", "train.steps=5", "--quiet"),
        0,
        cwd="w112",
        setup=mkdir("w112/runs"),
        check=sanitized_run_name,
    ),
    Case("C113", "train --resume runs/base1 model.d_model=128", 1, ("runs/base1", "d_model")),
    Case("C114", f"{SFT} --out runs/bi114 init_from=runs/symck", 1, ("runs/symck", "d_model")),
    Case("C115", f"{TRAIN} --out runs/bi115 --nproc 0", 2, ("--nproc",), form=ARGPARSE),
    Case("C116", f"{TRAIN} --out runs/bi116 --resume runs/base1", 2, ("--resume",), not_says=("key=value",)),
    Case(
        "C117",
        f"{TRAIN} --out runs/bi117 objective.distill.teacher=runs/nope",
        1,
        ("objective.distill.teacher", "runs/nope"),
    ),
    Case("C118", "config show bad/dupkeys.yaml", 2, ("bad/dupkeys.yaml", "steps")),
    Case(
        "C119",
        (*shlex.split(f"{TRAIN} --out runs/bi119 data.source=files"), "data.files=[bad/binary.jsonl]"),
        1,
        ("bad/binary.jsonl:1", "UTF-8"),
    ),
    Case(
        "C120",
        f"{TRAIN} --out runs/bi120 data.synthetic.n_docs=3 train.steps=5 --quiet",
        0,
        check=run_dir_written("runs/bi120"),
    ),
    Case(
        "C121",
        (*shlex.split(f"{TRAIN} --out runs/bi121 data.source=files"), "data.files=[bad/blank.txt]"),
        1,
        ("bad/blank.txt", "empty"),
    ),
    Case("C122", "export-hf runs/symck runs/bi122_hf", 1, ("runs/symck", "d_model"), absent=("runs/bi122_hf",)),
]
assert [c.id for c in CASES] == [f"C{i:02d}" for i in range(1, 123)]


# --------------------------------------------------------------------------- workspace


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The workspace, built once per module; every case runs on its own copy."""
    return build_workspace(tmp_path_factory.mktemp("bad_inputs") / "pristine")


@pytest.fixture
def workspace(pristine, tmp_path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(pristine, root, symlinks=True)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and directory under ``root``: (kind, size, mtime, inode) — a rewrite changes one of them."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if name == ".lock":  # run-directory locks come and go
                continue
            st = p.lstat()
            kind = "dir" if p.is_dir() and not p.is_symlink() else "file"
            out[str(p.relative_to(root))] = (kind,) if kind == "dir" else (kind, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def fingerprint(path: Path) -> tuple:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns


def out_dir(args: list[str]) -> str | None:
    return args[args.index("--out") + 1] if "--out" in args else None


def read_only_mkdir(monkeypatch, root: Path, name: str) -> None:
    """``mkdir`` of ``root/name`` (or below) fails as on a read-only filesystem (tests run as root: chmod would not)."""
    real = os.mkdir
    barrier = (root / name).resolve()

    def mkdir(path, mode=0o777, *, dir_fd=None):
        p = Path(os.fsdecode(path))
        if (Path.cwd() / p).resolve() == barrier or barrier in (Path.cwd() / p).resolve().parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir)


def run_cli(args: list[str]) -> tuple[int, bool]:
    """``(exit code, exited through argparse)``; any other exception fails the case, naming where it came from."""
    escaped = None
    try:
        return main(args), False
    except SystemExit as exit_:
        return (exit_.code if isinstance(exit_.code, int) else 1), True
    except Exception as err:  # noqa: BLE001 - the point: nothing may escape
        frames = traceback.extract_tb(err.__traceback__)
        frame = next((f for f in reversed(frames) if "/lmlab/" in f.filename), frames[-1])
        escaped = f"{type(err).__name__}: {err} (raised at {Path(frame.filename).name}:{frame.lineno})"
    pytest.fail(f"exception escaped lmlab {' '.join(args)[:200]}: {escaped}", pytrace=False)


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, workspace: Path, monkeypatch, capfd):
    root = workspace
    if case.setup:
        case.setup(root)
    args = case.args
    out = out_dir(args)
    absent = list(case.absent)
    if case.code == 2 and not case.late_check and out and not (root / case.cwd / out).exists():
        absent.append(out)  # a config error stops before any work
    victims = {v: fingerprint(root / v) for v in case.unchanged}
    before = snapshot(root)
    monkeypatch.chdir(root / case.cwd)
    if case.read_only:
        read_only_mkdir(monkeypatch, root, case.read_only)

    code, via_argparse = run_cli(args)
    captured = capfd.readouterr()
    err = captured.err
    monkeypatch.undo()

    expected = case.code
    assert "Traceback" not in err, err[-2000:]
    assert code == expected, f"exit {code}, expected {expected}; stderr: {err.strip()[-500:]}"
    if case.code != 0:
        lines = err.strip().splitlines()
        assert lines, "no message on stderr"
        if case.form == USAGE:
            message = lines[0]
            assert message.startswith("lmlab: "), err
        elif case.form == ARGPARSE and via_argparse:
            message = lines[-1]
            assert lines[0].startswith("usage: lmlab"), err
            assert message.startswith(f"lmlab {args[0]}") and ": error: " in message, err
        else:
            assert len(lines) == 1, f"{len(lines)} lines on stderr, expected one:\n{err[-2000:]}"
            message = lines[0]
            assert message.startswith(f"lmlab {args[0]}: error: "), message
        missing = [w for w in case.says if w.lower() not in message.lower()]
        assert not missing, f"{missing} not in {message!r}"
        wrong = [w for w in case.not_says if w.lower() in message.lower()]
        assert not wrong, f"{wrong} in {message!r}"
    for path in absent:
        assert not (root / case.cwd / path).exists(), f"{path} was created"
    for path, print_ in victims.items():
        assert fingerprint(root / path) == print_, f"{path} was rewritten"
    after = snapshot(root)
    changed = sorted(p for p, s in before.items() if after.get(p) != s)
    assert not changed, f"files that existed before were changed or removed: {changed[:10]}"
    if case.check:
        case.check(root)


# --------------------------------------------------------------------------- --overwrite does replace


def test_export_overwrite_replaces_the_file(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    victim = Path("runs/victim.safetensors")
    victim.write_text("old")
    assert main(["export", "runs/base1", "--out", str(victim), "--overwrite"]) == 0
    assert victim.read_bytes()[:8] != b"old" and victim.stat().st_size > 1000
    assert main(["export", "runs/base1", "--out", "runs"]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_export_hf_overwrite_replaces_the_whole_directory(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    assert main(["export-hf", "runs/other_size", "hf/automap", "--overwrite"]) == 0
    names = sorted(p.name for p in Path("hf/automap").iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert "auto_map" not in json.loads(Path("hf/automap/config.json").read_text())
    assert not list(Path("hf").glob(".automap.tmp*"))
    # never over the run being exported, even with --overwrite
    assert main(["export-hf", "runs/other_size", "runs", "--overwrite"]) == 1
    assert "holds the run" in capsys.readouterr().err
    assert (Path("runs/other_size") / "config.yaml").is_file()
    # a failed export (a foreign checkpoint) leaves the directory it would have replaced as it was
    before = snapshot(workspace / "hf")
    assert main(["export-hf", "runs/symck", "hf/automap", "--overwrite"]) == 1
    assert "checkpoint from another model" in capsys.readouterr().err
    assert snapshot(workspace / "hf") == before
    assert main(["export-hf", "runs/base1", "bad/afile.txt"]) == 1
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, words",
    [
        ("generate runs/base1 --temperature nan", ("--temperature", "nan")),
        ("generate runs/base1 --top-k -1", ("--top-k",)),
        ("generate runs/base1 --device nowhere", ("--device", "nowhere")),
        ("eval perplexity runs/base1 --tokens -5", ("--tokens", "-5")),
        ("eval memorization runs/base1 --data data/stories.jsonl --new-tokens 0", ("--new-tokens",)),
        ("eval memorization runs/base1 --data data/stories.jsonl --prefix-tokens -1", ("--prefix-tokens",)),
        ("eval memorization runs/base1 --data data/stories.jsonl --batch-size 0", ("--batch-size",)),
        ("eval memorization runs/base1 --data data/stories.jsonl --out runs", ("--out runs", "directory")),
        ("generate runs/base1 --refusal-threshold 2", ("--refusal-threshold", "[0, 1]", "-1")),
        ("generate runs/base1 --category-threshold weapons=-0.5", ("--category-threshold weapons", "[0, 1]")),
        ("eval safety runs/base1 --threshold 1.5", ("--threshold", "[0, 1]")),
        ("eval safety runs/base1 --thresholds 0,0.5,3", ("--thresholds", "3.0")),
        ("eval safety runs/base1 --refusal-temperature 0", ("--refusal-temperature",)),
        ("safety gcg runs/base1 --suffix-len 0", ("--suffix-len", ">= 1", "0")),
        ("safety gcg runs/base1 --steps -3", ("--steps", "-3")),
        ("safety lat runs/base1 --out runs/lat_bad --epsilon 0", ("--epsilon", "> 0")),
        ("safety lat runs/base1 --out runs/lat_bad --epsilon -1", ("--epsilon", "-1")),
        ("safety lat runs/base1 --out runs/lat_bad --layer 9", ("--layer 9", "out of range", "blocks")),
        ("safety overgenerate runs/base1 --out runs/og_bad --samples 0", ("--samples", "0")),
        ("safety retokenize runs/base1 --attacks data/none.json --p 0,2", ("--p", "[0, 1]")),
    ],
)
def test_generate_and_eval_arguments_are_checked_first(args, words, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    assert main(shlex.split(args)) == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"lmlab {args.split()[0]}: error: ") and "\n" not in message, message
    assert all(w in message for w in words), message
    assert snapshot(workspace) == before


@pytest.mark.parametrize(
    "overrides, words",
    [
        ("model.ffn.kind=moe model.ffn.experts=4 model.ffn.top_k=9", ("model.ffn.top_k=9", "experts=4")),
        ("model.attention.kind=sliding model.attention.window=100000", ("window=100000", "max_seq_len")),
        ("model.attention.kind=s2 model.attention.vert_stride=3", ("vert_stride=3", "KV heads")),
        ("model.recurrence.enabled=true model.recurrence.prelude_layers=5", ("prelude_layers=5", "core block")),
        ("model.ffn.kind=moe train.compile=full", ("train.compile=full", "model.ffn.kind=moe")),
        ("data.synthetic.world=arithmetic model.abacus.enabled=true", ("digit", "split_digits")),
    ],
    ids=["moe_top_k", "window", "s2_stride", "recurrence_layers", "moe_full_compile", "abacus_digits"],
)
def test_impossible_architectures_are_one_config_error(overrides, words, workspace, monkeypatch, capsys):
    """Issue 14 item 7: exit 2, one line naming the setting, nothing in the workspace changed."""
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    assert main([*shlex.split(TRAIN), "--out", "runs/arch", *overrides.split(), "--quiet"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("lmlab train: error: ") and "\n" not in message, message
    assert all(w in message for w in words), message
    assert {k: v for k, v in snapshot(workspace).items() if not k.startswith("runs/arch")} == before
