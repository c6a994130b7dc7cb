"""Facts about where mixdiff runs: the device, the dtype, the versions of the stack. Torch is imported
inside each function."""

from __future__ import annotations

from typing import Any

from mixdiff_cli import __version__
from mixdiff_cli.core.errors import UsageError


def pick_device(device: str | None = None) -> Any:
    import torch

    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UsageError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {device} requested but CUDA is not available", "pass --device cpu")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | None, device: Any) -> Any:
    import torch

    if dtype is None:
        return torch.float16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise UsageError(f"unknown dtype {dtype!r}", "use float32, float16 or bfloat16")
    return table[dtype]


def versions() -> dict[str, str]:
    import diffusers
    import peft
    import torch
    import transformers

    return {"mixdiff": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}
