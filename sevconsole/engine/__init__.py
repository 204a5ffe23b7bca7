"""One migration from plan to verified end, usable without a screen."""
