"""CLI entry points of the science commands: ``lmlab fit``, ``lmlab predict`` and ``lmlab sweep``.

- ``lmlab fit {chinchilla,annealing,lr-horizon,mixture,step-law} INPUT --out DIR [--compute C ...] [--bootstrap N]``
  writes ``DIR/fit.json`` and ``DIR/fit.png`` (input formats: :mod:`lmlab.science.fits`).
- ``lmlab predict curve FIT_DIR --schedule cosine|constant|wsd|multistep|rewarm|power --steps N --lr LR [...]`` prints
  ``step,lr,loss`` from an annealing fit, with ``loss_lo,loss_hi`` (the 95% interval over the fit's bootstrap
  refits) when it has them (schedule conventions: :mod:`lmlab.science.schedules`; ``--out`` writes the CSV of every
  step); ``lmlab predict loss FIT_DIR --params N --tokens D`` evaluates a Chinchilla fit, with its interval and a
  warning beyond 10× the fitted compute; ``lmlab predict hparams [FIT_DIR] --params N --tokens D`` gives Step Law's
  optimal LR and batch (the paper's constants, or a ``step-law`` fit's).
- ``lmlab sweep SWEEP.yaml --out DIR [--jobs N] [--dry-run] [--tokens-per-s X]`` runs a sweep
  (:mod:`lmlab.science.sweep`); ``--launcher slurm [--slurm-partition P --slurm-time MIN --slurm-gpus N ...]``
  runs it as one Slurm job array (:mod:`lmlab.science.slurm`); ``lmlab sweep results DIR`` (re)writes
  ``DIR/results.csv`` from its run dirs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from lmlab.errors import ConfigError, UserError
from lmlab.science.results import collect_results, write_results_csv
from lmlab.science.schedules import SCHEDULES
from lmlab.science.slurm import slurm_launcher
from lmlab.science.step_law import STEP_LAW, StepLaw
from lmlab.science.sweep import Launcher, SweepSpec, load_sweep, plan_table, run_sweep

LAWS = ("chinchilla", "annealing", "lr-horizon", "mixture", "step-law")
#: Default bootstrap resamples: enough for a rough 95% interval in seconds (Epoch used 4000; pass --bootstrap 4000).
DEFAULT_BOOTSTRAP = 100


def fit_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab fit", description="Fit a scaling law to sweep results (docs/science.md §1-4)."
    )
    p.add_argument("law", choices=LAWS)
    p.add_argument("input", help="sweep directory, results CSV, or (annealing) run directories / curve CSV")
    p.add_argument("--out", required=True, help="directory for fit.json and fit.png")
    p.add_argument("--compute", type=float, nargs="*", default=[], help="chinchilla: budgets (FLOPs) to allocate")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_BOOTSTRAP,
        help=f"resamples for 95%% intervals (default {DEFAULT_BOOTSTRAP}; 0: none)",
    )
    p.add_argument("--seed", type=int, default=42, help="bootstrap seed")
    p.add_argument("--grid", choices=("default", "small"), default="default", help="chinchilla: 4500 or 72 starts")
    p.add_argument(
        "--method",
        choices=("batched", "scipy"),
        default="batched",
        help="chinchilla: batched L-BFGS screen + polish (seconds) or scipy from every start (the literal §1.2 loop)",
    )
    p.add_argument(
        "--params-column",
        help="chinchilla, step-law: column used as N (params or non_embedding_params; default params for chinchilla, "
        "non_embedding_params for step-law, as each paper counts)",
    )
    p.add_argument(
        "--holdout",
        nargs="+",
        default=[],
        metavar="RUN",
        help="runs left out of the fit and predicted: chinchilla run names or top:K (the K largest by compute); "
        "annealing curve names",
    )
    p.add_argument("--fix-E", type=float, dest="fix_e", help="chinchilla: hold E at this value (a known loss floor)")
    p.add_argument(
        "--metric",
        help="the loss to fit: a results column (default loss, the final validation loss) or, for annealing runs, "
        "an eval record key (default val_loss); e.g. val_loss_docs on a world with an exact floor",
    )
    p.add_argument("--momentum", type=float, default=0.999, help="annealing: S2 momentum lambda")
    p.add_argument(
        "--vertex",
        choices=("local", "global"),
        default="local",
        help="lr-horizon: LR* from a parabola through the 5 LRs around the best (with an interval) or the whole sweep",
    )
    p.add_argument("--weights", type=float, nargs="*", help="mixture: family weights (default equal)")
    args = p.parse_args(argv)
    from lmlab.science import fits

    out = Path(args.out)
    if args.holdout and args.law not in ("chinchilla", "annealing"):
        raise UserError(f"--holdout applies to chinchilla and annealing fits, not {args.law}")
    if args.metric and args.law == "mixture":
        raise UserError("--metric does not apply to a mixture fit (it reads each family's loss column)")
    if args.bootstrap < 0:
        raise UserError("--bootstrap must be >= 0")
    if args.law == "chinchilla":
        res = fits.fit_chinchilla_command(
            args.input,
            out,
            computes=args.compute,
            bootstrap=args.bootstrap,
            seed=args.seed,
            grid=args.grid,
            params_column=args.params_column or "params",
            method=args.method,
            holdout=args.holdout,
            fixed_E=args.fix_e,
            loss_column=args.metric or "loss",
        )
    elif args.law == "annealing":
        res = fits.fit_annealing_command(
            args.input,
            out,
            bootstrap=args.bootstrap,
            seed=args.seed,
            lam=args.momentum,
            holdout=args.holdout,
            metric=args.metric or "val_loss",
        )
    elif args.law == "lr-horizon":
        res = fits.fit_lr_horizon_command(
            args.input,
            out,
            bootstrap=args.bootstrap,
            seed=args.seed,
            loss_column=args.metric or "loss",
            vertex=args.vertex,
        )
    elif args.law == "step-law":
        res = fits.fit_step_law_command(
            args.input,
            out,
            bootstrap=args.bootstrap,
            seed=args.seed,
            params_column=args.params_column or "non_embedding_params",
            loss_column=args.metric or "loss",
        )
    else:
        res = fits.fit_mixture_command(args.input, out, weights=args.weights)
    print(f"{args.law} fit on {res['n_points']} points -> {out / fits.FIT_FILE}")
    print("params: " + ", ".join(f"{k}={_show(v)}" for k, v in res["params"].items()))
    for row in res.get("compute_optimal", []):
        print(
            f"C={row['compute']:.3g}: N_opt={row['N_opt']:.4g} D_opt={row['D_opt']:.4g} D/N={row['tokens_per_param']:.1f}"
        )
    curves = args.law == "annealing"  # left out one curve at a time, errors over its points
    for what, label in (
        ("leave_one_out", "leave-one-curve-out" if curves else "leave-one-out"),
        ("holdout", "held-out"),
    ):
        errors = res.get(what)
        if errors and errors.get("n") and "lr_mean_factor" in errors:
            print(
                f"leave-one-out on {errors['n']} grids: LR* mean factor {errors['lr_mean_factor']:.3f}, batch* "
                f"{errors['batch_mean_factor']:.3f} (constant hyperparameters: {errors['lr_base_mean_factor']:.3f}, "
                f"{errors['batch_base_mean_factor']:.3f})"
            )
        elif errors and errors.get("n") and "mean_abs_log_error" in errors:
            print(
                f"leave-one-out LR* on {errors['n']} sweeps: mean factor {np.exp(errors['mean_abs_log_error']):.3f}, "
                f"max {errors['max_factor']:.3f} (a constant LR*: mean factor "
                f"{np.exp(errors['baseline_mean_abs_log_error']):.3f})"
            )
        elif errors and errors.get("n"):
            print(
                f"{label} error on {errors['n']} {'points' if curves else 'runs'}: mean {100 * errors['mean_rel_error']:.2f}%, max "
                f"{100 * errors['max_rel_error']:.2f}% (trivial baseline, the lowest fitted loss: mean "
                f"{100 * errors['baseline_mean_rel_error']:.2f}%)"
            )
    if res.get("excluded"):
        print("excluded: " + ", ".join(f"{k} ({v})" for k, v in res["excluded"].items()))
    for warning in res.get("warnings", []):
        print(f"warning: {warning}")
    return 0


def _show(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def predict_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmlab predict", description="Predict from a fitted law.")
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("curve", help="loss curve of an LR schedule from an annealing fit (docs/science.md §2)")
    c.add_argument("fit_dir")
    c.add_argument("--schedule", required=True, choices=SCHEDULES)
    c.add_argument("--steps", type=int, required=True)
    c.add_argument("--lr", type=float, required=True, help="peak learning rate")
    c.add_argument("--warmup", type=int, default=0)
    c.add_argument("--min-lr", type=float, default=0.0)
    c.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: fraction of steps spent decaying")
    c.add_argument("--decay-shape", choices=("linear", "cosine", "sqrt"), default="linear")
    c.add_argument("--milestones", type=int, nargs="*", default=[], help="multistep: steps where the LR drops")
    c.add_argument("--factor", type=float, default=0.1, help="multistep: LR multiplier at each milestone")
    c.add_argument("--restart", type=int, help="rewarm: step of the restart")
    c.add_argument("--rewarm-steps", type=int, default=0)
    c.add_argument("--power-a", type=float, default=4.6, help="power: LR = min(lr, batch_sequences·a·tokens^b)")
    c.add_argument("--power-b", type=float, default=-0.51)
    c.add_argument("--batch-sequences", type=int, help="power: sequences per optimizer update")
    c.add_argument("--seq-len", type=int, help="power: tokens per sequence")
    c.add_argument(
        "--min-lr-ratio", type=float, default=0.0, help="power: the decay ends at this fraction of its start"
    )
    c.add_argument("--every", type=int, default=0, help="print every K steps (default: about 20 lines)")
    c.add_argument("--out", help="write step,lr,loss (,loss_lo,loss_hi) for every step to this CSV")
    hp = sub.add_parser(
        "hparams", help="optimal LR and batch size at N params and D tokens by Step Law (docs/science.md §27)"
    )
    hp.add_argument("fit_dir", nargs="?", help="a step-law fit (default: the paper's constants)")
    hp.add_argument("--params", type=float, required=True, help="non-embedding parameters N")
    hp.add_argument("--tokens", type=float, required=True, help="training tokens D")
    hp.add_argument("--seq-len", type=int, help="also give the batch in sequences of this length")
    lo = sub.add_parser("loss", help="loss at N params and D tokens from a Chinchilla fit (docs/science.md §1)")
    lo.add_argument("fit_dir")
    lo.add_argument("--params", type=float, required=True)
    lo.add_argument("--tokens", type=float, required=True)
    args = p.parse_args(argv)
    from lmlab.science.annealing import AnnealingParams
    from lmlab.science.chinchilla import ChinchillaParams
    from lmlab.science.fit_checks import predicted_loss_report
    from lmlab.science.fits import params_of, read_fit
    from lmlab.science.schedules import make_schedule

    if args.what == "hparams":
        return _predict_hparams(args, read_fit(args.fit_dir) if args.fit_dir else None)
    fit = read_fit(args.fit_dir)
    law = params_of(fit)
    if args.what == "loss":
        if not isinstance(law, ChinchillaParams):
            raise UserError(f"{args.fit_dir} holds a {fit['law']} fit; 'predict loss' needs a chinchilla fit")
        if args.params <= 0 or args.tokens <= 0:
            raise UserError("--params and --tokens must be positive")
        print(predicted_loss_report(fit, law, args.params, args.tokens))
        return 0
    if not isinstance(law, AnnealingParams):
        raise UserError(f"{args.fit_dir} holds a {fit['law']} fit; 'predict curve' needs an annealing fit")
    lrs = make_schedule(
        args.schedule,
        args.steps,
        args.lr,
        warmup=args.warmup,
        min_lr=args.min_lr,
        decay_fraction=args.decay_fraction,
        shape=args.decay_shape,
        milestones=args.milestones,
        factor=args.factor,
        restart=args.restart,
        rewarm_steps=args.rewarm_steps,
        power=_power_args(args) if args.schedule == "power" else None,
    )
    momentum = float(fit.get("momentum", 0.999))
    loss = law.predict(lrs, args.warmup, momentum)
    columns, header = [np.arange(len(lrs)), lrs, loss], "step,lr,loss"
    draws = [AnnealingParams.from_dict(p).predict(lrs, args.warmup, momentum) for p in fit.get("bootstrap_params", [])]
    if draws:  # the 95% interval of the prediction over the fit's bootstrap refits
        columns += list(np.percentile(np.stack(draws), [2.5, 97.5], axis=0))
        header += ",loss_lo,loss_hi"
    table = np.stack(columns, axis=1)
    every = args.every or max(1, args.steps // 20)
    shown = sorted(set(range(max(args.warmup, every), len(lrs), every)) | {len(lrs) - 1})
    print(header)
    for s in shown:
        print(",".join([f"{s}", f"{lrs[s]:.6g}", *(f"{v:.6f}" for v in table[s, 2:])]))
    if args.out:
        np.savetxt(
            args.out,
            table,
            delimiter=",",
            header=header,
            comments="",
            fmt=["%d", "%.8g"] + ["%.8f"] * (len(columns) - 2),
        )
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _power_args(args: argparse.Namespace) -> dict:
    """The Power scheduler's settings for ``predict curve`` (the batch is needed: its LR depends on tokens seen)."""
    if not args.batch_sequences or not args.seq_len:
        raise UserError("--schedule power needs --batch-sequences and --seq-len (its LR depends on the tokens seen)")
    return {
        "a": args.power_a,
        "b": args.power_b,
        "batch_sequences": args.batch_sequences,
        "seq_len": args.seq_len,
        "min_lr_ratio": args.min_lr_ratio,
    }


