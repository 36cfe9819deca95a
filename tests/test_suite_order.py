"""The suite's own scheduling (tests/conftest.py): heaviest files first, stable within a file and between files of
equal weight, so every xdist worker collects one order and the longest file does not start last."""
from pathlib import Path
from types import SimpleNamespace

from conftest import pytest_collection_modifyitems


def _item(path: str, name: str, cost=None):
    marker = SimpleNamespace(args=(cost,)) if cost is not None else None
    return SimpleNamespace(path=Path(path), name=name, get_closest_marker=lambda n, m=marker: m if n == "cost" else None)


def test_heaviest_file_first_and_order_kept_otherwise():
    items = [_item("a.py", "a1"), _item("a.py", "a2"),
             _item("b.py", "b1"), _item("b.py", "b2", cost=40), _item("b.py", "b3"),
             _item("c.py", "c1"), _item("d.py", "d1", cost=100), _item("e.py", "e1", cost=40)]
    pytest_collection_modifyitems(None, items)
    # d (100) first; b and e (40 each) keep their collection order, b's tests stay together and in order;
    # unmarked files (weight 0) after them, in collection order
    assert [i.name for i in items] == ["d1", "b1", "b2", "b3", "e1", "a1", "a2", "c1"]


def test_the_setup_hands_files_out_in_collection_order(pytestconfig):
    """Without --no-loadscope-reorder, xdist's loadfile would sort files by test count and undo the order."""
    addopts = pytestconfig.getini("addopts")
    assert "--dist" in addopts and addopts[addopts.index("--dist") + 1] == "loadfile"
    assert "--no-loadscope-reorder" in addopts
