"""Unit tests: pure functions and formats, no servers."""