def _predict_hparams(args: argparse.Namespace, fit: dict | None) -> int:
    """Step Law's optimal LR and batch: the paper's constants, or those of ``fit`` (a step-law fit.json)."""
    if args.params <= 0 or args.tokens <= 0:
        raise UserError("--params and --tokens must be positive")
    if fit is not None:
        if fit.get("law") != "step-law":
            raise UserError(f"{args.fit_dir} holds a {fit.get('law')} fit; 'predict hparams' needs a step-law fit")
        law, source = StepLaw(**fit["params"]), f"the fit in {args.fit_dir}"
        n_range, d_range = (fit["data_range"].get(c) for c in (fit["params_column"], "tokens"))
    else:
        law, source, n_range, d_range = STEP_LAW, "Step Law (Li et al. 2025)", None, None
    lr, batch = float(law.lr(args.params, args.tokens)), float(law.batch_tokens(args.params, args.tokens))
    print(f"N={args.params:.4g} D={args.tokens:.4g} by {source}: lr*={lr:.4g}, batch*={batch:.4g} tokens", end="")
    print(f" ({batch / args.seq_len:.1f} sequences of {args.seq_len})" if args.seq_len else "")
    for name, value, span in (("N", args.params, n_range), ("D", args.tokens, d_range)):
        if span and not span[0] / 10 <= value <= span[1] * 10:
            print(f"warning: {name}={value:.3g} is more than 10x outside the fitted {span[0]:.3g}–{span[1]:.3g}")
    return 0


