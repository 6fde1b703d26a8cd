"""Readers, collators, samplers and selection."""
