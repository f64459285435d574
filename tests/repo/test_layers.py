"""The package's layers (docs/ARCHITECTURE.md): imports only go down, the import graph has no cycle, and the
module paths of before the layers still import, with a DeprecationWarning naming the new path."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import fastlora
from fastlora._moved import MOVED

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _graph():
    grimp = pytest.importorskip("grimp")
    return grimp.build_graph("fastlora")


def _cycles(graph) -> list[list[str]]:
    """Every cycle of the module graph, one per strongly connected component (Tarjan), as its module list."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
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
            if len(comp) > 1 or v in graph.find_modules_directly_imported_by(v):
                out.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_import_graph_has_no_cycle():
    # the package root re-exports the API: it imports everything and nothing imports it back
    graph = _graph()
    assert "fastlora.ops.lora" in graph.modules and "fastlora.integrations.patching" in graph.modules
    assert _cycles(graph) == []
    importers = sorted(m for m in graph.modules if "fastlora" in graph.find_modules_directly_imported_by(m))
    assert importers == []


def test_a_cycle_is_found():
    # the detector itself: a two-module cycle and a self-import are reported, an acyclic chain is not
    class G:
        modules = {"a", "b", "c", "d"}
        edges = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": set()}

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]
    assert _cycles(G()) == [["a", "b"]]
    G.edges = {"a": {"a"}, "b": set(), "c": set(), "d": set()}
    assert _cycles(G()) == [["a"]]


def test_layers_contract_holds():
    # pyproject's import-linter layers contract, as CI's `lint-imports` runs it
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (it is in the test extra)")
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_layers_contract_catches_an_upward_import(tmp_path):
    # the contract is not vacuous: an ops module importing an nn module breaks it
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (it is in the test extra)")
    pkg = tmp_path / "fastlora"
    shutil.copytree(os.path.join(ROOT, "fastlora"), pkg, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    with open(pkg / "ops" / "lora.py", "a") as f:
        f.write("\nfrom ..nn import lora as _upward  # noqa\n")
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    r = subprocess.run([exe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0 and "fastlora.ops.lora -> fastlora.nn.lora" in r.stdout, r.stdout + r.stderr


def test_old_module_paths_warn_and_resolve():
    # a fresh interpreter, so that each old module is imported for the first time: one warning each, at import
    code = textwrap.dedent("""
        import importlib, warnings
        import fastlora
        from fastlora._moved import MOVED
        for old, news in sorted(MOVED.items()):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                mod = importlib.import_module(old)
            msgs = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]
            assert len(msgs) == 1 and msgs[0].startswith(old + " moved to " + news[0]), (old, msgs)
            for new in news:      # every public name of every new module reads through the old one
                target = importlib.import_module(new)
                for name in [n for n in dir(target) if not n.startswith("__")]:
                    assert getattr(mod, name) is getattr(target, name) or new != news[0], (old, name)
            try:
                mod.no_such_name
            except AttributeError as e:
                assert "moved to" in str(e)
            else:
                raise AssertionError(old + ": no AttributeError")
        print(len(MOVED))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == str(len(MOVED)), r.stdout + r.stderr


def test_old_names_are_the_same_objects():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from fastlora.functional import lora_linear
        from fastlora.patching import patch
        from fastlora.qlora import QLoraLinear
        from fastlora.multi import MultiAdapterModel
        ops_forward = fastlora.ops.forward
    assert lora_linear is fastlora.lora_linear and patch is fastlora.patch
    assert QLoraLinear is fastlora.QLoraLinear and MultiAdapterModel is fastlora.MultiAdapterModel
    assert ops_forward is fastlora.ops.lora.forward
