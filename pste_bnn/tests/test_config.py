"""Every experiment composes and validates; the builders and the bad inputs of issue 13 item 11."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from common.config import compose
from common.errors import UserError
from pste_bnn.config import build_student, load_teacher, parse
from pste_bnn.method import SubBitDistiller, distribution_loss, epoch_lr, param_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
ROWS = [r["id"] for r in yaml.safe_load((CONFIGS.parent / "paper.yaml").read_text())["rows"] if r.get("model")]


def test_every_reproducible_row_has_an_experiment() -> None:
    assert sorted(ROWS) == EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name: str) -> None:
    cfg = compose(CONFIGS, [f"experiment={name}"])
    model, method = parse(cfg)
    assert cfg.row == name and cfg.trainer.epochs == 256
    assert cfg.optim.weight_decay == (1e-5 if method.step == 1 else 0.0)
    if method.step == 2:
        with pytest.raises(UserError, match="step-1 checkpoint"):
            build_student(model, method)


def _smoke(tmp_path: Path, overrides: list[str]):
    return compose(CONFIGS, ["profile=smoke", f"output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("variant", ["bnn", "snn", "sparks", "fixed"])
def test_step2_starts_from_step1_checkpoint(tmp_path: Path, variant: str) -> None:
    step1_model, step1_method = parse(_smoke(tmp_path, ["method=step1"]))
    step1 = build_student(step1_model, step1_method)
    ckpt = tmp_path / "step1.pt"
    torch.save({"model": step1.state_dict()}, ckpt)
    model, method = parse(_smoke(tmp_path, [f"method={variant}", f"method.init_checkpoint={ckpt}", "method.tau=3"]))
    student = build_student(model, method)
    for (_, a), (_, b) in zip(step1.binary_convs(), student.binary_convs()):
        assert torch.equal(a.weight, b.weight)
    if variant == "sparks":  # freq init: the most frequent step-1 codewords are the first selection
        from pste_bnn.sparks import frequent_codewords

        conv = student.binary_convs()[0][1]
        conv.eval()
        assert torch.equal(conv.selector.frozen_ids(), frequent_codewords(conv.weight, 8))
    out = SubBitDistiller(student).forward_train(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert set(out[1]) == {"loss_ce"}


def test_bad_config_values_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="method.quantizer"):
        parse(_smoke(tmp_path, ["method.quantizer=ternary", "method.step=2"]))
    with pytest.raises(UserError, match="method.step"):
        parse(_smoke(tmp_path, ["method=sparks", "method.step=1"]))
    with pytest.raises(UserError, match="bogus"):
        parse(_smoke(tmp_path, ["+method.bogus=1"]))
    with pytest.raises(UserError, match="selection"):
        parse(_smoke(tmp_path, ["method=sparks", "method.selection.iters=0"]))
    with pytest.raises(UserError, match="not found"):
        model, method = parse(_smoke(tmp_path, ["method=snn", f"method.init_checkpoint={tmp_path}/none.pt"]))
        build_student(model, method)


def test_teacher_must_be_a_resnet34(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_teacher(tmp_path / "absent.pth")
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="not a torchvision ResNet-34"):
        load_teacher(tmp_path / "r18.pth")
    r34 = torchvision.models.resnet34()
    torch.save(r34.state_dict(), tmp_path / "r34.pth")
    teacher = load_teacher(tmp_path / "r34.pth")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_official_optimiser_groups_and_schedule() -> None:
    from pste_bnn.models import mini_net

    for quantizer, n_groups in (("snn", 2), ("sparks", 3)):
        model = mini_net(quantizer=quantizer, tau=1)
        groups = {g["name"]: g for g in param_groups(model, 1e-3, 1e-5)}
        assert len(groups) == n_groups
        names = {id(p): n for n, p in model.named_parameters()}
        weights = {names[id(p)] for p in groups["weights"]["params"]}
        assert "conv1.weight" in weights and "fc.weight" not in weights
        if quantizer == "snn":
            assert "layer1.0.binary_conv.binarize.patterns" in weights  # 'conv' in its name (d.1)
        else:
            assert groups["selection_logits"]["lr"] == 1e-2 and groups["selection_logits"]["weight_decay"] == 0
    assert epoch_lr(1e-3, 0, 256) == pytest.approx(1e-3 * 255 / 256) and epoch_lr(1e-3, 255, 256) == 0


def test_distribution_loss_is_soft_cross_entropy() -> None:
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    expect = -(t.softmax(1) * s.log_softmax(1)).sum(1).mean()
    assert torch.allclose(distribution_loss(s, t), expect)
