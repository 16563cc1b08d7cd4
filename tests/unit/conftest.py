"""Fixtures shared by several unit test files."""

from serving_fakes import registry  # noqa: F401  (a fixture: the fake model registry)
