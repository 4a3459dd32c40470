"""``make reproduce-kernelwarehouse``: run the paper's rows, then print paper vs ours (``common.reproduce``).

    python -m kernelwarehouse.reproduce data.root=/data/imagenet            # every row of paper.yaml (days)
    python -m kernelwarehouse.reproduce data.root=/data/imagenet rows=resnet18,kw1x_resnet18 seeds=0,1
    python -m kernelwarehouse.reproduce                                      # no dataset: the smoke runs
    python -m kernelwarehouse.reproduce dry_run=true                         # the commands, nothing run

With an ImageNet root (``data.root=`` or ``$IMAGENET_ROOT``) each row trains with its full recipe. Without
one, the smoke runs of ``paper.yaml`` train the MobileNetV2 (0.5x) baseline and its KW (1/2x) and KW (4x)
versions on synthetic ImageNet-format JPEG folders (a few CPU minutes). Smoke numbers are labelled as such and
never compared with the paper's. Other ``key=value`` arguments are Hydra overrides passed to every run.
"""

from __future__ import annotations

import sys

from common.errors import cli_guard
from common.reproduce import reproduce

PAPER = "kernelwarehouse"


@cli_guard
def main(argv: list[str] | None = None) -> str:
    return reproduce(PAPER, sys.argv[1:] if argv is None else argv, doc=__doc__ or "")


if __name__ == "__main__":
    main()
