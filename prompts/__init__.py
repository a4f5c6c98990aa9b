"""Concept presets and prompt sets (data; see README.md in this folder)."""
