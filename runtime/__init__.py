"""hone runtime: the served agent (engine, graph, HTTP API, trajectory log, CLI)."""

__version__ = "0.1.0"
