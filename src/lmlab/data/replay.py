"""Replay for continual pre-training: a share of each batch from the data the parent run was trained on.

Ibrahim et al. 2024 (*Simple and Scalable Strategies to Continually Pre-train Large Language Models*, arXiv
2403.08763) match re-training from scratch with re-warming, re-decaying and replaying a few percent of the old
data; Guo et al. 2024 (*Efficient Continual Pre-training by Mitigating the Stability Gap*, arXiv 2406.14833) show
the old-domain loss first rising, then recovering. ``data.replay_fraction`` = f draws that share of rows from the
parent's training split (smooth round-robin, ``lmlab.data.mixture``) and logs ``val_loss/parent`` at every
evaluation; f = 0 only tracks it. The parent's data is ``data.replay_dir`` or the ``data_dir`` recorded in the
``init_from`` run's ``summary.json``; it must be tokenized with this run's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.config import RunConfig
from lmlab.data.shards import check_tokenizer, load_manifest
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError


def replay_data_dir(cfg: RunConfig, tokenizer: TextTokenizer, parent: Path | None) -> Path:
    """The prepared data directory to replay (``data.replay_dir``, else the data of the ``parent`` run directory),
    checked to exist and to share the run's tokenizer."""
    if cfg.data.replay_dir:
        path, origin = Path(cfg.data.replay_dir), "data.replay_dir"
    else:
        summary = (parent or Path()) / "summary.json"
        recorded = json.loads(summary.read_text()).get("data_dir") if summary.is_file() else None
        if not recorded:
            raise DataError(
                f"init_from={cfg.init_from}: its summary.json records no data_dir to replay (an imported model or a "
                "mixture run); name a prepared data directory with data.replay_dir"
            )
        path, origin = Path(recorded), f"the data of init_from={cfg.init_from}"
    manifest = load_manifest(path)  # a DataError naming the directory when it is not prepared data
    try:
        check_tokenizer(manifest, tokenizer, path)
    except DataError as err:
        raise DataError(f"replay ({origin}): {err}; replayed data must use this run's tokenizer") from None
    return path
