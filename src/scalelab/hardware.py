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

Bandwidths, for the step-time model (scalelab.steptime), in bytes/s:
- HBM (datasheets): A6000 768 GB/s (GDDR6); A100 40GB 1,555 GB/s, 80GB SXM 2,039 GB/s; H100 SXM
  3.35 TB/s; H100 PCIe 2.0 TB/s; H200 4.8 TB/s; B200 8 TB/s (HGX B200 datasheet, per GPU).
- Intra-node (NVLink), one direction per GPU = half the datasheet's bidirectional figure: A100
  600 GB/s -> 300; H100 SXM / H200 900 GB/s -> 450; B200 1.8 TB/s -> 900; H100 PCIe (NVLink
  bridge) 600 GB/s -> 300; A6000 NVLink bridge 112.5 GB/s -> 56.25 (a pair of GPUs).
- Inter-node, per GPU: one NIC per GPU as in DGX/HGX systems: DGX A100 8 x 200 Gb/s HDR
  InfiniBand (25 GB/s per GPU); DGX H100 / H200 / B200 8 x 400 Gb/s NDR ConnectX-7 (50 GB/s per
  GPU); Meta's Grand Teton (Llama 3, torchtitan's benchmarks) likewise 400 Gb/s per GPU. A6000 and
  PCIe parts: assumed 100 Gb/s (12.5 GB/s) Ethernet.
- mamf_bf16_flops: the Maximum Achievable Matmul FLOPS measured by scanning GEMM shapes
  (stas00/ml-engineering, compute/accelerator/README.md, "Maximum Achievable Matmul FLOPS
  comparison table"): A100 SXM 267.9 TFLOPS (85.9% of peak), H100 SXM 792.1 (80.1%), H100/H200
  SXM 794.5, B200 SXM 1,745 (77.6%). Unmeasured parts (A6000, H100 PCIe) get 80% of peak.
- attention_fraction: the share of dense peak that FlashAttention-2 (SDPA's flash kernel) reaches
  in forward + backward: about 35% on Hopper (Shah et al. 2024, FlashAttention-3, abstract:
  "FlashAttention-2 achieving only 35% utilization on the H100"), about 50% on Ampere (Dao 2023,
  FlashAttention-2: 50-73% of peak in forward, less in backward). Blackwell: taken as Hopper's.

H100-HBM2e-500W is the H100 of torchtitan's published benchmarks (benchmarks/
llama3_h100_202412_torchtitan.md: Meta's Grand Teton hosts, "96GB HBM2e with 2.4 TB/sec peak memory
bandwidth", "the default 500W power limit", 400 Gb/s per GPU; its footnote: "the actual peak TFLOPs
number is between SXM and NVL, and we don't know its exact value", and MFU there is against the SXM
peak, so peak_bf16_flops stays 989 T). Its matmul ceiling and attention rate are the SXM part's
scaled by 500/700 W, assuming throughput proportional to power at the power limit (an assumption,
not a measurement: see docs/parallelism.md for the case it decides).
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
    hbm_bytes_per_s: float = 0.0
    nvlink_bytes_per_s: float = 0.0  # one direction, per GPU, inside a node
    network_bytes_per_s: float = 0.0  # one direction, per GPU, between nodes
    mamf_bf16_flops: float = 0.0  # the largest GEMM throughput measured (0: 80% of peak)
    attention_fraction: float = 0.35  # FlashAttention-2 forward + backward, share of dense peak
    gpus_per_node: int = 8

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


    @property
    def matmul_flops(self) -> float:
        """The GEMM ceiling the step-time model uses: measured MAMF, else 80% of the dense peak."""
        return self.mamf_bf16_flops or 0.8 * self.peak_bf16_flops


ACCELERATORS: dict[str, Accelerator] = {
    "A6000": Accelerator("A6000", 154.8e12, 48, 768e9, 56.25e9, 12.5e9, 0.0, 0.5, 2),
    "A100-40GB": Accelerator("A100-40GB", 312e12, 40, 1555e9, 300e9, 25e9, 267.9e12, 0.5),
    "A100-80GB": Accelerator("A100-80GB", 312e12, 80, 2039e9, 300e9, 25e9, 267.9e12, 0.5),
    "H100-SXM": Accelerator("H100-SXM", 989e12, 80, 3.35e12, 450e9, 50e9, 792.1e12, 0.35),
    "H100-HBM2e-500W": Accelerator("H100-HBM2e-500W", 989e12, 96, 2.4e12, 450e9, 50e9, 792.1e12 * 500 / 700,
                                   0.35 * 500 / 700),
    "H100-PCIe": Accelerator("H100-PCIe", 756e12, 80, 2.0e12, 300e9, 50e9, 0.0, 0.35),
    "H200": Accelerator("H200", 989e12, 141, 4.8e12, 450e9, 50e9, 794.5e12, 0.35),
    "B200": Accelerator("B200", 2250e12, 180, 8.0e12, 900e9, 50e9, 1745e12, 0.35),
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