def sweep_main(argv: list[str]) -> int:
    if argv and argv[0] == "results":
        p = argparse.ArgumentParser(prog="lmlab sweep results", description="Collect a sweep's runs into results.csv.")
        p.add_argument("dir")
        args = p.parse_args(argv[1:])
        rows = collect_results(args.dir)
        path = write_results_csv(rows, Path(args.dir) / "results.csv")
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        print(f"{len(rows)} runs ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}) -> {path}")
        return 0
    p = argparse.ArgumentParser(
        prog="lmlab sweep", description="Run a sweep of training runs (or 'lmlab sweep results DIR')."
    )
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--out", required=True, help="sweep directory (one run directory per run)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local", help="where the runs train")
    p.add_argument("--jobs", type=int, help="runs at a time (--launcher local; default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--tokens-per-s", type=float, default=20000.0, help="throughput for the dry-run time estimate")
    g = p.add_argument_group("--launcher slurm (each overrides the same key of the sweep file's slurm: section)")
    g.add_argument("--slurm-partition", metavar="NAME", help="partition (default: the cluster's default)")
    g.add_argument("--slurm-time", type=int, metavar="MIN", help="time limit per run in minutes (default 60)")
    g.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per run (default 0)")
    g.add_argument("--slurm-cpus", type=int, metavar="N", help="CPUs per run (default 1)")
    g.add_argument("--slurm-mem", metavar="SIZE", help="memory per run, e.g. 16G (default: the partition's)")
    g.add_argument("--slurm-array-parallelism", type=int, metavar="N", help="runs at a time (default 256)")
    g.add_argument(
        "--slurm-opt", action="append", default=[], metavar="KEY=VALUE", help="any sbatch option (repeatable)"
    )
    args = p.parse_args(argv)
    spec = load_sweep(args.sweep)
    out = Path(args.out)
    launcher = _launcher(args, spec, out)
    if args.dry_run:
        print(plan_table(spec, out, args.tokens_per_s))
        return 0
    outcome = run_sweep(spec, out, jobs=args.jobs or 1, launcher=launcher)
    print(
        f"{len(outcome.started)} started, {len(outcome.resumed)} resumed, {len(outcome.skipped)} skipped (finished), "
        f"{len(outcome.failed)} failed -> {out / 'results.csv'}"
    )
    for name, rc in outcome.failed.items():
        print(f"  failed: {name} (exit {rc}; see {out / 'logs' / (name + '.log')})")
    return 1 if outcome.failed else 0


