"""`scalelab plan C`: the compute-optimal model shape and token count for a training budget.

Backward N-D grid search: for every shape in the space, D is solved exactly from C with the
shape's exact training FLOPs per token, the loss law scores (N, D), and the lowest loss wins.
The 6ND closed form is printed beside it. The budget is C in FLOPs, or GPUs × hours.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from scalelab.cli import (HelpFormatter, add_common_flags, format_bytes, format_count, format_duration,
                          parse_quantity, print_json)
from scalelab.config import INT_LIMITS
from scalelab.errors import UserError
from scalelab.files import check_output_file

EXAMPLES = """examples:
  scalelab plan 1.36e21
  scalelab plan 1.36e21 --no-gqa --top 5
  scalelab plan 1e22 --enforce-chinchilla --tolerance 0.25 --max-tokens 2T
  scalelab plan --gpus 8 --gpu-type H100 --hours 24 --mfu 0.4 --emit-config plan.toml
  scalelab plan --gpus 64 --gpu-type H100 --hours 240 --layout auto --emit-config plan.toml
  scalelab plan 3e20 --hidden 512:4096:128 --layers 8:40:2 --head-dims 64 --kv-heads 4 --law epoch
  scalelab plan 1e21 --law-file law.json --plot isoflop.png --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="compute-optimal model shape and token count for a FLOP budget",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    # let "-5e20" reach C (and its "must be positive" message) instead of reading as a flag
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
    p.add_argument("C", nargs="?", help="training compute budget in FLOPs, e.g. 1.36e21 (or use --hours)")
    g = p.add_argument_group("search space")
    g.add_argument("--style", default="llama3", help="family style: llama3, llama2, gpt2 (norms, FFN type, "
                   "positions, default KV heads, FFN ratio and vocabulary)")
    g.add_argument("--hidden", default=None, help="n_embd values: MIN:MAX:STEP (inclusive) or a,b,c (default "
                   "1024:8192:256, grown with the budget while a wider or narrower shape would beat the plan)")
    g.add_argument("--layers", default=None, help="n_layer values: MIN:MAX:STEP (inclusive) or a,b,c (default "
                   "16:64:2, grown likewise)")
    g.add_argument("--head-dims", default="64,128", help="head dims to try; n_head = n_embd / head_dim")
    g.add_argument("--kv-heads", default=None, help="KV-head count(s), e.g. 8 or 4,8 (default: the style's; "
                   "llama3: 8); shapes where they do not divide n_head are skipped")
    g.add_argument("--no-gqa", action="store_true", help="MHA: as many KV heads as query heads")
    g.add_argument("--ffn-ratio", type=float, default=None, help="FFN width / n_embd (default: the style's; "
                   "llama3 3.5), rounded up to the style's multiple")
    g.add_argument("--seq-len", type=int, default=2048, help="training sequence length S")
    g.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the style's; llama3 128256)")
    c = p.add_argument_group("constraints")
    c.add_argument("--aspect", default="40:130", help="allowed n_embd / n_layer, MIN:MAX, or 'none' "
                   "(40..130 spans GPT-3 350M to LLaMA-3.1-405B; see docs/plan.md)")
    c.add_argument("--enforce-chinchilla", action="store_true",
                   help="keep D/N within R·(1 ± tolerance) (R = --tokens-per-param)")
    c.add_argument("--tolerance", type=float, default=0.5, help="relative band for --enforce-chinchilla")
    c.add_argument("--tokens-per-param", type=float, default=20.0, help="the ratio R for --enforce-chinchilla")
    c.add_argument("--max-tokens", default=None, help="dataset size: D at most this, e.g. 2T")
    c.add_argument("--max-params", default=None, help="N at most this, e.g. 8B")
    h = p.add_argument_group("hardware (memory filter, wall-clock, or the budget itself)")
    h.add_argument("--gpus", type=int, default=None, help="number of GPUs (FSDP over all of them, or with --layout auto any "
                   "layout; one GPU trains unsharded)")
    h.add_argument("--gpu-type", default=None, help="A6000, A100-40GB, A100-80GB, H100-SXM, H100-PCIe, H200, B200")
    h.add_argument("--hours", type=float, default=None, help="budget from hardware: C = GPUs × peak × MFU × hours")
    h.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for --hours and wall-clock")
    h.add_argument("--layout", choices=("auto",), default=None, help="auto: keep a shape when any layout (tp, "
                   "pp, FSDP/HSDP) fits it, and for the best one search the fastest layout, micro-batch and "
                   "checkpointing that fits (scalelab.steptime); --emit-config writes it")
    law = p.add_argument_group("loss law L(N, D) = E + A/N^alpha + B/D^beta")
    law.add_argument("--law", default=None, help="named law: chinchilla (default), epoch, shakespeare-cpu (the demo's own fit)")
    law.add_argument("--law-file", default=None, help="JSON law file (what `scalelab fit` writes)")
    for name in ("E", "A", "B", "alpha", "beta"):
        law.add_argument(f"--{name}", type=float, default=None, help=f"override the law's {name}")
    o = p.add_argument_group("output")
    o.add_argument("--top", type=int, default=10, help="rows in the TOP-K table")
    o.add_argument("--emit-config", metavar="PATH.toml", default=None,
                   help="write a training config for the best shape and token budget")
    o.add_argument("--plot", metavar="PATH.png", default=None, help="IsoFLOP curve: best loss vs N at this budget")
    add_common_flags(p)
    p.set_defaults(func=run)


