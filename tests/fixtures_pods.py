"""Fixtures for the pods tests (kept apart so each area owns its file)."""
