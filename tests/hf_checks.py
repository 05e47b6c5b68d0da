"""The export half of the Hugging Face logit tests, shared by every architecture's test file."""

from __future__ import annotations

from pathlib import Path

import torch

from scalelab import hf


def assert_exports_with_equal_logits(mine, out: Path, arch: str, idx: torch.Tensor, label: str) -> None:
    """`hf.save(mine)` picks `arch`; transformers loads the export as that class and its logits equal
    ours within 1e-5; importing the export back gives our config and every tensor bit for bit."""
    from transformers import AutoModelForCausalLM

    assert hf.save(mine, out) == arch
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == hf.HF_CLASS[arch]
    with torch.no_grad():
        expected, got = exported(idx).logits, mine(idx)
    print(f"max |logit diff| {label} export: {(got - expected).abs().max().item():.3g}")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    back = hf.load(out)
    assert back.config == mine.config
    for key, tensor in mine.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
