"""The architecture registry (fastsr/models/registry.py) and the layering of fastsr/models.

Every registered architecture round-trips (build -> state dict -> detect -> the same config; one
whose config is not in its weights is detected as the architecture that holds the same weights),
each architecture name is written once in fastsr/models, and the package's imports form a DAG
with the registry at the bottom and no imports of fastsr modules hidden inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import fastsr
from fastsr.models import registry
from fastsr.models.checkpoint import ModelFileError, build_model, load_model, save_model

MODELS_DIR = Path(registry.__file__).parent
PACKAGE = "fastsr.models"

# Small configs of every registered architecture (without "arch"), covering the branches of each
# detector. A new architecture needs an entry here (test_every_architecture_has_samples).
SAMPLES: dict[str, list[dict]] = {
    "srresnet": [{"scale": 2, "num_blocks": 2, "channels": 8}, {"scale": 8, "num_blocks": 1, "channels": 4,
                                                               "in_channels": 1}],
    "discriminator": [{"channels": 4}, {"in_channels": 1, "channels": 2}],
    "msrresnet": [{"scale": s, "num_blocks": 2, "channels": 8} for s in (2, 3, 4)],
    "peer_srresnet": [{"scale": 2, "num_blocks": 1, "channels": 8, "output": "tanh"}],
    "rrdbnet": [{"scale": s, "num_blocks": 1, "channels": 8, "growth": 4, **extra}
                for s, extra in ((1, {}), (2, {}), (4, {}), (8, {}), (1, {"unshuffle": 1}), (2, {"unshuffle": 1}))],
    "srvggnet_compact": [{"scale": 3, "num_convs": 2, "channels": 8}, {"scale": 4, "num_convs": 1, "channels": 4,
                                                                       "in_channels": 1, "out_channels": 1}],
    "span": [{"scale": 2, "channels": 8}, {"scale": 3, "channels": 4}],
}


def _cases():
    return [pytest.param(name, config, id=f"{name}-{i}") for name, configs in SAMPLES.items()
            for i, config in enumerate(configs)]


def test_every_architecture_has_samples():
    assert sorted(SAMPLES) == registry.names()


@pytest.mark.parametrize(("name", "config"), _cases())
def test_architecture_round_trips_through_its_state_dict(name, config):
    model = build_model({"arch": name, **config})
    assert model.config["arch"] == name
    state = model.state_dict()
    detected = registry.detect(state)
    assert detected is not None, f"{name}: its state dict is detected as no architecture"
    matching = [n for n in registry.names() if registry.get(n).detect(state) is not None]
    if registry.get(name).infer is not None:
        assert detected == model.config
        assert matching == [name], "architecture layouts must be disjoint"
    else:  # its config is not in its weights: detected as the architecture that holds the same weights
        assert len(matching) == 1 and detected["arch"] != name
    build_model(detected).load_state_dict(state, strict=True)


@pytest.mark.parametrize(("name", "config"), _cases())
def test_architecture_round_trips_through_a_model_file(name, config, tmp_path):
    model = build_model({"arch": name, **config})
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_unknown_architecture_is_a_model_file_error_naming_the_known_ones():
    with pytest.raises(ModelFileError, match="unknown architecture 'nope'; known: discriminator, msrresnet, "):
        build_model({"arch": "nope"})
    with pytest.raises(ModelFileError, match="unknown architecture None"):
        build_model({"scale": 4})


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Architecture("srresnet", torch.nn.Identity))
    with pytest.raises(ValueError, match="both keys and infer"):
        registry.Architecture("x", torch.nn.Identity, keys=("a",))


def test_the_registry_is_what_the_public_api_builds():
    assert registry.get("srresnet").builder is fastsr.SRResNet
    assert {registry.get(n).title for n in registry.names()} >= {"SRResNet", "RRDBNet", "SPAN", "SRVGGNetCompact"}


# --- The source of fastsr/models, read with ast ---------------------------------------------------------

def _sources() -> dict[str, ast.Module]:
    """fastsr/models/*.py by module name (the package's __init__ as ``fastsr.models``)."""
    found = {}
    for path in sorted(MODELS_DIR.glob("*.py")):
        module = PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"
        found[module] = ast.parse(path.read_text(), filename=str(path))
    return found


SOURCES = _sources()


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The absolute module names ``node`` (in ``module``) imports; a ``from P import name`` is the
    submodule P.name where that is a file of fastsr/models, else P."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module.split(".") if module == PACKAGE else module.split(".")[:-1]
    base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
    target = ".".join(p for p in (base, node.module or "") if p)
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in SOURCES else target for a in node.names]


def _imports(tree: ast.Module, module: str, *, in_functions: bool) -> set[str]:
    """The fastsr modules imported at module level (``in_functions=False``) or inside functions."""
    found: set[str] = set()

    def visit(node: ast.AST, inside: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and inside == in_functions:
            found.update(m for m in _resolve(module, node) if m == "fastsr" or m.startswith("fastsr."))
        inside = inside or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {t for t in _imports(tree, m, in_functions=False) if t in SOURCES} for m, tree in SOURCES.items()}


def test_models_has_no_import_cycle():
    graph, state = _graph(), {}

    def walk(module: str, path: list[str]) -> None:  # depth-first; meeting an open module is a cycle
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join([*path[path.index(module):], module])
        state[module] = "open"
        for target in sorted(graph[module]):
            walk(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        walk(module, [])


def test_the_registry_is_at_the_bottom_and_loaders_above_the_models():
    graph = _graph()
    assert _imports(SOURCES[f"{PACKAGE}.registry"], f"{PACKAGE}.registry", in_functions=False) <= {"fastsr.errors"}
    loaders = {f"{PACKAGE}.{name}" for name in ("checkpoint", "peers", "ncnn")}
    models = set(SOURCES) - loaders - {PACKAGE, f"{PACKAGE}.registry"}
    assert all(f"{PACKAGE}.registry" in graph[m] for m in models), "each model module registers itself"
    assert not {m: graph[m] & loaders for m in models if graph[m] & loaders}, "a model module imports a loader"
    assert not {m: graph[m] & {PACKAGE} for m in SOURCES if graph[m] & {PACKAGE}}, "a module imports the package"


def test_no_function_level_imports_of_fastsr_modules():
    hidden = {m: sorted(found) for m, tree in SOURCES.items() if (found := _imports(tree, m, in_functions=True))}
    assert not hidden


def test_each_architecture_name_is_written_once():
    counts = dict.fromkeys(registry.names(), 0)
    where: dict[str, list[str]] = {name: [] for name in counts}
    for module, tree in SOURCES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in counts:
                counts[node.value] += 1
                where[node.value].append(f"{module}:{node.lineno}")
    assert {name: where[name] for name, n in counts.items() if n != 1} == {}
