"""Training: config (TOML schema), schedule, checkpoint, parallel (DDP/FSDP2), trainer, metrics.

`scalelab.train.config` imports no torch (the CLI parses and validates configs before loading
torch); the other modules do.
"""
