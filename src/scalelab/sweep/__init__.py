"""`scalelab sweep`: a scaling study as one resumable command.

    design.py   the ladder: per budget, shapes around the prior optimum, D solved exactly from C,
                hyperparameters from a law; OUT_DIR/sweep.toml (the contract: docs/interfaces.md)
    execute.py  running it through submitit (local processes or Slurm), resumable; the status table
    verify.py   training the fitted recommendation (OUT_DIR/fit.json) and comparing its loss

`design` imports no torch (but for the optional CPU throughput measurement); the runs do.
"""
