"""Boards: memory map, devices and boot."""
