"""Discrete-event mesh simulator driving kowalski-node's real pure cores (see docs/simulation.md)."""
