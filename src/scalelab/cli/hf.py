"""`scalelab import-hf` and `scalelab export-hf`: Hugging Face checkpoints in and out.

import-hf reads a Hugging Face directory (config.json + model.safetensors or a sharded index)
of a LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel and writes a
scalelab checkpoint (model.safetensors + model.toml). export-hf does the reverse, from a scalelab checkpoint (as
written by import-hf or the trainer). Only safetensors and json are used; no transformers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from scalelab.cli import HelpFormatter, add_common_flags, format_count, print_json, print_table
from scalelab.errors import UserError
from scalelab.files import atomic_directory, check_output_dir

IMPORT_EXAMPLES = """examples:
  scalelab import-hf ~/models/Llama-3.2-1B checkpoints/llama3.2-1b
  scalelab import-hf ~/models/gpt2 checkpoints/gpt2 --dtype float32 --json
  scalelab import-hf ~/models/Qwen2.5-0.5B checkpoints/qwen2.5-0.5b
"""

EXPORT_EXAMPLES = """examples:
  scalelab export-hf runs/demo/run hf/demo          # a run's newest intact checkpoint, with its tokenizer
  scalelab export-hf runs/demo/run/checkpoints/step_00000300 hf/demo-300
  scalelab export-hf checkpoints/llama3.2-1b hf/llama3.2-1b --dtype bfloat16 --max-shard-size 2GB
"""

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="convert a Hugging Face checkpoint into a scalelab checkpoint",
                       description=__doc__, epilog=IMPORT_EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("out", metavar="OUT_CHECKPOINT", help="directory to write (model.safetensors + model.toml)")
    _add_shared(p)
    add_common_flags(p)
    p.set_defaults(func=run_import)

    p = sub.add_parser("export-hf", help="convert a scalelab checkpoint into a Hugging Face checkpoint",
                       description=__doc__, epilog=EXPORT_EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="scalelab checkpoint directory (model.safetensors + model.toml or config.json)")
    p.add_argument("out", metavar="HF_DIR", help="directory to write (config.json + safetensors)")
    # scalelab.hf.ARCHITECTURES, written out: this module must not import torch (tests/test_qwen3.py checks)
    p.add_argument("--arch", choices=("gpt2", "qwen3", "qwen2", "mistral", "llama", "qwen3_moe", "mixtral",
                                      "deepseek_v3", "deepseek_v2"), default=None,
                   help="Hugging Face architecture (default: the one matching the model)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file; bigger models are sharded with an index")
    p.add_argument("--tokenizer", default=None, metavar="SPEC",
                   help="tokenizer to export with the model (byte, gpt2, hf:PATH, tiktoken:PATH) "
                        "[the run's copy: data.json + tokenizer/ beside CHECKPOINT or in a parent]")
    _add_shared(p)
    add_common_flags(p)
    p.set_defaults(func=run_export)


def _add_shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="convert the weights to this dtype (default: keep the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace OUT if it already exists")


def _check_paths(source: str, out: str, force: bool, flag: str) -> Path:
    """Refuse, before anything is loaded, a missing source and an output that cannot be written:
    the source itself, an existing file, a non-empty directory without --force, a parent that
    is a file or not writable."""
    src, dst = Path(source), Path(out)
    if not src.is_dir():
        raise UserError(f"{src}: no such directory")
    if dst.exists() and dst.resolve() == src.resolve():
        raise UserError(f"{dst} is the source directory; choose another output directory")
    check_output_dir(dst, flag=flag)
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise UserError(f"{dst} exists and is not empty; pass --force to replace it")
    return dst


def _write_directory(out: Path, write: Callable[[Path], object]) -> None:
    """Write into a temporary sibling directory moved into place only once complete, so an error
    never leaves a half-written checkpoint under the final name."""
    with atomic_directory(out) as tmp:
        write(tmp)


def _report(args: argparse.Namespace, model, source_format: str, out_format: str) -> int:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    files = sorted(p.name for p in Path(args.out).iterdir())
    report = {"source": str(args.hf_dir if hasattr(args, "hf_dir") else args.checkpoint),
              "source_format": source_format, "output": str(args.out), "output_format": out_format,
              "model": cfg.name(), "params": n, "dtype": dtype, "files": files, "config": cfg.to_dict()}
    if args.json:
        print_json(report)
    else:
        print_table([("Source", f"{report['source']} ({source_format})"),
                     ("Output", f"{report['output']} ({out_format})"), ("Model", cfg.name()),
                     ("Parameters", f"{n:,} ({format_count(n)})"), ("dtype", dtype),
                     ("Files", ", ".join(files))], title="Checkpoint converted")
    return 0


def run_import(args: argparse.Namespace) -> int:
    import torch

    from scalelab import hf

    out = _check_paths(args.hf_dir, args.out, args.force, "OUT_CHECKPOINT")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = hf.load(args.hf_dir, dtype=dtype, overrides=args.overrides)
    arch = hf.architecture_of(hf.read_json(Path(args.hf_dir) / "config.json"))
    _write_directory(out, lambda d: hf.save_native(model, d))
    return _report(args, model, hf.HF_CLASS[arch], "scalelab")


def run_export(args: argparse.Namespace) -> int:
    import torch

    from scalelab import hf

    out = _check_paths(args.checkpoint, args.out, args.force, "HF_DIR")
    max_shard = hf.parse_size(args.max_shard_size)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tokenizer = _export_tokenizer(Path(args.checkpoint), args.tokenizer)
    model, source = _load_for_export(Path(args.checkpoint), dtype, args.overrides)
    arch = args.arch or hf.default_architecture(model.config)
    hf.config_to_hf(model.config, arch)  # an unsupported architecture fails before anything is written
    _write_directory(out, lambda d: hf.save(model, d, arch=arch, max_shard_bytes=max_shard, tokenizer=tokenizer))
    if tokenizer is None:
        print(f"scalelab export-hf: note: no tokenizer with {args.checkpoint} (no data.json + tokenizer/ beside "
              "it or in a parent), so the export has none: transformers' AutoTokenizer will not load it; pass "
              "--tokenizer SPEC to include one", file=sys.stderr)
    return _report(args, model, source if source == "scalelab" else hf.HF_CLASS[source], hf.HF_CLASS[arch])


def _export_tokenizer(checkpoint: Path, spec: str | None):
    """--tokenizer, else the copy a training run keeps beside its checkpoints, else None."""
    from scalelab.data.tokenizer import find_run_tokenizer, load_tokenizer

    return load_tokenizer(spec) if spec else find_run_tokenizer(checkpoint)


def _load_for_export(path: Path, dtype, overrides: list[str]):
    """(model, source kind) from a checkpoint directory (ours or Hugging Face's), or from what only
    the trainer knows how to read: a run directory (its latest checkpoint) or an FSDP (DCP) one."""
    from scalelab import hf

    if any((path / name).is_file() for name in ("model.safetensors", hf.SAFETENSORS_INDEX, "config.json")):
        return hf.load_checkpoint(path, dtype=dtype, overrides=overrides)
    if overrides:
        raise UserError("--set needs a checkpoint directory with model.safetensors, not a run directory")
    from scalelab.train.checkpoint import load_model_for_inference

    return load_model_for_inference(path, dtype=dtype), "scalelab"
