"""Unit tests of the method core against the spec's invariants (spec §h)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernelwarehouse.warehouse import (
    KWConv2d,
    WarehouseManager,
    fuse_warehouse_name,
    parse_sharing_range,
    temperature_at,
)


class Net(nn.Module):
    """Three same-stage convs sharing one warehouse, a depthwise conv, and a KW linear head."""

    def __init__(self, budget: float = 1.0, rho: float = 1.0, basis: float = 1.0, norm: str = "bn") -> None:
        super().__init__()
        self.warehouse_manager = WarehouseManager(1 / 16, budget, rho, rho, "layer_conv", basis, norm=norm)
        r = self.warehouse_manager.reserve
        self.a = r(16, 16, 3, padding=1, bias=False, warehouse_name="stage0_layer0_conv0")
        self.b = r(16, 32, 3, stride=2, padding=1, bias=False, warehouse_name="stage0_layer1_conv0")
        self.c = r(16, 32, 1, stride=2, bias=False, warehouse_name="stage0_layer1_conv1")
        self.warehouse_manager.finalize(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x))) + self.c(x)


def static_kernel(layer: KWConv2d) -> torch.Tensor:
    """The kernel a layer has at tau = 1: beta-assigned cells, zeros for zero-cell rows (spec §h.4)."""
    attn = layer.attention.beta[:, :-1].unsqueeze(0)
    return layer.assemble(attn)[0]


def test_sharing_range_string_equals_token_list() -> None:
    assert parse_sharing_range("layer_conv") == ("layer", "conv")
    assert fuse_warehouse_name("stage1_layer0_conv2", ("layer", "conv")) == "stage1_layer_conv"
    assert fuse_warehouse_name("stage1_layer3_dwconv0", ("layer", "pwconv")) == "stage1_layer_dwconv0"
    assert fuse_warehouse_name("stage1_layer3_pwconv1", ("layer", "pwconv")) == "stage1_layer_pwconv"


def test_temperature_schedule_values() -> None:
    assert temperature_at(0, 0, 100, 20) == pytest.approx(0.9995)
    assert temperature_at(10, 0, 100, 20) == pytest.approx(0.4995)
    assert temperature_at(20, 0, 100, 20) == 0.0
    assert max(temperature_at(e, s, 100, 20) for e in range(25) for s in range(100)) <= 1.0


@pytest.mark.parametrize("budget,rho", [(1.0, 1.0), (2.0, 1.0), (0.5, 0.5)])
def test_beta_structure_and_ownership(budget: float, rho: float) -> None:
    net = Net(budget, rho)
    n = net.warehouse_manager.weights[0].shape[0]
    assigned = []
    layers = [net.a, net.b, net.c]
    for layer in layers:
        beta = layer.attention.beta
        assert torch.equal(beta.sum(1), torch.ones(beta.shape[0]))  # one-hot rows
        assigned += beta[:, :-1].nonzero()[:, 1].tolist()
    assert len(assigned) == len(set(assigned))  # distinct cells
    if budget >= 1:
        assert [(l.start_cell, l.end_cell) for l in layers][-1][1] == n
        assert layers[0].start_cell == 0 and layers[1].start_cell == layers[0].end_cell
    else:
        assert len(assigned) == n  # exactly n mixtures use real cells


def test_tau1_is_a_static_conv_and_attention_gets_no_gradient() -> None:
    torch.manual_seed(0)
    net = Net()
    net.train()
    net.warehouse_manager.set_temperature(1.0)
    x = torch.randn(3, 16, 9, 9)
    ref = F.conv2d(F.relu(F.conv2d(x, static_kernel(net.a), padding=1)), static_kernel(net.b), stride=2,
                   padding=1) + F.conv2d(x, static_kernel(net.c), stride=2)
    out = net(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    for name, p in net.named_parameters():
        if "attention" in name:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


@pytest.mark.parametrize("tau", [0.0, 0.4])
def test_batched_equals_per_sample_conv(tau: float) -> None:
    torch.manual_seed(1)
    net = Net(0.5, 0.5).eval()
    net.warehouse_manager.set_temperature(tau)
    x = torch.randn(4, 16, 8, 8)
    layer = net.b
    with torch.no_grad():
        kernels = layer.assemble(layer.mixture_weights(x.mean((2, 3))))
        loop = torch.stack([F.conv2d(x[i:i + 1], kernels[i], stride=2, padding=1)[0] for i in range(4)])
        torch.testing.assert_close(layer(x), loop, rtol=1e-5, atol=1e-6)


def test_eval_mode_is_batch_independent() -> None:
    torch.manual_seed(2)
    net = Net().eval()
    x = torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[1:2], net(x[1:2]), rtol=1e-5, atol=1e-6)


def test_contrasting_normalisation_l1_mass() -> None:
    torch.manual_seed(3)
    net = Net().eval()
    att = net.a.attention
    pooled = torch.randn(2, 16)
    raw = att.logits(pooled)
    full = raw / (raw.abs().sum(-1, keepdim=True) + 1e-3)
    s = raw.abs().sum(-1)
    torch.testing.assert_close(full.abs().sum(-1), s / (s + 1e-3))
    torch.testing.assert_close(att(pooled, 0.0), full[..., :-1])


def test_initialisation_statistics() -> None:
    torch.manual_seed(4)
    net = Net(budget=4.0)
    w = net.warehouse_manager.weights[0]
    for layer in (net.a, net.b):
        cells = w[layer.start_cell:layer.end_cell]
        expected = math.sqrt(2.0 / ((layer.end_cell - layer.start_cell) * w.shape[1]))
        assert cells.std().item() == pytest.approx(expected, rel=0.1)
    fc2 = net.a.attention.fc2
    assert fc2.weight.std().item() == pytest.approx(math.sqrt(2.0 / fc2.out_features), rel=0.1)
    assert torch.count_nonzero(fc2.bias) == 0


def test_state_dict_round_trip_keeps_temperature_not_beta() -> None:
    net = Net()
    net.warehouse_manager.set_temperature(0.25)
    sd = net.state_dict()
    assert not any("beta" in k for k in sd) and "warehouse_manager.temperature" in sd
    fresh = Net()
    fresh.load_state_dict(sd, strict=True)
    assert fresh.warehouse_manager.temperature.item() == 0.25
    clone = copy.deepcopy(net)  # EMA-style copies keep their own manager
    assert clone.a._manager[0] is clone.warehouse_manager


def test_bad_inputs_give_clear_errors() -> None:
    manager = WarehouseManager(cell_num_ratio=1.5, sharing_range="layer_conv")
    holder = nn.Module()
    holder.wm = manager
    holder.a = manager.reserve(8, 8, 3, padding=1, warehouse_name="stage0_layer0_conv0")
    with pytest.raises(RuntimeError, match="finalis"):
        holder.a(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="budget must be an integer"):
        manager.finalize(holder)
    net = Net().train()
    with pytest.raises(ValueError, match="batch size >= 2"):
        net(torch.randn(1, 16, 8, 8))
    net_ln = Net(norm="ln").train()
    assert net_ln(torch.randn(1, 16, 8, 8)).shape == (1, 32, 4, 4)


def test_inference_scratch_buffer_equals_autograd_path() -> None:
    torch.manual_seed(5)
    net = Net(2.0).eval()
    x = torch.randn(3, 16, 8, 8)
    ref = net(x).detach()
    with torch.no_grad():
        first = net(x)
        second = net(x * 2)  # the shared workspace is reused: earlier outputs must not change
    torch.testing.assert_close(first, ref)
    assert not torch.equal(first, second)
    torch.testing.assert_close(first, net(x).detach())


def test_assemble_returns_kernels_no_later_call_overwrites() -> None:
    """The public ``assemble()`` owns its result; the shared workspace is internal to the forward (issue 8).

    The 1x1 layer ``c`` is the case where the kernels are a plain view of the assembled cells (no permute copy).
    """
    torch.manual_seed(6)
    net = Net(2.0).eval()
    x = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        attn_c = net.c.mixture_weights(x.mean((2, 3)))
        first = net.c.assemble(attn_c)
        kept = first.clone()
        second = net.c.assemble(attn_c * -1)
        net.a.assemble(net.a.mixture_weights(torch.randn(3, 16)))
        net(x * 3)  # a forward through every layer, which uses the workspace
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    torch.testing.assert_close(second, -kept)
    with torch.enable_grad():
        torch.testing.assert_close(first, net.c.assemble(attn_c))


FORCE = {"tapwise": (0.0, math.inf), "mixed": (math.inf, 0.0)}  # (mixed_ratio, tapwise_ratio)


@pytest.mark.parametrize("how", ["tapwise", "mixed", "im2col"])
@pytest.mark.parametrize("budget,rho", [(1.0, 1.0), (2.0, 0.5), (0.5, 0.5)])
def test_every_kernel_application_equals_the_grouped_conv(how: str, budget: float, rho: float) -> None:
    """Outputs and every gradient of ``impl='auto'`` with the 3x3 layers forced to one application equal the
    official grouped conv (rho < 1: several input and output blocks per layer, G_i, G_o > 1). In float64, so
    that the attention's BatchNorm backward at batch 3 does not amplify float32 reordering noise."""
    torch.manual_seed(7)
    ref_net = Net(budget, rho).double().train()
    ref_net.warehouse_manager.set_temperature(0.3)
    ref_net.warehouse_manager.impl = "grouped"
    net = copy.deepcopy(ref_net)
    net.warehouse_manager.impl = "auto"
    if how == "im2col":  # chosen only for G_o > 1 at enough rows: forced here on every geometry
        for layer in (net.a, net.b):
            layer.kernel_application = lambda x: "im2col"
    else:
        net.warehouse_manager.mixed_ratio, net.warehouse_manager.tapwise_ratio = FORCE[how]
        net.warehouse_manager.im2col_min_length = math.inf
    x = torch.randn(3, 16, 9, 9, dtype=torch.float64)
    assert {net.a.kernel_application(x), net.b.kernel_application(x)} == {how}
    assert net.c.kernel_application(x) == "pointwise"
    out, ref = net(x), ref_net(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
        if q.grad is not None:
            scale = q.grad.abs().max().item()
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10 * scale + 1e-14, msg=name)
    with torch.inference_mode():
        torch.testing.assert_close(net.eval()(x), ref_net.eval()(x), rtol=1e-10, atol=1e-10)
        x_cl = x.contiguous(memory_format=torch.channels_last)  # the bench's memory format
        torch.testing.assert_close(net(x_cl), ref_net(x), rtol=1e-10, atol=1e-10)


