"""`scalelab tokenizer`: train a byte-level BPE, or inspect/encode with any tokenizer spec.

  train   learn a byte-level BPE with the `tokenizers` library from .txt/.md/.jsonl inputs and
          write OUT/tokenizer.json (BOS <|begin_of_text|> = 0, EOS <|end_of_text|> = 1);
          use it as --tokenizer hf:OUT.
  encode  print the ids of TEXT under a tokenizer spec (byte, gpt2, hf:PATH, tiktoken:PATH).
"""

from __future__ import annotations

import argparse

from scalelab.cli import HelpFormatter, add_common_flags, print_json, print_table
from scalelab.errors import UserError

EXAMPLES = """examples:
  scalelab tokenizer train --input corpus/ --vocab-size 8192 --out tok/
  scalelab tokenizer train --dataset shakespeare --vocab-size 4096 --out tok-shakespeare/
  scalelab tokenizer encode --tokenizer hf:tok/ "To be, or not to be"
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer, or encode text",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    tsub = p.add_subparsers(dest="action", metavar="ACTION")
    tsub.required = True

    t = tsub.add_parser("train", help="train a byte-level BPE", formatter_class=HelpFormatter,
                        epilog="example:\n  scalelab tokenizer train --input corpus/ --vocab-size 8192 --out tok/")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="PATH", help="files, globs or directories (.txt/.md/.jsonl)")
    src.add_argument("--dataset", choices=("shakespeare",), help="a built-in corpus")
    t.add_argument("--text-field", default="text", help="the JSON field holding the text in .jsonl inputs")
    t.add_argument("--vocab-size", type=int, default=8192, help="target vocabulary size, BOS/EOS included")
    t.add_argument("--out", required=True, help="directory for tokenizer.json (new, empty, or --overwrite)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer directory")
    add_common_flags(t, set_flag=False)
    t.set_defaults(func=run_train)

    e = tsub.add_parser("encode", help="print token ids of a text", formatter_class=HelpFormatter,
                        epilog="example:\n  scalelab tokenizer encode --tokenizer byte 'hello'")
    e.add_argument("text")
    e.add_argument("--tokenizer", default="byte", help="byte, gpt2, hf:PATH or tiktoken:PATH")
    add_common_flags(e, set_flag=False)
    e.set_defaults(func=run_encode)


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scalelab.data import prepare as P
    from scalelab.data.tokenizer import train_bpe

    if not 260 <= args.vocab_size <= 65536 * 4:
        raise UserError(f"--vocab-size {args.vocab_size}: a byte-level BPE needs 260 to 262144 tokens")
    P.check_output_dir(Path(args.out), args.overwrite, marker="tokenizer.json", what="tokenizer")  # before any work
    files = P.fetch_shakespeare() if args.dataset == "shakespeare" else P.resolve_inputs(args.input)
    tok = train_bpe(P.iter_documents(files, args.text_field), args.vocab_size, args.out, overwrite=args.overwrite)
    info = {"tokenizer": f"hf:{args.out}", "file": str(tok.files[0]), "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "inputs": len(files)}
    if args.json:
        print_json(info)
    else:
        print_table([(k, str(v)) for k, v in info.items()], title="trained byte-level BPE")
        if tok.vocab_size < args.vocab_size:
            print(f"note: the corpus supported only {tok.vocab_size} tokens of the {args.vocab_size} asked for")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from scalelab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text)
    if args.json:
        print_json({"tokenizer": tok.spec, "ids": ids, "tokens": len(ids)})
    else:
        print(" ".join(map(str, ids)))
    return 0
