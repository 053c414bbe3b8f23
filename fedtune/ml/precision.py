"""Mixed precision for local training: the autocast dtype, where it can run, and fp16's loss scaling.

Job
    :class:`Precision` is what ``[model] dtype`` means for the training loop: the frozen base is stored in that
    dtype (half the memory of float32), the forward and backward passes run under ``torch.autocast`` in it, and
    the trainable adapter keeps float32 master weights (PEFT's ``autocast_adapter_dtype`` upcasts LoRA weights of
    a half-precision base to float32; the optimizer steps them in float32). float16 on CUDA also needs a
    ``torch.amp.GradScaler`` (:meth:`Precision.scaler`), so small gradients do not underflow.

Threat
    None of its own: a contributor picks no precision the campaign did not ask for, and refuses (one line, see
    :meth:`Precision.unsupported`) a dtype its device cannot run rather than silently training in another one.

Pitfalls
    - bfloat16 autocast works on CPUs and on GPUs of compute capability >= 8.0; float16 needs a CUDA GPU here (a
      CPU runs float16 matmuls only slowly, and fedtune does not scale losses on CPU).
    - float16 with DP-SGD is refused (in the config): the loss scale would multiply every per-sample gradient
      before Opacus clips it, so the clip would bound the scaled gradient, not the real one.
    - The loss is computed from autocast logits; ``per_sequence_loss`` upcasts them to float32 before the
      log-softmax (autocast runs log-softmax in float32 anyway).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The training loop's autocast dtype on one device.

    Parameters
    ----------
    dtype : torch.dtype
        ``torch.float32`` (no autocast), ``torch.bfloat16`` or ``torch.float16``.
    device_type : str
        ``"cpu"`` or ``"cuda"`` (what ``torch.autocast`` takes).
    """

    dtype: torch.dtype = torch.float32
    device_type: str = "cpu"

    @classmethod
    def of(cls, dtype: str, device: torch.device | str) -> Precision:
        """The precision ``[model] dtype`` names, on ``device`` (a ``torch.device`` or a string like ``cuda:0``)."""
        return cls(DTYPES[dtype], torch.device(device).type)

    @property
    def mixed(self) -> bool:
        """Whether the loop runs under autocast (any dtype but float32)."""
        return self.dtype != torch.float32

    def unsupported(self) -> str | None:
        """Why this device cannot train in this dtype (one line), or ``None`` when it can."""
        if self.dtype == torch.float16 and self.device_type != "cuda":
            return f"[model] dtype float16 needs a CUDA GPU, this contributor trains on {self.device_type}: use bf16"
        if self.dtype == torch.bfloat16 and self.device_type == "cuda" and not torch.cuda.is_bf16_supported():
            return "[model] dtype bfloat16 needs a GPU of compute capability >= 8.0; this one has none: use float16"
        if self.device_type not in ("cpu", "cuda"):
            return f"fedtune trains on cpu or cuda, not {self.device_type}"
        return None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """``torch.autocast`` in this dtype (nothing for float32)."""
        if not self.mixed:
            yield
            return
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            yield

    def scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for float16 on CUDA (``None`` otherwise: bfloat16 has float32's exponent range)."""
        if self.dtype == torch.float16 and self.device_type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None
