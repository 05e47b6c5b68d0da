"""Accelerators: peak dense (no sparsity) BF16 tensor-core FLOP/s and memory.

Sources (vendor datasheets):
- RTX A6000: NVIDIA RTX A6000 datasheet — 154.8 TFLOPS BF16 dense (309.7 with sparsity), 48 GB.
- A100 40GB / 80GB SXM: NVIDIA A100 datasheet — 312 TFLOPS BF16 dense, 40 / 80 GB HBM.
- H100 SXM: NVIDIA H100 datasheet — 989 TFLOPS BF16 dense (1,979 with sparsity), 80 GB HBM3.
- H100 PCIe: NVIDIA H100 datasheet — 756 TFLOPS BF16 dense (1,513 with sparsity), 80 GB HBM2e.
- H200 SXM: NVIDIA H200 datasheet — 989 TFLOPS BF16 dense, 141 GB HBM3e.
- B200 (HGX): NVIDIA HGX B200 datasheet — 2.25 PFLOPS BF16 dense (4.5 with sparsity), 180 GB HBM3e.
MFU is always measured against these dense peaks. Marketed "80 GB" is 80 GiB of device memory
(nvidia-smi reports 81559 MiB on an H100 80GB, 81920 MiB on an A100 80GB).
"""

from __future__ import annotations

from dataclasses import dataclass

from scalelab.config import closest
from scalelab.errors import UserError


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_bf16_flops: float  # dense FLOP/s
    memory_gib: float  # as marketed; the "GB" on datasheets is GiB (nvidia-smi: H100 81559 MiB)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


ACCELERATORS: dict[str, Accelerator] = {
    "A6000": Accelerator("A6000", 154.8e12, 48),
    "A100-40GB": Accelerator("A100-40GB", 312e12, 40),
    "A100-80GB": Accelerator("A100-80GB", 312e12, 80),
    "H100-SXM": Accelerator("H100-SXM", 989e12, 80),
    "H100-PCIe": Accelerator("H100-PCIe", 756e12, 80),
    "H200": Accelerator("H200", 989e12, 141),
    "B200": Accelerator("B200", 2250e12, 180),
}
_ALIASES = {"A100": "A100-80GB", "H100": "H100-SXM", "RTXA6000": "A6000", "RTX-A6000": "A6000",
            "A100-40": "A100-40GB", "A100-80": "A100-80GB", "H100SXM": "H100-SXM", "H100PCIE": "H100-PCIe"}


def get_accelerator(name: str) -> Accelerator:
    """Look up by name, case-insensitive; 'H100' means H100-SXM, 'A100' the 80GB part."""
    key = name.strip()
    by_lower = {k.lower(): v for k, v in ACCELERATORS.items()}
    by_lower.update({k.lower(): ACCELERATORS[v] for k, v in _ALIASES.items()})
    if key.lower() in by_lower:
        return by_lower[key.lower()]
    raise UserError(f"unknown GPU type '{name}'{closest(key, ACCELERATORS)}; known: {', '.join(ACCELERATORS)}")


def detect_accelerator(device_name: str) -> Accelerator | None:
    """Map torch.cuda.get_device_name() (e.g. 'NVIDIA H100 80GB HBM3') to a table entry."""
    n = device_name.upper()
    if "H200" in n:
        return ACCELERATORS["H200"]
    if "H100" in n:
        return ACCELERATORS["H100-PCIe" if "PCIE" in n else "H100-SXM"]
    if "B200" in n:
        return ACCELERATORS["B200"]
    if "A100" in n:
        return ACCELERATORS["A100-40GB" if "40GB" in n else "A100-80GB"]
    if "A6000" in n:
        return ACCELERATORS["A6000"]
    return None
