"""Peak memory and speed of one training step at a 128K vocabulary: scalelab's chunked loss
(the default), its unchunked loss, and transformers' LlamaForCausalLM, same config and weights,
in one run.

A step is forward, loss, backward, grad clip 1.0 and AdamW (weight decay on matrices), starting
from the weights alone (no gradients, no optimizer state yet), as a run's first step does. Peak
memory is the CPU allocator's: every allocation and free the profiler records
(`profile_memory=True`), summed in time order, above what was allocated before the step (the
weights). Speed is timed separately, without the profiler, alternating the three models (best of
--repeats windows each) so background load hits all alike. Beside each peak, counting's
prediction for it (counting.training_memory's step timeline for a first step, weights excluded).

    python benchmarks/loss_memory.py          # 2 layers x 256, vocab 128256, batch 8 x 256, fp32, CPU
"""

from __future__ import annotations

import argparse
import time

import torch
from train_speed import make_optimizer, step_fn  # the same step and optimizer as the speed benchmark

from scalelab import counting
from scalelab.presets import style_config
from scalelab.train.metrics import allocator_peak_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=128256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=counting.DEFAULT_LOSS_CHUNK_TOKENS,
                    help="tokens per chunk of the chunked loss (default: the trainer's default)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per window")
    ap.add_argument("--repeats", type=int, default=3, help="timing windows per model (best is reported)")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from scalelab import hf
    from scalelab.model import Transformer

    cfg = style_config("llama3", args.n_layer, args.n_embd, args.n_head, vocab_size=args.vocab_size,
                       block_size=args.seq_len)
    torch.manual_seed(0)
    reference = Transformer(cfg)
    hf_cfg = hf.config_to_hf(cfg, "llama")
    hf_cfg["attn_implementation"] = "sdpa"

    def build(name: str) -> torch.nn.Module:
        if name == "transformers":
            model = LlamaForCausalLM(LlamaConfig(**hf_cfg))
            model.load_state_dict(hf._hf_from_native(reference.state_dict(), cfg, "llama"), strict=False)
            return model
        model = Transformer(cfg, loss_chunk_tokens=args.chunk if name == "chunked" else 0)
        model.load_state_dict(reference.state_dict())
        return model

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    # HF shifts labels inside the model: it gets the window as input and labels (one target fewer
    # per sequence); ours gets (x, y) explicitly. The same tokens, the same weights.
    names = ("chunked", "unchunked", "transformers")
    models = {name: build(name) for name in names}
    steps, peaks, losses = {}, {}, {}
    for name in names:  # the first step of each, from the weights alone, under the profiler
        steps[name] = step_fn(models[name], make_optimizer(models[name], fused=False), x, y,
                              name == "transformers", None)
        peaks[name], loss = allocator_peak_bytes(steps[name])
        losses[name] = float(loss.detach())
    best = {name: float("inf") for name in names}
    for _ in range(args.repeats):
        for name in names:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = steps[name]()
            float(loss.detach())
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)

    tokens = args.batch * args.seq_len
    n = counting.count_params(cfg).total
    print(f"model {cfg.name()}: {n:,} params ({4 * n / 2**30:.2f} GiB of fp32 weights); batch {args.batch} x "
          f"{args.seq_len} = {tokens:,} tokens; fp32 on cpu ({torch.get_num_threads()} threads); "
          f"chunk {args.chunk} tokens")
    print(f"{'':14}{'peak GiB':>10}{'vs HF':>8}{'predicted':>11}{'step s':>9}{'tokens/s':>10}{'vs HF':>8}"
          f"{'first loss':>12}")
    for name in names:
        if name == "transformers":
            predicted = ""
        else:
            m = counting.training_memory(cfg, micro_batch=args.batch, seq_len=args.seq_len, precision="fp32",
                                         sharding="none", loss_chunk_tokens=args.chunk if name == "chunked" else 0,
                                         optimizer_impl="for-loop", device="cpu")
            # a first step: AdamW's state appears only at its optimizer step
            first_step = max(*(m[f"phase_{p}"] - m["optimizer"] for p in counting.PHASES[:-1]),
                             m["phase_optimizer_step"])
            predicted = f"{(first_step - m['weights']) / 2**30:.2f}"
        print(f"{name:<14}{peaks[name] / 2**30:>10.2f}{peaks[name] / peaks['transformers']:>7.2f}x{predicted:>11}"
              f"{best[name]:>9.2f}{tokens / best[name]:>10,.0f}{best['transformers'] / best[name]:>7.2f}x"
              f"{losses[name]:>12.6f}")


if __name__ == "__main__":
    main()