def test_inference_prefers_im2col_to_tapwise() -> None:
    """Without autograd a layer eligible for the tap products is applied as im2col (measured faster, issue 8)."""
    net = Net()
    net.warehouse_manager.mixed_ratio, net.warehouse_manager.tapwise_ratio = FORCE["tapwise"]
    x = torch.randn(3, 16, 9, 9)
    assert net.a.kernel_application(x) == "tapwise"
    with torch.no_grad():
        assert net.a.kernel_application(x) == "im2col"


def test_warehouse_layouts_are_shared_within_one_forward_and_never_stale() -> None:
    """One copy of a warehouse's GEMM layout per network forward, dropped at its end (even on an error), so
    weights changed between forwards, even through ``.data`` (no version bump), are always seen."""
    torch.manual_seed(8)
    net = Net().eval()
    manager = net.warehouse_manager
    manager.mixed_ratio = math.inf  # a and b: mixed, both from the one stage-0 warehouse
    ref = copy.deepcopy(net)
    ref.warehouse_manager.impl = "grouped"
    copies = []
    original = manager.warehouse_as

    def counting(*args: object) -> torch.Tensor:
        out = original(*args)
        copies.append(out.data_ptr())
        return out

    manager.warehouse_as = counting
    x = torch.randn(3, 16, 9, 9)
    with torch.no_grad():
        net(x)
        assert len(copies) == 2 and len(set(copies)) == 1 and manager._layouts is None
        for m in (net, ref):
            m.warehouse_manager.weights[0].data.mul_(-2.0)
        torch.testing.assert_close(net(x), ref(x))
        with pytest.raises(RuntimeError):
            net(torch.randn(3, 7, 9, 9))
        assert manager._layouts is None
        for m in (net, ref):
            m.warehouse_manager.weights[0].data.mul_(0.5)
        torch.testing.assert_close(net.a(x), ref.a(x))  # a layer alone, outside a network forward


def test_analytic_macs_match_the_spec() -> None:
    """Spec §c.5 (224 px): ResNet18 1.814 G; KW 1x 2.199 G of which kernel assembly 0.385 G."""
    from kernelwarehouse.bench import macs_per_image
    from kernelwarehouse.models import create_model

    plain = macs_per_image(create_model("resnet18"), 224)
    kw = macs_per_image(create_model("kw1x_resnet18"), 224)
    assert round(sum(plain.values()) / 1e9, 3) == 1.814
    assert round(sum(kw.values()) / 1e9, 3) == 2.199 and round(kw["assembly"] / 1e9, 3) == 0.385
