"""ShuffleNetV2 backbones from torchvision (timm has none; spec c.1), with timm's feature/head contract.

The official ``models/noah_shufflenetv2.py`` is torchvision's network with the classifier moved to ``head``;
backbone keys are torchvision's, and (as in the official file) there is no custom initialisation.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.models.shufflenetv2 import ShuffleNetV2

STAGE_CHANNELS = {
    "shufflenetv2_050": [24, 48, 96, 192, 1024],
    "shufflenetv2_100": [24, 116, 232, 464, 1024],
    "shufflenetv2_150": [24, 176, 352, 704, 1024],
    "shufflenetv2_200": [24, 244, 488, 976, 2048],
}


class ShuffleNetV2Features(ShuffleNetV2):
    """torchvision ShuffleNetV2 without its ``fc``: ``conv5`` map out, global average pool for the baseline."""

    def __init__(self, stages_out_channels: list[int]) -> None:
        super().__init__([4, 8, 4], stages_out_channels)
        del self.fc
        self.num_features = stages_out_channels[-1]

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.stage4(self.stage3(self.stage2(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = True) -> Tensor:
        return x.mean((2, 3))
