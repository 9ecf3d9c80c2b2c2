"""The network of an exported lsmfm model, rebuilt from torch and MONAI alone.

This file is packed as it is into every bioimage.io package lsmfm writes (the `pytorch_state_dict`
weights' architecture), so bioimage.io consumers (bioimageio.core, ilastik, napari plugins) rebuild the
network without installing lsmfm. It must import nothing from lsmfm: a test loads it on its own and
checks it gives lsmfm's `TaskModel` outputs bit for bit from the same state dict.

The state dict keys are those of an lsmfm model folder: `backbone.*` (the MONAI network's own keys) and
`head.*` (a 1x1x1 convolution from the dense features to the output channels).

Example (the kwargs are those written to the package's rdf.yaml):
    >>> net = LsmfmNetwork(backbone="UNet", backbone_kwargs={"spatial_dims": 3, "in_channels": 1,
    ...     "out_channels": 8, "channels": [8, 16], "strides": [2]}, head_channels=1, residual=False)
    >>> net(torch.zeros(1, 1, 16, 16, 16)).shape
    torch.Size([1, 1, 16, 16, 16])
"""
from __future__ import annotations

import sys
from typing import Any, Dict

import torch
from torch import nn


def _monai_nets() -> Any:
    """`monai.networks.nets`, imported while `transformers` is hidden when it is not loaded yet (MONAI's
    Transchex would import it: seconds and ~100 MiB for nothing here)."""
    hide = "transformers" not in sys.modules and "monai" not in sys.modules
    if hide:
        sys.modules["transformers"] = None  # type: ignore[assignment]  # `import transformers` fails
    try:
        import monai.networks.nets as nets
    finally:
        if hide and sys.modules.get("transformers", 0) is None:
            del sys.modules["transformers"]
    return nets


class LsmfmNetwork(nn.Module):
    """A MONAI backbone, a 1x1x1 convolution head and, when `residual`, the input added to the output.

    Args:
        backbone: the class name in `monai.networks.nets` ("UNet", "SwinUNETR").
        backbone_kwargs: its keyword arguments; `out_channels` is the dense feature dimension.
        head_channels: output channels of the head.
        residual: add the input to the head's output (deblurring: the network predicts a correction).
        axes: "zyx", or "xyz" for a backbone trained on (x, y, z) arrays (the LSM foundation model paper's):
            its (z, y, x) input is transposed for the backbone and the features transposed back.
    """

    def __init__(self, backbone: str, backbone_kwargs: Dict[str, Any], head_channels: int,
                 residual: bool = False, axes: str = "zyx") -> None:
        super().__init__()
        network = getattr(_monai_nets(), backbone)
        self.backbone = network(**backbone_kwargs)
        self.head = nn.Conv3d(int(backbone_kwargs["out_channels"]), head_channels, kernel_size=1)
        self.residual = residual
        self.xyz = axes == "xyz"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.xyz:
            features = self.backbone(x.permute(0, 1, 4, 3, 2).contiguous())
            features = features.permute(0, 1, 4, 3, 2).contiguous()
        else:
            features = self.backbone(x)
        out = self.head(features)
        if self.residual:
            out = x + out
        return out
