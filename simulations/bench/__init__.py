"""Benchmarks: ``python -m simulations.bench SCENARIO`` (or ``fedlearn bench SCENARIO``) runs a
named scenario and appends its figures to ``simulations/results/<scenario>.jsonl``; ``report``
prints them as markdown tables (``report --docs DIR`` writes them for the docs).

``harness``: machine facts, process-tree memory, one simulation in a subprocess, records, report
and the scenario registry (``@scenario``); ``cli``: the command; the scenarios, by topic:
``scale``, ``collaborative``, ``privacy``, ``access``, ``deployment``, ``training``.
"""

# cli first: it imports the topic modules in the order --help and report list their scenarios.
from simulations.bench.cli import build_parser, main
from simulations.bench.access import without_access_control  # noqa: I001
from simulations.bench.harness import SCENARIOS, TreeMemory, docs_page, machine, record, report, scenario, simulate_once, write_docs

__all__ = [
    "SCENARIOS", "TreeMemory", "build_parser", "docs_page", "machine", "main", "record", "report", "scenario",
    "simulate_once", "without_access_control", "write_docs",
]
