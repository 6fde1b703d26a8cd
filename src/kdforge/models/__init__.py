"""Model adapters, builders and references."""
