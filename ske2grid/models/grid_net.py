"""The Ske2Grid convolution network (spec §b.5-b.6): Ske2Grid front end, grid-conv blocks, person-averaging head.

Blocks are the release's `STGCNBlock2CN` in ST-GCN's layout: a per-frame k×k convolution over the grid patch
(+BN), a temporal unit BN-ReLU-Conv(9×1, stride s)-BN, a zero / identity / 1×1-conv residual, ReLU. The
network is built from a block list, so the released 10-block plan and small smoke widths share one code path.
Activations are kept channels-last (`(B, T, H, W, C)` in memory): the per-frame and temporal views are then
free, and the network costs its convolutions and nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ske2grid.ske2grid import Ske2Grid

__all__ = ["BlockSpec", "GridBlock", "PersonAveragingHead", "Ske2GridNet", "stgcn_block_plan"]


@dataclass(frozen=True)
class BlockSpec:
    """One block of the channel plan (§b.5): channels, temporal stride, residual, kernel (temporal, spatial)."""

    in_channels: int
    out_channels: int
    stride: int = 1
    residual: bool = True
    kernel_size: tuple[int, int] = (9, 3)

    @classmethod
    def parse(cls, spec: BlockSpec | Mapping) -> BlockSpec:
        """A `BlockSpec` from itself or a mapping with the fields above (e.g. a fixture's recorded config)."""
        if isinstance(spec, BlockSpec):
            return spec
        allowed = set(cls.__dataclass_fields__)
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"unknown block key(s) {sorted(unknown)}; valid keys: {sorted(allowed)} (spec §b.5)")
        kw = dict(spec)
        if "kernel_size" in kw:
            kw["kernel_size"] = tuple(int(k) for k in kw["kernel_size"])
        return cls(**kw)


def stgcn_block_plan(in_channels: int = 3, widths: Sequence[int] = (64, 64, 64, 64, 128, 128, 128, 256, 256, 256),
                     strides: Sequence[int] | None = None) -> list[BlockSpec]:
    """ST-GCN's channel plan (§b.5): first block without residual; stride 2 where the width grows after the
    first block (blocks 4 and 7 of the released plan), 1 elsewhere; residuals identity or 1×1 conv."""
    if strides is None:
        strides = [1] + [2 if b > a else 1 for a, b in zip(widths, widths[1:])]
    chans = [in_channels, *widths]
    return [BlockSpec(chans[i], chans[i + 1], int(strides[i]), residual=i > 0) for i in range(len(widths))]


class GridBlock(nn.Module):
    """`STGCNBlock2CN` (§b.5): grid conv + BN, BN-ReLU-temporal conv-BN, residual, ReLU on `(B, C, T, H, W)`."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        cin, cout, s = spec.in_channels, spec.out_channels, spec.stride
        kt, ks = spec.kernel_size
        if kt % 2 != 1 or ks % 2 != 1:
            raise ValueError(f"kernel sizes must be odd, got {spec.kernel_size} (spec §b.5)")
        self.grid_conv = nn.Conv2d(cin, cout, ks, padding=ks // 2)
        self.grid_bn = nn.BatchNorm2d(cout)
        self.tcn = nn.Sequential(
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, (kt, 1), (s, 1), ((kt - 1) // 2, 0)), nn.BatchNorm2d(cout),
        )
        self.residual: nn.Module | None
        if not spec.residual:
            self.residual = None
        elif cin == cout and s == 1:
            self.residual = nn.Identity()
        else:
            self.residual = nn.Sequential(nn.Conv2d(cin, cout, 1, (s, 1)), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.grid_bn(self.grid_conv(x.transpose(1, 2).reshape(b * t, c, h, w)))  # per frame
        y = y.reshape(b, t, -1, h * w).transpose(1, 2)  # (B, C', T, H·W): a view when channels-last
        y = self.tcn(y)
        if self.residual is not None:
            y = y + self.residual(x.reshape(b, c, t, h * w))
        return self.relu(y).reshape(b, y.shape[1], y.shape[2], h, w)


class PersonAveragingHead(nn.Module):
    """`STGCN2CNHead` (§b.5): average over (T, H, W), then over the M persons (padded ones included), linear."""

    def __init__(self, in_channels: int, num_classes: int, num_person: int = 2) -> None:
        super().__init__()
        self.num_person = num_person
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        feat = x.mean(dim=tuple(range(2, x.dim())))
        feat = feat.view(-1, self.num_person, feat.shape[1]).mean(dim=1)
        return feat if pre_logits else self.fc(feat)


class Ske2GridNet(nn.Module):
    """Ske2Grid network: `Ske2Grid` front end -> grid blocks -> head. Input `(N, M, T, V, C)`, logits `(N, K)`."""

    def __init__(
        self,
        num_classes: int,
        layout: str = "coco",
        in_channels: int = 3,
        grid_shape: Sequence[int] = (5, 5),
        progressive_joint_seq: Sequence[int] = (17,),
        blocks: Sequence[BlockSpec | Mapping] | None = None,
        num_person: int = 2,
    ) -> None:
        super().__init__()
        specs = [BlockSpec.parse(b) for b in (blocks if blocks is not None else stgcn_block_plan(in_channels))]
        if not specs or specs[0].in_channels != in_channels:
            raise ValueError(f"the first block must take the {in_channels} input channels (spec §b.5)")
        for a, b in zip(specs, specs[1:]):
            if a.out_channels != b.in_channels:
                raise ValueError(f"block widths do not chain: {a.out_channels} -> {b.in_channels} (spec §b.5)")
        self.num_classes, self.num_person = num_classes, num_person
        self.block_specs = specs
        self.ske2grid = Ske2Grid(layout, in_channels, grid_shape, progressive_joint_seq)
        self.blocks = nn.Sequential(*(GridBlock(s) for s in specs))
        self.num_features = specs[-1].out_channels
        self.head = PersonAveragingHead(self.num_features, num_classes, num_person)
        self.init_weights()

    def init_weights(self) -> None:
        """Official init (§b.6): convs Kaiming-normal fan_out/ReLU, bias 0; BN 1/0; head N(0, 0.01), bias 0.
        UPT and GIT keep their own init (§b.2-b.3)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.fc.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """`(N, M, T, V, C)` -> `(N·M, C', T', H, W)`."""
        if x.shape[1] != self.num_person:
            raise ValueError(f"expected {self.num_person} persons on axis 1 of (N, M, T, V, C), got {x.shape[1]}")
        return self.blocks(self.ske2grid(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
