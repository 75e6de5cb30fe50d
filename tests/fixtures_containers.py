"""Fixtures for the containers tests (kept apart so each area owns its file)."""
