"""The package's shape: no import cycles (function-level imports included), the model applied to from outside,
no argparse outside dbrx/cli, one home for each fact, and the HF layout table equal to the model's state dict."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.hf_checkpoint import _expected_shapes

PKG = Path(__file__).resolve().parent.parent / "dbrx"


def _modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the package."""
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The dbrx modules that module `name` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import mod` imports the submodule; `from mod import name` the module itself
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read_correctly():
    g = _graph()
    assert "dbrx.hf_checkpoint" in g["dbrx.model"]  # a function-level import counts
    assert {"dbrx.config", "dbrx.fsutil", "dbrx.devices"} <= g["dbrx.hf_checkpoint"]
    assert "dbrx.train.train_checkpoint" in g["dbrx.train.trainer"]  # `from . import train_checkpoint`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the detector works


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_what_may_import_what():
    g = _graph()
    assert not {m for m in g["dbrx.model"] if m.startswith(("dbrx.parallel", "dbrx.train", "dbrx.cli"))}
    assert "dbrx.model" not in g["dbrx.hf_checkpoint"]
    for leaf in ("dbrx.tokens", "dbrx.devices", "dbrx.fsutil", "dbrx.compat"):
        assert g[leaf] == set(), leaf
    importers_of_cli = [m for m, deps in g.items() if not m.startswith(("dbrx.cli", "dbrx.__main__")) and
                        any(d.startswith("dbrx.cli") for d in deps)]
    assert importers_of_cli == []


def test_no_argparse_outside_the_cli():
    offenders = [str(f.relative_to(PKG)) for f in PKG.rglob("*.py")
                 if "cli" not in f.relative_to(PKG).parts and re.search(r"\bargparse\b", f.read_text())]
    assert offenders == []


def test_every_package_says_what_it_holds_and_may_import():
    for init in PKG.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and ("import" in doc.lower()), init


def _constant_homes(values: set) -> list[str]:
    """Files whose code (not comments or docstrings) holds one of these numeric constants."""
    return sorted(str(f.relative_to(PKG)) for f in PKG.rglob("*.py")
                  if any(isinstance(n, ast.Constant) and type(n.value) in (int, float) and n.value in values
                         for n in ast.walk(ast.parse(f.read_text()))))


@pytest.mark.parametrize("values, home", [
    ({100257, 100277, 100278, 100279}, "tokens.py"),  # special-token ids
    ({100280, 100352}, "tokens.py"),  # real and padded vocabulary
    ({989e12, 989.0, 756e12, 312e12}, "devices.py"),  # GPU peak FLOP/s
])
def test_one_home_for_each_fact(values, home):
    assert _constant_homes(values) == [home]


def test_one_list_of_activation_checkpointing_modes():
    homes = [str(f.relative_to(PKG)) for f in PKG.rglob("*.py") if re.search(r'"full", "selective"', f.read_text())]
    assert homes == ["parallel/activation_checkpoint.py"]


@pytest.mark.parametrize("preset", ["dbrx-tiny", "dbrx-demo"])
def test_hf_layout_table_matches_the_model(preset):
    cfg = DbrxConfig.from_preset(preset, n_layers=3)
    model = DbrxForCausalLM.from_config(cfg, device="meta")
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == list(_expected_shapes(cfg).items())


def test_flops_formula_matches_the_baseline_tool():
    """The one FLOP formula against ../shared/tools/hf_dbrx_baseline.py's, written out here directly."""
    cfg = DbrxConfig.from_preset("dbrx-132b")
    d, L, V, E, k, F = 6144, 40, 100352, 16, 4, 10752
    attn_params = L * (d * (d + 2 * 8 * 128) + d * d)
    active = attn_params + L * E * d + L * 3 * k * F * d + V * d
    assert cfg.active_matmul_params() == active
    assert cfg.flops_per_token(4096) == 3 * (2 * active + 2 * L * 4096 * d)
    assert torch.tensor(cfg.flops_per_token(4096, training=False)) == 2 * active + 2 * L * 4096 * d
