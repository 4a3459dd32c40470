"""Checkpoint conversion and export: official layouts in, our layout and the folded plain student out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.checkpoint import atomic_save
from norm.convert import convert_state_dict, load_student, load_teacher, main
from norm.distiller import NORMDistiller
from norm.models import NORMStudent, create_model


def _official_student_sd(student: NORMStudent, ft_prefix: str = "layer3") -> dict[str, torch.Tensor]:
    """Our student written back in the official key layout, with the official unused tensors."""
    sd = {}
    for k, v in student.state_dict().items():
        k = k.replace("ft.expand.", f"{ft_prefix}1.").replace("ft.contract.", f"{ft_prefix}2.")
        sd["module." + k.removeprefix("net.")] = v
    sd["module.alpha"] = torch.ones(4)
    return sd


def test_official_student_file_folds_to_the_plain_network(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    student = NORMStudent(create_model("resnet20", 100), teacher_channels=64, n=8).eval()
    src = tmp_path / "resnet20_best.pth"
    torch.save({"epoch": 3, "model": _official_student_sd(student), "best_acc": torch.tensor(71.0)}, src)
    loaded = load_student(src, "resnet20", teacher_channels=64)
    assert loaded.ft.n == 8
    dst = tmp_path / "deployed.pt"
    main([str(src), str(dst), "--arch", "resnet20", "--teacher-channels", "64", "--fold"])
    assert "max |logit diff|" in capsys.readouterr().out
    plain = create_model("resnet20", 100).eval()
    saved = torch.load(dst, weights_only=True)
    assert saved["origin"] == "official"  # converted from an official file: evaluations report it as such
    plain.load_state_dict(saved["state_dict"])  # strict: exactly the plain architecture
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), student(x), atol=1e-5, rtol=1e-5)


def test_trained_distiller_checkpoint_exports_merged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = NORMStudent(create_model("vgg8", 10), teacher_channels=512, n=2)
    distiller = NORMDistiller(student, create_model("vgg13", 10))
    atomic_save({"model": distiller.state_dict(), "epoch": 1, "global_step": 5}, tmp_path / "last.pt")  # as the engine
    main([str(tmp_path / "last.pt"), str(tmp_path / "vgg8.pt"), "--arch", "vgg8", "--teacher-channels", "512",
          "--fold"])
    plain = create_model("vgg8", 10).eval()
    saved = torch.load(tmp_path / "vgg8.pt", weights_only=True)
    assert saved["origin"] == "ours"  # one of our runs stays ours after the export
    plain.load_state_dict(saved["state_dict"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), student.eval()(x), atol=1e-5, rtol=1e-5)


def test_repdistiller_teacher_and_mobilenet_v1_key_map(tmp_path: Path) -> None:
    teacher = create_model("resnet32x4", 100)
    torch.save({"model": teacher.state_dict(), "epoch": 240}, tmp_path / "ckpt_epoch_240.pth")
    loaded = load_teacher(tmp_path / "ckpt_epoch_240.pth", "resnet32x4")
    assert not loaded.training
    # official MobileNet-v1 names: model1.0 stem, model1.1-11 / model2.0-1 depthwise-separable blocks, fc
    official = {"model1.0.0.weight": None, "model1.0.1.running_var": None, "model1.1.0.weight": None,
                "model1.11.4.bias": None, "model2.0.3.weight": None, "model2.1.4.weight": None,
                "fc.weight": None, "layer31.0.weight": None}
    ours = list(convert_state_dict(official, "mobilenet_v1", student=True))
    assert ours == ["net.conv_stem.weight", "net.bn1.running_var", "net.blocks.0.0.conv_dw.weight",
                    "net.blocks.3.5.bn2.bias", "net.blocks.4.0.conv_pw.weight", "net.blocks.4.1.bn2.weight",
                    "net.classifier.weight", "ft.expand.0.weight"]
    names = set(create_model("mobilenet_v1", 1000).state_dict())
    assert {k[4:] for k in ours if k.startswith("net.")} <= names


def test_bad_inputs_give_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "o.pt")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        main([str(bad), out, "--arch", "resnet20", "--teacher-channels", "64"])
    assert exc.value.code == 2 and "corrupt" in capsys.readouterr().err
    torch.save({"model": create_model("resnet20", 100).state_dict()}, tmp_path / "plain.pth")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "plain.pth"), out, "--arch", "resnet20", "--teacher-channels", "64"])
    assert "no FT" in capsys.readouterr().err
    student = NORMStudent(create_model("wrn_16_2", 100), teacher_channels=128, n=2)
    torch.save({"model": _official_student_sd(student)}, tmp_path / "wrn.pth")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "wrn.pth"), out, "--arch", "wrn_16_2", "--teacher-channels", "128", "--fold"])
    assert "cannot be folded" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # wrong architecture: the mismatching keys are named
        main([str(tmp_path / "wrn.pth"), out, "--arch", "resnet20", "--teacher-channels", "64"])
    assert "does not fit" in capsys.readouterr().err
