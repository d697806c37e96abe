"""Device and precision choice: one place that decides where and in which dtype models run."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cpu`/`cuda`/`cuda:N` are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return device


def resolve_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """`auto`: bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision != "auto":
        if precision not in table:
            raise ValueError(
                f"precision must be one of auto, {', '.join(table)}; got {precision!r}"
            )
        if device.type == "cpu" and precision != "fp32":
            raise ValueError(f"precision {precision} is for CUDA; on CPU dloral runs in fp32")
        return table[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without stalling the host: on CUDA through pinned memory with
    a non-blocking copy (a copy from pageable memory waits for the device's queue to drain);
    elsewhere a plain `.to`. The dtype is kept: convert on the device afterwards."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
