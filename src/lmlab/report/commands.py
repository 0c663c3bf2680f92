"""``lmlab report``: write an HTML report of one run, of several runs, or of a sweep directory.

- ``lmlab report RUN``: ``RUN/report.html`` (:mod:`lmlab.report.run_report`);
- ``lmlab report SWEEP``: ``SWEEP/report.html`` comparing its run subdirectories, with its fits
  (:mod:`lmlab.report.multi`);
- ``lmlab report RUN1 RUN2 ... --out FILE``: the runs compared.

The page is one self-contained file (images embedded, no network).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.errors import UserError
from lmlab.report.multi import runs_report, sweep_report
from lmlab.report.run_report import run_report


def is_single_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "summary.json").is_file()


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmlab report", description="Write an HTML report for runs or a sweep.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="a run directory, a sweep directory, or several runs")
    p.add_argument("--out", help="output file (default DIR/report.html; required with several directories)")
    args = p.parse_args(argv)
    dirs = [Path(d) for d in args.dirs]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise UserError(f"not a directory: {', '.join(missing)}")
    if len(dirs) > 1:
        if not args.out:
            raise UserError("several directories: give the report's file with --out FILE (e.g. --out compare.html)")
        text = runs_report(dirs)
    else:
        text = run_report(dirs[0]) if is_single_run(dirs[0]) else sweep_report(dirs[0])
    out = Path(args.out) if args.out else dirs[0] / "report.html"
    out.write_text(text)
    print(f"wrote {out}")
    return 0
