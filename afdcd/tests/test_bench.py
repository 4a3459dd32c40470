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


@pytest.mark.parametrize("launch,env,kept", [
    (None, {}, "False"),                                  # import afdcd as a library: glibc's default
    (["-m", "afdcd.bench", "crop=128,256"], {}, "True"),  # an entry point keeps large blocks on the heap
    (["-m", "afdcd.train"], {"AFDCD_HEAP": "off"}, "False"),
])
def test_entry_points_keep_large_allocations_on_the_heap(launch: list[str] | None, env: dict[str, str],
                                                         kept: str) -> None:
    """`python -m afdcd.<entry>` applies common.allocator's setting at package import; AFDCD_HEAP=off opts out."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    fake = "" if launch is None else f"import sys; sys.orig_argv = [sys.executable, *{launch!r}]; "
    probe = fake + "import afdcd, common.allocator as a; print(a.heap_kept())"
    run_env = {k: v for k, v in os.environ.items() if k != "AFDCD_HEAP"} | {"PYTHONPATH": str(repo), **env}
    out = subprocess.run([sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == kept

    from afdcd import ENTRY_POINTS

    assert ENTRY_POINTS == {f"afdcd.{m}" for m in ("train", "eval", "bench", "reproduce", "infer")}
