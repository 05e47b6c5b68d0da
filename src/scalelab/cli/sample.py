"""`scalelab sample CHECKPOINT`: generate text from a trained model (KV cache on).

CHECKPOINT is a run directory (its latest checkpoint), a checkpoint directory, RUN_DIR/final,
or any native checkpoint (model.safetensors + model.toml). The tokenizer is the copy the
trainer put in the run directory (found next to the checkpoint or in a parent), or --tokenizer.
The prompt is treated as the start of a new document (it follows an end-of-text token, as
every document did in training); a sample ends at the model's next end-of-text token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scalelab.cli import HelpFormatter, add_common_flags, print_json
from scalelab.errors import UserError

EXAMPLES = """examples:
  scalelab sample runs/demo --prompt "ROMEO:" --max-new-tokens 200
  scalelab sample runs/demo/final --prompt "To be" --temperature 0.8 --top-k 50 --num-samples 3 --seed 1
  scalelab sample runs/demo --prompt "KING" --temperature 0   # greedy
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a trained checkpoint", description=__doc__,
                       epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory, checkpoint directory or RUN_DIR/final")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this probability")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same text)")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec if the run directory has none (byte, gpt2, hf:PATH...)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    p.add_argument("--no-stop", action="store_true", help="do not cut a sample at end-of-text")
    add_common_flags(p, set_flag=False)
    p.set_defaults(func=run)


def find_tokenizer(start: Path):
    """The trainer's copy: data.json + tokenizer/ in the checkpoint directory or up to 3 parents."""
    from scalelab.data.tokenizer import load_saved_tokenizer

    for d in [start, *list(start.resolve().parents)[:3]]:
        meta_file = d / "data.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            return load_saved_tokenizer(d / "tokenizer", meta["tokenizer"]["saved_spec"])
    return None


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise UserError("--max-new-tokens and --num-samples must be positive")
    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1) or (
            args.top_p is not None and not 0 < args.top_p <= 1):
        raise UserError("need --temperature ≥ 0, --top-k ≥ 1, 0 < --top-p ≤ 1")
    import torch

    from scalelab.train.checkpoint import load_model_for_inference

    path = Path(args.checkpoint)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or run directory")
    model = load_model_for_inference(path, device=args.device)  # first: it names the run below a demo directory
    if args.tokenizer:
        from scalelab.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    else:
        tok = find_tokenizer(path)
        if tok is None:
            raise UserError(f"no tokenizer found with {path} (no data.json + tokenizer/ beside it or in a parent); "
                            "pass --tokenizer SPEC")
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer vocab {tok.vocab_size} exceeds the model's {model.config.vocab_size}")
    ids = [tok.eos_id] + tok.encode(args.prompt)
    block = model.config.block_size
    if len(ids) >= block:
        ids = ids[-(block - 1):]
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=args.device)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=g)
    samples = []
    for row in out.tolist():
        new = row[len(ids):]
        if not args.no_stop and tok.eos_id in new:
            new = new[:new.index(tok.eos_id)]
        samples.append(args.prompt + tok.decode(new))
    if args.json:
        print_json({"checkpoint": str(path), "prompt": args.prompt, "samples": samples})
    else:
        for i, s in enumerate(samples):
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            print(s)
    sys.stdout.flush()
    return 0
