"""Where ScaleKD taps its models (spec b.4, j).

Students: `StudentTaps(model)(x) -> (S3, S4, logits)` with S3 the second-to-last and S4 the last stage
as B x C x H x W maps, for timm ResNet, MobileNet-V1 (EfficientNet builder), ConvNeXt, Swin, ViT and
MLP-Mixer (table in b.4).

Teachers: a `TeacherAdapter` gives `stage_outputs(x) -> (T3, T4, logits)` (maps; T3 only fixes the
stage-3 CAP's width and grid, T4 is the target) and `last_stage(tokens, hw)`: Phi, the frozen last stage
applied to B x (H3*W3) x C3 tokens, returning B x (H4*W4) x C4 tokens; plain-ViT teachers also have a
`tail` applied to the stage-4 CAP output (`is_vit` in the official code). Every grid comes from the
input, so any resolution the timm model accepts works.
"""

from __future__ import annotations

import abc
import math

from torch import Tensor, nn

from common.errors import UserError


def _grid(tokens: Tensor, hw: tuple[int, int] | None = None) -> tuple[int, int]:
    if hw is not None:
        return hw
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} tokens are not a square grid; pass hw")
    return side, side


def _to_map(tokens: Tensor, hw: tuple[int, int]) -> Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *hw)


class StudentTaps:
    """S3 / S4 / logits of a timm student, per family (b.4's table). Not a module: holds no weights."""

    def __init__(self, model: nn.Module, s3_index: int | None = None) -> None:
        self.model = model
        self.family = type(model).__name__
        if self.family not in ("ResNet", "EfficientNet", "ConvNeXt", "SwinTransformer", "VisionTransformer",
                               "MlpMixer"):
            raise UserError(f"no ScaleKD student taps for {self.family}; supported: ResNet, MobileNet-V1 "
                            "(EfficientNet), ConvNeXt, SwinTransformer, VisionTransformer, MlpMixer")
        depth = len(getattr(model, "blocks", ()))
        # ViT: official out indices [2, 5, 8, 11] -> S3 after block 9 of 12; Mixer: out_indices [-7,-5,-3,-1]
        # -> S3 after block depth-2 (S4 before the final LN, which only the head uses)
        default = {"VisionTransformer": 3 * depth // 4 - 1, "MlpMixer": depth - 3}.get(self.family)
        self.s3_index = s3_index if s3_index is not None else default

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.model
        f = self.family
        if f == "ResNet":
            h = m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(x))))))
            s3 = m.layer3(h)
            s4 = m.layer4(s3)
            return s3, s4, m.forward_head(s4)
        if f == "EfficientNet":  # MobileNet-V1: S3 = 512 x 14^2 (6 blocks), S4 = 1024 x 7^2
            s3 = m.blocks[:-1](m.bn1(m.conv_stem(x)))
            s4 = m.blocks[-1](s3)
            return s3, s4, m.forward_head(m.bn2(m.conv_head(s4)))
        if f == "ConvNeXt":  # S4 after the final LayerNorm (head_norm_first)
            s3 = m.stages[:-1](m.stem(x))
            s4 = m.norm_pre(m.stages[-1](s3))
            return s3, s4, m.forward_head(s4)
        if f == "SwinTransformer":  # the last two stage outputs, S4 after the final norm (b.4 intended)
            s3 = m.layers[:-1](m.patch_embed(x))
            s4 = m.norm(m.layers[-1](s3))
            return s3.permute(0, 3, 1, 2), s4.permute(0, 3, 1, 2), m.forward_head(s4)
        if f == "VisionTransformer":
            h = m.patch_embed(x)
            hw = tuple(h.shape[1:3]) if h.dim() == 4 else m.patch_embed.dynamic_feat_size(x.shape[-2:])
            h = m.norm_pre(m.patch_drop(m._pos_embed(h)))
            s3 = None
            for i, blk in enumerate(m.blocks):
                h = blk(h)
                if i == self.s3_index:
                    s3 = h
            h = m.norm(h)
            n = m.num_prefix_tokens
            return _to_map(s3[:, n:], hw), _to_map(h[:, n:], hw), m.forward_head(h)
        # MlpMixer: tokens B x L x C on the patch grid
        h = m.stem(x)
        hw = m.stem.grid_size
        s3 = m.blocks[: self.s3_index + 1](h)
        s4 = m.blocks[self.s3_index + 1:](s3)
        return _to_map(s3, hw), _to_map(s4, hw), m.forward_head(m.norm(s4))