# ---- parsing -------------------------------------------------------------------------------


def parse_int_values(text: str, flag: str, limit: int) -> tuple[int, ...]:
    """'1024:8192:256' (inclusive), '16:64' (step 1), '64,128' or '2048' -> sorted tuple of ints.
    A range is checked against the largest size any model may have before it is built (`1:1e30`)."""
    s = str(text).strip()
    hint = f"{flag} takes MIN:MAX:STEP or a comma list of positive integers, got '{text}'"
    try:
        parts = [int(x) for x in s.split(":" if ":" in s else ",")]
    except ValueError:
        raise UserError(hint) from None
    if ":" in s:
        if len(parts) not in (2, 3):
            raise UserError(hint)
        lo, hi, step = parts[0], parts[1], parts[2] if len(parts) == 3 else 1
        if step <= 0:
            raise UserError(f"{flag}: STEP must be positive, got {step}")
        if lo > hi:
            raise UserError(f"{flag}: the range {s} is empty (MIN > MAX); write MIN:MAX:STEP")
        if hi > limit:
            raise UserError(f"{flag}: MAX {hi:.3g} is beyond any model's size (at most {limit:,})")
        values = tuple(range(lo, hi + 1, step))
    else:
        values = tuple(sorted(set(parts)))
    if not values:
        raise UserError(f"{flag} is empty; {hint}")
    if min(values) <= 0:
        raise UserError(f"{flag}: values must be positive, got {min(values)}")
    return values


def parse_aspect(text: str) -> tuple[float, float] | None:
    s = str(text).strip().lower()
    if s in ("none", "off", ""):
        return None
    try:
        lo, hi = (float(x) for x in s.split(":"))
    except ValueError:
        raise UserError(f"--aspect takes MIN:MAX (n_embd / n_layer), e.g. 40:130, or 'none'; got '{text}'") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise UserError(f"--aspect MIN:MAX needs 0 < MIN <= MAX, got '{text}'")
    return lo, hi


def resolve_law(args: argparse.Namespace):
    from scalelab.scaling.laws import get_law, law_from_values, load_law_file

    if args.law is not None and args.law_file is not None:
        raise UserError("give --law or --law-file, not both")
    base = load_law_file(args.law_file) if args.law_file else get_law(args.law or "chinchilla")
    given = {k: getattr(args, k) for k in ("E", "A", "B", "alpha", "beta") if getattr(args, k) is not None}
    if not given:
        return base
    values = dict(base.to_dict(), **given, name="custom")
    return law_from_values(values, where="--E/--A/--B/--alpha/--beta")



def shape_flags(args: argparse.Namespace) -> dict:
    """The search space's shape flags (--hidden, --layers, --head-dims, --kv-heads) as SearchSpace
    fields, each checked against the model's bounds; unset ones None (the space's defaults)."""
    return {
        "hidden": None if args.hidden is None else parse_int_values(args.hidden, "--hidden", INT_LIMITS["n_embd"]),
        "layers": None if args.layers is None else parse_int_values(args.layers, "--layers", INT_LIMITS["n_layer"]),
        "head_dims": parse_int_values(args.head_dims, "--head-dims", INT_LIMITS["n_embd"]),
        "kv_heads": (None if args.kv_heads is None
                     else parse_int_values(args.kv_heads, "--kv-heads", INT_LIMITS["num_key_value_heads"])),
    }

