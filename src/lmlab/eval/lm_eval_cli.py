"""``python -m lmlab.eval.lm_eval_cli ...``: lm-eval's own command line with lmlab's model registered.

lm-eval 0.4 finds models only in its registry (no plugin entry points), so ``lm_eval --model lmlab`` needs the
registration this module does first; every flag is lm-eval's, e.g.
``python -m lmlab.eval.lm_eval_cli run --model lmlab --model_args run=RUN --tasks lmlab_facts_mc
--include_path $(lmlab eval harness --tasks-dir)``.
"""

from __future__ import annotations

import lmlab.eval.harness  # noqa: F401  (registers --model lmlab)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
