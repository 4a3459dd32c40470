"""Progressive learning strategy (spec §b.4): grow a trained Ske2Grid network by one UPT+GIT pair.

The child has one more stage than its parent; it is initialised from the parent's (best) state: data BN, every
earlier UPT/GIT pair, all conv blocks and the head are copied; only the newest pair keeps its fresh init. The
earlier pairs are frozen by construction (`Ske2Grid` freezes all but its last stage), so their parameters get
no gradient and no weight decay, and stay bit-identical through the child's training.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from common.errors import UserError
from ske2grid.convert import checkpoint_filter_fn
from ske2grid.ske2grid import Ske2Grid

__all__ = ["front_end", "load_parent", "new_stage_keys", "parent_node_counts"]

_THETA = re.compile(r"^(?P<prefix>(?:.*\.)?)stages\.(?P<s>\d+)\.git\.theta$")
_OFFICIAL_THETA = re.compile(r"^(?:backbone\.)?SGT_stages\.(\d+)\.sgt_trans_mat$")


def front_end(model: nn.Module) -> Ske2Grid:
    """The `Ske2Grid` front end of `model` (the model itself, or its `ske2grid` attribute)."""
    front = model if isinstance(model, Ske2Grid) else getattr(model, "ske2grid", None)
    if not isinstance(front, Ske2Grid):
        raise UserError(f"PLS needs a Ske2Grid network, got {type(model).__name__} (spec §b.4)")
    return front


def new_stage_keys(model: nn.Module) -> list[str]:
    """State-dict keys of `model`'s newest UPT/GIT pair (the only ones a PLS parent may lack)."""
    front = front_end(model)
    prefix = "" if front is model else "ske2grid."
    s = len(front.stages) - 1
    return [f"{prefix}stages.{s}.{name}" for name in front.stages[s].state_dict()]


def parent_node_counts(state: Mapping[str, torch.Tensor]) -> list[int]:
    """Output node count of every stage stored in a state_dict (ours or official), in stage order."""
    found: dict[int, int] = {}
    for key, value in state.items():
        m = _THETA.match(key)
        s = int(m.group("s")) if m else (int(o.group(1)) if (o := _OFFICIAL_THETA.match(key)) else None)
        if s is not None:
            found[s] = int(value.shape[0])
    if sorted(found) != list(range(len(found))):
        raise UserError(f"PLS parent state holds GIT stages {sorted(found)}, not 0..S-1 (spec §b.4)")
    return [found[s] for s in range(len(found))]


def load_parent(child: nn.Module, parent_state: Mapping[str, torch.Tensor], source: str = "PLS parent") -> None:
    """Initialise `child` (S stages) from a parent with S−1 stages (ours or an official state_dict).

    The parent must end exactly where the child's newest stage starts (its grid is `n_{S-1}` nodes); only the
    newest pair's keys may be missing; any other missing, unexpected or mis-shaped key is a one-line error.
    """
    front = front_end(child)
    counts = parent_node_counts(parent_state)
    want = front.node_counts[1:-1]
    if counts != want:
        side = lambda n: f"{int(n ** 0.5)}x{int(n ** 0.5)}"  # noqa: E731
        got = f"{len(counts)} stage(s) ending at {side(counts[-1])}" if counts else "no UPT/GIT stage"
        raise UserError(f"{source} has {got} (node counts {counts}); the child {front.node_counts} needs "
                        f"{len(want)} stage(s) with node counts {want}, i.e. the parent grid "
                        f"{side(want[-1]) if want else '-'} (spec §b.4)")
    state = checkpoint_filter_fn(parent_state, child)
    own = child.state_dict()
    allowed = set(new_stage_keys(child))
    missing = [k for k in own if k not in state and k not in allowed]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and own[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                 if keys]
        raise UserError(f"{source} does not fit the child network ({'; '.join(parts)}); only the newest UPT/GIT "
                        "pair may be missing (spec §b.4)")
    child.load_state_dict({k: v for k, v in state.items()}, strict=False)
