"""``--autocast``: whether the backbone's forward runs in bf16/fp16 autocast, per family and device.

The group sums themselves are always accumulated in fp32 (``GroupTap``); autocast only changes the precision
of the layers whose outputs are summed. ``auto`` picks, per backbone family, only a choice measured to keep
the sums within ``TOLERANCE`` of fp32 (``benchmarks/bench_autocast.py``; figures and command in docs/cloud.md):

- on CPU, never: it is exact, and the measured gain of CPU autocast was within the noise of a shared machine;
- on CUDA, bf16 for token-sequence backbones (``NLC``: ViT, DeiT, EVA, BEiT): measured 2.2e-3 relative RMS
  error on the pretrained depth-12 ViT (fp16: 2.7e-4, but bf16 keeps fp32's range, so no activation outlier
  of a big ViT can overflow); nothing for CNNs: EfficientNet-Lite0's stage-5 sums moved 5.8e-2 under bf16
  and 6.1e-3 under fp16, both past the tolerance. Families not measured (Swin's ``NHWC``) stay in fp32.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import CloudError

CHOICES = ("auto", "off", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Relative RMS error of the stored sums against fp32 that autocast may add: about 10x what the fp16 storage
# cast alone costs (2^-11 relative, half an ulp), so autocast never dominates the features' error.
TOLERANCE = 5e-3
_AUTO_CUDA = {"NLC": "bf16", "NCHW": "off"}


def autocast_choice(choice: str, device: torch.device, layout: str) -> str:
    """Resolve ``auto`` to ``off``, ``bf16`` or ``fp16`` for this device and backbone layout."""
    if choice not in CHOICES:
        raise CloudError(f"--autocast must be one of {CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    return _AUTO_CUDA.get(layout, "off") if device.type == "cuda" else "off"


def exact_fp32_on_cuda() -> None:
    """``off`` means fp32: without this, cuDNN convolutions would quietly run in TF32 (a 10-bit mantissa)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def autocast(choice: str, device: torch.device) -> contextlib.AbstractContextManager:
    if choice == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[choice])


def manifest_record(choice: str) -> dict[str, str]:
    """What goes into the manifest's backbone record: nothing for fp32, so fp32 sets are unchanged, and the
    autocast dtype otherwise, so a resume cannot mix precisions."""
    return {} if choice == "off" else {"autocast": choice}
