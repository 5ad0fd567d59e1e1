"""The one-way data flow as a rule: modules import only from their own layer or below.

files -> Sample -> Prepared -> features -> branch maps -> fused map -> metrics / report.
"""
import ast
from pathlib import Path

import cmad

ROOT = Path(cmad.__file__).parent
# a layer may import itself and any layer with a lower number
LAYERS = {
    "base": 0,       # errors, types, configs, cache, runtime, progress, executor, stages
    "data": 1,
    "synth": 2,
    "features": 2,
    "model": 3,
    "metrics": 3,
    "pipeline": 4,
    "evaluate": 4,
    "predict_io": 5,
    "export": 5,
    "report": 5,
    "bench": 6,
    "costcurve": 7,
    "serve": 6,
    "cli": 8,
}
BASE = {"errors", "types", "configs", "cache", "runtime", "progress", "executor", "stages",
        "__init__"}


def _layer(module: str) -> str:
    """`cmad.a.b` -> the layer name of `a`."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    return "base" if head in BASE else head


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("cmad")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("cmad"):
                out.append(node.module)
    return out


def test_every_module_belongs_to_a_layer():
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        layer = _layer(".".join(rel.parts))
        assert layer in LAYERS, f"{path}: no layer for {layer!r}; add it to LAYERS"


def test_imports_never_reach_back_up_the_chain():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        me = _layer(".".join(rel.parts))
        for mod in _imports(path):
            them = _layer(mod)
            if them != me and LAYERS[them] >= LAYERS[me]:
                bad.append(f"{rel}: imports {mod} ({them} is not below {me})")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_backward_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from cmad.report import write_report\nimport numpy\n")
    assert _imports(f) == ["cmad.report"]
    assert LAYERS[_layer("cmad.report")] > LAYERS["features"]
