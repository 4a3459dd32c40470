"""``make reproduce-noah``: run the paper's rows, then print paper vs ours (``common.reproduce``).

    python -m noah.reproduce data.root=/data/imagenet coco_root=/data/coco     # every row (weeks of GPU time)
    python -m noah.reproduce data.root=/data/imagenet rows=mobilenetv2_050,noah_mobilenetv2_050 seeds=0,1,2
    python -m noah.reproduce coco_root=/data/coco rows=coco_resnet101,coco_noah_resnet101 model.pretrained=...
    python -m noah.reproduce                                                     # no dataset: the smoke runs
    python -m noah.reproduce dry_run=true                                        # the commands, nothing run

With an ImageNet root (``data.root=`` or ``$IMAGENET_ROOT``) / a COCO root (``coco_root=`` or ``$COCO_ROOT``)
each row trains with its recipe. Without one, the smoke runs of ``paper.yaml``: a ShuffleNetV2-0.5x host (its
head sees 4x4 positions at 128 px) with the baseline head and with NOAH on synthetic ImageNet-format JPEGs,
then the MS-COCO pair (baseline, NOAH) on a synthetic COCO-format set, each fine-tuned from its own
ImageNet-smoke weights (the pretrained-backbone protocol of spec d.5). The smoke table checks the floors of
issue 10 at the last evaluation: top-1 >= 2x chance, mAP >= 2x the random-score mAP (the mean class
prevalence), and prints the COCO gain NOAH - baseline. Smoke numbers are never compared with the paper's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import OmegaConf

from common.errors import UserError, cli_guard
from common.reproduce import Finished, Plan, reproduce

PAPER = "noah"


def floors(finished: Sequence[Finished]) -> list[dict[str, object]]:
    """Each smoke run's score at the last evaluation against its floor (issue 10, item 8)."""
    rows = []
    for f in finished:
        cfg = OmegaConf.load(f.directory / "config.yaml")
        m = f.metrics
        if "mAP" in m:
            ref = float(m["prevalence"])
            rows.append({"run": f.run.name, "head": cfg.method.head, "metric": "mAP", "value": float(m["mAP"]),
                         "reference": f"prevalence {ref:.1f}", "floor": 2 * ref, "seconds": f.seconds})
        else:
            chance = 100.0 / int(cfg.data.num_classes)
            rows.append({"run": f.run.name, "head": cfg.method.head, "metric": "top1", "value": float(m["top1"]),
                         "reference": f"chance {chance:.1f}", "floor": 2 * chance, "seconds": f.seconds})
    return rows


def summarize(plan: Plan, finished: list[Finished]) -> str:
    """The smoke table (value, floor, pass) and the MS-COCO gain NOAH - baseline; fails if a floor is missed."""
    rows = floors(finished)
    lines = ["| run | head | metric (last eval) | value | random reference | floor (2x) | ok | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r["value"] >= r["floor"]  # type: ignore[operator]
        lines.append(f"| {r['run']} | {r['head']} | {r['metric']} | {r['value']:.2f} | {r['reference']} | "
                     f"{r['floor']:.1f} | {'yes' if ok else 'NO'} | {r['seconds']:.0f} |")
    coco = {r["head"]: r["value"] for r in rows if r["metric"] == "mAP"}
    if {"noah", "baseline"} <= coco.keys():
        lines.append(f"\nMS-COCO-format smoke: mAP gain NOAH - baseline = {coco['noah'] - coco['baseline']:+.2f} "
                     "(smoke; the paper's +3.6 / +1.1 are ResNet101 / ViT-Large on MS-COCO)")
    text = "\n".join(lines)
    missed = [r["run"] for r in rows if r["value"] < r["floor"]]  # type: ignore[operator]
    if missed:
        print(text)
        raise UserError(f"noah.reproduce: smoke runs below their floor: {', '.join(map(str, missed))}")
    return text


@cli_guard
def main(argv: list[str] | None = None) -> str:
    return reproduce(PAPER, sys.argv[1:] if argv is None else argv, doc=__doc__ or "", summarize_smoke=summarize)


if __name__ == "__main__":
    main()
