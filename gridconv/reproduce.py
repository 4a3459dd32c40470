"""``make reproduce-gridconv``: the README rows on Human3.6M, or, without it, the smoke comparison.

    python -m gridconv.reproduce data.root=/data/h36m seeds=0,1,2      # the four README rows, mean +- std
    python -m gridconv.reproduce                                        # synthetic smoke, CPU minutes
    python -m gridconv.reproduce dry_run=true                           # the commands, nothing run

With a Human3.6M root (``data.root=`` or ``$GRIDCONV_H36M_ROOT``) every trainable row of ``paper.yaml`` is
trained with its experiment file and the paper-vs-ours table is printed (mean +- std over seeds). Without
one, the smoke runs of ``paper.yaml`` (spec section i) train, on synthetic poses with 3 px detection-like
noise, an MLP baseline, plain GridConv, and D-GridConv with handcrafted and with learnable (frozen
``standard``) SGT, and print their MPJPE / P-MPJPE. Smoke numbers show that the pipeline learns; they are not
the paper's. The keys are ``common.reproduce``'s; other ``key=value`` arguments are Hydra overrides.
"""

from __future__ import annotations

import sys

from common.config import compose
from common.errors import cli_guard
from common.profiling import count_params
from common.reproduce import Finished, Plan, reproduce, smoke_table

from .models import build_model
from .train import CONFIG_DIR, PAPER, model_kwargs, validate_config


def smoke_summary(plan: Plan, finished: list[Finished]) -> str:
    """MPJPE / P-MPJPE (mean +- std over seeds), the parameter count of each smoke network, the wall time."""
    overrides = {f.run.name: f.run.overrides for f in finished}

    def params(name: str) -> str:
        model_cfg = validate_config(compose(CONFIG_DIR, overrides[name])).model
        return f"{count_params(build_model(model_kwargs(model_cfg))):,}"

    return ("seeds " + ", ".join(map(str, plan.seeds)) + "; synthetic poses, 3 px 2D noise; MPJPE / P-MPJPE in mm\n\n"
            + smoke_table(finished, ["mpjpe", "pmpjpe"], {"params": params}))


@cli_guard
def main(argv: list[str] | None = None) -> str:
    return reproduce(PAPER, sys.argv[1:] if argv is None else argv, doc=__doc__ or "", summarize_smoke=smoke_summary)


if __name__ == "__main__":
    main()
