"""Training-step speed of scalelab's Transformer against transformers' LlamaForCausalLM.

Same config, same weights (copied through scalelab.hf's mapping, and the losses are checked
equal), same batch, same process; forward + backward of the mean cross-entropy, steps of the
two models interleaved so background load hits both alike. Prints tokens/s of each and the
ratio ours / transformers (> 1 means we are faster). CPU in fp32 by default; on a GPU, bf16.

    .venv/bin/python benchmarks/model_speed.py
    .venv/bin/python benchmarks/model_speed.py --layers 8 --width 1024 --seq-len 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256, help="n_embd")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's). 1 makes process CPU time a clean measure")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from scalelab import hf
    from scalelab.model import Transformer
    from scalelab.presets import style_config

    cfg = style_config("llama3", args.layers, args.width, args.heads, num_key_value_heads=args.kv_heads,
                       vocab_size=args.vocab, block_size=max(args.seq_len, 256))
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device=args.device, dtype=dtype)
    hf_config = {k: v for k, v in hf.config_to_hf(cfg, "llama", dtype).items()
                 if k not in ("architectures", "model_type", "torch_dtype", "dtype", "rope_scaling", "rope_theta")}
    theirs = LlamaForCausalLM(LlamaConfig(**hf_config, attn_implementation="sdpa")).to(device=args.device, dtype=dtype)
    missing = theirs.load_state_dict(hf._hf_from_native(ours.state_dict(), cfg, "llama"), strict=False)
    assert not missing.unexpected_keys and all("rotary" in k for k in missing.missing_keys), missing
    return cfg, dtype, ours, theirs


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, dtype, ours, theirs = build(args)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=gen).to(args.device)
    targets = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=gen).to(args.device)

    def step_ours() -> torch.Tensor:
        _, loss = ours(idx, targets)
        loss.backward()
        return loss

    def step_theirs() -> torch.Tensor:
        logits = theirs(input_ids=idx, use_cache=False).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        loss.backward()
        return loss

    def timed(step) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) of one step."""
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    loss_ours, loss_theirs = step_ours().item(), step_theirs().item()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(loss_ours - loss_theirs) <= tolerance * max(1.0, abs(loss_theirs)), (loss_ours, loss_theirs)
    for _ in range(args.warmup):
        step_ours(), step_theirs()
    times_ours, times_theirs = [], []
    for _ in range(args.steps):  # interleaved
        times_ours.append(timed(step_ours))
        times_theirs.append(timed(step_theirs))
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
    tokens = args.batch * args.seq_len
    tps_ours = tokens / statistics.median(t for t, _ in times_ours)
    tps_theirs = tokens / statistics.median(t for t, _ in times_theirs)
    # On a shared CPU, wall time includes waiting for other processes; the CPU seconds this
    # process spent per step do not, so their ratio is the steadier comparison there.
    cpu_ratio = statistics.median(c for _, c in times_theirs) / statistics.median(c for _, c in times_ours)
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads"
    result = {"model": cfg.name(), "params": sum(p.numel() for p in ours.parameters()), "device": device_name,
              "dtype": str(dtype).removeprefix("torch."), "batch": args.batch, "seq_len": args.seq_len,
              "loss_ours": loss_ours, "loss_transformers": loss_theirs,
              "tokens_per_second_ours": tps_ours, "tokens_per_second_transformers": tps_theirs,
              "ratio_ours_over_transformers": tps_ours / tps_theirs, "ratio_cpu_time": cpu_ratio,
              "steps": args.steps,
              "torch": torch.__version__}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"forward+backward, {result['model']} ({result['params']:,} params), batch {args.batch} x "
          f"seq {args.seq_len}, {result['dtype']} on {device_name}; median of {args.steps} steps")
    print(f"  loss                 ours {loss_ours:.6f}   transformers {loss_theirs:.6f}")
    print(f"  tokens/s             ours {tps_ours:,.0f}   transformers {tps_theirs:,.0f}")
    print(f"  ratio ours/transformers  {result['ratio_ours_over_transformers']:.3f} (wall time), "
          f"{cpu_ratio:.3f} (process CPU time)")


if __name__ == "__main__":
    main()
