"""afdcd.bench refuses bad arguments in one line, before building any network."""

from __future__ import annotations

import pytest

from afdcd.bench import main


@pytest.mark.parametrize("argv,match", [
    (["row=cityscapes_deeplabv3_resnet18_kd"], "choose an afdcd row"),
    (["batch=1", "device=cpu"], "batch=1"),
    (["crop=100,200", "device=cpu"], "multiples of 128"),
])
def test_bench_bad_arguments_are_one_line(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0]
