"""SigLIP's pre-processing split in two: resize on the CPU to uint8, scale and normalise on the device.

A SigLIP image processor resizes with PIL (to a fixed height x width, no crop), then rescales
(x / 255) and normalises ((x - mean) / std) in float32 numpy. The resize is the costly part and
PIL runs it without the GIL; the float maths is cheap but, in Python per image, it holds the GIL
and makes the CPU side of a GPU build the bottleneck (measured: benchmarks/bench_gpu.py). So the
loader threads do only the resize to uint8 (4x less memory and host-to-device traffic than float32),
and the encoder finishes the affine part on the device. ``PixelPlan.from_processor`` returns None
for any processor configuration it does not reproduce exactly (crops, shortest-edge sizes,
padding...), and the build then keeps the processor itself. The equivalence is tested against
the processor's own output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class PixelPlan:
    height: int
    width: int
    resample: int
    scale: float  # 0 when the processor does not rescale
    mean: tuple[float, float, float]  # (0, 0, 0) / (1, 1, 1) when it does not normalise
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, proc: Any) -> "PixelPlan | None":
        size = getattr(proc, "size", None)
        h = _get(size, "height")
        w = _get(size, "width")
        if not (getattr(proc, "do_resize", False) and h and w):
            return None
        for other in ("shortest_edge", "longest_edge", "max_height", "max_width"):
            if _get(size, other):
                return None
        if any(getattr(proc, flag, None) for flag in ("do_center_crop", "do_pad", "do_reduce_labels")):
            return None
        mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
        normalise = bool(getattr(proc, "do_normalize", False))
        if normalise and (mean is None or std is None or len(mean) != 3 or len(std) != 3):
            return None
        return cls(
            height=int(h), width=int(w), resample=int(getattr(proc, "resample", 3)),
            scale=float(proc.rescale_factor) if getattr(proc, "do_rescale", False) else 1.0,
            mean=tuple(float(m) for m in mean) if normalise else (0.0, 0.0, 0.0),
            std=tuple(float(s) for s in std) if normalise else (1.0, 1.0, 1.0),
        )

    def resize(self, images: Sequence[Any]) -> "torch.Tensor":  # noqa: F821
        """RGB PIL images -> (n, 3, H, W) uint8, resized exactly as the processor would."""
        import torch

        arrs = [np.asarray(im.convert("RGB").resize((self.width, self.height), resample=self.resample))
                for im in images]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)

    def finish(self, px_uint8: "torch.Tensor", dtype) -> "torch.Tensor":  # noqa: F821
        """(n, 3, H, W) uint8 on any device -> the processor's normalised pixels in ``dtype``."""
        import torch

        x = px_uint8.to(torch.float32) * self.scale
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(dtype)


def _get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)
