"""From a run's config to a prepared data directory and its tokenizer.

``prepare_run_data`` handles the four ``data.source`` kinds:

* ``synthetic``: documents from a registered world (``lmlab.data.synthetic``);
* ``files``: local ``.txt``/``.jsonl``/``.parquet`` files;
* ``prepared``: a directory written by ``lmlab data prepare``, used as is;
* ``mixture``: several of the first two with one shared tokenizer (``lmlab.data.mixture``).

Synthetic and file sources are prepared once and cached (``lmlab.data.cache``).
"""

from __future__ import annotations

from pathlib import Path

from lmlab.config import RunConfig
from lmlab.data.cache import prepare_files, prepare_synthetic
from lmlab.data.mixture import prepare_mixture_data
from lmlab.data.shards import check_tokenizer, load_manifest
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError
from lmlab.safe_io import write_bytes_atomic


def prepare_run_data(cfg: RunConfig, run_dir: str | Path | None = None) -> tuple[Path, TextTokenizer]:
    """Make sure the run's shards exist; return their directory and the tokenizer (also copied into ``run_dir``
    when one is given)."""
    d = cfg.data
    if d.source == "prepared":
        data_dir, tok = _open_prepared(cfg)
    elif d.source == "synthetic":
        data_dir, tok = prepare_synthetic(cfg)
    elif d.source == "files":
        data_dir, tok = prepare_files(cfg)
    elif d.source == "mixture":
        dirs, tok = prepare_mixture_data(cfg)
        data_dir = next(iter(dirs.values()))
    else:  # the config loader only allows the kinds above
        raise DataError(f"unknown data.source {d.source!r}")
    if run_dir is not None:
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(run / "tokenizer.json", (data_dir / "tokenizer.json").read_bytes())
    return data_dir, tok


def _open_prepared(cfg: RunConfig) -> tuple[Path, TextTokenizer]:
    data_dir = Path(cfg.data.prepared_dir or "")
    manifest = load_manifest(data_dir)
    tok = TextTokenizer.load(cfg.tokenizer.path or data_dir / "tokenizer.json")
    check_tokenizer(manifest, tok, data_dir)
    return data_dir, tok
