"""Command-line tools: memory check."""
