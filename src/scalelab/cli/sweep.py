"""`scalelab sweep`: a scaling study as one resumable command.

  design OUT_DIR --budgets C1,C2,...   the ladder: per budget, shapes around the prior optimum, D solved
                                       exactly from C, hyperparameters from a law -> OUT_DIR/sweep.toml
  run OUT_DIR                          train every run through submitit (local processes or Slurm);
                                       finished runs are skipped, interrupted ones resume
  status OUT_DIR                       each run's state, step, loss, tokens/s and ETA
  fit OUT_DIR                          fit the finished runs, extrapolate, report (OUT_DIR/fit.json)
  verify OUT_DIR                       train the fit's recommendation and compare predicted with measured loss

`sweep fit` lives in scalelab.cli.sweep_fit (registered here when present).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

from scalelab.cli import HelpFormatter, add_common_flags, format_count, format_duration, parse_quantity, print_json
from scalelab.errors import UserError

EXAMPLES = """examples:
  scalelab sweep design runs/study --budgets 1e13,3e13,1e14 --data data/mine --gpus 8 --gpu-type H100
  scalelab sweep design runs/wsd --budgets 1e13,3e13,1e14 --method wsd --data data/mine
  scalelab sweep design runs/ab --budgets 1e13,3e13,1e14 --compare ffn_type=swiglu,gelu --data data/mine
  scalelab sweep run runs/study --parallel 2
  scalelab sweep run runs/study --executor slurm --gpus-per-run 8 --slurm partition=gpu --dry-run
  scalelab sweep status runs/study
  scalelab sweep verify runs/study
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="a scaling study: design a ladder, run it (resumably), fit, verify",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    verbs = p.add_subparsers(dest="sweep_verb", metavar="STEP")
    verbs.required = True
    _register_design(verbs)
    _register_run(verbs)
    _register_verify(verbs)
    try:
        fit = importlib.import_module("scalelab.cli.sweep_fit")
    except ModuleNotFoundError as e:
        if e.name != "scalelab.cli.sweep_fit":
            raise
    else:
        fit.register(verbs)


# ---- design ----------------------------------------------------------------------------------------

def _register_design(verbs) -> None:
    d = verbs.add_parser("design", help="design the runs (OUT_DIR/sweep.toml) and print them with their cost",
                         formatter_class=HelpFormatter, description=(
                             "Per budget, `--points` shapes of the search space spaced evenly in log N around the "
                             "prior law's optimum (one grid for all budgets, so budgets share shapes), each with D "
                             "= C / (exact training FLOPs per token); every run's full training config goes to "
                             "OUT_DIR/sweep.toml."))
    d.add_argument("out_dir", metavar="OUT_DIR", help="the sweep directory (new, empty, or this same design)")
    d.add_argument("--budgets", required=True, help="training budgets in FLOPs, increasing, e.g. 1e13,3e13,1e14")
    d.add_argument("--points", type=int, default=5, help="shapes per budget")
    d.add_argument("--method", default="isoflop", help="isoflop (a run per point), grid (every shape at every "
                   "budget) or wsd (a stable run per shape, the points as decay branches)")
    d.add_argument("--spread", type=float, default=0.5, help="decades of N sampled either side of the optimum")
    d.add_argument("--data", default=None, help="prepared data directory (`scalelab prepare`): its vocabulary, "
                   "and its training tokens bound D (one pass)")
    g = d.add_argument_group("search space (as `scalelab plan`)")
    g.add_argument("--style", default="llama3", help="llama3, llama2 or gpt2")
    g.add_argument("--hidden", default=None, help="n_embd values: MIN:MAX:STEP or a,b,c")
    g.add_argument("--layers", default=None, help="n_layer values: MIN:MAX:STEP or a,b,c")
    g.add_argument("--head-dims", default="64,128", help="head dims; n_head = n_embd / head_dim")
    g.add_argument("--kv-heads", default=None, help="KV-head count(s) (default: the style's)")
    g.add_argument("--ffn-ratio", type=float, default=None, help="FFN width / n_embd (default: the style's)")
    g.add_argument("--seq-len", type=int, default=2048, help="training sequence length")
    g.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: --data's, else the style's)")
    g.add_argument("--aspect", default="40:130", help="allowed n_embd / n_layer, MIN:MAX, or 'none'")
    g.add_argument("--max-tokens", default=None, help="D at most this (default: --data's training tokens)")
    law = d.add_argument_group("laws")
    law.add_argument("--law", default=None, help="prior loss law, named: chinchilla (default), epoch, shakespeare-cpu")
    law.add_argument("--law-file", default=None, help="prior loss law from a law file (`scalelab fit --out`); its "
                     "fitted hyperparameter laws too, unless --hparams")
    law.add_argument("--hparams", default=None, help="hyperparameter law: deepseek (DeepSeek LLM's, the default), "
                     "width:LR@WIDTH (lr = LR x WIDTH / n_embd, batch from DeepSeek's law), or a law file with "
                     "fitted hyperparameters")
    law.add_argument("--batch-tokens", type=int, default=None, help="a fixed global batch (tokens) for every run "
                     "instead of the law's")
    law.add_argument("--tune-lr", action="store_true", help="add a learning-rate x batch grid (0.5, 1, 2 x the "
                     "law's each) at the two smallest budgets, on the shape nearest the optimum: `sweep fit` fits "
                     "hyperparameter laws to them (DeepSeek LLM's method)")
    w = d.add_argument_group("WSD and A/B")
    w.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: each branch's decay, as a fraction of "
                   "its length (rounded up to the stable run's checkpoint grid)")
    w.add_argument("--decay-shape", default="1-sqrt", help="wsd: linear, cosine or 1-sqrt")
    w.add_argument("--compare", default=None, metavar="FIELD=V1,V2", help="design the same ladder per value: "
                   "style, num_key_value_heads, or any [model] field (e.g. ffn_type=swiglu,gelu)")
    h = d.add_argument_group("cost")
    h.add_argument("--gpus", type=int, default=None, help="GPUs for the time estimate (with --gpu-type)")
    h.add_argument("--gpu-type", default=None, help="A100-80GB, H100-SXM, H200, ... (time at --mfu of its peak)")
    h.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate")
    add_common_flags(d)
    d.set_defaults(func=run_design)


