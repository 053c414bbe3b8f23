"""What a contributor's machine can do: a hardware probe and a short matmul micro-benchmark.

The coordinator credits work from what it assigned, and flags claims faster than the contributor's
hardware allows; the benchmarked FLOP/s is the declared peak it checks against. The probe uses
torch.cuda and, where installed, NVML (for the driver version); without a GPU it reports CPU cores and RAM.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GpuInfo:
    """One CUDA device as torch (and NVML) see it."""

    index: int
    name: str
    vram_bytes: int
    compute_capability: str
    bf16: bool
    driver: str | None = None


@dataclass
class HardwareInfo:
    """The machine a contributor offers; ``device`` is what training will use (``cuda:N`` or ``cpu``)."""

    device: str
    cpu_model: str
    cpu_cores: int
    ram_bytes: int
    torch_version: str
    cuda_version: str | None
    gpus: list[GpuInfo] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for the console."""
        if self.device.startswith("cuda") and self.gpus:
            g = self.gpus[0]
            return (
                f"GPU {g.name}, {g.vram_bytes / 2**30:.1f} GiB, compute {g.compute_capability}, "
                f"bf16 {'yes' if g.bf16 else 'no'}, driver {g.driver or 'unknown'}"
            )
        return (
            f"CPU {self.cpu_model or platform.machine()}, {self.cpu_cores} cores, {self.ram_bytes / 2**30:.1f} GiB RAM"
        )


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvml_driver() -> str | None:
    """The NVIDIA driver version via NVML, when pynvml is installed and a driver is loaded."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else str(version)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML raises its own error types; no driver means unknown
        return None


def probe(gpu: int | None = None) -> HardwareInfo:
    """Describe the machine; with ``gpu`` set, the device training will use is that CUDA device."""
    import torch

    info = HardwareInfo(
        device="cpu",
        cpu_model=_cpu_model(),
        cpu_cores=os.cpu_count() or 1,
        ram_bytes=_ram_bytes(),
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
    )
    if not torch.cuda.is_available():
        return info
    driver = _nvml_driver()
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        info.gpus.append(
            GpuInfo(
                index=i,
                name=props.name,
                vram_bytes=int(props.total_memory),
                compute_capability=f"{props.major}.{props.minor}",
                bf16=props.major >= 8,
                driver=driver,
            )
        )
    if gpu is not None and 0 <= gpu < len(info.gpus):
        info.device = f"cuda:{gpu}"
        info.gpus = [info.gpus[gpu]] + [g for g in info.gpus if g.index != gpu]
    return info


def benchmark_flops(device: str = "cpu", seconds: float = 1.0, size: int | None = None) -> float:
    """Sustained matmul FLOP/s on ``device`` over about ``seconds`` (the contributor's declared peak).

    GPUs run in bf16/fp16 when supported (what LoRA training uses), CPUs in fp32. Two warm-up
    multiplications are excluded from the timing.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        n = size or 4096
    else:
        dtype, n = torch.float32, size or 512
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(2):
        a @ b
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if iters % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2.0 * n**3 * iters / elapsed
