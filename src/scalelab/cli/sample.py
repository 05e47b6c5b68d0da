"""`scalelab sample CHECKPOINT`: generate text from a trained model (KV cache on).

CHECKPOINT is a run directory (its latest checkpoint), a checkpoint directory, RUN_DIR/final,
or any native checkpoint (model.safetensors + model.toml). The tokenizer is the copy the
trainer put in the run directory (found next to the checkpoint or in a parent), or --tokenizer.
The prompt is treated as the start of a new document (it follows an end-of-text token, as
every document did in training); a sample ends at the model's next end-of-text token.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from scalelab.cli import HelpFormatter, add_common_flags, print_json
from scalelab.errors import UserError

EXAMPLES = """examples:
  scalelab sample runs/demo/run --prompt "ROMEO:" --max-new-tokens 200    # the run of `scalelab demo`
  scalelab sample runs/demo/run/final --prompt "To be" --temperature 0.8 --top-k 50 --num-samples 3 --seed 1
  scalelab sample runs/demo/run --prompt "KING" --temperature 0   # greedy
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


MAX_NEW_TOKENS = 1_000_000  # per sample: beyond this a request is a typo, not a plan
MAX_SAMPLES = 10_000
MIN_TEMPERATURE = 1e-3  # logits / T overflows float32 to inf (then NaN) for T ~ 1e-38; 0 is greedy


def check_sampling_args(args: argparse.Namespace) -> None:
    """One line for every number `sample` cannot use (NaN passed `temperature < 0` unnoticed and
    died in torch.multinomial)."""
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be between 1 and {MAX_NEW_TOKENS:,}")
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise UserError(f"--num-samples {args.num_samples} must be between 1 and {MAX_SAMPLES:,}")
    t = args.temperature
    if not (t == 0 or MIN_TEMPERATURE <= t < math.inf):
        raise UserError(f"--temperature {t} must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k {args.top_k} must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # also false for NaN
        raise UserError(f"--top-p {args.top_p} must be in (0, 1]")
    if not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed accepts
        raise UserError(f"--seed {args.seed} must fit in 64 bits")


def resolve_device(spec: str, verb: str = "sample"):
    """A torch.device this machine has, or a one-line UserError (cuda without a GPU, mps off a
    Mac, an index past the last GPU, a name torch does not know). "auto": cuda if available,
    else cpu."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {spec!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine (no GPU, driver or "
                            "CUDA build of torch); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {spec}: MPS (Apple GPU) is not available on this machine; use --device cpu")
        return device
    raise UserError(f"--device {spec}: {verb} runs on cpu, cuda or mps, not {device.type}")


def run(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    import torch

    device = resolve_device(args.device)
    path = Path(args.checkpoint)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or run directory")
    from scalelab.train.checkpoint import load_model_for_inference

    model = load_model_for_inference(path, device=device)  # first: it names the run below a demo directory
    if args.tokenizer:
        from scalelab.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    else:
        from scalelab.data.tokenizer import find_run_tokenizer

        tok = find_run_tokenizer(path)
        if tok is None:
            raise UserError(f"no tokenizer found with {path} (no data.json + tokenizer/ beside it or in a parent); "
                            "pass --tokenizer SPEC")
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer vocab {tok.vocab_size} exceeds the model's {model.config.vocab_size}")
    ids = [tok.eos_id] + tok.encode(args.prompt)
    block = model.config.block_size
    if len(ids) >= block:
        ids = ids[-(block - 1):]
    g = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
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
