"""ComfyUI's API graph (the `prompt` chunk of its PNGs) as data: its nodes, the links between them, the
plain values they hold, and which sampling node made the saved picture. Nothing in it is run or evaluated.

An API graph is {node id: {"class_type": ..., "inputs": {name: value, or [source node id, output index] for
a link}}}; `pictor.comfy_workflow` reads its node classes for the settings.
"""

from __future__ import annotations

import json
from typing import Any

SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
KIND_WORDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}

Link = tuple[str, int]


class ComfyGraphError(ValueError):
    """A `prompt` chunk that is not a ComfyUI graph with a sampler; the message says what is wrong."""


class ComfyGraph:
    """The nodes of an API graph, and those whose part has been taken or said in a notice (`used`)."""

    def __init__(self, nodes: dict[str, dict[str, Any]]) -> None:
        self.nodes = nodes
        self.used: set[str] = set()
        self._ancestors: dict[str, frozenset[str]] = {}  # asked for again and again on big graphs

    def cls(self, node: str) -> str:
        return str(self.nodes[node]["class_type"])

    def inputs(self, node: str) -> dict[str, Any]:
        return self.nodes[node].get("inputs") or {}

    def name(self, node: str) -> str:
        return f"{self.cls(node)} (node {node})"

    def link(self, value: Any) -> Link | None:
        """`value` as a link to a node of the graph, or None for a plain value."""
        if not (isinstance(value, list) and len(value) == 2 and _is_int(value[1])):
            return None
        if isinstance(value[0], str) or _is_int(value[0]):
            source = str(value[0])
            if source not in self.nodes:
                raise ComfyGraphError(f"a link leads to node {source}, which the graph does not have")
            return source, value[1]
        return None

    def sources(self, node: str) -> list[str]:
        found = []
        for value in self.inputs(node).values():
            try:
                ref = self.link(value)
            except ComfyGraphError:  # a dangling link leads nowhere; only links that are read must hold
                continue
            if ref:
                found.append(ref[0])
        return found

    def ancestors(self, node: str) -> frozenset[str]:
        """Every node `node` draws on, through any number of links (not `node` itself)."""
        if node in self._ancestors:
            return self._ancestors[node]
        seen: set[str] = set()
        todo = self.sources(node)
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(self.sources(current))
        seen.discard(node)  # a damaged graph may loop back
        self._ancestors[node] = frozenset(seen)
        return self._ancestors[node]

    def value(self, node: str, name: str, kind: type, notices: list[str]) -> Any:
        """Input `name` of `node` as a `kind`: as written, or through a link to a node that holds nothing
        but that one value (a primitive: PrimitiveString, a string or seed literal...). None where the
        input is absent, or (with a notice) comes from a node that works something out."""
        raw = self.inputs(node).get(name)
        where = f"{self.name(node)}'s {name}"
        ref = self.link(raw)
        if ref is not None:
            held = list(self.inputs(ref[0]).values())
            if len(held) != 1 or self.link(held[0]) is not None:
                notices.append(
                    f"{where} comes from {self.name(ref[0])}, which is not a plain value: not taken"
                )
                self.used.add(ref[0])  # said here, not again with what is not taken
                return None
            self.used.add(ref[0])
            where, raw = f"{where} (from {self.name(ref[0])})", held[0]
        return None if raw is None else _as(kind, raw, where)

    def follow(self, value: Any) -> Link | None:
        """The node a link input leads to (marked as read), or None where the input is not linked."""
        ref = self.link(value)
        if ref is not None:
            self.used.add(ref[0])
        return ref


def parse_graph(text: str) -> ComfyGraph:
    """The graph of a `prompt` chunk; ComfyGraphError where it is not one."""
    try:
        nodes = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ComfyGraphError(f"it is not valid JSON ({exc})") from None
    if not isinstance(nodes, dict):
        raise ComfyGraphError(f"it is JSON {type(nodes).__name__}, not ComfyUI's {{node id: node}} graph")
    for node_id, node in nodes.items():
        if not (isinstance(node, dict) and isinstance(node.get("class_type"), str)):
            raise ComfyGraphError(f"its node {node_id} has no class_type")
        if not isinstance(node.get("inputs", {}), dict):
            raise ComfyGraphError(
                f"its node {node_id} ({node['class_type']}) has inputs that are not a mapping"
            )
    return ComfyGraph(nodes)


def final_sampler(graph: ComfyGraph, notices: list[str]) -> tuple[str, list[str]]:
    """The sampling node whose latent became the saved picture, and the nodes that saved it.

    Every saved (else shown) picture's path is followed up to its nearest samplers. The graph does not say
    which of its pictures this file is, so where pictures of several samplers are saved, the last pass (one
    that no other of them feeds) is taken, the first by node id where that leaves several, and a notice
    says so.
    """
    samplers = [n for n in graph.nodes if graph.cls(n) in SAMPLER_CLASSES]
    if not samplers:
        others = sorted({graph.cls(n) for n in graph.nodes if "sampler" in graph.cls(n).lower()})
        held = f"; it has {', '.join(others)}, which pictor does not read" if others else ""
        raise ComfyGraphError(f"it has no sampler node ({', '.join(SAMPLER_CLASSES)}){held}")
    saved = _picture_outputs(graph)
    candidates = {s for out in saved for s in _nearest(graph, out, set(samplers))} or set(samplers)
    last = sorted((s for s in candidates if not _feeds_another(graph, s, candidates)), key=id_order)
    if len(candidates) > 1:
        why = "the last pass" if len(last) == 1 else "of the last passes, the first by node id"
        notices.append(
            f"the graph's pictures come from {len(candidates)} samplers "
            f"({', '.join(graph.name(s) for s in sorted(candidates, key=id_order))}); the settings of "
            f"{graph.name(last[0])} ({why}) are taken"
        )
    return last[0], [out for out in saved if last[0] in graph.ancestors(out)]


def _picture_outputs(graph: ComfyGraph) -> list[str]:
    """The nodes that save pictures (SaveImage and other savers), else those that show them."""
    with_images = [n for n in graph.nodes if "images" in graph.inputs(n)]
    for word in ("save", "preview"):
        found = [n for n in with_images if word in graph.cls(n).lower()]
        if found:
            return found
    return []


def _nearest(graph: ComfyGraph, start: str, samplers: set[str]) -> set[str]:
    """The samplers reached first going up from `start` (the search stops at each)."""
    found: set[str] = set()
    seen: set[str] = set()
    todo = graph.sources(start)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in samplers:
            found.add(node)
        else:
            todo.extend(graph.sources(node))
    return found


def _feeds_another(graph: ComfyGraph, sampler: str, candidates: set[str]) -> bool:
    return any(sampler in graph.ancestors(other) for other in candidates if other != sampler)


def picture_path(graph: ComfyGraph, sampler: str, saved: list[str]) -> set[str]:
    """The nodes between the sampler and the saved picture: decoding, and whatever changed the picture."""
    before = graph.ancestors(sampler) | {sampler}
    return {n for out in saved for n in ({out} | graph.ancestors(out))} - before


def _as(kind: type, raw: Any, where: str) -> Any:
    if kind is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    if kind is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, kind) and (kind is bool or not isinstance(raw, bool)):
        return raw
    raise ComfyGraphError(f"its {where} is {raw!r}, not {KIND_WORDS.get(kind, kind.__name__)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def id_order(node: str) -> list[tuple[int, int, str]]:
    """Node ids in number order ("9" before "10"; subgraph ids like "12:3" part by part)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in node.split(":")]