def build(args: argparse.Namespace):
    """(C, budget description, law, SearchSpace) from the flags; UserError on bad input."""
    from scalelab.hardware import get_accelerator
    from scalelab.scaling.search import SearchSpace, hardware_budget

    law = resolve_law(args)
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu is a fraction in (0, 1], got {args.mfu}")
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {args.gpus}")
    if args.gpus is not None and args.gpu_type is None:
        raise UserError("--gpus needs --gpu-type, e.g. --gpus 8 --gpu-type H100")
    if args.layout and args.gpu_type is None:
        raise UserError("--layout auto needs --gpus and --gpu-type, e.g. --gpus 64 --gpu-type H100")
    accelerator = get_accelerator(args.gpu_type) if args.gpu_type else None
    gpus = args.gpus or 1
    if args.hours is not None:
        if args.C is not None:
            raise UserError("give the budget C or --hours (with --gpus --gpu-type), not both")
        if accelerator is None:
            raise UserError("--hours needs --gpu-type (and --gpus), e.g. --gpus 8 --gpu-type H100 --hours 24")
        if not (math.isfinite(args.hours) and args.hours > 0):
            raise UserError(f"--hours must be positive, got {args.hours}")
        C = hardware_budget(gpus, accelerator, args.hours, args.mfu)
        budget = f"{gpus} x {accelerator.name} x {args.hours:g} h at {args.mfu:.0%} MFU"
    else:
        if args.C is None:
            raise UserError("give the budget C in FLOPs (e.g. 1.36e21) or --gpus N --gpu-type NAME --hours H")
        C = parse_quantity(args.C, name="C")
        budget = "given"
    if not C > 0:
        raise UserError(f"C must be a positive number of FLOPs, got {args.C}")
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    if args.no_gqa and args.kv_heads is not None:
        raise UserError("give --kv-heads or --no-gqa, not both")
    max_tokens = parse_quantity(args.max_tokens, name="--max-tokens") if args.max_tokens is not None else None
    max_params = parse_quantity(args.max_params, name="--max-params") if args.max_params is not None else None
    for flag, v in (("--max-tokens", max_tokens), ("--max-params", max_params)):
        if v is not None and v <= 0:
            raise UserError(f"{flag} must be positive, got {v:g}")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise UserError(f"--tolerance must be a non-negative fraction, got {args.tolerance}")
    space = SearchSpace(
        **shape_flags(args), mha=args.no_gqa, style=args.style, ffn_ratio=args.ffn_ratio, seq_len=args.seq_len,
        vocab_size=args.vocab, aspect=parse_aspect(args.aspect), max_tokens=max_tokens, max_params=max_params,
        enforce_chinchilla=args.enforce_chinchilla, tokens_per_param=args.tokens_per_param,
        tolerance=args.tolerance, gpus=gpus, accelerator=accelerator, mfu=args.mfu,
        layout_checkpointing=trainer_checkpointing_modes() if args.layout == "auto" else None)
    return C, budget, law, space


def run(args: argparse.Namespace) -> int:
    C, budget, law, space = build(args)
    # check --set before searching: it may only touch the emitted config's non-model sections
    owned = plan_owned_keys(space, layout_auto=args.layout == "auto")
    for item in args.overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model."):
            raise UserError(f"--set {item}: the planner chooses the model; use the search flags instead")
        if key in owned:
            raise UserError(f"--set {item}: the plan writes {key} itself (its figures assume that value); use the "
                            "plan's flags (--seq-len, --gpus, ...) or edit the emitted file afterwards and check it "
                            "with `scalelab count`")
    if args.overrides and not args.emit_config:
        raise UserError("--set overrides the emitted config (e.g. --set data.dir=data/mine); it needs --emit-config")
    # refuse output paths the writers cannot honour before any work (a PNG into x.txt, a directory)
    if args.emit_config:
        check_output_file(args.emit_config, flag="--emit-config", suffixes=(".toml",))
    if args.plot:
        check_output_file(args.plot, flag="--plot", suffixes=(".png",))
    if args.layout == "auto":  # the layout search chooses the global batch, and its memory includes the accumulation
        from scalelab.scaling.search import search

        result = search(C, law, space, top=args.top)
        choose_layout(result)
    else:
        result = search_with_accumulation(C, law, space, args.top, args.law_file)
    result.search["budget"] = budget
    if args.emit_config:
        write_config(result, args.emit_config, args.overrides, argv=_command_argv(), law_file=args.law_file)
        result.search["emitted_config"] = args.emit_config
    if args.plot:
        plot_isoflop(result, args.plot)
        result.search["plot"] = args.plot
    for w in result.search["warnings"]:
        print(f"scalelab plan: warning: {w}", file=sys.stderr)
    if args.json:
        print_json(result.to_json())
    else:
        print_report(result)
    for what in ("emitted_config", "plot"):
        if what in result.search:
            print(f"wrote {result.search[what]}", file=sys.stderr)
    return 0


