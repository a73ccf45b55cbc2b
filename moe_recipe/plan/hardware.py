"""GPUs and clusters for the planner: memory and link bandwidths per GPU model (the dense bf16 peak is
flops.PEAK_BF16_FLOPS, which the trainer's MFU uses too), and the cluster shape."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flops import PEAK_BF16_FLOPS

GiB = 2**30


@dataclass(frozen=True)
class GpuPreset:
    device_name: str  # what torch.cuda.get_device_name() contains for this GPU
    memory_gib: float  # what torch sees as total device memory
    intra_node_gbps: float  # achievable GB/s per GPU and direction inside a node (NVLink / PCIe)
    inter_node_gbps: float  # achievable GB/s per GPU and direction between nodes (InfiniBand / Ethernet)

    @property
    def peak_bf16_flops(self) -> float:
        """Dense (no sparsity) bf16 peak."""
        return PEAK_BF16_FLOPS[self.device_name]


# Achievable (not nominal) bandwidths of common machines, about 80% of the link rate; moe-plan's --intra-node-gbps /
# --inter-node-gbps override them for yours.
GPU_PRESETS = {
    "h100": GpuPreset("H100", 79.6, 360.0, 40.0),  # SXM, NVLink4, 8 x 400 Gb/s InfiniBand per node
    "h200": GpuPreset("H200", 140.4, 360.0, 40.0),
    "a100-80gb": GpuPreset("A100", 80.0, 240.0, 20.0),  # SXM, NVLink3, 8 x 200 Gb/s InfiniBand per node
    "a100-40gb": GpuPreset("A100", 40.0, 240.0, 20.0),
    "l40s": GpuPreset("L40S", 45.0, 25.0, 10.0),  # PCIe Gen4, 100 Gb/s Ethernet per GPU
    "a10g": GpuPreset("A10G", 22.5, 12.0, 3.0),  # PCIe, 100 Gb/s per 8-GPU node
}


def preset_for_device(device_name: str, memory_gib: float) -> str | None:
    """The preset of a GPU torch calls `device_name`: the one it names, the closest in memory if several do."""
    named = [key for key, preset in GPU_PRESETS.items() if preset.device_name in device_name]
    return min(named, key=lambda key: abs(GPU_PRESETS[key].memory_gib - memory_gib), default=None)


def detect_gpu() -> tuple[str, float]:
    """(preset name, memory in GiB) of this machine's first GPU; the launch scripts plan with `--gpu auto`."""
    if not torch.cuda.is_available():
        raise ValueError(f"--gpu auto: no GPU visible here; name one of {sorted(GPU_PRESETS)}.")
    name = torch.cuda.get_device_name(0)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    preset = preset_for_device(name, memory_gib)
    if preset is None:
        raise ValueError(f"--gpu auto: no preset for {name!r}; pass the closest of {sorted(GPU_PRESETS)} and override "
                         "its numbers (--gpu-memory-gib, --intra-node-gbps, --inter-node-gbps, --peak-tflops).")
    return preset, memory_gib


@dataclass(frozen=True)
class ClusterSpec:
    """Build it with `from_preset`; every field can be overridden."""

    nodes: int
    gpus_per_node: int
    gpu: str
    memory_gib: float
    intra_node_gbps: float
    inter_node_gbps: float
    peak_flops: float
    mfu: float = 0.4  # share of peak FLOPs the kernels reach
    headroom: float = 0.1  # memory kept free for the CUDA context, NCCL buffers and fragmentation

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def from_preset(cls, gpu: str = "h100", nodes: int = 1, gpus_per_node: int = 8, **overrides) -> ClusterSpec:
        """`gpu`: a GPU_PRESETS name, or "auto" for this machine's GPU (its preset, and its real memory)."""
        if gpu == "auto":
            gpu, memory_gib = detect_gpu()
            overrides["memory_gib"] = overrides.get("memory_gib") or memory_gib
        if gpu not in GPU_PRESETS:
            raise ValueError(f"--gpu {gpu!r} is not a preset; use the closest of {sorted(GPU_PRESETS)} and override "
                             "its numbers with --gpu-memory-gib, --intra-node-gbps, --inter-node-gbps, --peak-tflops.")
        p = GPU_PRESETS[gpu]
        values = dict(nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu, memory_gib=p.memory_gib,
                      intra_node_gbps=p.intra_node_gbps, inter_node_gbps=p.inter_node_gbps,
                      peak_flops=p.peak_bf16_flops)
        values.update({k: v for k, v in overrides.items() if v is not None})
        spec = cls(**values)
        for name in ("nodes", "gpus_per_node", "memory_gib", "intra_node_gbps", "inter_node_gbps", "peak_flops",
                     "mfu"):
            if getattr(spec, name) <= 0:
                raise ValueError(f"cluster: {name}={getattr(spec, name)} must be > 0.")
        return spec


__all__ = ["GPU_PRESETS", "ClusterSpec", "GpuPreset", "detect_gpu", "preset_for_device"]
