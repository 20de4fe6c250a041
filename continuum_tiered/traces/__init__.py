"""Agent traces: the program/turn format every replay reads, and loaders into it."""