# ---- output --------------------------------------------------------------------------------


def print_report(result) -> None:
    b, cf, s, law, space = result.best, result.closed_form, result.search, result.law, result.space
    print(f"Budget C = {result.C:.4g} FLOPs ({s['budget']}); law {law.name}: L = {law.E:g} + {law.A:g}/N^{law.alpha:g}"
          f" + {law.B:g}/D^{law.beta:g}")
    d = s["space"]
    kv = "MHA" if d["kv_heads"] == "MHA" else f"{','.join(map(str, d['kv_heads']))} KV heads"
    print(f"Searched {s['shapes_total']:,} shapes ({d['style']} style; hidden {d['hidden']}, layers {d['layers']}, "
          f"head_dim {','.join(map(str, d['head_dims']))}, {kv}, FFN {d['ffn_ratio']:.3g}x, seq {d['seq_len']}, "
          f"vocab {d['vocab_size']}) in {s['seconds'] * 1e3:.0f} ms")
    sk = s["skipped"]
    print(f"  skipped {s['skipped_total']:,} with head counts that do not divide "
          f"(head_dim into n_embd: {sk['head_dim_does_not_divide_n_embd']:,}; KV heads into n_head: "
          f"{sk['kv_heads_do_not_divide_n_head']:,})")
    names = {"one_sequence": "less than one sequence of tokens", "aspect": f"aspect outside "
             f"{':'.join(f'{a:g}' for a in d['aspect'] or ())}", "max_params": "over --max-params",
             "max_tokens": "over --max-tokens", "chinchilla": "D/N outside the Chinchilla band",
             "memory": ("no layout of the GPUs fits the training state" if d["hardware"] and
                        d["hardware"]["memory_model"]["any_layout"] else "training state does not fit the GPUs")}
    excluded = [f"{n:,} {names[k]}" for k, n in s["excluded"].items() if n]
    if excluded:
        print(f"  excluded (a shape may fail several): {'; '.join(excluded)}")
    print(f"  {s['feasible']:,} feasible shapes scored")
    for axis, change in s.get("grown", {}).items():
        print(f"  --{axis} grew with the budget from the default {change['from']} to {change['to']}")
    print()
    if s["binding"] is not None:
        flags = " and ".join(f"--{axis}" for axis in s["binding"]["axes"])
        print(f"LIMITED BY THE SEARCH SPACE ({flags}): a shape past {'their edges' if ' and ' in flags else 'its edge'} "
              f"would beat this plan ({s['binding']['n_layer']}L x {s['binding']['n_embd']}H, "
              f"N {format_count(s['binding']['N'])}, loss {s['binding']['loss']:.6f}); widen {flags}\n")

    print("BEST CONFIG:")
    rows = [
        ("Loss", f"{b['loss']:.6f}"),
        ("N (params)", f"{format_count(b['N'])} ({b['N']:,}; non-embedding {format_count(b['N_non_embedding'])})"),
        ("D (tokens)", f"{format_count(b['D'])} (rounded down to {b['sequences']:,} sequences of {b['seq_len']} = "
                       f"{b['D_rounded']:,} tokens)"),
        ("C (FLOPs)", f"{b['C']:.4g} (error: {b['flops_error']:.1e}; {b['flops_error_rounded']:.1e} after "
                      f"rounding D to whole sequences)"),
        ("Architecture", f"{b['n_layer']}L x {b['n_embd']}H x {b['n_head']}A (head_dim={b['head_dim']}), "
                         f"aspect {b['aspect']:.0f}"),
        ("FFN", ffn_text(b["d_ff"], b["n_embd"], space.ratio, space.multiple_of)),
        ("D/N ratio", f"{b['tokens_per_param']:.1f} (Chinchilla: 20.0)"),
        ("Attention", "MHA" if b["attention_type"] == "MHA" else
         f"{b['attention_type']}: {b['num_key_value_heads']} KV heads ({b['n_head'] // b['num_key_value_heads']}:1 "
         f"Q:KV ratio)"),
        ("FLOPs/token", f"{b['training_flops_per_token']:.4g} exact at S={b['seq_len']} "
                        f"({b['flops_per_param_per_token']:.2f}·N; 6N would be {6 * b['N']:.4g})"),
    ]
    if "wall_clock" in b:
        t = b["wall_clock"]
        rows.append(("Wall-clock", f"{format_duration(t['seconds'])} on {t['num_devices']} x {t['gpu_type']} at "
                                   f"{t['mfu']:.0%} MFU ({t['gpu_hours']:,.0f} GPU-hours, "
                                   f"{t['tokens_per_second']:,.0f} tokens/s)"))
        m = s["space"]["hardware"]["memory_model"]
        sharding = f"FSDP over {space.gpus}" if m["sharding"] == "fsdp" else "one GPU, unsharded"
        if "layout" in b:
            lay = b["layout"]
            m = dict(m, micro_batch=lay["micro_batch"], activation_checkpointing=lay["activation_checkpointing"] != "none")
            sharding = f"{lay['describe']} on {space.gpus} GPUs"
            rows.append(("Layout", f"{lay['describe']}, micro-batch {lay['micro_batch']}, checkpointing "
                                   f"{lay['activation_checkpointing']}: {lay['step_seconds']:.2f} s per step of "
                                   f"{lay['tokens_per_second_per_device'] * space.gpus * lay['step_seconds']:,.0f} "
                                   f"tokens, predicted MFU {lay['mfu']:.1%} (fastest of {len(b['layout_top'])} shown "
                                   "by --json; scalelab.steptime)"))
        rows.append(("Memory/GPU", f"{format_bytes(b['memory_per_gpu_bytes'])} of "
                                   f"{space.accelerator.memory_gib:g} GiB ({sharding}, micro-batch {m['micro_batch']}"
                                   f"{f' x {accum} accumulated' if (accum := b.get('grad_accum_steps', 1)) > 1 else ''}, "
                                   f"{'activation checkpointing, ' if m['activation_checkpointing'] else ''}"
                                   f"{m['precision']}, {m['attention']}; --emit-config writes these settings)"))
    rows.append(("Name", b["name"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k + ':':<{width + 1}} {v}")
    print()
    print(f"CLOSED FORM (C = 6ND): N {format_count(cf['N'])}, D {format_count(cf['D'])}, D/N {cf['tokens_per_param']:.1f}, "
          f"loss {cf['loss']:.6f} (grid {cf['loss_gap']:+.4f})")
    print(f"  why: {cf['explanation']}")
    print()
    print(f"TOP {len(result.top)} CANDIDATES:")
    print(f"{'Rank':>4} {'Loss':>9} {'N':>8} {'D':>8} {'L':>3} {'H':>5} {'A':>3} {'KV':>3} {'hd':>4} "
          f"{'D/N':>6} {'H/L':>5}")
    for r in result.top:
        print(f"{r['rank']:>4} {r['loss']:>9.6f} {format_count(r['N']):>8} {format_count(r['D']):>8} {r['n_layer']:>3} "
              f"{r['n_embd']:>5} {r['n_head']:>3} {r['num_key_value_heads']:>3} {r['head_dim']:>4} "
              f"{r['tokens_per_param']:>6.1f} {r['aspect']:>5.0f}")


def ffn_text(d_ff: int, n_embd: int, ratio: float, multiple_of: int) -> str:
    """The FFN width with its ratio, and, when the style's rounding moved it off the style's ratio, why."""
    text = f"{d_ff} ({d_ff / n_embd:.3g}x n_embd)"
    raw = int(ratio * n_embd)
    if d_ff != raw:
        text += f": the style's {ratio:.3g}x gives {raw}, rounded up to a multiple of {multiple_of}"
    return text


PLAN_LENGTH_KEYS = ("train.seq_len", "train.max_tokens", "train.max_steps", "train.max_flops")


def plan_owned_keys(space, layout_auto: bool = False) -> list[str]:
    """Config keys the emitted file sets from the plan: the figures it prints assume these values."""
    from scalelab.layout import LAYOUT_KEYS

    settings = space.trainer_settings()
    owned = [*PLAN_LENGTH_KEYS, *(f"{section}.{key}" for section, keys in settings.items() for key in keys)]
    if layout_auto:
        owned += ["train.global_batch_tokens", *(f"parallel.{k}" for k in LAYOUT_KEYS)]
    return owned


def choose_layout(result) -> None:
    """--layout auto: the fastest layout for the best shape (layout_search.search, the same figures as
    `count --layout auto`), stored in result.best with the trainer settings that reproduce its memory."""
    from scalelab import layout_search
    from scalelab.layout import Layout
    from scalelab.scaling.search import TRAINER_DTYPE, layout_global_batch

    space, best = result.space, result.best
    cfg = space.model_config(best["n_layer"], best["n_embd"], best["n_head"], best["num_key_value_heads"])
    batch = layout_global_batch(space.gpus, space.seq_len)
    found = layout_search.search(cfg, space.accelerator, space.gpus, seq_len=space.seq_len, global_batch_tokens=batch,
                                 precision=space.precision, attention=space.attention,
                                 checkpointing=space.layout_checkpointing)
    assert found, "the memory filter (keep_shapes_a_layout_fits) kept a shape that no layout fits"
    chosen = found[0]
    default = Layout()
    parallel = {k: v for k, v in layout_search.layout_cost.layout_dict(chosen.layout).items()
                if v != getattr(default, k) and not (k == "pp_microbatches" and chosen.layout.pp == 1)}
    mode = chosen.activation_checkpointing
    train = {"micro_batch_size": chosen.micro_batch,
             "activation_checkpointing": mode == "full" if mode in ("none", "full") else mode,
             "dtype": TRAINER_DTYPE[space.precision], "attention": space.attention,
             "global_batch_tokens": int(chosen.time.tokens_per_step)}
    if mode == "selective":
        train["selective_ac_option"] = chosen.selective_ac_option
    best["layout"] = chosen.row()
    best["layout_top"] = [c.row() for c in found]
    best["memory_per_gpu_bytes"] = float(chosen.memory["total"])
    best["trainer_settings"] = {"train": train, "parallel": parallel}


def planned_accumulation(result, law_file: str | None = None) -> int:
    """Micro-batches per optimizer step of the best shape's emitted config: the hyperparameter law's
    global batch (planned_hyperparameters, whole micro-batches) over the plan's micro-batch on every GPU."""
    hyper, _ = planned_hyperparameters(result, law_file)
    return max(1, hyper["global_batch_tokens"] // (result.best["seq_len"] * result.space.micro_batch
                                                    * result.space.gpus))


def search_with_accumulation(C: float, law, space, top: int, law_file: str | None = None):
    """The search whose memory filter assumes the gradient accumulation its best shape's emitted config
    runs: when the planned global batch needs more than one micro-batch per GPU, the search again with
    accumulation (the gradients accumulated so far are live through every later micro-batch, the same
    bytes for any k > 1). result.best gets `grad_accum_steps` and the memory at it."""
    import dataclasses

    from scalelab import counting
    from scalelab.config import ModelConfig
    from scalelab.scaling.search import search

    result = search(C, law, space, top=top)
    if space.accelerator is None:
        return result
    accum = planned_accumulation(result, law_file)
    if accum > 1:
        result = search(C, law, dataclasses.replace(space, grad_accum_steps=accum), top=top)
        accum = planned_accumulation(result, law_file)
    best, space = result.best, result.space
    best["grad_accum_steps"] = accum
    if (accum > 1) != (space.grad_accum_steps > 1):  # the new best's own batch is one micro-batch per GPU
        best["memory_per_gpu_bytes"] = counting.training_memory(
            ModelConfig(**best["config"]), micro_batch=space.micro_batch, seq_len=best["seq_len"],
            num_devices=space.gpus, sharding=space.sharding, precision=space.precision, attention=space.attention,
            activation_checkpointing=space.activation_checkpointing, grad_accum_steps=accum)["total"]
    return result


def trainer_checkpointing_modes() -> tuple[tuple[str, str], ...]:
    """The checkpointing modes the layout search may choose: those train.activation_checkpointing
    accepts (its AC_MODES once selective checkpointing exists there; none and full before)."""
    from scalelab import layout_search
    from scalelab.train import config as train_config

    accepted = getattr(train_config, "AC_MODES", ("none", "full"))
    return tuple(m for m in layout_search.CHECKPOINTING if m[0] in accepted)


def planned_hyperparameters(result, law_file: str | None = None) -> tuple[dict, str]:
    """The plan's [train] lr, min_lr, warmup, schedule and global_batch_tokens from a hyperparameter law
    (scaling/hparams.py): the law file's fitted one when it has one, else DeepSeek LLM's default; and the
    comment that names the source. The batch is a whole number of micro-batches: the plan's micro-batch on
    its GPUs, or, without memory settings, the trainer's default micro_batch_size (TrainSection)."""
    from scalelab.config import ModelConfig
    from scalelab.scaling import hparams

    b, space = result.best, result.space
    law = hparams.hyperparameter_law_from_file(law_file) if law_file else None
    if law is not None:
        source = (f"# lr, min_lr, warmup, schedule, global_batch_tokens: the hyperparameter law fitted in {law_file} "
                  f"(eta_opt = {law.lr_coef:.4g} C^{law.lr_exponent:.4f}, B_opt = {law.batch_coef:.4g} "
                  f"C^{law.batch_exponent:.4f} tokens, C = {law.compute} FLOPs)")
    else:
        law = hparams.DEFAULT
        source = ("# lr, min_lr, warmup, schedule, global_batch_tokens: DEFAULT hyperparameter laws, not fitted to "
                  "this setup: DeepSeek LLM (arXiv 2401.02954, sec. 3.1), eta_opt = 0.3118 C^-0.125, B_opt = 0.2920 "
                  "C^0.3271 tokens, C = non-embedding training FLOPs; fit your own with `scalelab fit` on "
                  "learning-rate x batch grids (`scalelab sweep design --tune-lr`)")
    cfg = ModelConfig(**b["config"])
    from scalelab.train.config import TrainSection

    micro = space.micro_batch if space.trainer_settings() else TrainSection().micro_batch_size
    unit = b["seq_len"] * micro * space.gpus
    hp = hparams.hyperparameters(hparams.law_compute(law, cfg, b["seq_len"], b["D_rounded"]), law, width=cfg.n_embd,
                                 tokens=b["D_rounded"], seq_len=unit)  # seq_len=unit: whole micro-batches
    train = {"global_batch_tokens": int(hp["batch_tokens"]), "lr": hp["peak_lr"], "min_lr": hp["min_lr"],
             "warmup": float(hp["warmup"]), "schedule": hp["schedule"]}
    return train, source


def emitted_config_text(result, overrides: list[str] = (), argv: list[str] | None = None,
                        law_file: str | None = None) -> str:
    """A training config: [model] with the full fields, [data] dir placeholder, [train] seq_len and
    max_tokens = D rounded down to whole sequences, lr, min_lr, warmup, schedule and global batch from a
    hyperparameter law (planned_hyperparameters), and, when the plan filtered by memory, every
    setting that memory figure assumed ([train] micro-batch, activation checkpointing, dtype,
    attention; [parallel] strategy), so that counting the config gives the plan's figure."""
    import tomli_w

    from scalelab.config import apply_overrides

    b, space = result.best, result.space
    settings = b.get("trainer_settings") or space.trainer_settings()
    hyper, hyper_source = planned_hyperparameters(result, law_file)
    if "layout" in b:  # the layout's figures (memory with pipeline micro-batches, step time) assume its batch
        hyper_source += (f"\n# global_batch_tokens: the layout search's {settings['train']['global_batch_tokens']:,} "
                         f"(its step time assumes it), not the law's {hyper['global_batch_tokens']:,}")
        hyper = {k: v for k, v in hyper.items() if k != "global_batch_tokens"}
    sections = {"data": {"dir": "data/shakespeare"},
                "train": {"seq_len": b["seq_len"], "max_tokens": b["D_rounded"], **settings.get("train", {}),
                          **hyper},
                "parallel": dict(settings.get("parallel", {}))}
    apply_overrides(sections, overrides)
    command = "scalelab " + " ".join(argv) if argv else f"scalelab plan {result.C:.4g}"
    lines = [
        f"# Written by `{command}`.",
        f"# Compute-optimal under the {result.law.name} law at C = {result.C:.4g} FLOPs: predicted loss "
        f"{b['loss']:.4f}, N = {b['N']:,} parameters, D = {b['D_rounded']:,} tokens (D/N {b['tokens_per_param']:.1f}).",
    ]
    if settings:
        launch = (f"torchrun --nproc_per_node {space.gpus} -m scalelab train FILE" if space.gpus > 1
                  else "scalelab train FILE")
        lines += [
            f"# Memory: {format_bytes(b['memory_per_gpu_bytes'])} per GPU predicted (counting.training_memory) with "
            f"the [train] and [parallel] settings below, on {space.gpus} x {space.accelerator.name}: "
            f"{launch} (across nodes: torchrun with --nnodes).",
        ]
    lines += [
        "",
        tomli_w.dumps({"model": b["config"]}).rstrip(),
        "",
        "[data]",
        "# placeholder: point this at a directory written by `scalelab prepare`",
        tomli_w.dumps(sections.pop("data")).rstrip(),
        "",
        "[train]",
        "# max_tokens is D from the plan (whole sequences; the trainer rounds up to whole steps)",
        hyper_source,
        tomli_w.dumps(sections.pop("train")).rstrip(),
    ]
    if "layout" in b:
        lay = b["layout"]
        lines.append(f"# layout (--layout auto): {lay['describe']}, predicted {lay['step_seconds']:.2f} s per step, "
                     f"{lay['tokens_per_second_per_device']:,.0f} tokens/s per GPU, MFU {lay['mfu']:.1%} "
                     "(scalelab.steptime; `scalelab count FILE --gpu-type ... --mfu auto` shows the breakdown)")
    parallel = sections.pop("parallel")
    if parallel:
        lines += ["", "[parallel]", tomli_w.dumps(parallel).rstrip()]
    if sections:  # other sections given with --set (eval, checkpoint, ...)
        lines += ["", tomli_w.dumps(sections).rstrip()]
    return "\n".join(lines) + "\n"


def _command_argv() -> list[str]:
    """The command line from the verb on (for the emitted file's header)."""
    argv = sys.argv[1:]
    return argv[argv.index("plan"):] if "plan" in argv else ["plan", *argv]


def write_config(result, path: str, overrides: list[str] = (), argv: list[str] | None = None,
                 law_file: str | None = None) -> None:
    """Check the config with the trainer's own loader (no torch), then write it atomically: an
    invalid one (`--set train.lr=abc`) is a UserError and nothing is written."""
    import tomllib

    from scalelab.files import atomic_write_text
    from scalelab.train.config import config_from_dict

    text = emitted_config_text(result, overrides, argv, law_file)
    config_from_dict(tomllib.loads(text), where=f"--emit-config {path}")
    atomic_write_text(path, text)


def plot_isoflop(result, path: str) -> None:
    """Predicted loss vs N along the budget: every feasible shape, the lower envelope, the 6ND curve."""
    import numpy as np

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalelab.files import atomic_path

    N, loss = result.curve["N"], result.curve["loss"]
    b, cf, law = result.best, result.closed_form, result.law
    fig, ax = plt.subplots(figsize=(8, 5), dpi=130)
    shown = np.random.default_rng(0).choice(len(N), 20000, replace=False) if len(N) > 20000 else slice(None)
    ax.scatter(N[shown], loss[shown], s=9, color="#9bb7d4", alpha=0.6, lw=0, rasterized=True,
               label=f"feasible shapes ({len(N):,}{', 20,000 drawn' if len(N) > 20000 else ''})")
    # lower envelope: the best loss in each of ~40 log-spaced N bins
    edges = np.geomspace(N.min(), N.max() * 1.0001, 41)
    which = np.digitize(N, edges)
    env = [(N[which == k][np.argmin(loss[which == k])], loss[which == k].min()) for k in np.unique(which)]
    ex, ey = zip(*sorted(env))
    ax.plot(ex, ey, color="#1f4e79", lw=1.6, label="best shape at each N (grid, exact FLOPs)")
    grid_n = np.geomspace(min(N.min(), cf["N"]) / 1.5, max(N.max(), cf["N"]) * 1.5, 200)
    ax.plot(grid_n, law.loss(grid_n, result.C / (6 * grid_n)), color="#c0504d", lw=1.2, ls="--",
            label="closed form, C = 6ND")
    ax.scatter([b["N"]], [b["loss"]], marker="*", s=220, color="#ffb000", edgecolor="black", zorder=5,
               label=f"grid optimum: {b['n_layer']}L x {b['n_embd']}H, N={format_count(b['N'])}, "
                     f"D={format_count(b['D'])}, loss {b['loss']:.4f}")
    ax.scatter([cf["N"]], [cf["loss"]], marker="D", s=50, color="#c0504d", edgecolor="black", zorder=5,
               label=f"6ND optimum: N={format_count(cf['N'])}, loss {cf['loss']:.4f}")
    ax.set_xscale("log")
    lo = min(min(ey), b["loss"], cf["loss"])
    top = max(min(max(ey), lo + 0.3), max(b["loss"], cf["loss"]), lo + 0.02)
    ax.set_ylim(lo - 0.08 * (top - lo), top + 0.02 * (top - lo))
    ax.axvline(b["N"], color="#ffb000", lw=0.8, ls=":", zorder=1)
    in_view = N[loss <= top]
    ax.set_xlim(min(in_view.min(), cf["N"]) / 1.6, max(in_view.max(), cf["N"]) * 1.6)
    ax.set_xlabel("parameters N (total, incl. embeddings)")
    ax.set_ylabel(f"predicted loss ({law.name} law)")
    ax.set_title(f"IsoFLOP curve at C = {result.C:.3g} FLOPs ({result.space.style}, S = {result.space.seq_len})")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