def _data_meta(path: str | None) -> dict | None:
    if path is None:
        return None
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        raise UserError(f"--data {path}: no meta.json there; give a directory made by `scalelab prepare`")
    try:
        return json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--data {path}: meta.json is not valid JSON ({e}); prepare the data again") from None


def _hparams_law(args, law_file: str | None):
    from scalelab.scaling import hparams as H

    text = args.hparams
    if text is None:
        fitted = H.hyperparameter_law_from_file(law_file) if law_file else None
        return fitted or H.DEFAULT
    if text.lower() in ("deepseek", "deepseek-llm"):
        return H.DEFAULT
    if text.lower().startswith("width:"):
        try:
            lr, width = text[6:].split("@")
            return H.width_rule(float(lr), int(width))
        except ValueError:
            raise UserError(f"--hparams {text}: write width:LR@WIDTH, e.g. width:3e-3@128") from None
    law = H.hyperparameter_law_from_file(text)
    if law is None:
        raise UserError(f"--hparams {text}: the law file has no fitted hyperparameters (fit with a learning-rate "
                        "grid first), or give deepseek or width:LR@WIDTH")
    return law


def _compare(text: str | None):
    from scalelab.config import parse_value

    if text is None:
        return None
    field, _, values = text.partition("=")
    parts = [v.strip() for v in values.split(",") if v.strip()]
    if not field.strip() or len(parts) < 2:
        raise UserError(f"--compare {text}: write FIELD=V1,V2 (two or more values), e.g. ffn_type=swiglu,gelu")
    return field.strip(), tuple(parse_value(v) for v in parts)


