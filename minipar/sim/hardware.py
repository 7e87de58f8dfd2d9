"""Hardware presets for the cost model, each number with its source.

A device is described by what the time model needs: peak dense FLOP/s per dtype, memory size
and bandwidth, and two link tiers (inside a node and across nodes), each with a bandwidth per
GPU per direction and a per-message latency. Achievable fractions of those peaks are stated
once per device, never fitted to a particular published run.

"this-machine" is measured, not looked up: ``python -m minipar.bench --json`` writes
``gemm_flops`` (and optionally ``allreduce_bytes_per_s``, ``latency_s``, ``mem_bytes_per_s``)
and ``Hardware.from_bench_json`` reads it. ``python -m minipar.bench --measure-hardware``
(``minipar.bench.validate``) measures more, each with one BLAS thread per process: the GEMM
rate at the model's shapes and of attention's batched products (``bmm_flops``), what NumPy's
elementwise kernels achieve by kernel family (``elem_bytes_per_s``; a fused GPU kernel streams
at memory bandwidth, NumPy makes several passes and evaluates transcendentals), the cost of
faulting in fresh memory (``first_touch_bytes_per_s``: by default glibc gives a step's freed
activations back to the OS and the next step faults them in again; 0 where they are reused, as
``minipar.dist.launch`` arranges), the per-kernel Python overhead, the core count, a process's
speed while every core is busy (``all_busy_speed``), and allreduce latency and bandwidth at
each local rank count (``ranks``).
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
    # Measured on a CPU ("this machine"); the defaults leave GPU presets unchanged.
    cores: int = 1  # processes that run at full speed at once (see shared_by)
    elem_bw: dict = field(default_factory=dict)  # achieved bytes/s by elementwise family
    bmm_flops: float = 0.0  # achieved FLOP/s of attention's batched products; 0: as GEMMs
    first_touch_bw: float = 0.0  # bytes/s of faulting in fresh memory; 0: memory is reused
    links_by_ranks: dict = field(default_factory=dict)  # ranks -> (bytes/s, latency) measured
    all_busy_speed: float = 1.0  # one process's speed while every core runs one (vs alone)

    def flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for a dtype name; a clear error for one the device lacks."""
        if dtype not in self.peak_flops:
            raise ConfigError(
                f"--dtype {dtype}: no peak FLOP/s known for {self.name} "
                f"(known: {', '.join(self.peak_flops)})")
        return float(self.peak_flops[dtype])

    def shared_by(self, ranks: int) -> "Hardware":
        """This machine when ``ranks`` processes share it.

        Measured rates describe one process; ``cores`` of them run at once at full speed, so
        each of ``ranks`` processes gets min(1, cores / ranks) of every rate and pays 1/that
        per-kernel overhead (with ``cores`` = 1, a bench that used every core for one process,
        each gets 1/ranks), times its speed with that many cores busy: ``all_busy_speed``
        (measured with every core running a process) for all of them, 1 for one, linear in
        between. Links come from the measurement at this rank count when there is one.
        """
        share = min(1.0, self.cores / ranks) if ranks > 1 else 1.0
        if ranks > 1 and self.cores > 1:  # busier cores share caches and memory bandwidth
            busy = (min(ranks, self.cores) - 1) / (self.cores - 1)
            share *= 1 - (1 - self.all_busy_speed) * busy
        links = self.links_by_ranks.get(ranks)
        if share == 1.0 and not links:
            return self
        bw, lat = links if links else (None, None)
        return replace(self, name=f"{self.name}/{ranks}",
                       peak_flops={k: v * share for k, v in self.peak_flops.items()},
                       bmm_flops=self.bmm_flops * share,
                       mem_bw=self.mem_bw * share,
                       elem_bw={k: v * share for k, v in self.elem_bw.items()},
                       first_touch_bw=self.first_touch_bw * share,
                       kernel_latency=self.kernel_latency / share,
                       intra_bw=bw or self.intra_bw, inter_bw=bw or self.inter_bw,
                       intra_latency=lat or self.intra_latency,
                       inter_latency=lat or self.inter_latency)

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
        elem = {str(k): float(v) for k, v in (data.get("elem_bytes_per_s") or {}).items()
                if _positive(v)}
        links = {int(r): (float(d["allreduce_bytes_per_s"]), float(d["latency_s"]))
                 for r, d in (data.get("ranks") or {}).items()
                 if str(r).isdigit() and isinstance(d, dict)
                 and _positive(d.get("allreduce_bytes_per_s")) and _positive(d.get("latency_s"))}
        touch = data.get("first_touch_bytes_per_s")
        bmm = data.get("bmm_flops")
        busy = data.get("all_busy_speed")
        cores = data.get("cores")
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
                     "defaults when absent: 2 GB/s allreduce, 20 us latency, 5 GB/s memory"),
            cores=int(cores) if _positive(cores) else 1, elem_bw=elem,
            bmm_flops=float(bmm) if _positive(bmm) else 0.0,
            all_busy_speed=min(1.0, float(busy)) if _positive(busy) else 1.0,
            first_touch_bw=float(touch) if _positive(touch) else 0.0, links_by_ranks=links)


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
