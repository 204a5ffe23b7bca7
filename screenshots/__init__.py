"""The README's screenshots; `python -m screenshots.make` from the repository root."""
