"""Pure renderers of the cardinal rules (DESIGN.md 4): one canonical, sorted text per format."""
