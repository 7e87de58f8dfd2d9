"""Hardware presets for the cost model, each number with its source.

A device is described by what the time model needs: peak dense FLOP/s per dtype, memory size
and bandwidth, and two link tiers (inside a node and across nodes), each with a bandwidth per
GPU per direction and a per-message latency. Achievable fractions of those peaks are stated
once per device, never fitted to a particular published run.

"this-machine" is measured, not looked up: ``python -m minipar.bench --json`` writes
``gemm_flops`` (and optionally ``allreduce_bytes_per_s``, ``latency_s``, ``mem_bytes_per_s``)
and ``Hardware.from_bench_json`` reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

from minipar.config import ConfigError

GiB = 2 ** 30


@dataclass(frozen=True)
class Hardware:
    """One accelerator and its node; bandwidths in bytes/s per GPU per direction."""

    name: str
    peak_flops: dict  # dense FLOP/s by dtype name (bf16, fp16, fp32, fp64)
    memory_bytes: float  # device memory capacity
    mem_bw: float  # device memory bandwidth (HBM), bytes/s
    gpus_per_node: int  # devices sharing the fast intra-node links
    intra_bw: float  # NVLink/NVSwitch bandwidth per GPU per direction, bytes/s
    intra_latency: float  # seconds per message (one ring step) inside a node
    inter_bw: float  # network bandwidth per GPU per direction (one NIC each), bytes/s
    inter_latency: float  # seconds per message across nodes
    # Achievable fractions of the peaks above: assumptions stated once for every run.
    gemm_efficiency: float = 0.8  # large GEMMs reach ~80% of the tensor-core peak
    mem_efficiency: float = 0.8  # streaming kernels reach ~80% of the memory bandwidth
    link_efficiency: float = 0.8  # collectives reach ~80% of the link bandwidth
    kernel_latency: float = 5e-6  # launch + tail of one kernel, seconds
    sources: tuple = field(default=())  # where each number comes from

    def flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for a dtype name; a clear error for one the device lacks."""
        if dtype not in self.peak_flops:
            raise ConfigError(
                f"--dtype {dtype}: no peak FLOP/s known for {self.name} "
                f"(known: {', '.join(self.peak_flops)})")
        return float(self.peak_flops[dtype])

    def shared_by(self, ranks: int) -> "Hardware":
        """This machine when ``ranks`` processes share it: each gets 1/ranks of the measured
        FLOP/s and memory bandwidth (a bench measured with every core for one process)."""
        if ranks <= 1:
            return self
        return replace(self, name=f"{self.name}/{ranks}",
                       peak_flops={k: v / ranks for k, v in self.peak_flops.items()},
                       mem_bw=self.mem_bw / ranks)

    @staticmethod
    def from_bench_json(path: str) -> "Hardware":
        """This machine as measured by ``python -m minipar.bench --json`` (see module doc)."""
        if not path or not os.path.exists(path):
            raise ConfigError(
                f"--hardware this-machine needs a measurement file; none at {path!r}. Run "
                "`python -m minipar.bench --json > bench.json` and pass --hardware-file bench.json")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--hardware-file {path}: not readable JSON ({exc})") from exc
        if not isinstance(data, dict) or not _positive(data.get("gemm_flops")):
            raise ConfigError(f"--hardware-file {path}: needs a positive number 'gemm_flops'")
        gemm = float(data["gemm_flops"])
        bw = float(data["allreduce_bytes_per_s"]) if _positive(
            data.get("allreduce_bytes_per_s")) else 2e9
        lat = float(data["latency_s"]) if _positive(data.get("latency_s")) else 20e-6
        mem = float(data["mem_bytes_per_s"]) if _positive(data.get("mem_bytes_per_s")) else 5e9
        # The measured GEMM rate already is what is achievable, so efficiencies are 1; every
        # rank of a local run shares one machine, so both link tiers are the same (shared memory).
        return Hardware(
            name="this-machine",
            peak_flops={d: gemm for d in ("fp64", "fp32", "bf16", "fp16")},
            memory_bytes=float(data.get("memory_bytes", 16 * GiB)),
            mem_bw=mem, gpus_per_node=int(data.get("ranks_per_node", 1024)),
            intra_bw=bw, intra_latency=lat, inter_bw=bw, inter_latency=lat,
            gemm_efficiency=1.0, mem_efficiency=1.0, link_efficiency=1.0,
            kernel_latency=float(data.get("op_latency_s", 10e-6)),
            sources=(f"measured by python -m minipar.bench --json ({path})",
                     "defaults when absent: 2 GB/s allreduce, 20 us latency, 5 GB/s memory"))


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


A100_80GB = Hardware(
    name="a100-80gb",
    peak_flops={"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "fp64": 19.5e12},
    memory_bytes=80 * GiB,
    mem_bw=2.039e12,
    gpus_per_node=8,
    intra_bw=300e9,  # NVLink 3: 12 links x 25 GB/s per direction (600 GB/s both ways)
    intra_latency=3e-6,
    inter_bw=25e9,  # one 200 Gb/s HDR InfiniBand NIC per GPU (DGX A100: 8 per node)
    inter_latency=6e-6,
    sources=(
        "NVIDIA A100 Tensor Core GPU datasheet (2021): 312 TFLOP/s BF16/FP16 dense, 19.5 "
        "TFLOP/s FP32 and FP64 tensor core, 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s",
        "NVIDIA DGX A100 user guide: 8 x ConnectX-6 200 Gb/s HDR InfiniBand for compute",
        "Narayanan et al. 2021 (PTD-P), section 5: Selene, DGX A100 nodes, 8 x 200 Gb/s HDR",
    ),
)

H100_SXM = Hardware(
    name="h100-sxm",
    peak_flops={"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "fp64": 67e12},
    memory_bytes=80 * GiB,
    mem_bw=3.35e12,
    gpus_per_node=8,
    intra_bw=450e9,  # NVLink 4: 18 links x 25 GB/s per direction (900 GB/s both ways)
    intra_latency=3e-6,
    inter_bw=50e9,  # one 400 Gb/s NDR InfiniBand NIC per GPU (DGX H100: 8 per node)
    inter_latency=6e-6,
    sources=(
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s BF16/FP16 dense (1,979 "
        "with sparsity), 67 TFLOP/s FP32/FP64 tensor core, 80 GB HBM3 at 3.35 TB/s, "
        "NVLink 900 GB/s",
        "NVIDIA DGX H100 user guide: 8 x ConnectX-7 400 Gb/s NDR InfiniBand for compute",
    ),
)

HARDWARE_PRESETS: dict[str, Hardware] = {"a100-80gb": A100_80GB, "h100-sxm": H100_SXM}
HARDWARE_NAMES = (*HARDWARE_PRESETS, "this-machine")


def get_hardware(name: str, hardware_file: str | None = None) -> Hardware:
    """A preset by name, or this machine from the bench JSON; a ConfigError names the flag."""
    if name == "this-machine" or (hardware_file and name not in HARDWARE_PRESETS):
        return Hardware.from_bench_json(hardware_file or "bench.json")
    if name not in HARDWARE_PRESETS:
        raise ConfigError(
            f"--hardware must be one of {', '.join(HARDWARE_NAMES)}, got {name!r}")
    return HARDWARE_PRESETS[name]


__all__ = ["Hardware", "A100_80GB", "H100_SXM", "HARDWARE_PRESETS", "HARDWARE_NAMES",
           "get_hardware", "replace"]
