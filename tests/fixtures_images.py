"""Fixtures for the images tests (kept apart so each area owns its file)."""
