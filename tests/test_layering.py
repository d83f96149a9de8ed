"""The import rules of DESIGN.md, checked on the source: arrows point down (or sideways), and no cycles.

Every `import pictor...` counts, also those inside functions: a lazy import still ties the two modules
together, and only `if TYPE_CHECKING:` blocks are left out because they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# DESIGN.md's layers, top first: `cli`, `serve` -> `pipeline`, `train`, `eval` -> `models`, `flow`,
# `sampling`, `checkpoint`, `provenance`, `data` -> torch. A module may import its own layer or lower ones.
LAYERS: dict[str, int] = {
    # the entry points
    "cli": 3,
    "cli_args": 3,
    "cli_inspect": 3,
    "cli_lora": 3,
    "cli_merge": 3,
    "cli_grid": 3,
    "cli_guidance": 3,
    "cli_preprocess": 3,
    "cli_caption": 3,
    "cli_upscale": 3,
    "cli_preview": 3,
    "cli_options": 3,
    "cli_conditioning_options": 3,
    "cli_pipeline": 3,
    "cli_output": 3,
    "cli_edit": 3,
    "cli_reproduce": 3,
    "cli_eval": 3,
    "cli_convert": 3,
    "cli_serve": 3,
    "serve": 3,
    # what wires the parts together
    "pipeline": 2,
    "pipeline_offload": 2,
    "pipeline_sampling": 2,
    "pipeline_records": 2,
    "pipeline_addons": 2,
    "pipeline_text": 2,
    "edit_resolution": 2,
    "request_resolution": 2,
    "guided_velocity": 2,
    "guided_inputs": 2,
    "picture_runs": 2,
    "grid_runs": 2,
    "loading": 2,
    "reproduce": 2,
    "reproduce_inputs": 2,
    "rerank": 2,
    "train": 2,
    "eval": 2,
    # the parts
    "flow": 1,
    "denoise_tiles": 1,
    "sampling": 1,
    "sampling_steps": 1,
    "sampling_multistep": 1,
    "sampling_deis": 1,
    "sampling_sde": 1,
    "sampling_adams": 1,
    "sampling_lcm": 1,
    "sampling_res": 1,
    "sampling_cfg_pp": 1,
    "sampling_er_sde": 1,
    "sampling_seeds": 1,
    "sampling_sa_solver": 1,
    "sampling_sa_solver_coeffs": 1,
    "sampling_stages": 1,
    "sampling_ancestral": 1,
    "sampling_schedules": 1,
    "checkpoint": 1,
    "convert": 1,
    "bundle_folders": 1,
    "bundle_storage": 1,
    "bundle_defaults": 1,
    "generation_settings": 1,
    "generation_request": 1,
    "guidance_methods": 1,
    "grid_axes": 1,
    "grid_values": 1,
    "prompt_variants": 1,
    "prompt_weights": 1,
    "settings_import": 1,
    "a1111_denoise": 1,
    "imported_settings": 1,
    "comfy_settings_import": 1,
    "comfy_workflow": 1,
    "comfy_graph": 1,
    "comfy_prompt_weights": 1,
    "comfy_passes": 1,
    "comfy_sampling_nodes": 1,
    "comfy_sampler_settings": 1,
    "comfy_upscale_nodes": 1,
    "picture_files": 1,
    "hires": 1,
    "image_grid": 1,
    "flux_files": 1,
    "fill_images": 1,
    "gguf_files": 1,
    "t5_gguf_files": 1,
    "bnb_files": 1,
    "locate": 1,
    "presets": 1,
    "provenance": 1,
    "editing": 1,
    "edit_request": 1,
    "edit_images": 1,
    "record_checks": 1,
    "edit_common": 1,
    "edit_upscale": 1,
    "inpaint_area": 1,
    "edit_blending": 1,
    "latent_preview": 1,
    "prompt_editing": 1,
    "pass_texts": 1,
    "regional_prompts": 1,
    "regional_attention": 1,
    "composable_prompts": 1,
    "noise_variation": 1,
    "lora_files": 1,
    "lora_tools": 1,
    "lora_merge": 1,
    "model_merge": 1,
    "adapter_files": 1,
    "layout_files": 1,
    "reference_files": 1,
    "redux_images": 1,
    "ip_adapter_files": 1,
    "context_images": 1,
    "control_images": 1,
    "edge_maps": 1,
    "depth_maps": 1,
    "captioning": 1,
    "hf_folders": 1,
    "controlnet_files": 1,
    "controlnet_keys": 1,
    "controlnet_writing": 1,
    "controlnet_runs": 1,
    "controlnet_requests": 1,
    "upscaler_files": 1,
    "upscaling": 1,
    "data": 1,
    "notices": 1,
    # pure torch.nn modules: no file I/O, so they import nothing of pictor's outside models/
    "models": 0,
    # The package root holds `__version__`, which every layer may read, and `pictor.load`, a door whose
    # imports run on first use from the caller's side; so it sits below everything and its own lazy
    # imports are not edges (see `module_graph`).
    "pictor": -1,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def group(module: str) -> str:
    """`pictor.models.flux` -> "models", `pictor.cli` -> "cli", `pictor` -> "pictor"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pictor"


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def pictor_imports(path: Path) -> set[str]:
    """Modules of pictor that `path` imports, resolved to the longest existing module name."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from pictor import pipeline` names a module; `from pictor.x import f` names an attribute.
            found.update(f"{target}.{a.name}" for a in node.names)
            found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in found if m.split(".")[0] == "pictor"}


def module_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / "pictor").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        if name == "pictor":
            graph[name] = targets
            continue
        for imported in pictor_imports(path):
            # the longest prefix that is a module of ours: `pictor.flow.interpolate` -> `pictor.flow`
            parts = imported.split(".")
            while parts and ".".join(parts) not in files:
                parts.pop()
            if parts and ".".join(parts) != name:
                targets.add(".".join(parts))
        graph[name] = targets
    return graph


GRAPH = module_graph()


def test_every_module_has_a_layer() -> None:
    unplaced = sorted({group(m) for m in GRAPH} - set(LAYERS))
    assert not unplaced, f"give these a layer in LAYERS: {unplaced}"


def upward_imports(graph: dict[str, set[str]], module: str) -> list[str]:
    return sorted(t for t in graph[module] if LAYERS[group(t)] > LAYERS[group(module)])


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str) -> None:
    # models/ is layer 0, so this is also "models import nothing of pictor's outside models/"
    upward = upward_imports(GRAPH, module)
    assert not upward, f"{module} (layer {LAYERS[group(module)]}) imports from a higher layer: {upward}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        path = [root]
        state[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, sorted(graph.get(nxt, ()))))
                path.append(nxt)
    return None


def test_no_import_cycles() -> None:
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH) or [])}"


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    # The rules above pass on a clean tree; these graphs show they would fail on a broken one.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    broken = {"pictor.models.flux": {"pictor.checkpoint"}, "pictor.checkpoint": set()}
    assert upward_imports(broken, "pictor.models.flux") == ["pictor.checkpoint"]
    # and the graph is read from the source: the CLI's lazy imports of the pipeline are edges
    assert "pictor.pipeline" in GRAPH["pictor.cli"]
