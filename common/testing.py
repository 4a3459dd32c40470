"""Test helpers shared by every paper: fixture discovery for golden tests.

Golden fixtures live in `$OSVAI_FIXTURES` (a directory holding `*.pt` files, or one directory per
paper) or, by default, in `../shared/fixtures/<paper>` next to the repository. A user's clone has no
`../shared`: there the golden tests skip with one line. CI sets `OSVAI_REQUIRE_FIXTURES=1`, and then a
missing fixture directory fails instead of skipping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The `shared/` directory beside the checkout (may not exist)."""
    return REPO_ROOT.parent / "shared"


def fixture_dir(paper: str) -> Path:
    """Where `paper`'s golden fixtures are looked for."""
    env = os.environ.get("OSVAI_FIXTURES")
    if env:
        root = Path(env).expanduser()
        return root / paper if (root / paper).is_dir() else root
    return shared_dir() / "fixtures" / paper


def fixtures_required() -> bool:
    return os.environ.get("OSVAI_REQUIRE_FIXTURES", "") not in ("", "0")


def golden_files(paper: str, pattern: str = "*.pt") -> list[Any]:
    """pytest parameters, one per fixture file of `paper` (sorted); ids are the file names.

    With no fixture directory the single parameter is skipped with a one-line reason, or, when
    `OSVAI_REQUIRE_FIXTURES=1`, fails.
    """
    import pytest

    directory = fixture_dir(paper)
    files = sorted(directory.glob(pattern)) if directory.is_dir() else []
    if files:
        return [pytest.param(f, id=f.name) for f in files]
    reason = f"no golden fixtures for {paper} in {directory} (set OSVAI_FIXTURES to their directory)"
    if fixtures_required():
        # Fails collection, so CI can never pass by skipping.
        raise FileNotFoundError(reason + "; OSVAI_REQUIRE_FIXTURES=1 forbids skipping")
    return [pytest.param(None, id="missing", marks=pytest.mark.skip(reason=reason))]


def shared_data_dir(name: str) -> Path | None:
    """`../shared/data/<name>` when present, else None (tests then skip unless fixtures are required)."""
    path = shared_dir() / "data" / name
    return path if path.is_dir() else None


def require_or_skip(path: Path | None, what: str) -> Path:
    """Return `path`, or skip the calling test (fail under OSVAI_REQUIRE_FIXTURES=1) with one line."""
    import pytest

    if path is not None and path.exists():
        return path
    reason = f"{what} not found (expected beside the checkout in ../shared)"
    if fixtures_required():
        pytest.fail(reason)
    pytest.skip(reason)


# --------------------------------------------------------------------------------------------------
# Golden harness helpers: recorded programs and calls, recorded keys, gradients judged at the model's scale
# --------------------------------------------------------------------------------------------------
GRAD_NOISE = 1e-6  # a reference gradient below this fraction of the model's largest holds only float noise


def gradient_scale(values: Any) -> float:
    """The largest magnitude over a collection of reference gradients (tensors or norms)."""
    import torch

    items = values.values() if isinstance(values, dict) else values
    return max((float(v.abs().max()) if isinstance(v, torch.Tensor) else abs(float(v)) for v in items),
               default=0.0)


def assert_grad_close(ours: Any, ref: Any, name: str, *, scale: float, rel: float, floor: float,
                      rtol: float = 0.0, noise: float = GRAD_NOISE) -> None:
    """A gradient tensor within the fixture README's per-tensor tolerance `atol = rel * max|ref| + floor`.

    A reference whose largest entry is at float-noise level of the model's gradients (`<= noise * scale`;
    mathematically zero, e.g. a BatchNorm bias followed by BatchNorm in train mode) is only float noise in
    both implementations: it is judged with `atol = noise * scale` instead. Every other tensor keeps the
    README tolerance unchanged.
    """
    import torch

    ref_max = float(ref.abs().max()) if ref.numel() else 0.0
    atol = rel * ref_max + floor
    if ref_max <= noise * scale:
        atol = max(atol, noise * scale)
    ours = torch.zeros_like(ref) if ours is None else ours.detach().reshape(ref.shape).to(ref.dtype)
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, msg=lambda m: f"gradient {name}: {m}")


