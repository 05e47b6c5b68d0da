"""Tokens for training: tokenizers (`tokenizer`), `scalelab prepare` (`prepare`), and the
memory-mapped batch loader (`loader`). Import the submodules; this package imports nothing heavy."""
