"""tf2onnx in a fixed order: the same model converts to the same bytes in every process.

tf2onnx 1.17's optimisers walk two collections in their iteration order:
- a tensor's consumers (`Graph.find_output_consumers`), kept in a set of node names: ordered by
  string hash, which PYTHONHASHSEED makes random per process;
- the nodes kept when unused ones are dropped (`Graph.extract_sub_graph_nodes`, after every
  pass), a set of Node objects: ordered by address.
Which Transpose is pushed through first, and which of two equal constants is kept, followed
that order, and with them the counters in every name tf2onnx makes (new_shape__1451 or
new_shape__1450) and even the node count (985 or 987 for the bundled emotion graph): `make
models` wrote another file on each run. Renaming after the conversion cannot mend graphs that
differ in their nodes, so the order is fixed at its source: consumers sorted by node name (names
are unique) and the kept nodes in the graph's own order. Both methods promise no order, so the
graph is the same either way, only its names and the optimisers' choices among equals fixed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def fixed_order() -> Iterator[None]:
    """Within it, tf2onnx's Graph walks consumers and kept nodes in a fixed order (see above);
    tf2onnx is as it was afterwards. A tf2onnx without these methods is left as it is."""
    from tf2onnx.graph import Graph

    consumers = getattr(Graph, "find_output_consumers", None)
    extract = getattr(Graph, "extract_sub_graph_nodes", None)
    if consumers is None or extract is None:
        yield
        return

    def find_output_consumers(self, output_name):
        return sorted(consumers(self, output_name), key=lambda node: node.name)

    def extract_sub_graph_nodes(self, *args, **kwargs):
        kept = set(extract(self, *args, **kwargs))
        ordered = [node for node in self.get_nodes() if node in kept]
        listed = set(ordered)
        return ordered + sorted((node for node in kept if node not in listed), key=lambda node: node.name)

    Graph.find_output_consumers, Graph.extract_sub_graph_nodes = find_output_consumers, extract_sub_graph_nodes
    try:
        yield
    finally:
        Graph.find_output_consumers, Graph.extract_sub_graph_nodes = consumers, extract
