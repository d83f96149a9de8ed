"""ComfyUI's API graph (the `prompt` chunk of its PNGs) as data: its nodes, the links between them, the
plain values they hold, and which sampling node made the saved picture. Nothing in it is run or evaluated.

An API graph is {node id: {"class_type": ..., "inputs": {name: value, or [source node id, output index] for
a link}}}; `pictor.comfy_workflow` reads its node classes for the settings.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable, Iterable
from typing import Any

SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
KIND_WORDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}
# More nodes than any workflow a person builds; a bigger graph is refused before it is walked.
MAX_NODES = 10_000
_SHORT = reprlib.Repr()  # values quoted in messages: a huge or deeply nested one is cut short
_SHORT.maxstring = _SHORT.maxother = 80

Link = tuple[str, int]


class ComfyGraphError(ValueError):
    """A `prompt` chunk that is not a ComfyUI graph with a sampler; the message says what is wrong."""


class ComfyGraph:
    """The nodes of an API graph, and those whose part has been taken or said in a notice (`used`)."""

    def __init__(self, nodes: dict[str, dict[str, Any]]) -> None:
        self.nodes = nodes
        self.used: set[str] = set()
        self._sources: dict[str, list[str]] = {}  # asked for again and again on big graphs
        self._consumers: dict[str, list[str]] | None = None

    def cls(self, node: str) -> str:
        return str(self.nodes[node]["class_type"])

    def inputs(self, node: str) -> dict[str, Any]:
        return self.nodes[node].get("inputs") or {}

    def name(self, node: str) -> str:
        return f"{shortened(self.cls(node))} (node {shortened(node)})"

    def link(self, value: Any) -> Link | None:
        """`value` as a link to a node of the graph, or None for a plain value.

        A link is ComfyUI's: a list of a node id and an output index (its `is_link` takes an int or a float
        index; a whole float such as 0.0 is read as 0). A whole-number node id ([6, 0]) is taken as the id
        "6" too, as hand-written graphs have it."""
        if not (isinstance(value, list) and len(value) == 2 and _is_number(value[1])):
            return None
        if not (isinstance(value[0], str) or _is_int(value[0])):
            return None
        source, output = str(value[0]), value[1]
        if source not in self.nodes:
            raise ComfyGraphError(f"a link leads to node {shortened(source)}, which the graph does not have")
        if isinstance(output, float):
            if not output.is_integer():
                raise ComfyGraphError(
                    f"a link to node {shortened(source)} has output {output!r}, not a whole number"
                )
            output = int(output)
        return source, output

    def sources(self, node: str) -> list[str]:
        """The nodes `node` links to (a dangling link leads nowhere: only links that are read must hold)."""
        found = self._sources.get(node)
        if found is None:
            found = []
            for value in self.inputs(node).values():
                try:
                    ref = self.link(value)
                except ComfyGraphError:
                    continue
                if ref:
                    found.append(ref[0])
            self._sources[node] = found
        return found

    def consumers(self, node: str) -> list[str]:
        """The nodes that link to `node` (the graph's links the other way round, worked out once)."""
        if self._consumers is None:
            self._consumers = {n: [] for n in self.nodes}
            for n in self.nodes:
                for source in self.sources(n):
                    self._consumers[source].append(n)
        return self._consumers[node]

    def upstream(self, starts: Iterable[str]) -> set[str]:
        """Every node the `starts` draw on, through any number of links (a start only where another start,
        or itself through a loop, draws on it): one walk, however many starts."""
        return _walk(starts, self.sources)

    def downstream(self, starts: Iterable[str]) -> set[str]:
        """Every node that draws on one of the `starts`, through any number of links."""
        return _walk(starts, self.consumers)

    def ancestors(self, node: str) -> set[str]:
        """Every node `node` draws on, through any number of links (not `node` itself)."""
        return self.upstream([node]) - {node}  # a damaged graph may loop back

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
    except RecursionError:  # arrays or objects nested thousands deep: no graph is
        raise ComfyGraphError("it is not ComfyUI's graph: its JSON nests too deep to read") from None
    except ValueError as exc:  # a number too long to read (Python's 4,300 digits), which no graph holds
        raise ComfyGraphError(f"it is not ComfyUI's graph: {exc}") from None
    if not isinstance(nodes, dict):
        raise ComfyGraphError(f"it is JSON {type(nodes).__name__}, not ComfyUI's {{node id: node}} graph")
    if len(nodes) > MAX_NODES:
        raise ComfyGraphError(f"it has {len(nodes):,} nodes, more than the {MAX_NODES:,} pictor reads")
    for node_id, node in nodes.items():
        if not (isinstance(node, dict) and isinstance(node.get("class_type"), str)):
            raise ComfyGraphError(f"its node {shortened(node_id)} has no class_type")
        if not isinstance(node.get("inputs", {}), dict):
            raise ComfyGraphError(
                f"its node {shortened(node_id)} ({shortened(node['class_type'])}) has inputs that are not "
                "a mapping"
            )
    return ComfyGraph(nodes)


def final_sampler(graph: ComfyGraph, notices: list[str]) -> tuple[str, list[str]]:
    """The sampling node whose latent became the saved picture, and the nodes that saved it.

    Every saved (else shown) picture's path is followed up to its nearest samplers. The graph does not say
    which of its pictures this file is, so where pictures of several samplers are saved, the last pass (one
    that no other of them feeds) is taken, the first by node id where that leaves several, and a notice
    says so. Each question is one walk over the graph, however many pictures and samplers it has.
    """
    samplers = {n for n in graph.nodes if graph.cls(n) in SAMPLER_CLASSES}
    if not samplers:
        others = sorted({graph.cls(n) for n in graph.nodes if "sampler" in graph.cls(n).lower()})
        held = f"; it has {', '.join(others)}, which pictor does not read" if others else ""
        raise ComfyGraphError(f"it has no sampler node ({', '.join(SAMPLER_CLASSES)}){held}")
    saved = _picture_outputs(graph)
    candidates = _nearest(graph, saved, samplers) or samplers
    fed = _fed_by_another(graph, candidates)
    ordered = sorted(candidates, key=id_order)
    # every one feeding another is a loop (ComfyUI refuses those): the first by node id is taken then
    last = [s for s in ordered if s not in fed] or ordered
    if len(candidates) > 1:
        why = "the last pass" if len(last) == 1 else "of the last passes, the first by node id"
        names = listed([graph.name(s) for s in ordered], "samplers")
        notices.append(
            f"the graph's pictures come from {len(candidates)} samplers ({names}); the settings of "
            f"{graph.name(last[0])} ({why}) are taken"
        )
    made = graph.downstream([last[0]])
    return last[0], [out for out in saved if out in made]


def _picture_outputs(graph: ComfyGraph) -> list[str]:
    """The nodes that save pictures (SaveImage and other savers), else those that show them."""
    with_images = [n for n in graph.nodes if "images" in graph.inputs(n)]
    for word in ("save", "preview"):
        found = [n for n in with_images if word in graph.cls(n).lower()]
        if found:
            return found
    return []


def _nearest(graph: ComfyGraph, starts: list[str], samplers: set[str]) -> set[str]:
    """The samplers reached first going up from any of `starts` (the walk stops at each): one walk."""
    found: set[str] = set()
    seen: set[str] = set()
    todo = [s for start in starts for s in graph.sources(start)]
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


def _fed_by_another(graph: ComfyGraph, candidates: set[str]) -> set[str]:
    """The candidates that feed another candidate (lie upstream of it): one walk up from all of them, each
    node keeping up to two of the candidates it feeds, which tells "another" from a loop back to itself."""
    feeds: dict[str, set[str]] = {}
    todo = [(s, c) for c in candidates for s in graph.sources(c)]
    while todo:
        node, below = todo.pop()
        known = feeds.setdefault(node, set())
        if below in known or len(known) >= 2:
            continue
        known.add(below)
        todo.extend((s, below) for s in graph.sources(node))
    return {c for c in candidates if feeds.get(c, set()) - {c}}


def picture_path(graph: ComfyGraph, sampler: str, saved: list[str]) -> set[str]:
    """The nodes between the sampler and the saved picture: decoding, and whatever changed the picture."""
    before = graph.upstream([sampler]) | {sampler}
    return (graph.upstream(saved) | set(saved)) - before


def _walk(starts: Iterable[str], step: Callable[[str], list[str]]) -> set[str]:
    """Every node reached from the `starts` by `step` (a node's sources, or its consumers), once each."""
    seen: set[str] = set()
    todo = [n for start in starts for n in step(start)]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(step(node))
    return seen


def listed(names: list[str], what: str, most: int = 20) -> str:
    """Names joined with commas; past `most` of them, a count of the rest (a notice stays readable)."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:most])} and {len(names) - most:,} more {what}"


def _as(kind: type, raw: Any, where: str) -> Any:
    if isinstance(raw, float) and not math.isfinite(raw):  # JSON's Infinity and NaN, which ComfyUI reads
        raise ComfyGraphError(f"its {where} is {raw!r}, not a finite number")
    if kind is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        try:
            return float(raw)
        except OverflowError:  # a JSON integer past any float (10**400)
            raise ComfyGraphError(f"its {where} is {_SHORT.repr(raw)}, not a finite number") from None
    if kind is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, kind) and (kind is bool or not isinstance(raw, bool)):
        return raw
    raise ComfyGraphError(f"its {where} is {_SHORT.repr(raw)}, not {KIND_WORDS.get(kind, kind.__name__)}")


def shortened(text: str, most: int = 80) -> str:
    """`text` for a message: a long one cut short."""
    return text if len(text) <= most else f"{text[: most - 3]}..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def id_order(node: str) -> list[tuple[int, int, str]]:
    """Node ids in number order ("9" before "10"; subgraph ids like "12:3" part by part). Digits are
    compared by their length and then as text, so an id of any length orders without becoming a number;
    other parts order as text, after the numbers."""
    key = []
    for part in node.split(":"):
        if part.isascii() and part.isdigit():
            digits = part.lstrip("0")
            key.append((0, len(digits), digits))
        else:
            key.append((1, 0, part))
    return key
