"""CPU models."""
