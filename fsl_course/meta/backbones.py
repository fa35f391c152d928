"""Feature extractors (backbones) shared by the few-shot learners.

``Conv4`` is the embedding network of Matching Networks (Vinyals et al. 2016,
arXiv:1606.04080) and Prototypical Networks (Snell et al. 2017, arXiv:1703.05175):
four blocks of

    conv 3x3 (64 filters, padding 1) -> normalisation -> ReLU -> max-pool 2x2,

so each block halves the image: 28 -> 14 -> 7 -> 3 -> 1, and a 28x28 image becomes a
64-dimensional feature vector f(x).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

NORMS = ("batch", "group", "none")


def norm_layer(norm: str, channels: int, groups: int = 8) -> nn.Module:
    """``"batch"``: BatchNorm2d; ``"group"``: GroupNorm with ``groups`` groups; ``"none"``: identity."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(groups, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


class Conv4(nn.Module):
    """The Conv-4 backbone: ``(B, in_channels, H, W) -> (B, hidden * (H // 16) * (W // 16))``;
    for 28x28 images, ``(B, 1, 28, 28) -> (B, 64)``.

    ``norm`` chooses the normalisation after each convolution:

    * ``"batch"`` (the papers' choice): batch statistics while training; at test time call
      ``.eval()`` so the running averages from training are used. Then every query is
      embedded independently of the others: the learner is *non-transductive*. Left in
      train mode at test time, batch norm pools statistics over the support and query
      images of the episode, which is transductive and inflates accuracy (see Nichol et
      al. 2018, arXiv:1803.02999, and Bronskill et al. 2020, arXiv:2003.03284).
    * ``"group"``: GroupNorm normalises each image on its own, the same in train and eval
      mode, so the question does not arise.
    * ``"none"``: no normalisation (the convolutions then carry a bias).

    ``pools`` (default 4): only the first ``pools`` blocks max-pool; ``flatten=False`` returns the
    feature maps ``(B, hidden, H', W')``. The Relation Network's embedding is ``pools=2,
    flatten=False``: 28x28 -> 64 x 7 x 7 maps (Sung et al. 2018).
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, norm: str = "batch", pools: int = 4, flatten: bool = True):
        super().__init__()
        if not 0 <= pools <= 4:
            raise ValueError(f"pools must be between 0 and 4, got {pools}")
        self.hidden, self.pools, self.flatten = hidden, pools, flatten
        blocks = []
        for i in range(4):
            blocks += [
                # a bias right before a normalisation layer is cancelled by its mean subtraction
                nn.Conv2d(in_channels if i == 0 else hidden, hidden, kernel_size=3, padding=1, bias=norm == "none"),
                norm_layer(norm, hidden),
                nn.ReLU(),
                nn.MaxPool2d(2) if i < pools else nn.Identity(),
            ]
        self.blocks = nn.Sequential(*blocks)
        # Store the convolution weights "channels last" (NHWC) and feed NHWC images: the same
        # computation up to rounding, about 1.6x faster on CPUs (oneDNN) for these small images.
        self.to(memory_format=torch.channels_last)

    def feature_dim(self, height: int = 28, width: int = 28) -> int:
        """Length of the feature vector for ``height x width`` images: ``hidden * (H // 2^pools) * (W // 2^pools)``."""
        return self.hidden * (height >> self.pools) * (width >> self.pools)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, H, W)`` with ``H, W >= 16`` -> features ``(B, feature_dim(H, W))``."""
        if x.ndim != 4 or min(x.shape[2:]) < 16:
            raise ValueError(f"Conv4 expects images of shape (B, C, H, W) with H, W >= 16, got {tuple(x.shape)}")
        try:
            x = x.contiguous(memory_format=torch.channels_last)
        except RuntimeError:  # inside torch.func.vmap (MAML over a batch of tasks): no channels-last rule, keep NCHW
            pass
        features = self.blocks(x)
        return rearrange(features, "b c h w -> b (c h w)") if self.flatten else features
