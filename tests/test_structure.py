"""The repository's shape: imports point down the layers, tensorflow stays in data/, and no
file points outside the repository."""

import ast
import os
import re

from conftest import REPO

PACKAGE = os.path.join(REPO, "xmodal_jax")
# What each package may import from xmodal_jax (docs/architecture.md, "Layers"). train/
# and eval/ get their data through a data.source.Source that the experiment hands them.
# The top-level modules (schema, experiment) assemble the layers and may import any.
ALLOWED = {
    "parallel": {"parallel"},
    "models": {"models"},
    "losses": {"losses", "parallel"},
    "pretrained": {"pretrained", "models", "tokenizers"},
    "data": {"data", "tokenizers", "files"},
    "eval": {"eval", "parallel", "models", "files"},
    "train": {"train", "eval", "losses", "models", "pretrained", "parallel", "files"},
    "serve": {"serve", "eval", "models", "files"},
}
TOP_LEVEL = {"schema", "experiment", "tokenizers", "files"}
MAX_LINES = 350


def python_files(root):
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        yield os.path.join(folder, name)


def imported_modules(path):
  """Every module `path` imports, at any depth (function-level imports too)."""
  tree = ast.parse(open(path).read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_every_package_imports_only_its_own_layer_and_those_below():
  wrong = []
  for path in python_files(PACKAGE):
    package = os.path.relpath(path, PACKAGE).split(os.sep)[0]
    if package not in ALLOWED:
      continue
    for module in imported_modules(path):
      parts = module.split(".")
      if parts[0] == "xmodal_jax" and len(parts) > 1 and parts[1] in set(ALLOWED) | TOP_LEVEL:
        if parts[1] not in ALLOWED[package]:
          wrong.append(f"{os.path.relpath(path, REPO)} imports {module}")
      if parts[0] == "tensorflow" and package != "data":
        wrong.append(f"{os.path.relpath(path, REPO)} imports tensorflow outside data/")
  assert not wrong, "\n".join(sorted(set(wrong)))


def test_no_module_is_longer_than_a_reader_takes_in_at_once():
  long = [f"{os.path.relpath(path, REPO)}: {n} lines" for path in python_files(PACKAGE)
          if (n := len(open(path).read().splitlines())) > MAX_LINES]
  assert not long, "\n".join(long)


def test_no_module_imports_itself_back():
  """The package's import graph (every import, at any depth) has no cycle."""
  graph = {}
  for path in python_files(PACKAGE):
    name = "xmodal_jax." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
    name = name.removesuffix(".__init__")
    graph[name] = set(imported_modules(path))
  modules = set(graph)
  # `from a.b import c` names module a.b.c when there is one, else a.b (c is an attribute).
  graph = {n: {m for m in deps if m in modules and m != n
               and not any(d.startswith(m + ".") and d in modules for d in deps)}
           for n, deps in graph.items()}
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for dep in graph[node]:
      if state.get(dep) == "open":
        cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
        raise AssertionError(" -> ".join(cycle))
      if dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"
  for node in sorted(graph):
    if node not in state:
      visit(node, [node])


def test_no_file_points_outside_the_repository():
  pattern = re.compile(r"\.\./shared|DESIGN\.md|METHODS\.md|issue \d+ note")
  found = []
  for folder in ("xmodal_jax", "configs", "launch", "tests", "benchmarks", "docs", ".ci"):
    for root, _, files in os.walk(os.path.join(REPO, folder)):
      for name in files:
        if name.endswith((".py", ".md", ".txt", ".ini", ".cfg")) or name == "run":
          path = os.path.join(root, name)
          for number, line in enumerate(open(path, errors="replace"), start=1):
            if pattern.search(line) and path != os.path.abspath(__file__):
              found.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
  for name in ("README.md", "setup.py", "pytest.ini"):
    for number, line in enumerate(open(os.path.join(REPO, name)), start=1):
      if pattern.search(line):
        found.append(f"{name}:{number}: {line.strip()}")
  assert not found, "\n".join(found)


def test_docs_pages_that_code_points_to_exist():
  """Every `docs/NAME.md` named in the code or README exists, with each "section" quoted
  beside it (docs/methods.md, "Pairs") as a heading there."""
  reference = re.compile(r'docs/([\w-]+\.md)(?:,\s*"([^"]+)")?')
  missing = []
  paths = list(python_files(REPO)) + [os.path.join(REPO, "README.md")]
  for path in paths:
    if (os.sep + ".venv" in path or os.sep + "build" + os.sep in path
        or path == os.path.abspath(__file__)):
      continue
    text = open(path, errors="replace").read().replace("\n", " ")
    for page, section in reference.findall(re.sub(r'"""|#\s*|\s+', " ", text)):
      page_path = os.path.join(REPO, "docs", page)
      if not os.path.exists(page_path):
        missing.append(f"{os.path.relpath(path, REPO)}: docs/{page}")
      elif section and not re.search(rf"^#+ .*{re.escape(section)}", open(page_path).read(),
                                     re.MULTILINE):
        missing.append(f"{os.path.relpath(path, REPO)}: docs/{page}, section {section!r}")
  assert not missing, "\n".join(sorted(set(missing)))
