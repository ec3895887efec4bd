"""Backends: block (raw and qcow2 images), char (terminal, buffers).  They know nothing about devices."""
