"""How pytest-xdist spreads the suite over its workers (`make test`: `-n 3 --dist loadgroup
--no-loadscope-reorder`).

Each worker is a pytest session of its own, so a fixture wider than one test (a tritonserver that
many test modules share, a module's engine, a compiled emulator) is built again in every worker
that runs one of its tests. Tests that share such a fixture, directly or through a chain of them,
therefore get one xdist_group and run in one worker. The session fixtures every test folder uses
(tests/conftest.py's, pytest's own) are cheap or cached and do not tie tests together.
"""
from __future__ import annotations

import warnings

import pytest


def mark_groups(items: list[pytest.Item], everywhere: set[str]) -> None:
    """Mark each item that shares a fixture wider than function scope, other than those defined at
    the node ids in `everywhere`, with xdist_group(one name per set of tests that share them)."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared: dict[pytest.Item, list[str]] = {}
    for item in items:
        keys = [f"{fixture.baseid}::{fixture.argname}" for fixture in used_fixtures(item)
                if fixture.scope != "function" and fixture.baseid not in everywhere]
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
        shared[item] = keys
    for item, keys in shared.items():
        if keys:
            item.add_marker(pytest.mark.xdist_group(root(keys[0])))


def used_fixtures(item: pytest.Item) -> list:
    """The fixture definitions the item's fixtures run: for each name the closest one, and the one
    it overrides only where it asks for it (a fixture that takes its own name as an argument)."""
    used = []
    for name, fixtures in item._fixtureinfo.name2fixturedefs.items():
        for fixture in reversed(fixtures):
            used.append(fixture)
            if name not in fixture.argnames:
                break
    return used


def longest_first(items: list[pytest.Item]) -> None:
    """Tests that start servers (marked e2e) first: with --no-loadscope-reorder xdist hands out work
    in collection order, and a long group started last would keep one worker busy after the others
    finished (its default order, by number of tests, puts single slow tests last)."""
    items.sort(key=lambda item: "e2e" not in item.keywords)


def warn_if_ignored(items: list[pytest.Item]) -> None:
    """pytest-xdist 3.8 tells a test's group by appending it to the node id, which pytest 9.2's
    node ids ignore (pytest-xdist#1386, hence pytest<9.2 in requirements.txt): then every worker
    would start its own copy of each shared server, the suite passing but slower."""
    if any(item.get_closest_marker("xdist_group") and "@" not in item.nodeid for item in items):
        warnings.warn(pytest.PytestWarning("--dist loadgroup ignores the xdist_group marks with this pytest: "
                                           "tests/support/worker_groups.py"), stacklevel=2)