def _launcher(args: argparse.Namespace, spec: SweepSpec, out: Path) -> Launcher | None:
    """None for the local launcher; the Slurm launcher with the file's ``slurm:`` section under the options."""
    given = [
        f"--{k.replace('_', '-')}" for k, v in vars(args).items() if k.startswith("slurm_") and v not in (None, [])
    ]
    if args.launcher == "local":
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --launcher slurm")
        return None
    if args.jobs is not None:
        raise ConfigError("--jobs is for --launcher local; with slurm, --slurm-array-parallelism sets runs at a time")
    cli = {k: getattr(args, f"slurm_{k}") for k in ("partition", "time", "gpus", "cpus", "mem", "array_parallelism")}
    sbatch = dict(spec.slurm.sbatch)
    for item in args.slurm_opt:
        key, sep, value = item.partition("=")
        if not key:
            raise UserError(f"--slurm-opt {item!r}: expected KEY=VALUE (an sbatch option), e.g. account=lab")
        sbatch[key.lstrip("-")] = value if sep else True
    options = replace(spec.slurm, **{k: v for k, v in cli.items() if v is not None}, sbatch=sbatch)
    options.validate(f"{spec.path} with the --slurm-* options")
    return slurm_launcher(options, out / "slurm", f"lmlab-{spec.path.stem}")
