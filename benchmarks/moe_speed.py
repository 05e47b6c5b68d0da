"""Forward + backward speed of scalelab's MoE layer against transformers' MixtralSparseMoeBlock.

Same config, same weights (our [E, in, out] expert tensors split into transformers' layout, and the
outputs checked equal), same tokens, same process; forward + backward of sum(output · g) for a fixed
random g, the two layers' steps interleaved so background load hits both alike. Prints tokens/s of
each and the ratios ours / transformers (> 1 means we are faster). Ours sorts the (token, expert)
assignments by expert and runs each projection as one torch._grouped_mm (scalelab.moe). transformers
is measured twice: with experts_implementation "grouped_mm" (what from_pretrained picks where the
kernel runs) and "eager" (its loop over the experts that have tokens, gathering and scattering each
one's rows).

    .venv/bin/python benchmarks/moe_speed.py
    .venv/bin/python benchmarks/moe_speed.py --experts 64 --top-k 8 --width 512 --expert-width 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256, help="n_embd")
    p.add_argument("--expert-width", type=int, default=512, help="moe_intermediate_size (Mixtral: d_ff)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch × sequence)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per layer")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def build(args):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from scalelab.config import ModelConfig
    from scalelab.moe import MoE

    cfg = ModelConfig(n_layer=1, n_head=4, n_embd=args.width, vocab_size=256, d_ff=args.expert_width,
                      n_routed_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    ours = MoE(cfg)
    ours.init_weights(0.02, 0.02)
    theirs = {}
    for implementation in ("grouped_mm", "eager"):  # from_pretrained's default where it can, and the loop
        config = MixtralConfig(hidden_size=args.width, intermediate_size=args.expert_width,
                               num_local_experts=args.experts, num_experts_per_tok=args.top_k, router_jitter_noise=0.0)
        config._experts_implementation = implementation
        layer = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            layer.gate.weight.copy_(ours.router.weight)
            layer.experts.gate_up_proj.copy_(ours.gate_up.transpose(1, 2))  # [E, 2I, H]: gate rows, then up
            layer.experts.down_proj.copy_(ours.down.transpose(1, 2))  # [E, H, I]
        theirs[f"transformers {implementation}"] = layer.to(args.device, dtype)
    return cfg, dtype, ours.to(args.device, dtype), theirs


def step(layer, x, g) -> None:
    x = x.detach().requires_grad_()
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    (out * g).sum().backward()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, dtype, ours, theirs = build(args)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, args.tokens, args.width, generator=gen).to(args.device, dtype)
    g = torch.randn(1, args.tokens, args.width, generator=gen).to(args.device, dtype)
    layers = {"scalelab": ours, **theirs}
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        a = ours(x)
        for name, layer in theirs.items():
            b = layer(x)
            b = b[0] if isinstance(b, tuple) else b
            assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), f"{name} differs from ours"
    times = {name: [] for name in layers}
    cpu = {name: [] for name in layers}  # process CPU time: with --threads 1, what load on the machine does not inflate
    for i in range(args.warmup + args.steps):
        for name, layer in layers.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step(layer, x, g)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    tps = {name: args.tokens / statistics.median(t) for name, t in times.items()}
    cpu_tps = {name: args.tokens / statistics.median(t) for name, t in cpu.items()}
    result = {"config": {"n_embd": args.width, "expert_width": args.expert_width, "experts": args.experts,
                         "top_k": args.top_k, "tokens": args.tokens, "device": args.device, "dtype": args.dtype,
                         "threads": torch.get_num_threads()},
              "tokens_per_second": tps, "tokens_per_cpu_second": cpu_tps,
              "ratio": {name: tps["scalelab"] / tps[name] for name in theirs},
              "cpu_time_ratio": {name: cpu_tps["scalelab"] / cpu_tps[name] for name in theirs}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    c = result["config"]
    print(f"MoE layer: {c['experts']} experts, top-{c['top_k']}, n_embd {c['n_embd']}, expert width "
          f"{c['expert_width']}, {c['tokens']} tokens, {c['device']} {c['dtype']}, {c['threads']} threads")
    for name, value in tps.items():
        print(f"  {name:24s} {value:10,.0f} tokens/s, {cpu_tps[name]:10,.0f} tokens per CPU second "
              f"(forward + backward, median of {args.steps})")
    for name, ratio in result["ratio"].items():
        print(f"  ratio ours / {name}: {ratio:.2f}x wall, {result['cpu_time_ratio'][name]:.2f}x CPU time")


if __name__ == "__main__":
    main()