def build_spec(args):
    """The design's inputs from the flags (UserError on bad input, before anything is written)."""
    from scalelab.cli.plan import parse_aspect, shape_flags
    from scalelab.scaling.laws import get_law, load_law_file
    from scalelab.scaling.search import SearchSpace
    from scalelab.sweep.design import Spec, check_spec

    budgets = tuple(parse_quantity(b, name="--budgets") for b in args.budgets.split(",") if b.strip())
    if args.law and args.law_file:
        raise UserError("give --law or --law-file, not both")
    law = load_law_file(args.law_file) if args.law_file else get_law(args.law or "chinchilla")
    meta = _data_meta(args.data)
    vocab = args.vocab
    if meta is not None:
        if vocab is not None and vocab != meta["vocab_size"]:
            raise UserError(f"--vocab {vocab} differs from --data's vocabulary {meta['vocab_size']}; drop --vocab")
        vocab = int(meta["vocab_size"])
    max_tokens = parse_quantity(args.max_tokens, name="--max-tokens") if args.max_tokens else None
    if max_tokens is None and meta is not None:
        max_tokens = float(meta["splits"]["train"]["tokens"])
    space = SearchSpace(
        **shape_flags(args), style=args.style, ffn_ratio=args.ffn_ratio, seq_len=args.seq_len, vocab_size=vocab,
        aspect=parse_aspect(args.aspect), max_tokens=max_tokens)
    from scalelab.scaling.search import DEFAULT_HIDDEN, DEFAULT_LAYERS
    space = dataclasses.replace(space, hidden=space.hidden or DEFAULT_HIDDEN, layers=space.layers or DEFAULT_LAYERS)
    spec = Spec(budgets=budgets, space=space, law=law, hparams=_hparams_law(args, args.law_file),
                data_dir=str(Path(args.data).resolve()) if args.data else "", points=args.points,
                method=args.method, spread_dex=args.spread, decay_fraction=args.decay_fraction,
                decay_shape=args.decay_shape, batch_tokens=args.batch_tokens, tune_lr=args.tune_lr,
                compare=_compare(args.compare),
                overrides=tuple(args.overrides))
    if args.decay_shape not in ("linear", "cosine", "1-sqrt"):
        raise UserError(f"--decay-shape must be linear, cosine or 1-sqrt, got {args.decay_shape!r}")
    if args.gpus is not None and args.gpu_type is None:
        raise UserError("--gpus needs --gpu-type, e.g. --gpus 8 --gpu-type H100-SXM")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu is a fraction in (0, 1], got {args.mfu}")
    check_spec(spec)
    return spec


def run_design(args) -> int:
    from scalelab.files import atomic_directory, atomic_write_text, check_output_dir
    from scalelab.sweep.design import SWEEP_FILE, design, existing_design, sweep_toml

    out = check_output_dir(args.out_dir, flag="OUT_DIR")
    spec = build_spec(args)
    previous = existing_design(out) if out.exists() else None
    result = design(spec)
    if previous is not None and previous != result["fingerprint"]:
        raise UserError(f"{out} holds a sweep of another design (fingerprint {previous}, this one "
                        f"{result['fingerprint']}); give a new OUT_DIR, or delete {out} to replace it")
    result["time"] = time_estimate(result, args)
    if previous is None:  # OUT_DIR new or empty: it appears complete with its sweep.toml, or not at all
        with atomic_directory(out) as staged:
            atomic_write_text(staged / SWEEP_FILE, sweep_toml(result, ["scalelab", "sweep", *sys.argv[2:]]))
    if args.json:
        print_json(result)
    else:
        print_design(result)
    for note in result["notes"]:
        print(f"scalelab sweep design: warning: {note}", file=sys.stderr)
    print(f"{'unchanged' if previous else 'wrote'} {out / SWEEP_FILE} (fingerprint {result['fingerprint']}); next: "
          f"scalelab sweep run {out}", file=sys.stderr)
    return 0


def time_estimate(result: dict, args) -> dict:
    """Wall-clock for the design's FLOPs: at --mfu of --gpus x --gpu-type's peak, or at the training
    throughput measured on this CPU with a few steps of the design's median run."""
    flops = result["cost"]["flops"]
    if args.gpu_type:
        from scalelab.hardware import get_accelerator

        acc = get_accelerator(args.gpu_type)
        gpus = args.gpus or 1
        rate = gpus * acc.peak_bf16_flops * args.mfu
        return {"seconds": flops / rate, "flops_per_second": rate,
                "how": f"{gpus} x {acc.name} at {args.mfu:.0%} MFU, one run at a time on all of them"}
    per_thread = measure_cpu_flops(result)
    cores = os.cpu_count() or 1
    rate = per_thread * cores
    return {"seconds": flops / rate, "flops_per_second": rate,
            "how": f"{per_thread / 1e9:.2f} GFLOP/s measured here on one thread training the median run's shape, "
                   f"on each of {cores} CPU cores: `sweep run --parallel {cores}`"}


