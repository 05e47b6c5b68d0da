"""The documents of scalelab_tiny_mc.yaml: scalelab_tiny_mc.jsonl beside this file, read locally."""

import json
from pathlib import Path


def load(**_metadata):
    """The harness calls this with its metadata (model arguments...) as keywords; none are needed."""
    import datasets

    lines = (Path(__file__).with_suffix(".jsonl")).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