def assert_norm_close(ours: float, ref: float, name: str, *, scale: float, rel: float, floor: float,
                      noise: float = GRAD_NOISE) -> None:
    """A gradient norm (or sum) within `max(rel * |ref|, floor)` (pytest.approx's rule), or at noise level of
    the model's gradients (`noise * scale`) when the reference is."""
    tol = max(rel * abs(ref), floor)
    if abs(ref) <= noise * scale:
        tol = max(tol, noise * scale)
    assert abs(ours - ref) <= tol, f"{name}: ours {ours:.6g} vs reference {ref:.6g} (tolerance {tol:.3g})"


def recorded_temperature(key: str, entry: Any = None) -> float:
    """The temperature an output block was recorded at: its own `temperature` entry, else the key's suffix
    (`eval_tau0` -> 0, `eval_tau05` -> 0.5, `eval_tau0.25` / `eval_tau0_25` / `T=1.0` -> the number)."""
    import re

    if isinstance(entry, dict) and "temperature" in entry:
        return float(entry["temperature"])
    m = re.search(r"(?:tau|T=?)(\d+(?:[._p]\d+)?)$", key)
    if m is None:
        raise ValueError(f"{key}: no temperature recorded in the key or the block")
    text = re.sub(r"[_p]", ".", m.group(1))
    if "." not in text and len(text) > 1 and text.startswith("0"):
        text = "0." + text[1:]  # eval_tau05: the dot of 0.5 is dropped in key names
    return float(text)


def _strip_note(text: str) -> str:
    """Longest prefix of `text` that parses as a Python expression (drops a trailing note)."""
    import ast

    text = text.strip()
    for end in range(len(text), 0, -1):
        candidate = text[:end].rstrip()
        if not candidate or candidate[-1] in "+-*/,(=":
            continue
        try:
            ast.parse(candidate, mode="eval")
        except SyntaxError:
            continue
        return candidate
    raise ValueError(f"cannot parse {text!r} as an expression")