def student_taps(model: nn.Module, s3_index: int | None = None) -> StudentTaps:
    """The `StudentTaps` of a timm student."""
    return StudentTaps(model, s3_index)


class TeacherAdapter(abc.ABC):
    """Protocol of a ScaleKD teacher (j): stage outputs, the last stage Phi, and an optional tail."""

    model: nn.Module
    is_vit: bool = False

    @abc.abstractmethod
    def stage_outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(T3, T4, logits) of the teacher for images `x`."""

    @abc.abstractmethod
    def last_stage(self, tokens: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """Phi: the frozen last stage applied to stage-3-shaped tokens (autograd flows to the input)."""

    def tail(self, tokens: Tensor) -> Tensor:
        return tokens


class SwinTeacher(TeacherAdapter):
    """timm Swin: T3 = stage n-1 output (no norm), T4 = last stage + final norm; Phi = PatchMerging +
    last-stage blocks + final norm (official `forward_specific_stage(x, 4)`, any grid)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def stage_outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.model
        t3 = m.layers[:-1](m.patch_embed(x))
        t4 = m.norm(m.layers[-1](t3))
        return t3.permute(0, 3, 1, 2), t4.permute(0, 3, 1, 2), m.forward_head(t4)

    def last_stage(self, tokens: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        h, w = _grid(tokens, hw)
        x = self.model.norm(self.model.layers[-1](tokens.reshape(tokens.shape[0], h, w, tokens.shape[2])))
        return x.flatten(1, 2)


class ViTTeacher(TeacherAdapter):
    """timm plain ViT / EVA (BEiT-L/14): Phi = `phi_blocks` blocks (+ final norm when there is no tail),
    tail = the remaining `tail_blocks` blocks + final norm, all on patch tokens only (official
    `forward_specific_stage`). EVA-L: phi 2, tail 0 (blocks 23-24 + LN); ViT-B: phi 3, tail 1 (b.4)."""

    is_vit = True

    def __init__(self, model: nn.Module, phi_blocks: int = 2, tail_blocks: int = 0) -> None:
        depth = len(model.blocks)
        if phi_blocks < 1 or phi_blocks + tail_blocks >= depth:
            raise UserError(f"phi_blocks {phi_blocks} + tail_blocks {tail_blocks} must leave blocks of the "
                            f"{depth} for stage n-1")
        self.model = model
        self.split = depth - phi_blocks - tail_blocks  # first block of Phi
        self.tail_start = depth - tail_blocks

    def stage_outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.model
        h = m.patch_embed(x)
        hw = tuple(h.shape[1:3]) if h.dim() == 4 else tuple(m.patch_embed.grid_size)
        h = m.norm_pre(m.patch_drop(m._pos_embed(h)))
        h = m.blocks[: self.split](h)
        n = m.num_prefix_tokens
        t3 = h[:, n:]
        h = m.norm(m.blocks[self.split:](h))
        return _to_map(t3, hw), _to_map(h[:, n:], hw), m.forward_head(h)

    def last_stage(self, tokens: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        x = self.model.blocks[self.split: self.tail_start](tokens)
        return self.model.norm(x) if self.tail_start == len(self.model.blocks) else x

    def tail(self, tokens: Tensor) -> Tensor:
        if self.tail_start == len(self.model.blocks):
            return tokens
        return self.model.norm(self.model.blocks[self.tail_start:](tokens))


def teacher_adapter(model: nn.Module, phi_blocks: int | None = None, tail_blocks: int | None = None) -> TeacherAdapter:
    """The adapter of a timm teacher: Swin, or plain ViT / EVA (EVA-L's split by default)."""
    name = type(model).__name__
    if name == "SwinTransformer":
        return SwinTeacher(model)
    if name == "VisionTransformer":
        return ViTTeacher(model, 2 if phi_blocks is None else phi_blocks, 0 if tail_blocks is None else tail_blocks)
    raise UserError(f"no ScaleKD teacher adapter for {name}; supported: timm SwinTransformer, VisionTransformer")
