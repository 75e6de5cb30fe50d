"""Fixtures for the streaming tests (kept apart so each area owns its file)."""
