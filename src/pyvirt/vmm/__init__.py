"""One running VM: run loop, console, event loop."""
