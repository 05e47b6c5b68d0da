"""`scalelab count MODEL`: exact parameters and FLOPs, memory and time for an architecture."""

from __future__ import annotations

import argparse
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
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for time")
    p.add_argument("--tokens", default=None, help="training tokens D for time/cost, e.g. 15T or 1.6e11")
    p.add_argument("--sharding", choices=("fsdp", "ddp", "none"), default=None,
                   help="how weights/optimizer are split over GPUs (default: fsdp when --gpus > 1)")
    p.add_argument("--precision", choices=("bf16-mixed", "bf16", "fp32"), default=None,
                   help="training precision (bytes per parameter for weights, grads, optimizer)")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute blocks in backward")
    p.add_argument("--attention", choices=("sdpa", "math"), default=None, help="attention kernel (default sdpa)")
    p.add_argument("--loss-chunk-tokens", type=int, default=None, metavar="N",
                   help="score the loss N tokens at a time, as the trainer does by default "
                   f"(default {DEFAULT_LOSS_CHUNK_TOKENS}); 0 forms all the logits at once")
    add_common_flags(p)
    p.set_defaults(func=run)


def count_report(cfg, *, seq_len: int, micro_batch: int = 1, gpus: int = 1, gpu_type: str | None = None,
                 mfu: float = 0.4, tokens: float | None = None, sharding: str | None = None,
                 precision: str = "bf16-mixed", activation_checkpointing: bool = False,
                 attention: str = "sdpa", loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS) -> dict:
    """Everything `count` prints, as one dict (the --json object)."""
    from scalelab import counting
    from scalelab.hardware import get_accelerator

    params = counting.count_params(cfg)
    flops = counting.flops_report(cfg, seq_len)
    sharding = sharding or ("fsdp" if gpus > 1 else "ddp")
    memory = counting.training_memory(cfg, micro_batch=micro_batch, seq_len=seq_len, num_devices=gpus,
                                      sharding=sharding, precision=precision,
                                      activation_checkpointing=activation_checkpointing, attention=attention,
                                      loss_chunk_tokens=loss_chunk_tokens)
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
    }
    if gpu_type is not None:
        acc = get_accelerator(gpu_type)
        report["accelerator"] = {"name": acc.name, "peak_bf16_flops": acc.peak_bf16_flops,
                                 "memory_bytes": acc.memory_bytes}
        report["memory"]["device_memory"] = acc.memory_bytes
        report["memory"]["fits"] = bool(memory["total"] <= acc.memory_bytes)
        if tokens is not None:
            report["time"] = counting.training_time(flops["training_per_token"], tokens, acc, gpus, mfu)
    if tokens is not None:
        report["tokens"] = tokens
        report["training_flops"] = flops["training_per_token"] * tokens
        report["tokens_per_param"] = tokens / params.total
    return report


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
    for flag, default in (("micro_batch", 1), ("precision", "bf16-mixed"), ("activation_checkpointing", False),
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
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu is a fraction in (0, 1], got {args.mfu}")
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
    report = count_report(cfg, seq_len=seq_len, micro_batch=args.micro_batch, gpus=args.gpus,
                          gpu_type=args.gpu_type, mfu=args.mfu, tokens=tokens, sharding=args.sharding,
                          precision=args.precision, activation_checkpointing=args.activation_checkpointing,
                          attention=args.attention, loss_chunk_tokens=args.loss_chunk_tokens)
    if args.json:
        print_json(report)
    else:
        print_report(cfg, report)
    return 0


def training_config_settings(spec: str | None) -> dict:
    """What a training config's [train] and [parallel] sections say about memory, as count's flags (the
    trainer's mapping, trainer.predicted_memory): {} for a preset or a bare model file."""
    from pathlib import Path

    from scalelab.config import load_toml

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
                      ("loss_chunk_tokens", "loss_chunk_tokens")):
        if key in train:
            out[flag] = train[key]
    for flag, ok in (("micro_batch", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                     ("seq_len", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                     ("activation_checkpointing", lambda v: isinstance(v, bool)),
                     ("attention", lambda v: v in ("sdpa", "math")),
                     ("loss_chunk_tokens", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)):
        if flag in out and not ok(out[flag]):
            raise UserError(f"{spec}: [train] value {out[flag]!r} is not a valid {flag.replace('_', ' ')}; "
                            "check it with `scalelab train --check`")
    if "dtype" in train:  # the trainer runs fp32 as fp32 and every 16-bit dtype as autocast / FSDP bf16
        out["precision"] = "fp32" if train["dtype"] == "fp32" else "bf16-mixed"
    if parallel.get("strategy") in ("fsdp", "ddp", "none"):
        out["sharding"] = parallel["strategy"]
    return out


def print_report(cfg, r: dict) -> None:
    from scalelab.counting import FLOPS_SHORTCUTS

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
    title = (f"Training memory per device ({m['sharding'].upper()} over {m['num_devices']}, {m['precision']}, "
             f"micro-batch {m['micro_batch']} x {m['seq_len']}{', activation checkpointing' if m['activation_checkpointing'] else ''}, "
             f"{loss})")
    rows = [(k.replace("_", " ").capitalize(), format_bytes(m[k]))
            for k in ("weights", "gradients", "optimizer", "unsharded_buffers", "weight_copies", "activations")
            if m[k]]
    rows.append(("Total (estimate)", format_bytes(m["total"])))
    if "device_memory" in m:
        verdict = "fits" if m["fits"] else "DOES NOT FIT"
        rows.append((f"{r['accelerator']['name']} memory", f"{format_bytes(m['device_memory'])} -> {verdict}"))
    print_table(rows, title=title)
    if "device_memory" in m and not m["fits"]:
        print("  Does not fit: try more GPUs (--gpus), --activation-checkpointing, a smaller --micro-batch "
              "or --seq-len.\n")
    if "time" in r:
        t = r["time"]
        print_table([("Tokens", f"{r['tokens']:.4g} ({r['tokens_per_param']:.1f} per parameter)"),
                     ("Training FLOPs", f"{r['training_flops']:.4e}"),
                     ("Throughput", f"{t['tokens_per_second_per_device']:,.0f} tokens/s/device, "
                      f"{t['tokens_per_second']:,.0f} tokens/s total"),
                     ("Wall-clock", f"{format_duration(t['seconds'])} ({t['gpu_hours']:,.0f} GPU-hours)")],
                    title=f"Time on {t['num_devices']} x {t['gpu_type']} at {t['mfu']:.0%} MFU")
