"""Paged attention backends behind a small registry (see ``registry.py``)."""
