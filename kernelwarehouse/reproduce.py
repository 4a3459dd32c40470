"""``make reproduce-kernelwarehouse``: run the paper's rows, then print paper vs ours.

    python -m kernelwarehouse.reproduce data.root=/data/imagenet            # every row of paper.yaml (days)
    python -m kernelwarehouse.reproduce data.root=/data/imagenet rows=resnet18,kw1x_resnet18
    python -m kernelwarehouse.reproduce                                      # no dataset: the smoke profile

With an ImageNet root (``data.root=`` or ``$IMAGENET_ROOT``) each row trains with its full recipe. Without
one, the smoke profile trains the MobileNetV2 (0.5x) baseline and its KW (1/2x) and KW (4x) versions on
synthetic ImageNet-format JPEG folders (a few CPU minutes; KW MobileNetV2 is the cheapest KW family on CPU
because its kernel-assembly cost is small). Smoke numbers are labelled as such and never compared with the
paper's. Other ``key=value`` arguments are passed to every run as Hydra overrides.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from common.config import compose
from common.errors import UserError, cli_guard
from common.report import paper_report
from kernelwarehouse import train

SMOKE_ROWS = ("mobilenetv2_050", "kw1d2x_mobilenetv2_050", "kw4x_mobilenetv2_050")


def all_rows() -> list[str]:
    data = yaml.safe_load((Path(__file__).parent / "paper.yaml").read_text())
    return [r["id"] for r in data["rows"]]


@cli_guard
def main(argv: list[str] | None = None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    root = os.environ.get("IMAGENET_ROOT")
    rows: list[str] | None = None
    overrides: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"reproduce: expected key=value, got {arg!r}")
        if key == "data.root":
            root = value or None
        elif key == "rows":
            rows = [r for r in value.split(",") if r]
        else:
            overrides.append(arg)
    known = all_rows()
    unknown = [r for r in rows or [] if r not in known]
    if unknown:
        raise UserError(f"reproduce: unknown rows {unknown}; rows are the ids in kernelwarehouse/paper.yaml")
    outputs = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), "outputs")
    if root:
        chosen = rows or known
        extra = [f"data.root={root}"]
    else:
        chosen = rows or list(SMOKE_ROWS)
        extra = ["profile=smoke"]
        print(f"no ImageNet root (data.root=... or $IMAGENET_ROOT): smoke profile on synthetic data, rows {chosen}")
    for row in chosen:
        print(f"=== {row}")
        train.run(compose(train.CONFIG_DIR, [f"experiment={row}", *extra, *overrides]))
    report = paper_report(train.PAPER, outputs)
    print(report)
    return report


if __name__ == "__main__":
    main()