def parse_call(text: str) -> tuple[str, list[Any], dict[str, Any]]:
    """A recorded builder call, e.g. ``'models/x.py: kw_mobilenetv2_050(num_classes=10, ...) ; notes'``
    -> (name, positional args, keyword args). A leading `file:` and any trailing note are ignored."""
    import ast
    import re

    m = re.search(r"[A-Za-z_][\w.]*\s*\(", text)
    if m is None:
        raise ValueError(f"no call in {text!r}")
    depth, end = 0, None
    for i in range(m.end() - 1, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            end = i + 1
            break
    if end is None:
        raise ValueError(f"unbalanced call in {text!r}")
    node = ast.parse(text[m.start():end], mode="eval").body
    assert isinstance(node, ast.Call)
    name = ast.unparse(node.func).rsplit(".", 1)[-1]
    return (name, [ast.literal_eval(a) for a in node.args],
            {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None})


def _program_ops() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    def spatial(t: Any) -> tuple[int, ...]:
        return tuple(range(2, t.dim()))

    return {
        # elementwise
        "relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "sigmoid": torch.sigmoid,
        "tanh": torch.tanh, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "leaky_relu": F.leaky_relu,
        "elu": F.elu, "softplus": F.softplus, "exp": torch.exp, "abs": torch.abs, "neg": torch.neg,
        "sqrt": torch.sqrt, "identity": lambda t: t, "softmax": lambda t, dim=-1: t.softmax(dim),
        "log_softmax": lambda t, dim=-1: t.log_softmax(dim), "dropout": lambda t, *a, **k: t,
        # pooling and reductions
        "mean_HW": lambda t: t.mean(dim=spatial(t)), "mean_hw": lambda t: t.mean(dim=spatial(t)),
        "gap": lambda t: t.mean(dim=spatial(t)), "global_avg_pool": lambda t: t.mean(dim=spatial(t)),
        "max_HW": lambda t: t.amax(dim=spatial(t)), "sum_HW": lambda t: t.sum(dim=spatial(t)),
        "mean": torch.mean, "sum": torch.sum, "amax": torch.amax, "max": torch.amax,
        "avg_pool2d": F.avg_pool2d, "max_pool2d": F.max_pool2d, "avg_pool1d": F.avg_pool1d,
        "max_pool1d": F.max_pool1d, "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
        "adaptive_max_pool2d": F.adaptive_max_pool2d, "adaptive_avg_pool1d": F.adaptive_avg_pool1d,
        # reshapes and joins
        "flatten": torch.flatten, "reshape": torch.reshape, "view": lambda t, *s: t.reshape(*s),
        "transpose": torch.transpose, "permute": lambda t, *d: t.permute(*d), "squeeze": torch.squeeze,
        "unsqueeze": torch.unsqueeze, "cat": torch.cat, "concat": torch.cat, "stack": torch.stack,
        "add": torch.add, "mul": torch.mul, "matmul": torch.matmul,
        # losses a recorded train step may name
        "cross_entropy": F.cross_entropy, "mse_loss": F.mse_loss, "l1_loss": F.l1_loss,
    }


_TENSOR_METHODS = {"flatten", "reshape", "view", "transpose", "permute", "mean", "sum", "amax", "squeeze",
                   "unsqueeze", "relu", "sigmoid", "tanh", "softmax", "log_softmax", "t", "contiguous", "abs",
                   "exp", "pow", "sqrt", "max", "min"}


def evaluate_expression(text: str, env: dict[str, Any]) -> Any:
    """Evaluate one recorded expression (names from `env` and the known operations; no Python builtins,
    attributes only as whitelisted tensor methods). `name_{H,W}` is read as `name_HW`."""
    import ast
    import operator
    import re

    ops = {**_program_ops(), **env}
    text = re.sub(r"(\w+)_\{([\w\s,]+)\}", lambda m: m.group(1) + "_" + re.sub(r"[\s,]", "", m.group(2)), text)
    binary = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.MatMult: operator.matmul, ast.Pow: operator.pow, ast.FloorDiv: operator.floordiv}
    unary = {ast.USub: operator.neg, ast.UAdd: operator.pos}

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in ops:
                raise KeyError(f"recorded program names {node.id!r}, which is neither a value nor a known operation")
            return ops[node.id]
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.BinOp) and type(node.op) in binary:
            return binary[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in unary:
            return unary[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Subscript):
            return ev(node.value)[ev(node.slice)]
        if isinstance(node, ast.Slice):
            return slice(*(None if p is None else ev(p) for p in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.Call):
            kwargs = {k.arg: ev(k.value) for k in node.keywords if k.arg is not None}
            args = [ev(a) for a in node.args]
            if isinstance(node.func, ast.Attribute):
                if node.func.attr not in _TENSOR_METHODS:
                    raise ValueError(f"recorded program calls .{node.func.attr}(), not a known tensor method")
                return getattr(ev(node.func.value), node.func.attr)(*args, **kwargs)
            return ev(node.func)(*args, **kwargs)
        raise ValueError(f"unsupported syntax in a recorded program: {ast.dump(node)[:80]}")

    return ev(ast.parse(_strip_note(text), mode="eval"))


def run_program(program: str, env: dict[str, Any]) -> dict[str, Any]:
    """Run a recorded forward program such as ``h1=relu(conv_a(x)); out=head(mean_{H,W}(h3))``.

    Statements are separated by `;` or new lines; `#` comments and segments that are not assignments
    (notes) are skipped, a trailing note after an expression is dropped. Returns `env` with every
    assigned name; the program must assign `out`.
    """
    import re

    env = dict(env)
    lines = [line.split("#", 1)[0] for line in program.splitlines()]
    for segment in ";".join(lines).split(";"):
        m = re.match(r"\s*([A-Za-z_]\w*)\s*=(?!=)(.*)$", segment)
        if m is None:
            continue  # a note
        env[m.group(1)] = evaluate_expression(m.group(2), env)
    if "out" not in env:
        raise ValueError(f"the recorded program assigns no 'out': {program!r}")
    return env


def sigterm_then_resume(module: str, args: list[str], run_dir: Path, resume_args: tuple[str, ...] = (),
                        timeout: float = 600) -> tuple[str, str]:
    """The SIGTERM contract of a train entry point, as every paper's `sigterm` test checks it.

    Start `python -m <module> <args>` (its `hydra.run.dir` must be `run_dir`), send SIGTERM once it has
    logged a step, and require exit code 143 with a `last.pt` and no `result.json`; then run it again with
    `trainer.resume=auto` (plus `resume_args`) and require that it finishes with a `result.json`.
    Returns the two runs' combined outputs.
    """
    import signal
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "OSVAI_TRACEBACK"}
    env |= {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    first, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 143, first[-3000:]
    assert (run_dir / "last.pt").is_file() and not (run_dir / "result.json").exists(), first[-3000:]
    done = subprocess.run([*cmd, "trainer.resume=auto", *resume_args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    second = done.stdout + done.stderr
    assert done.returncode == 0, second[-3000:]
    assert "resumed from" in second and (run_dir / "result.json").is_file(), second[-3000:]
    return first, second
