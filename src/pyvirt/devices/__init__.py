"""Device models.  Devices never import the CPU: they see the bus and interrupt lines."""
