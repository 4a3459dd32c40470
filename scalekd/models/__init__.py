"""ScaleKD's students and teachers on timm, with the official builds' differences (spec c).

Factories by the paper's names: `create_student(name)` / `create_teacher(name)`; `STUDENTS` / `TEACHERS`
list them. Builders with free widths and depths (`resnet`, `swin`, `vit`, `mixer`, `convnext`,
`mobilenet_v1`) back both the named models and the models rebuilt from recorded mmcls configs
(`scalekd.models.mmcls`). Nothing is downloaded: weights come from local files (`scalekd.convert`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import timm
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, make_blocks
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from common.errors import UserError

from .taps import StudentTaps, SwinTeacher, TeacherAdapter, ViTTeacher, student_taps, teacher_adapter

__all__ = [
    "STUDENTS", "TEACHERS", "create_student", "create_teacher", "resnet", "swin", "vit", "mixer", "convnext",
    "mobilenet_v1", "StudentTaps", "TeacherAdapter", "SwinTeacher", "ViTTeacher", "student_taps",
    "teacher_adapter",
]

RESNET_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)), 152: (Bottleneck, (3, 8, 36, 3)),
}


def resnet(depth: int = 50, stem_channels: int = 64, base_channels: int = 64, deep_stem: bool = False,
           avg_down: bool = False, num_classes: int = 1000, drop_path_rate: float = 0.0) -> ResNet:
    """mmcls `ResNet` (`deep_stem=avg_down=False`) / `ResNetV1d` (both True) as a timm ResNet.

    Stage widths base_channels * 2^i; zero-initialised last BN per block (mmcls `zero_init_residual`).
    timm fixes a plain 7x7 stem at 64 channels, so other stem widths rebuild the stem and the stages.
    """
    if depth not in RESNET_DEPTHS:
        raise UserError(f"ResNet depth {depth} is not one of {sorted(RESNET_DEPTHS)}")
    block, layers = RESNET_DEPTHS[depth]
    channels = tuple(base_channels * 2 ** i for i in range(4))
    if deep_stem and stem_channels % 2:
        raise UserError(f"a deep ResNet stem needs an even stem_channels, got {stem_channels}")
    model = ResNet(block, layers, channels=channels, num_classes=num_classes, stem_width=stem_channels // 2,
                   stem_type="deep" if deep_stem else "", avg_down=avg_down, drop_path_rate=drop_path_rate)
    if not deep_stem and stem_channels != 64:
        model.conv1 = nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
        model.bn1 = nn.BatchNorm2d(stem_channels)
        stages, _ = make_blocks((block,) * 4, channels, layers, stem_channels, avg_down=avg_down,
                                drop_path_rate=drop_path_rate, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d)
        for name, stage in stages:
            setattr(model, name, stage)
        model.init_weights(zero_init_last=True)
    return model


def swin(embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
         window_size: int = 7, patch_size: int = 4, img_size: int = 224, num_classes: int = 1000,
         drop_path_rate: float = 0.0, **kwargs: Any) -> SwinTransformer:
    """Swin Transformer (mmcls `SwinTransformer`; PatchMerging order differs, see scalekd.convert)."""
    return SwinTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depths=tuple(depths),
                           num_heads=tuple(num_heads), window_size=window_size, num_classes=num_classes,
                           drop_path_rate=drop_path_rate, **kwargs)


def vit(embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, patch_size: int = 16,
        img_size: int = 224, num_classes: int = 1000, class_token: bool = False, drop_path_rate: float = 0.0,
        **kwargs: Any) -> VisionTransformer:
    """ViT student as built by mmcls for ScaleKD: no class token, LN per token, then GAP (spec c)."""
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                             class_token=class_token, global_pool="avg", fc_norm=False,
                             drop_path_rate=drop_path_rate, **kwargs)


def mixer(embed_dim: int = 512, num_blocks: int = 8, tokens_mlp_dim: int = 256, channels_mlp_dim: int = 2048,
          patch_size: int = 16, img_size: int = 224, num_classes: int = 1000,
          drop_path_rate: float = 0.0) -> MlpMixer:
    """MLP-Mixer (mmcls `MlpMixer`: final LN per token, then GAP = timm)."""
    return MlpMixer(num_classes=num_classes, img_size=img_size, patch_size=patch_size, num_blocks=num_blocks,
                    embed_dim=embed_dim, mlp_ratio=(tokens_mlp_dim / embed_dim, channels_mlp_dim / embed_dim),
                    drop_path_rate=drop_path_rate)


def convnext(depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
             num_classes: int = 1000, drop_path_rate: float = 0.0) -> nn.Module:
    """ConvNeXt with the final LayerNorm per position before GAP (mmcls `gap_before_final_norm=False`)."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=tuple(depths), dims=tuple(dims), num_classes=num_classes, head_norm_first=True,
                    drop_path_rate=drop_path_rate)


