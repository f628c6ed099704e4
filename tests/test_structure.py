"""The package's shape: no import cycle, the public API, the README's Python API example."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
from tiny_models import tiny_student

import clipdistill_jax

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clipdistill_jax"


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports, at any depth of its code (imports inside
  functions count: they run too)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the package, up level - 1
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                          + ([base] if base else []))
        # `from a import b` imports a.b where b is a module, else a
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                   for alias in node.names]
      else:
        continue
      edges.update(t for t in targets if t in modules and t != name)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert "clipdistill_jax.run_builder" in graph["clipdistill_jax.train"]
  assert "clipdistill_jax.run_builder" in graph["clipdistill_jax.teacher_cache"]
  # The reader needs the cache's format, not its writer (which builds the teacher).
  assert "clipdistill_jax.teacher_cache" not in graph["clipdistill_jax.teacher_cache_reader"]
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_every_public_name_imports():
  assert set(clipdistill_jax.__all__) >= {
      "CLIPModel", "CLIPConfig", "load_pretrained", "save_pretrained", "load_tokenizer",
      "preprocess_images", "run_train", "run_experiment", "run_ablation"}
  for name in clipdistill_jax.__all__:
    assert getattr(clipdistill_jax, name) is not None, name
  from clipdistill_jax import train
  assert clipdistill_jax.run_train is train.train  # the module keeps its name


def test_importing_the_package_stays_light():
  probe = ("import sys, clipdistill_jax; print(sorted(m for m in ('jax', 'tensorflow', "
           "'torch', 'flax', 'transformers') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


def test_readme_python_api_example_runs(tmp_path, capsys):
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index("## Python API"):readme.index("## Layout")]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert len(code.strip().splitlines()) <= 12
  config, params = tiny_student(eos_token_id=2)
  clipdistill_jax.save_pretrained(config, params, tmp_path / "student")
  PIL.Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(tmp_path / "cat.jpg")
  code = code.replace('"openai/clip-vit-base-patch32"', repr(str(tmp_path / "student")))
  code = code.replace('"cat.jpg"', repr(str(tmp_path / "cat.jpg")))
  exec(compile(code, "README.md", "exec"), {})
  assert capsys.readouterr().out.strip() in ("cat", "dog", "car")


def test_no_module_exports_what_another_defines():
  """No re-export shims: a `noqa: F401` import is a name passed through for others."""
  shims = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
           if "noqa: F401" in p.read_text() and p.name != "__init__.py"]
  assert shims == [], shims
  assert not os.path.exists(PACKAGE / "evaluate.py")


def test_no_module_is_over_500_lines():
  long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > 500}
  assert long == {}, long
