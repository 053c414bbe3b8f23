"""What a contributor's machine can do: a hardware probe and a repeated matmul micro-benchmark.

The coordinator credits work from what it assigned, and flags claims faster than 1.25 × the contributor's
declared peak FLOP/s. The probe uses torch.cuda and, where installed, NVML (for the driver version); without a
GPU it reports CPU cores and RAM.

Pitfall (measured): one one-second matmul loop on a shared CPU declared anywhere from 0.004 to 0.114 TFLOP/s on
the same machine, so an honest contributor benchmarked while busy would later be flagged for "impossible"
speed. :func:`benchmark` runs several trials (GPU: larger bf16/fp16 matrices timed with CUDA events), reports
their median, minimum and maximum, and declares the fastest trial: the figure that never understates what the
hardware did, i.e. the conservative one for a check that flags claims above it.
"""

from __future__ import annotations

import os
import platform
import statistics
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
    """Describe the machine; with ``gpu`` set, the device training will use is that CUDA device.

    ``gpu`` is torch's index in this process (it honours the caller's ``CUDA_VISIBLE_DEVICES``); an index torch
    cannot use leaves ``device`` on the CPU here, which is why ``fedtune join`` refuses one before probing
    (:func:`fedtune.clients.join_checks.plan_device`, which also gives the SuperNode's ``CUDA_VISIBLE_DEVICES``).
    """
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


@dataclass(frozen=True)
class Benchmark:
    """Matmul FLOP/s of ``trials`` timed runs on ``device``; :attr:`declared` is what the ledger checks against."""

    device: str
    dtype: str
    size: int
    trials: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.trials)

    @property
    def declared(self) -> float:
        """The declared peak: the fastest trial (a busy moment can only slow a trial down, never speed it up)."""
        return max(self.trials)

    def summary(self) -> str:
        """One line for the console."""
        return (
            f"{self.declared / 1e12:.3f} TFLOP/s declared (median {self.median / 1e12:.3f}, "
            f"min {min(self.trials) / 1e12:.3f}, max {max(self.trials) / 1e12:.3f} over {len(self.trials)} "
            f"{self.size}x{self.size} {self.dtype} matmul trials on {self.device})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "size": self.size,
            "trials_flops": list(self.trials),
            "median_flops": self.median,
            "min_flops": min(self.trials),
            "max_flops": max(self.trials),
            "declared_flops": self.declared,
        }


def benchmark(device: str = "cpu", seconds: float = 2.5, trials: int = 5, size: int | None = None) -> Benchmark:
    """Time ``trials`` matmul loops of about ``seconds / trials`` each on ``device`` (two warm-ups excluded).

    GPUs run in bf16/fp16 when supported (what LoRA training uses) on 8192² matrices, timed with CUDA events;
    CPUs in fp32 on 512² matrices.
    """
    import torch

    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        n = size or 8192
    else:
        dtype, n = torch.float32, size or 512
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    if cuda:
        torch.cuda.synchronize(dev)
    per_trial = max(seconds / trials, 0.02)
    results = []
    for _ in range(trials):
        iters, elapsed = _timed_loop(a, b, per_trial, cuda)
        results.append(2.0 * n**3 * iters / elapsed)
    return Benchmark(str(dev), str(dtype).removeprefix("torch."), n, tuple(results))


def _timed_loop(a: Any, b: Any, seconds: float, cuda: bool) -> tuple[int, float]:
    """(multiplications, seconds) of one trial lasting at least ``seconds``."""
    import torch

    iters, start = 0, time.perf_counter()
    first = last = None
    if cuda:
        first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        first.record()
    while True:
        a @ b
        iters += 1
        if iters % 4 == 0:
            if cuda:
                torch.cuda.synchronize(a.device)
            if time.perf_counter() - start >= seconds:
                break
    if cuda and first is not None and last is not None:
        last.record()
        last.synchronize()
        return iters, first.elapsed_time(last) / 1000.0
    return iters, time.perf_counter() - start
