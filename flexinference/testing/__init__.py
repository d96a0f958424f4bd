"""References and helpers for tests."""
