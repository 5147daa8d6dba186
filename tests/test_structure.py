"""The shape of the code: scripts at the top, library modules in utils/, no import cycles."""

import ast

from conftest import ROOT

SCRIPTS = sorted(p.name for p in ROOT.glob("*.py"))
MODULES = {f"utils.{p.stem}": p for p in (ROOT / "utils").glob("*.py") if p.stem != "__init__"}


def imported_modules(path):
    """Every project module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES}
    return found


def test_no_module_imports_itself_back():
    graph = {name: imported_modules(path) - {name} for name, path in MODULES.items()}
    cycles = []

    def visit(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif len(path) < len(graph):
                visit(nxt, path + [nxt])

    for start in graph:
        visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(sorted(set(cycles)))


def test_scripts_at_the_top_library_in_utils():
    assert {"train.py", "generate.py", "report.py"} <= set(SCRIPTS)
    for name, path in MODULES.items():
        assert '__name__ == "__main__"' not in path.read_text(), f"{name} is a script: move it to the top level"


def test_sampler_and_stream_offer_one_train_order_interface():
    """The loop and the checkpointer never ask which one they have."""
    from utils.data import TrainOrder
    from utils.mixture import MixedStreams, MixtureSampler
    from utils.stream import StreamedBlocks

    for cls in (MixtureSampler, StreamedBlocks, MixedStreams):
        for method in ("set_epoch", "position", "start_at"):
            assert callable(getattr(cls, method, None)), f"{cls.__name__} lacks {method}()"
    assert MixtureSampler([10], [None], 4, seed=0).steps_per_epoch == 2
    assert set(TrainOrder.__annotations__) == {"steps_per_epoch", "each_process_reads"}
    assert MixtureSampler.each_process_reads is StreamedBlocks.each_process_reads is False
