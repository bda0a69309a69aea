"""Judging edits: the judge's config, prompts, answer parsing, image metrics and engines, and the
Ray Data stage that scores rows (docs/architecture.md, "Judging edits").

Everything here but ``stage.py`` imports without Ray, like the model families.
"""
