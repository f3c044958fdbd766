"""Command-line tools: memory check (memcheck), collectives and FLOP model
(scaling)."""
