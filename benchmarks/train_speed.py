"""Train-step speed: scalelab's Transformer vs transformers' LlamaForCausalLM, same config, same
optimizer (AdamW, weight decay on matrices, grad clip 1.0), same batch, in one run.

A step is forward + backward + clip + AdamW step. Achieved TFLOP/s use the exact FLOPs of
scalelab.counting.training_flops (the same architecture, so the same count for both). Timings
alternate between the two models (best of --repeats windows each) so background load hits both.

    python benchmarks/train_speed.py                                   # small LLaMA-3 style, CPU
    python benchmarks/train_speed.py --preset llama3.2-1b --seq-len 2048 --batch 4 --compile   # GPU
"""

from __future__ import annotations

import argparse
import time

import torch

from scalelab.counting import count_params, training_flops
from scalelab.presets import get_preset, style_config


def make_optimizer(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=3e-4, betas=(0.9, 0.95), **({"fused": True} if fused else {}))


def step_fn(model, opt, x, y, hf: bool, autocast_dtype):
    def step():
        ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(
            x.device.type, enabled=False)
        with ctx:
            loss = model(input_ids=x, labels=x).loss if hf else model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="an official model (default: a small llama3-style model)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per window")
    ap.add_argument("--repeats", type=int, default=3, help="timing windows per model (best is reported)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from scalelab import hf
    from scalelab.model import Transformer

    device = torch.device(args.device)
    if args.preset:
        cfg = get_preset(args.preset).replace(block_size=max(args.seq_len, 128))
    else:
        cfg = style_config("llama3", args.n_layer, args.n_embd, args.n_head, vocab_size=args.vocab_size,
                           block_size=args.seq_len)
    cfg = cfg.replace(rope_scaling=None) if cfg.rope_scaling else cfg
    bf16 = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if bf16 else None

    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    hf_cfg = hf.config_to_hf(cfg, "llama")
    hf_cfg["attn_implementation"] = "sdpa"
    theirs = LlamaForCausalLM(LlamaConfig(**hf_cfg)).to(device)
    theirs.load_state_dict(hf._hf_from_native(ours.state_dict(), cfg, "llama"), strict=False)
    if args.compile:
        ours.compile()
        theirs.compile()
    fused = device.type == "cuda"
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    # HF shifts labels inside the model: give it the full window as both input and labels so the
    # two models see the same (input, target) pairs; our model gets (x, y) explicitly. Same FLOPs
    # up to one position, which we do not count.
    runs = {
        "scalelab": step_fn(ours, make_optimizer(ours, fused), x, y, False, autocast_dtype),
        "transformers": step_fn(theirs, make_optimizer(theirs, fused), x, y, True, autocast_dtype),
    }
    flops = training_flops(cfg, args.batch, args.seq_len)
    for step in runs.values():  # warm up (and compile)
        for _ in range(2):
            step()
    sync(device)
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, step in runs.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            float(loss.detach())
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)

    tokens = args.batch * args.seq_len
    name = cfg.name()
    print(f"model {name}: {count_params(cfg).total:,} params; batch {args.batch} x {args.seq_len} on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
          f"({'bf16 autocast' if bf16 else 'fp32'}{', compiled' if args.compile else ''}, "
          f"{torch.get_num_threads()} threads); {flops / 1e9:.2f} GFLOP per step (exact)")
    print(f"{'':14}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}")
    for n, t in best.items():
        print(f"{n:14}{t * 1e3:10.1f}{tokens / t:12,.0f}{flops / t / 1e12:10.3f}")
    print(f"ratio scalelab / transformers tokens/s: {best['transformers'] / best['scalelab']:.2f}x")


if __name__ == "__main__":
    main()
