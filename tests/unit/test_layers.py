"""The package's layers, read from its source (AST): a module imports only from its own layer or
the layers below, there are no import cycles, and imports inside functions are only for heavy
optional packages (torch and friends, vllm, the together SDK), directly or through a tuneop module
that imports one at module level.

Layers, bottom to top (docs/ARCHITECTURE.md):
  api        the resource models (the CRDs are generated from them)
  pure       libraries with no cluster I/O: datasets, archives, job config, pod causes, defaults,
             manifests, and the code that runs inside pods (trainer, the vLLM guard and fetcher)
  decide     each resource's builders and reducer (finetunejob/, adapterdeployment/): dict in, dict out
  edge       the Kubernetes client and the metrics
  backends   FineTuneJob backends (tuneop.backends.*: protocol, kubernetes, together)
  glue       each resource's kopf handlers, the operator process (handlers/), the local vLLM runner
  cli        the command line
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2] / "operator"
PACKAGE = ROOT / "tuneop"
HEAVY = {"torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "liger_kernel", "accelerate",
         "together", "httpx", "vllm", "zstandard", "celpy", "jsonschema", "tqdm",
         "mlflow", "wandb"}
# Optional where a module runs: the guard is shipped into any vLLM image and needs only the standard library.
OPTIONAL_IN = {"tuneop.serving.guard": {"prometheus_client"}}
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("api", ("tuneop.api",)),
    ("pure", ("tuneop.dataset", "tuneop.cost", "tuneop.archive", "tuneop.jobconfig", "tuneop.podcauses", "tuneop.workload_defaults",
              "tuneop.manifests", "tuneop.quickstart", "tuneop.objects", "tuneop.trainer", "tuneop.serving.guard",
              "tuneop.s3", "tuneop.files",
              "tuneop.serving.fetch", "tuneop.serving.client")),
    ("decide", ("tuneop.finetunejob.builders", "tuneop.finetunejob.reconcile", "tuneop.finetunejob.gang",
                "tuneop.finetunejob.startfrom", "tuneop.adapterdeployment.builders",
                "tuneop.adapterdeployment.reconcile", "tuneop.adapterdeployment.basemodel",
                "tuneop.adapterdeployment.vllm", "tuneop.adapterdeployment.servingdefaults")),
    ("edge", ("tuneop.kube", "tuneop.metrics")),
    ("backends", ("tuneop.backends",)),
    ("glue", ("tuneop.glue", "tuneop.finetunejob.handlers", "tuneop.adapterdeployment.handlers", "tuneop.handlers",
              "tuneop.serving.local")),
    ("cli", ("tuneop.cli",)),
]
# Code that runs inside pods (training, upload/download, the vLLM guard and fetcher) imports nothing
# of the operator's side: no kopf, no Kubernetes client, no handlers.
POD_CODE = ("tuneop.trainer", "tuneop.serving.guard", "tuneop.serving.fetch", "tuneop.backends.together.pod", "tuneop.s3",
            "tuneop.files")
OPERATOR_SIDE = ("kopf", "tuneop.kube", "tuneop.handlers", "tuneop.glue", "tuneop.finetunejob.handlers",
                 "tuneop.adapterdeployment.handlers", "tuneop.backends.together.handlers", "tuneop.metrics")
UNLAYERED = {"tuneop", "tuneop.serving", "tuneop.finetunejob", "tuneop.adapterdeployment"}  # bare packages


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> Optional[int]:
    best: Optional[tuple[int, int]] = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    return None if best is None else best[0]


def imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement loads (tuneop ones resolved; `from pkg import mod` -> pkg.mod)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in MODULES]
    return subs or [name]


@functools.cache
def imports_of(module: str) -> tuple[list[str], list[tuple[int, str]]]:
    """(module-level imports, [(line, name)] of imports inside functions); TYPE_CHECKING blocks skipped."""
    tree = ast.parse(MODULES[module].read_text())
    top: list[str] = []
    nested: list[tuple[int, str]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in imported(module, child):
                    (nested.append((child.lineno, name)) if in_function else top.append(name))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return top, nested


def edges(module: str) -> list[str]:
    """The tuneop modules `module` loads directly: each import and the __init__ of every package
    above it (importing a.b.c runs a/__init__ and a/b/__init__), except `module`'s own packages."""
    out: list[str] = []
    for name in imports_of(module)[0]:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            target = ".".join(parts[:i])
            if target in MODULES and not (module == target or module.startswith(target + ".")):
                out.append(target)
    return list(dict.fromkeys(out))


GRAPH = {m: edges(m) for m in MODULES}


def imports_heavy(module: str) -> bool:
    return any(n.split(".")[0] in HEAVY for n in imports_of(module)[0])


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if m not in UNLAYERED and layer_of(m) is None] == []


def test_no_import_goes_up_a_layer() -> None:
    bad = []
    for m, targets in GRAPH.items():
        lm = layer_of(m)
        for t in targets:
            lt = layer_of(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{m} ({LAYERS[lm][0]}) imports {t} ({LAYERS[lt][0]})")
    assert bad == []


def test_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_inside_functions_are_only_for_heavy_optional_packages() -> None:
    bad = []
    for m in MODULES:
        for line, name in imports_of(m)[1]:
            heavy = (name.split(".")[0] in HEAVY | OPTIONAL_IN.get(m, set())
                     or (name in MODULES and imports_heavy(name)))
            if not heavy:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {name}")
    assert bad == []


def loaded_by(module: str) -> set[str]:
    """Every tuneop module importing `module` runs (module-level imports, transitively, with the
    __init__ of every package on the way)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES)
        todo.extend(GRAPH.get(m, []))
    return seen


def test_code_that_runs_in_pods_loads_nothing_of_the_operator() -> None:
    bad = []
    for m in MODULES:
        if not any(m == p or m.startswith(p + ".") for p in POD_CODE):
            continue
        for loaded in sorted(loaded_by(m)):
            names = [loaded, *imports_of(loaded)[0]]
            hits = [n for n in names if any(n == o or n.startswith(o + ".") for o in OPERATOR_SIDE)]
            if hits:
                bad.append(f"{m} loads {loaded}, which is or imports {hits}")
    assert bad == []