def mobilenet_v1(num_classes: int = 1000) -> nn.Module:
    """MobileNet-V1 1.0 (timm `mobilenetv1_100`: same layers as mmcls `MobileNetV1`)."""
    return timm.create_model("mobilenetv1_100", pretrained=False, num_classes=num_classes)


# paper name -> (builder, kwargs). Drop-path as in the official student configs (spec c).
STUDENTS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v1": mobilenet_v1,
    "resnet50": lambda **kw: resnet(50, **kw),
    "resnet50d": lambda **kw: resnet(50, deep_stem=True, avg_down=True, **kw),
    "convnext_tiny": lambda **kw: convnext(drop_path_rate=kw.pop("drop_path_rate", 0.1), **kw),
    "mixer_s16": lambda **kw: mixer(512, 8, 256, 2048, patch_size=16, **kw),
    "mixer_b16": lambda **kw: mixer(768, 12, 384, 3072, patch_size=16,
                                    drop_path_rate=kw.pop("drop_path_rate", 0.1), **kw),
    "mixer_b14": lambda **kw: mixer(768, 12, 384, 3072, patch_size=14,
                                    drop_path_rate=kw.pop("drop_path_rate", 0.1), **kw),
    "vit_s16": lambda **kw: vit(384, 12, 6, patch_size=16, **kw),
    "vit_b16": lambda **kw: vit(768, 12, 12, patch_size=16, **kw),
    "vit_b14": lambda **kw: vit(768, 12, 12, patch_size=14, **kw),
    "resnet": resnet,  # free depth/widths (model.student_kwargs), e.g. the smoke profile's small ResNet
    "swin": swin,  # free widths (model.student_kwargs): the smoke profile trains its small teacher as one
    "swin_t": lambda **kw: swin(96, (2, 2, 6, 2), (3, 6, 12, 24), drop_path_rate=kw.pop("drop_path_rate", 0.05),
                                **kw),
}

# Teachers: drop-path as in the official teacher configs (active only with teacher_train_mode, b.5).
TEACHERS: dict[str, Callable[..., nn.Module]] = {
    "swin_s": lambda **kw: swin(96, (2, 2, 18, 2), (3, 6, 12, 24), drop_path_rate=kw.pop("drop_path_rate", 0.3),
                                **kw),
    "swin_b": lambda **kw: swin(128, (2, 2, 18, 2), (4, 8, 16, 32),
                                drop_path_rate=kw.pop("drop_path_rate", 0.5), **kw),
    "swin_l": lambda **kw: swin(192, (2, 2, 18, 2), (6, 12, 24, 48),
                                drop_path_rate=kw.pop("drop_path_rate", 0.1), **kw),
    "swin": swin,  # free widths/depths/window (model.teacher_kwargs), e.g. the smoke profile's small Swin
    # BEiT-L/14 pre-trained by EVA: abs pos-emb, no rel-pos, 16x16 tokens at 224 (reconstructed path, k.5)
    "eva_l14": lambda **kw: timm.create_model("eva_large_patch14_196", pretrained=False,
                                              img_size=kw.pop("img_size", 224), **kw),
}


def create_student(name: str, **kwargs: Any) -> nn.Module:
    """A student of Table 3 by name (`STUDENTS`), randomly initialised."""
    if name not in STUDENTS:
        raise UserError(f"unknown student {name!r}; choose one of {sorted(STUDENTS)}")
    return STUDENTS[name](**kwargs)


def create_teacher(name: str, **kwargs: Any) -> nn.Module:
    """A teacher by name (`TEACHERS`), randomly initialised; load weights with scalekd.convert."""
    if name not in TEACHERS:
        raise UserError(f"unknown teacher {name!r}; choose one of {sorted(TEACHERS)}")
    return TEACHERS[name](**kwargs)
