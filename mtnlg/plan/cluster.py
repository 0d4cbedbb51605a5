"""The machine a plan runs on: GPU presets, the cluster shape and the
calibration constants of the time model.

Bandwidths are per GPU and per direction, as a ring collective sees them:
``nvlink_gbps`` between GPUs of one node, ``ib_gbps`` from one GPU to another
node (a DGX A100 has one 200 Gb/s HDR adapter per GPU: 25 GB/s).  The
calibration constants are shared by every model, layout and cluster; they are
*not* fitted per row of the MT-NLG table (see docs/plan.md for why they have
the values they have).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from mtnlg.errors import UserError


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gb: float        # HBM capacity (GB = 1e9 bytes, as vendors count)
    peak_tflops: float      # dense bf16/fp16 tensor-core peak
    hbm_gbps: float         # HBM bandwidth, GB/s
    nvlink_gbps: float      # intra-node bandwidth per GPU per direction, GB/s
    ib_gbps: float          # inter-node bandwidth per GPU per direction, GB/s
    gpus_per_node: int = 8


GPUS: dict[str, GPUSpec] = {
    "a100-40gb": GPUSpec("a100-40gb", 40, 312, 1555, 300, 25),
    "a100-80gb": GPUSpec("a100-80gb", 80, 312, 2039, 300, 25),
    "h100-80gb": GPUSpec("h100-80gb", 80, 989, 3350, 450, 50),
    "h200-141gb": GPUSpec("h200-141gb", 141, 989, 4800, 450, 50),
}


@dataclass(frozen=True)
class Calibration:
    """Constants of the time and memory model, shared across every prediction.

    compute_efficiency: fraction of the GPU's peak that the transformer's
        forward/backward reaches (GEMMs plus the memory-bound LayerNorm,
        GeLU, softmax and dropout kernels between them).  0.5 of an A100's
        312 TFLOP/s = 156 TFLOP/s, what a Megatron GPT layer with h=20480
        sustains on one GPU slice (Narayanan et al. 2021 report 45-52 % of
        peak end to end including their bubble and communication).
    link_efficiency: fraction of a link's nominal bandwidth a NCCL ring
        reaches (A100 NVLink ~235 of 300 GB/s bus bandwidth; HDR ~ 20 of 25).
    hbm_efficiency: fraction of HBM bandwidth the (memory-bound) Adam step reaches.
    reserved_gb: memory per GPU that the model cannot use: CUDA context,
        NCCL buffers, allocator fragmentation.
    device: a ``mtnlg.plan.cost.DeviceProfile``; when set, a stage's compute
        time is the sum of its operations' times (shape-dependent GEMM
        efficiency, memory-bound kernels, attention) instead of FLOPs at
        ``compute_efficiency`` of peak.
    """

    compute_efficiency: float = 0.5
    link_efficiency: float = 0.8
    hbm_efficiency: float = 0.7
    reserved_gb: float = 4.0
    device: object = None        # a cost.DeviceProfile: per-operation compute time instead of compute_efficiency


DEFAULT_CALIBRATION = Calibration()


@dataclass(frozen=True)
class Cluster:
    gpu: GPUSpec
    nodes: int

    @property
    def gpus_per_node(self) -> int:
        return self.gpu.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpu.gpus_per_node


def make_cluster(gpu: str = "a100-80gb", gpus: int | None = None, nodes: int | None = None,
                 gpus_per_node: int | None = None, memory_gb: float | None = None,
                 peak_tflops: float | None = None, nvlink_gbps: float | None = None,
                 ib_gbps: float | None = None, hbm_gbps: float | None = None) -> Cluster:
    """A cluster from a GPU preset plus overrides; give either ``gpus`` or ``nodes``."""
    if gpu not in GPUS:
        raise UserError(f"unknown GPU {gpu!r}; presets: {', '.join(GPUS)} (override with --peak-tflops etc.)")
    over = {k: v for k, v in dict(gpus_per_node=gpus_per_node, memory_gb=memory_gb, peak_tflops=peak_tflops,
                                  nvlink_gbps=nvlink_gbps, ib_gbps=ib_gbps, hbm_gbps=hbm_gbps).items()
            if v is not None}
    for k, v in over.items():
        if v <= 0:
            raise UserError(f"--{k.replace('_', '-')} must be positive, got {v}")
    spec = replace(GPUS[gpu], **over)
    if (gpus is None) == (nodes is None):
        raise UserError("give exactly one of --gpus N or --nodes N")
    if nodes is None:
        if gpus <= 0 or (gpus > spec.gpus_per_node and gpus % spec.gpus_per_node):
            raise UserError(f"--gpus {gpus} must be positive and, beyond one node, a multiple of "
                            f"{spec.gpus_per_node} GPUs per node")
        if gpus < spec.gpus_per_node:  # a partial node: shrink the node
            spec = replace(spec, gpus_per_node=gpus)
        nodes = gpus // spec.gpus_per_node
    if nodes <= 0:
        raise UserError(f"--nodes must be positive, got {nodes}")
    return Cluster(spec, nodes)
