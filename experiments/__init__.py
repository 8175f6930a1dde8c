"""Experiments: Python config modules and one trainer (big_vision style)."""
