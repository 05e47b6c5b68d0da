"""`scalelab count MODEL`: exact parameters and FLOPs, memory and time for an architecture."""

from __future__ import annotations

import argparse
import re
import sys

from scalelab.cli import (HelpFormatter, add_common_flags, format_bytes, format_count, format_duration,
                          parse_quantity, print_json, print_table)
from scalelab.config import DEFAULT_LOSS_CHUNK_TOKENS, INT_LIMITS
from scalelab.errors import UserError

LOSS_CHUNK_LIMIT = 2**24  # train.loss_chunk_tokens' bound

EXAMPLES = """examples:
  scalelab count llama3.1-8b
  scalelab count llama3.1-8b --seq-len 8192 --micro-batch 1 --gpus 8 --gpu-type H100 --tokens 15T
  scalelab count gpt2 --set n_layer=24 --json
  scalelab count my_model.toml --set num_key_value_heads=4
  scalelab count llama3.1-8b --gpus 8 --gpu-type H100 --micro-batch 2 --mfu auto
  scalelab count llama3.1-70b --gpus 64 --gpu-type H100 --tp 8 --mfu auto
  scalelab count llama3.1-405b --gpus 16384 --gpu-type H100 --tp 8 --pp 16 --pp-schedule Interleaved1F1B \
      --pp-stages-per-rank 2 --global-batch-tokens 16M --mfu auto
  scalelab count llama3.1-70b --gpus 64 --gpu-type H100 --layout auto
  scalelab count --list
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("count", help="exact parameters, FLOPs, memory and training time of a model",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("model", nargs="?", help="preset name (see --list) or a TOML model/training config (a "
                   "training config's [train] micro_batch_size, seq_len, activation_checkpointing, dtype, attention, "
                   "loss_chunk_tokens and [parallel] strategy are the defaults of the flags below)")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: model block_size, max 8192)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per device per micro-step (default 1)")
    p.add_argument("--gpus", type=int, default=1, help="number of devices")
    p.add_argument("--gpu-type", default=None, help="accelerator: A6000, A100-40GB, A100-80GB, H100-SXM, "
                   "H100-PCIe, H200, B200 (H100 = H100-SXM, A100 = A100-80GB)")
    p.add_argument("--mfu", default=None, help="model FLOPs utilisation for time: a fraction (default 0.4), or "
                   "auto to predict the step time and MFU from the model, GPU and layout (scalelab.steptime)")
    p.add_argument("--tokens", default=None, help="training tokens D for time/cost, e.g. 15T or 1.6e11")
    p.add_argument("--sharding", choices=("fsdp", "ddp", "none"), default=None,
                   help="how weights/optimizer are split over GPUs (default: fsdp when --gpus > 1)")
    p.add_argument("--precision", choices=("bf16-mixed", "bf16", "fp32"), default=None,
                   help="training precision (bytes per parameter for weights, grads, optimizer)")
    p.add_argument("--activation-checkpointing", nargs="?", const="full", default=None,
                   choices=("none", "full", "selective"), metavar="MODE",
                   help="recompute activations in backward: none, full (the flag alone) or selective "
                   "(see --selective-ac-option); docs/memory.md")
    p.add_argument("--selective-ac-option", default=None, metavar="OPT",
                   help="with --activation-checkpointing selective: op (save attention's and every other "
                   "matmul's outputs; default) or an integer k (recompute every k-th block)")
    p.add_argument("--attention", choices=("sdpa", "math"), default=None, help="attention kernel (default sdpa)")
    p.add_argument("--loss-chunk-tokens", type=int, default=None, metavar="N",
                   help="score the loss N tokens at a time, as the trainer does by default "
                   f"(default {DEFAULT_LOSS_CHUNK_TOKENS}); 0 forms all the logits at once")
    lay = p.add_argument_group("layout over --gpus (docs/parallelism.md; default: FSDP over all of them)")
    lay.add_argument("--tp", type=int, default=None, help="tensor-parallel degree")
    lay.add_argument("--pp", type=int, default=None, help="pipeline stages")
    lay.add_argument("--dp-shard", type=int, default=None, help="FSDP degree (-1 = the rest; the default)")
    lay.add_argument("--dp-replicate", type=int, default=None, help="replicas (DDP, or HSDP with --dp-shard)")
    lay.add_argument("--pp-schedule", default=None, help="pipeline schedule: 1F1B (default), Interleaved1F1B, GPipe, "
                     "LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble")
    lay.add_argument("--pp-microbatches", type=int, default=None, help="micro-batches per step (default pp x stages "
                     "per rank, or what --global-batch-tokens gives)")
    lay.add_argument("--pp-stages-per-rank", type=int, default=None, help="virtual stages per rank (interleaved "
                     "schedules; default 2 for them)")
    lay.add_argument("--no-sequence-parallel", action="store_true", help="with --tp: keep norms and the residual "
                     "stream whole (all-reduce instead of all-gather/reduce-scatter)")
    lay.add_argument("--loss-parallel", action="store_true", help="with --tp: cross-entropy on vocabulary shards")
    lay.add_argument("--global-batch-tokens", default=None, help="tokens per optimizer step over all replicas, e.g. "
                     "16M: sets gradient accumulation or the pipeline's micro-batches")
    lay.add_argument("--layout", choices=("auto",), default=None, help="auto: search the layout, micro-batch and "
                     "checkpointing for the fastest that fits (needs --gpu-type); shows the top few")
    add_common_flags(p)
    p.set_defaults(func=run)


LAYOUT_FLAGS = ("tp", "pp", "dp_shard", "dp_replicate", "pp_schedule", "pp_microbatches", "pp_stages_per_rank")


def layout_from_flags(args: argparse.Namespace, given: dict, cfg, gpus: int):
    """The resolved, validated Layout the layout flags (else a training config's [parallel] layout
    keys) describe, or None when neither gives one (then --sharding decides, as before)."""
    from scalelab.layout import SINGLE_STAGE_SCHEDULES, Layout

    flags = {k: getattr(args, k) for k in LAYOUT_FLAGS if getattr(args, k) is not None}
    if args.no_sequence_parallel:
        flags["sequence_parallel"] = False
    if args.loss_parallel:
        flags["loss_parallel"] = True
    if flags and args.sharding is not None:
        raise UserError("give --sharding or the layout flags (--tp, --pp, --dp-shard, --dp-replicate, --pp-*), "
                        "not both")
    if not flags:
        flags = dict(given.get("layout", {}))
    if not flags:
        return None
    schedule = flags.get("pp_schedule", "1F1B")
    flags.setdefault("pp_stages_per_rank", 1 if schedule in SINGLE_STAGE_SCHEDULES else 2)
    try:
        return Layout(**flags).validate(cfg, gpus)
    except UserError as e:  # the trainer's words for its keys, as count's flags
        raise UserError(re.sub(r"parallel\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"),
                               str(e).replace("WORLD_SIZE", "--gpus").replace("launch", "use"))) from None


def strategy_layout(sharding: str, gpus: int):
    """The layout --sharding means on --gpus (replicas for ddp, and for none on several GPUs)."""
    from scalelab.layout import Layout

    if sharding == "fsdp" and gpus > 1:
        return Layout(dp_shard=gpus).resolved(gpus)
    return Layout(dp_replicate=gpus, dp_shard=1).resolved(gpus)


def count_report(cfg, *, seq_len: int, micro_batch: int = 1, gpus: int = 1, gpu_type: str | None = None,
                 mfu: float | str = 0.4, tokens: float | None = None, sharding: str | None = None,
                 precision: str = "bf16-mixed", activation_checkpointing=False, selective_ac_option="op",
                 attention: str = "sdpa", loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS, layout=None,
                 global_batch_tokens: float | None = None, layout_auto: bool = False) -> dict:
    """Everything `count` prints, as one dict (the --json object). `layout` (a resolved Layout) replaces
    `sharding`; `mfu = "auto"` predicts the step time (scalelab.steptime, JSON time.predicted);
    `layout_auto` searches the layout, micro-batch and checkpointing (layout_search.search) first."""
    from scalelab import counting, layout_cost, layout_search, steptime
    from scalelab.hardware import get_accelerator

    acc = get_accelerator(gpu_type) if gpu_type is not None else None
    params = counting.count_params(cfg)
    flops = counting.flops_report(cfg, seq_len)
    sharding = sharding or ("fsdp" if gpus > 1 else "ddp")
    search_rows = None
    if layout_auto:
        if acc is None:
            raise UserError("--layout auto needs --gpu-type (and --gpus), e.g. --gpus 64 --gpu-type H100")
        found = layout_search.search(cfg, acc, gpus, seq_len=seq_len, precision=precision, attention=attention,
                                     global_batch_tokens=global_batch_tokens or default_global_batch(gpus, seq_len),
                                     loss_chunk_tokens=loss_chunk_tokens)
        if not found:
            raise UserError(f"no layout of {gpus} x {acc.name} fits {cfg.name()} at sequence length {seq_len}; "
                            "use more GPUs (--gpus), a shorter --seq-len or a larger --global-batch-tokens")
        best = found[0]
        layout, micro_batch = best.layout, best.micro_batch
        activation_checkpointing, selective_ac_option = best.activation_checkpointing, best.selective_ac_option
        global_batch_tokens = best.time.tokens_per_step
        search_rows = [c.row() for c in found]
    mode, option = layout_cost.checkpointing(activation_checkpointing, selective_ac_option)
    costed = strategy_layout(sharding, gpus) if layout is None else layout
    # the global batch sets the gradient accumulation, whose accumulated gradients the memory holds
    costed, accumulation, batch_tokens = layout_search.resolve_batch(costed, micro_batch=micro_batch, seq_len=seq_len,
                                                                     global_batch_tokens=global_batch_tokens)
    if layout is None:
        memory = counting.training_memory(cfg, micro_batch=micro_batch, seq_len=seq_len, num_devices=gpus,
                                          sharding=sharding, precision=precision, activation_checkpointing=mode,
                                          selective_ac_option=option, attention=attention,
                                          loss_chunk_tokens=loss_chunk_tokens, grad_accum_steps=accumulation)
    else:
        memory = layout_search.device_memory(cfg, costed, micro_batch=micro_batch, seq_len=seq_len,
                                             precision=precision, activation_checkpointing=mode,
                                             selective_ac_option=option, attention=attention,
                                             loss_chunk_tokens=loss_chunk_tokens, grad_accum_steps=accumulation)
    # hardware FLOPs: activation checkpointing's recomputation on top of the model's FLOPs
    flops["training_per_token_executed"] = counting.executed_training_flops(
        cfg, 1, seq_len, activation_checkpointing=mode, selective_ac_option=option, attention=attention) / seq_len
    report = {
        "model": cfg.name(),
        "config": cfg.to_dict(),
        "params": {"total": params.total, "active": params.active, "embedding": params.embedding,
                   "non_embedding": params.non_embedding, "breakdown": params.breakdown,
                   "per_layer": params.per_layer},
        "flops": flops,
        "gqa": counting.gqa_comparison(cfg, seq_len),
        "kv_cache_bytes_per_token": counting.kv_cache_bytes_per_token(cfg),
        "memory": memory,
        "layout": layout_report(cfg, costed, micro_batch=micro_batch, seq_len=seq_len, precision=precision,
                                accumulation=accumulation, batch_tokens=batch_tokens, mode=mode, option=option),
    }
    if search_rows is not None:
        report["layout_search"] = search_rows
    if acc is not None:
        report["accelerator"] = {"name": acc.name, "peak_bf16_flops": acc.peak_bf16_flops,
                                 "memory_bytes": acc.memory_bytes}
        report["memory"]["device_memory"] = acc.memory_bytes
        report["memory"]["fits"] = bool(memory["total"] <= acc.memory_bytes)
        predicted = None
        if mfu == "auto":
            predicted = steptime.step_time(cfg, acc, costed, micro_batch=micro_batch, seq_len=seq_len,
                                           accumulation=accumulation, precision=precision,
                                           activation_checkpointing=mode, selective_ac_option=option).as_dict()
            report["time"] = {"predicted": predicted}
        if tokens is not None:
            used = predicted["mfu"] if predicted else mfu
            report["time"] = dict(counting.training_time(flops["training_per_token"], tokens, acc, gpus, used),
                                  **({"predicted": predicted} if predicted else {}))
            report["time"]["hfu"] = used * flops["training_per_token_executed"] / flops["training_per_token"]
    elif mfu == "auto":
        raise UserError("--mfu auto needs --gpu-type (and --gpus), e.g. --gpus 8 --gpu-type H100")
    if tokens is not None:
        report["tokens"] = tokens
        report["training_flops"] = flops["training_per_token"] * tokens
        report["tokens_per_param"] = tokens / params.total
    return report


DEFAULT_GLOBAL_BATCH_TOKENS = 2**22  # --layout auto without --global-batch-tokens: 4M tokens per step


def default_global_batch(gpus: int, seq_len: int) -> int:
    """4M tokens per step (Llama 3's batch early in training), at least one sequence per GPU, in whole
    sequences per GPU."""
    per_gpu = max(1, round(DEFAULT_GLOBAL_BATCH_TOKENS / (gpus * seq_len)))
    return per_gpu * gpus * seq_len


def layout_report(cfg, layout, *, micro_batch: int, seq_len: int, precision: str, accumulation: int,
                  batch_tokens: int, mode: str, option: str) -> dict:
    """The layout, its pipeline figures and the bytes each collective moves per step per device."""
    from scalelab import layout_cost

    return {
        **layout_cost.layout_dict(layout), "describe": layout.describe(), "num_devices": layout.world,
        "micro_batch": micro_batch, "accumulation": accumulation, "global_batch_tokens": batch_tokens,
        "activation_checkpointing": mode, "selective_ac_option": option,
        "bubble_fraction": layout_cost.bubble_fraction(layout.pp, layout.microbatches, layout.pp_stages_per_rank,
                                                       layout.pp_schedule),
        "in_flight_first_stage": layout_cost.in_flight_chunks(layout.pp_schedule, layout.pp, layout.microbatches,
                                                              layout.pp_stages_per_rank, 0),
        "communication": [c.as_dict() for c in layout_cost.communication(
            cfg, layout, micro_batch=micro_batch, seq_len=seq_len, precision=precision, accumulation=accumulation,
            activation_checkpointing=mode, selective_ac_option=option)],
    }


def run(args: argparse.Namespace) -> int:
    from scalelab.presets import PRESETS, load_model_config

    if args.list:
        from scalelab.counting import count_params

        width = max(map(len, PRESETS)), max(len(cfg.name()) for cfg in PRESETS.values())
        for name, cfg in PRESETS.items():
            p = count_params(cfg)
            active = f" ({format_count(p.active)} active)" if p.active != p.total else ""
            print(f"{name:<{width[0]}} {cfg.name():<{width[1]}} {p.total:>17,} params{active}")
        return 0
    if not args.model:
        raise UserError("give a MODEL (a preset name or a .toml file); `scalelab count --list` lists presets")
    given = training_config_settings(args.model)
    for flag, default in (("micro_batch", 1), ("precision", "bf16-mixed"), ("activation_checkpointing", "none"),
                          ("selective_ac_option", "op"),
                          ("attention", "sdpa"), ("sharding", None), ("seq_len", None),
                          ("loss_chunk_tokens", DEFAULT_LOSS_CHUNK_TOKENS)):
        if getattr(args, flag) is None:
            setattr(args, flag, given.get(flag, default))
    for flag in ("micro_batch", "gpus"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 <= args.loss_chunk_tokens <= LOSS_CHUNK_LIMIT:
        raise UserError(f"--loss-chunk-tokens must be between 0 (unchunked) and {LOSS_CHUNK_LIMIT:,}, "
                        f"got {args.loss_chunk_tokens:.3g}")
    if args.seq_len is not None and not 1 <= args.seq_len <= INT_LIMITS["block_size"]:
        raise UserError(f"--seq-len must be between 1 and {INT_LIMITS['block_size']:,}, got {args.seq_len:.3g}")
    mfu = parse_mfu(args.mfu)
    batch = (parse_quantity(args.global_batch_tokens, name="--global-batch-tokens")
             if args.global_batch_tokens is not None else given.get("global_batch_tokens"))
    if batch is not None and not 1 <= batch <= 2**50:
        raise UserError(f"--global-batch-tokens must be between 1 and 2**50 tokens, got {batch:.3g}")
    from scalelab.train.config import checkpointing_mode, selective_option

    args.activation_checkpointing = checkpointing_mode(args.activation_checkpointing)
    if selective_option(args.selective_ac_option) is None:
        raise UserError(f"--selective-ac-option must be op or a whole number k >= 1, got {args.selective_ac_option!r}")
    args.selective_ac_option = selective_option(args.selective_ac_option)
    tokens = parse_quantity(args.tokens, name="--tokens") if args.tokens is not None else None
    if tokens is not None and tokens <= 0:
        raise UserError("--tokens must be positive")
    if tokens is not None and args.gpu_type is None:
        raise UserError("--tokens needs --gpu-type (and --gpus) to estimate time, e.g. --gpu-type H100")
    cfg = load_model_config(args.model, args.overrides)
    seq_len = args.seq_len or min(cfg.block_size, 8192)
    if seq_len > cfg.block_size:
        if cfg.position_encoding == "learned":
            raise UserError(f"--seq-len {seq_len} exceeds the model's {cfg.block_size} learned positions "
                            f"(block_size): there is no position embedding past it; use --seq-len {cfg.block_size} "
                            f"or less, or --set block_size={seq_len} (a longer position table)")
        print(f"scalelab count: warning: --seq-len {seq_len} is beyond block_size {cfg.block_size}, the context "
              "the model was configured for; RoPE runs there, but quality is not what the counts promise",
              file=sys.stderr)
    if args.layout == "auto" and (any(getattr(args, k) is not None for k in LAYOUT_FLAGS) or args.sharding):
        raise UserError("--layout auto chooses the layout itself; drop --tp/--pp/--dp-shard/--dp-replicate/--pp-*/"
                        "--sharding, or drop --layout auto")
    layout = None if args.layout == "auto" else layout_from_flags(args, given, cfg, args.gpus)
    report = count_report(cfg, seq_len=seq_len, micro_batch=args.micro_batch, gpus=args.gpus,
                          gpu_type=args.gpu_type, mfu=mfu, tokens=tokens, sharding=args.sharding,
                          precision=args.precision, activation_checkpointing=args.activation_checkpointing,
                          selective_ac_option=args.selective_ac_option, attention=args.attention,
                          loss_chunk_tokens=args.loss_chunk_tokens, layout=layout,
                          global_batch_tokens=batch, layout_auto=args.layout == "auto")
    if args.json:
        print_json(report)
    else:
        print_report(cfg, report)
    return 0


def parse_mfu(text: str | None) -> float | str:
    """--mfu: 'auto', or a fraction in (0, 1] (default 0.4)."""
    if text is None:
        return 0.4
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--mfu is a fraction in (0, 1] or auto, got {text!r}") from None
    if not 0 < value <= 1:
        raise UserError(f"--mfu is a fraction in (0, 1] or auto, got {text}")
    return value


def training_config_settings(spec: str | None) -> dict:
    """What a training config's [train] and [parallel] sections say about memory, as count's flags (the
    trainer's mapping, trainer.predicted_memory): {} for a preset or a bare model file."""
    from pathlib import Path

    from scalelab.config import load_toml
    from scalelab.train.config import selective_option

    if spec is None or not Path(spec).is_file():
        return {}
    data = load_toml(spec)
    if not isinstance(data.get("model"), dict):
        return {}
    train, parallel = data.get("train", {}), data.get("parallel", {})
    if not isinstance(train, dict) or not isinstance(parallel, dict):
        return {}
    out = {}
    for key, flag in (("micro_batch_size", "micro_batch"), ("seq_len", "seq_len"),
                      ("activation_checkpointing", "activation_checkpointing"), ("attention", "attention"),
                      ("loss_chunk_tokens", "loss_chunk_tokens"), ("selective_ac_option", "selective_ac_option")):
        if key in train:
            out[flag] = train[key]
    for flag, ok in (("micro_batch", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                     ("seq_len", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                     ("activation_checkpointing", lambda v: isinstance(v, bool) or v in ("none", "full", "selective")),
                     ("selective_ac_option", lambda v: selective_option(v) is not None),
                     ("attention", lambda v: v in ("sdpa", "math")),
                     ("loss_chunk_tokens", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)):
        if flag in out and not ok(out[flag]):
            raise UserError(f"{spec}: [train] value {out[flag]!r} is not a valid {flag.replace('_', ' ')}; "
                            "check it with `scalelab train --check`")
    if "dtype" in train:  # the trainer runs fp32 as fp32 and every 16-bit dtype as autocast / FSDP bf16
        out["precision"] = "fp32" if train["dtype"] == "fp32" else "bf16-mixed"
    if parallel.get("strategy") in ("fsdp", "ddp", "none"):
        out["sharding"] = parallel["strategy"]
    from scalelab.layout import LAYOUT_KEYS, MESH_KEYS, Layout

    if any(k in parallel and parallel[k] != getattr(Layout(), k) for k in MESH_KEYS):
        out["layout"] = {k: parallel[k] for k in LAYOUT_KEYS if k in parallel}
        out.pop("sharding", None)
    if (isinstance(train.get("global_batch_tokens"), int) and not isinstance(train["global_batch_tokens"], bool)
            and train["global_batch_tokens"] > 0):
        out["global_batch_tokens"] = train["global_batch_tokens"]
    return out


def print_report(cfg, r: dict) -> None:
    from scalelab.counting import FLOPS_SHORTCUTS, MEMORY_COMPONENTS, PHASES

    print_table(cfg.summary(), title=f"Model {r['model']}")
    p = r["params"]
    b = p["breakdown"]
    rows = [("Total", f"{p['total']:,} ({format_count(p['total'])})")]
    if p["active"] != p["total"]:  # a MoE: what one token uses beside what is held
        rows.append(("Active per token", f"{p['active']:,} ({format_count(p['active'])}, "
                                         f"{p['active'] / p['total']:.1%}; all but the unchosen routed experts)"))
    rows += [("Non-embedding", f"{p['non_embedding']:,}"),
            ("Embedding (incl. lm_head)", f"{p['embedding']:,}")]
    rows += [(f"  {k.replace('_', ' ')}", f"{v:,}") for k, v in b.items() if v]
    rows.append(("Per layer", f"{p['per_layer']:,}"))
    print_table(rows, title="Parameters")
    f = r["flops"]
    active = ", active path" if p["active"] != p["total"] else ""
    rows = [(f"Forward / token (exact{active})", f"{f['forward_per_token']:.4e}"),
            ("Training / token (exact, 3x fwd)", f"{f['training_per_token']:.4e}"),
            *[(f"  {label}", f"{f[key]:.4e}  ({f[key] / f['training_per_token'] - 1:+.1%})")
              for key, label in FLOPS_SHORTCUTS.items() if key in f],
            ("Attention share of forward", f"{f['attention_share']:.1%}")]
    if f["training_per_token_executed"] != f["training_per_token"]:
        rows.insert(2, ("Executed / token (with recomputation)", f"{f['training_per_token_executed']:.4e}  "
                        f"({f['training_per_token_executed'] / f['training_per_token'] - 1:+.1%})"))
    print_table(rows, title=f"FLOPs at sequence length {f['seq_len']}")
    g = r["gqa"]
    if g["attention_type"] == "MLA":
        print_table([("KV cache / token (bf16)", f"{g['kv_cache_bytes_per_token']:,} B (latent + RoPE key, "
                      f"{format_bytes(g['kv_cache_bytes_per_token'])})"),
                     ("  with a K and V per head (MHA)", f"{g['kv_cache_bytes_per_token_mha']:,} B "
                      f"({format_bytes(g['kv_cache_bytes_per_token_mha'])}): MLA's is "
                      f"{g['kv_cache_reduction']:.1f}x smaller")], title="MLA vs MHA")
    elif g["attention_type"] != "MHA":
        print_table([("Parameters saved vs MHA", f"{g['params_saved']:,} ({g['params_saved_fraction']:.1%})"),
                     ("Training FLOPs saved vs MHA", f"{g['flops_saved_fraction']:.1%}"),
                     ("KV cache / token (bf16)", f"{format_bytes(g['kv_cache_bytes_per_token'])} "
                      f"vs {format_bytes(g['kv_cache_bytes_per_token_mha'])} MHA "
                      f"({g['kv_cache_reduction']:.0f}x smaller)")],
                    title=f"{g['attention_type']} vs MHA")
    else:
        print_table([("KV cache / token (bf16)", format_bytes(r["kv_cache_bytes_per_token"]))], title="Inference")
    m = r["memory"]
    loss = f"loss in chunks of {m['loss_chunk_tokens']:,} tokens" if m["loss_chunk_tokens"] else "unchunked loss"
    spread = (f"{_layout_name(m['layout'])}, pipeline rank {m['pp_rank']} (the fullest)" if "layout" in m
              else f"{m['sharding'].upper()} over {m['num_devices']}")
    title = (f"Training memory per device ({spread}, {m['precision']}, "
             f"micro-batch {m['micro_batch']} x {m['seq_len']}{_checkpointing_text(m)}, "
             f"{loss})")
    # counting.training_memory, or layout_cost.layout_memory (tp, pp or HSDP): the same components and phases
    rows = [(k.replace("_", " ").capitalize(), format_bytes(m[k])) for k in MEMORY_COMPONENTS if m[k]]
    if "layout" in m and m["layout"]["pp"] > 1:
        rows.append(("Activations in flight", f"{m['in_flight']} (micro-batch x local stage) chunks on pipeline "
                                               f"rank {m['pp_rank']}, which holds {m['layers']} layers"))
    rows += [(f"Live at {phase.replace('_', ' ')}", format_bytes(m[f"phase_{phase}"])) for phase in PHASES]
    rows.append(("Peak (allocated)", f"{format_bytes(m['peak'])} at {m['peak_phase'].replace('_', ' ')}"))
    rows.append(("Runtime reserve (CUDA context, allocator)", format_bytes(m["runtime_reserve"])))
    rows.append(("Total (estimate)", format_bytes(m["total"])))
    if "device_memory" in m:
        verdict = "fits" if m["fits"] else "DOES NOT FIT"
        rows.append((f"{r['accelerator']['name']} memory", f"{format_bytes(m['device_memory'])} -> {verdict}"))
    print_table(rows, title=title)
    if "device_memory" in m and not m["fits"]:
        accumulating = ("; or one micro-batch per step (--global-batch-tokens), without the accumulated gradients' "
                        f"{format_bytes(m['accumulated_gradients'])}" if m.get("accumulated_gradients") else "")
        print("  Does not fit: try more GPUs (--gpus), --activation-checkpointing, a smaller --micro-batch "
              f"or --seq-len{accumulating}.\n")
    if r["layout"]["num_devices"] > 1 or "time" in r:
        print_layout(r)
    if "time" in r and "predicted" in r["time"]:
        print_step_time(r["time"]["predicted"])
    if "time" in r and "seconds" in r["time"]:
        t = r["time"]
        print_table([("Tokens", f"{r['tokens']:.4g} ({r['tokens_per_param']:.1f} per parameter)"),
                     ("Training FLOPs", f"{r['training_flops']:.4e}"),
                     ("Throughput", f"{t['tokens_per_second_per_device']:,.0f} tokens/s/device, "
                      f"{t['tokens_per_second']:,.0f} tokens/s total"),
                     ("Wall-clock", f"{format_duration(t['seconds'])} ({t['gpu_hours']:,.0f} GPU-hours)")],
                    title=f"Time on {t['num_devices']} x {t['gpu_type']} at {t['mfu']:.0%} MFU ({t['hfu']:.0%} HFU)")


def print_layout(r: dict) -> None:
    """The layout's pipeline figures and its collectives (bytes per step per device), and the layout
    search's top rows when it ran."""
    lay = r["layout"]
    if "layout_search" in r:
        print(f"Layout search: the fastest feasible of {lay['num_devices']} x {r['accelerator']['name']} "
              f"(global batch {lay['global_batch_tokens']:,} tokens), by predicted step time")
        print(f"  {'#':>2} {'layout':<50} {'micro':>5} {'AC':<12} {'memory':>10} {'step':>9} {'tok/s/GPU':>10} "
              f"{'MFU':>6}")
        for i, row in enumerate(r["layout_search"], 1):
            name = _layout_name(row["layout"])
            ac = row["activation_checkpointing"] + (f" {row['selective_ac_option']}"
                                                    if row["activation_checkpointing"] == "selective" else "")
            print(f"  {i:>2} {name:<50} {row['micro_batch']:>5} {ac:<12} {format_bytes(row['memory_bytes']):>10} "
                  f"{row['step_seconds']:>8.2f}s {row['tokens_per_second_per_device']:>10,.0f} {row['mfu']:>6.1%}")
        print()
    rows = [("Layout", _layout_name(lay)),
            ("Micro-batch", f"{lay['micro_batch']} x {r['flops']['seq_len']} tokens, "
                            + (f"{lay['pp_microbatches']} pipeline micro-batches" if lay["pp"] > 1 else
                               f"{lay['accumulation']} accumulation step(s)")
                            + f"; {lay['global_batch_tokens']:,} tokens per step")]
    if lay["pp"] > 1:
        rows += [("Pipeline bubble", f"{lay['bubble_fraction']:.1%} of the step ({lay['pp_schedule']}, "
                                     f"(p-1)/(v·m + p-1) with p={lay['pp']}, v={lay['pp_stages_per_rank']}, "
                                     f"m={lay['pp_microbatches']})"),
                 ("In flight on stage 0", f"{lay['in_flight_first_stage']} micro-batch x local-stage activations")]
    print_table(rows, title="Layout")
    comm = lay["communication"]
    if comm:
        print("Communication per step per device (ring algorithms: all-gather / reduce-scatter (n-1)/n, "
              "all-reduce 2(n-1)/n of the buffer)")
        print(f"  {'collective':<44} {'group':>6} {'calls':>8} {'bytes':>12}")
        for c in comm:
            print(f"  {c['name']:<44} {c['group']:>6} {c['calls']:>8,} {format_bytes(c['bytes']):>12}")
        print()


def _checkpointing_text(m: dict) -> str:
    mode = m["activation_checkpointing"]
    if mode in (False, "none"):
        return ""
    if mode == "selective":
        return f", selective activation checkpointing ({m.get('selective_ac_option', 'op')})"
    return ", activation checkpointing"


def _layout_name(lay: dict) -> str:
    parts = [f"{k} {lay[k]}" for k in ("pp", "dp_replicate", "dp_shard", "tp") if lay[k] != 1]
    if lay["pp"] > 1:
        parts.append(lay["pp_schedule"] + (f" v{lay['pp_stages_per_rank']}" if lay["pp_stages_per_rank"] > 1 else ""))
    return " x ".join(parts) or "one device"


def print_step_time(t: dict) -> None:
    """steptime's breakdown: seconds per step by part, and the predicted throughput and MFU."""
    total = t["step_seconds"]
    rows = [(name, f"{secs:8.3f} s  {secs / total:6.1%}") for name, secs in t["parts"].items() if secs > 0]
    rows += [("Step", f"{total:8.3f} s"),
             ("Throughput", f"{t['tokens_per_second_per_device']:,.0f} tokens/s/device"),
             ("MFU (model FLOPs)", f"{t['mfu']:.1%}"),
             ("HFU (with recomputation)", f"{t['hfu']:.1%}")]
    print_table(rows, title=f"Predicted step time on {t['num_devices']} x {t['gpu_type']} (scalelab.steptime; "
                            "docs/parallelism.md)")