def measure_cpu_flops(result: dict, steps: int = 3) -> float:
    """Training FLOP/s of one thread on this CPU: a few AdamW steps of the median-cost run's model and
    micro-batch. One thread, as each of `sweep run --parallel <cores>`'s runs trains: torch's default of
    every core measured 0.8 GFLOP/s against 30 on one thread on 2 cores shared with other work (the
    design printed 117 min for runs that took 2)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _training_flops_per_second(result, steps)
    finally:
        torch.set_num_threads(threads)


def _training_flops_per_second(result: dict, steps: int) -> float:
    import torch

    from scalelab.counting import training_flops
    from scalelab.model import Transformer
    from scalelab.presets import resolve_model_section

    runs = sorted(result["runs"], key=lambda r: r["flops_per_token"])
    run = runs[len(runs) // 2]
    cfg = resolve_model_section(run["config"]["model"])
    t = run["config"]["train"]
    micro, seq = int(t["micro_batch_size"]), int(t["seq_len"])
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (micro, seq))

    def step() -> None:
        loss = model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return training_flops(cfg, micro, seq) * steps / (time.perf_counter() - start)


def print_design(result: dict) -> None:
    d = result["design"]
    law = d["law"]
    print(f"Sweep design ({d['method']}): budgets {', '.join(f'{b:.3g}' for b in d['budgets'])} FLOPs, "
          f"{d['points']} points each; prior law {law.get('name')}: L = {law['E']:g} + {law['A']:g}/N^{law['alpha']:g} "
          f"+ {law['B']:g}/D^{law['beta']:g}")
    hp = d["hparams"]
    print(f"Hyperparameters: {hp.get('name')} ({hp.get('source', '')}); its C: {hp.get('compute')} FLOPs")
    head = ("run", "kind", "N", "D", "tokens/N", "steps", "batch", "lr", "FLOPs", "prior loss")
    rows = []
    for r in result["runs"]:
        h = r["hparams"]
        extra = f" (from step {r['branch_step']}, decay {r['decay_steps']})" if r["kind"] == "branch" else ""
        rows.append((r["name"], r["kind"] + extra, format_count(r["N"]), format_count(r["tokens"]),
                     f"{r['tokens'] / r['N']:.1f}", str(r["steps"]), str(h["batch_tokens"]), f"{h['peak_lr']:.3g}",
                     f"{r.get('flops_trained', r['flops']):.3g}",
                     "" if r.get("prior_loss") is None else f"{r['prior_loss']:.3f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    cost = result["cost"]
    t = result["time"]
    print(f"Total: {len(result['runs'])} runs, {cost['flops']:.4g} FLOPs, about {format_duration(t['seconds'])} "
          f"({t['how']})")
    if "isoflop_flops" in cost:
        print(f"The same {sum(r['kind'] == 'branch' for r in result['runs'])} points as independent runs (isoflop): "
              f"{cost['isoflop_flops']:.4g} FLOPs; WSD costs {cost['flops'] / cost['isoflop_flops']:.0%} of that")


# ---- run and status -------------------------------------------------------------------------------

def _register_run(verbs) -> None:
    r = verbs.add_parser("run", help="train every run of the sweep (resumable), showing a live status table",
                         formatter_class=HelpFormatter, description=(
                             "Train the sweep's runs through submitit: local processes, or Slurm jobs (torchrun "
                             "inside a job for --gpus-per-run > 1). Finished runs are skipped and interrupted ones "
                             "resume from their checkpoints, so rerunning after a crash or Ctrl-C continues."))
    r.add_argument("out_dir", metavar="OUT_DIR", help="a sweep directory made by `scalelab sweep design`")
    r.add_argument("--executor", default="local", help="local (processes here) or slurm (sbatch)")
    r.add_argument("--parallel", type=int, default=1, help="runs in flight at once")
    r.add_argument("--gpus-per-run", type=int, default=1, help="GPUs per run (torchrun inside the job when > 1)")
    r.add_argument("--retries", type=int, default=2, help="tries after a run's first failure before it is reported")
    r.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: this machine's cores / --parallel "
                   "for local runs, torch's default for Slurm jobs: more threads than cores slows every run down)")
    r.add_argument("--timeout-min", type=int, default=7 * 24 * 60, help="a job's time limit in minutes")
    r.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="an sbatch parameter of submitit's SlurmExecutor, e.g. partition=gpu (repeatable)")
    r.add_argument("--dry-run", action="store_true", help="slurm: write each pending run's sbatch script to "
                   "OUT_DIR/slurm/ without submitting")
    r.set_defaults(func=run_run)
    s = verbs.add_parser("status", help="each run's state, step, loss, tokens/s and ETA",
                         formatter_class=HelpFormatter)
    s.add_argument("out_dir", metavar="OUT_DIR", help="a sweep directory")
    add_common_flags(s, set_flag=False)
    s.set_defaults(func=run_status)


def _slurm_params(items: list[str]) -> dict:
    from scalelab.config import parse_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm {item}: write KEY=VALUE, e.g. --slurm partition=gpu")
        out[key.strip()] = parse_value(value)
    return out


def run_run(args) -> int:
    from scalelab.sweep.design import read_sweep
    from scalelab.sweep.execute import EXECUTORS, run_sweep, write_slurm_scripts

    out = Path(args.out_dir)
    doc = read_sweep(out)
    if args.executor not in EXECUTORS:
        raise UserError(f"--executor must be local or slurm, got {args.executor!r}")
    for flag, v, low in (("--parallel", args.parallel, 1), ("--gpus-per-run", args.gpus_per_run, 1),
                         ("--retries", args.retries, 0), ("--threads", args.threads, 0),
                         ("--timeout-min", args.timeout_min, 1)):
        if v < low:
            raise UserError(f"{flag} must be at least {low}, got {v}")
    if not doc["design"].get("data_dir"):
        raise UserError(f"{out} was designed without --data; design it again with --data DIR")
    if not (Path(doc["design"]["data_dir"]) / "meta.json").is_file():
        raise UserError(f"the sweep's data {doc['design']['data_dir']} is gone (no meta.json); prepare it there again")
    from scalelab.sweep.execute import split_problem

    for run in doc["runs"]:
        if args.gpus_per_run > 1 and (why := split_problem(run, args.gpus_per_run)) is not None:
            raise UserError(f"--gpus-per-run {args.gpus_per_run}: {why}")
    slurm = _slurm_params(args.slurm)
    threads = args.threads
    if threads == 0 and args.executor == "local":
        threads = max(1, (os.cpu_count() or 1) // args.parallel)
    if args.dry_run:
        if args.executor != "slurm":
            raise UserError("--dry-run writes Slurm scripts; add --executor slurm")
        try:
            scripts = write_slurm_scripts(out, gpus_per_run=args.gpus_per_run, timeout_min=args.timeout_min,
                                          slurm=slurm, threads=args.threads)
        except ValueError as e:  # submitit's check of the sbatch parameters
            raise UserError(f"--slurm: {str(e).splitlines()[0]}") from None
        for s in scripts:
            print(s)
        print(f"wrote {len(scripts)} sbatch scripts under {out / 'slurm'} (not submitted)", file=sys.stderr)
        return 0

    def show(table: str) -> None:
        print(f"\n[{time.strftime('%H:%M:%S')}] scalelab sweep run {out}\n{table}", file=sys.stderr, flush=True)

    try:
        rows = run_sweep(out, executor=args.executor, parallel=args.parallel, gpus_per_run=args.gpus_per_run,
                         retries=args.retries, timeout_min=args.timeout_min, slurm=slurm, threads=threads,
                         show=show)
    except ValueError as e:
        raise UserError(f"--slurm: {str(e).splitlines()[0]}") from None
    failed = [r for r in rows if r["state"] != "done"]
    print(f"{len(rows) - len(failed)}/{len(rows)} runs done" + (f"; not done: {', '.join(r['name'] for r in failed)}"
                                                                  if failed else f"; next: scalelab sweep fit {out}"))
    return 1 if failed else 0


def run_status(args) -> int:
    from scalelab.sweep.execute import status_rows, status_table

    rows = status_rows(Path(args.out_dir))
    if args.json:
        print_json(rows)
    else:
        print(status_table(rows))
    return 0


# ---- verify -----------------------------------------------------------------------------------------

def _register_verify(verbs) -> None:
    v = verbs.add_parser("verify", help="train the fit's recommendation and compare predicted with measured loss",
                         formatter_class=HelpFormatter)
    v.add_argument("out_dir", metavar="OUT_DIR", help="a sweep directory with fit.json (`scalelab sweep fit`)")
    v.add_argument("--budget", default=None, help="the budget fit.json was made for (a check; `sweep fit "
                   "--budget C` chooses it)")
    v.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    add_common_flags(v, set_flag=False)
    v.set_defaults(func=run_verify)


def run_verify(args) -> int:
    from scalelab.sweep.verify import read_fit, verify

    out = Path(args.out_dir)
    budget = parse_quantity(args.budget, name="--budget") if args.budget is not None else None
    fit = read_fit(out, budget)
    result = verify(out, fit, threads=args.threads)
    if args.json:
        print_json(result)
        return 0
    lo, hi = result["interval"] if result["interval"] else (math.nan, math.nan)
    print(f"Verification at C = {result['budget']:.3g} FLOPs ({result['extrapolation']:.3g}x the largest budget "
          f"of the sweep): {result['shape']}, N = {format_count(result['N'])}, D = {format_count(result['D'])}")
    print(f"  predicted val loss  {result['predicted']:.4f}  (95% interval [{lo:.4f}, {hi:.4f}])")
    print(f"  measured val loss   {result['measured']:.4f}  ({result['measured'] - result['predicted']:+.4f}; "
          f"{'inside' if result['inside'] else 'OUTSIDE'} the interval)")
    print(f"  run directory       {result['run_dir']}")
    return 0
