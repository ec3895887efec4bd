"""Backends: block (raw files), char (terminal, buffers).  They know nothing about devices."""
