"""The shape of the house, read from the source: imports run one way (no circle, counting imports
inside functions), no module imports another's private names, and inference never loads the
training engine."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "framework")
# what serves inference: loading an export, sampling, guidance, the frozen encoders
INFERENCE = ["pipeline", "diffusion.sampling", "diffusion.process", "models.unet", "models.text", "models.vae",
             "weights", "images", "models.classifier"]


def modules() -> dict[str, str]:
    """dotted name (relative to framework) -> file, packages included."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), PKG)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def imports() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> framework modules it imports anywhere (module level or inside functions), and the
    (module, source, name) of every private name imported from another module."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []

    def resolve(m: str, node: ast.ImportFrom) -> str:
        if node.level:
            base = m.split(".")
            is_pkg = mods[m].endswith("__init__.py")
            base = base if is_pkg else base[:-1]
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            return ".".join(base + ([node.module] if node.module else []))
        return node.module[len("framework."):] if node.module.startswith("framework.") else ""

    for m, path in mods.items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("framework")):
                src = resolve(m, node)
                for a in node.names:
                    full = f"{src}.{a.name}" if src else a.name
                    target = full if full in mods else src
                    if target in mods and target != m:
                        edges[m].add(target)
                    if a.name.startswith("_") and target not in (m,):
                        private.append((m, src, a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("framework.") and a.name[len("framework."):] in mods:
                        edges[m].add(a.name[len("framework."):])
    return edges, private


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for t in edges.get(m, ()):
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def test_no_import_circle():
    edges, _ = imports()
    circles = sorted(m for m in edges if m in closure(edges, m))
    assert not circles, {m: sorted(edges[m]) for m in circles}


def test_no_private_name_crosses_modules():
    _, private = imports()
    assert private == []


def test_inference_does_not_reach_the_training_engine():
    edges, _ = imports()
    for m in INFERENCE:
        reach = closure(edges, m)
        assert "train.engine" not in reach, f"{m} reaches the training engine through {sorted(reach)}"
    # and at run time: loading the inference modules loads neither the engine nor deepspeed
    code = ("import sys\nimport framework.pipeline, framework.export, framework.models.classifier\n"
            "bad = [m for m in ('framework.train.engine', 'deepspeed') if m in sys.modules]\n"
            "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-2000:]


def test_the_checker_sees_a_circle(tmp_path, monkeypatch):
    """The control: a function-level import that closes a circle is found."""
    edges, _ = imports()
    edges = {m: set(t) for m, t in edges.items()}
    edges["diffusion.process"].add("train.engine")
    assert "diffusion.process" in closure(edges, "diffusion.process")


def test_one_home_for_the_shard_format():
    """The reader and the writer share the format module and do not import each other."""
    edges, _ = imports()
    assert "data.shards" not in closure(edges, "data.loader")
    assert "data.loader" not in closure(edges, "data.shards")
    assert "data.shardformat" in edges["data.loader"] & edges["data.shards"]
