"""Training: device mesh and sharding rules (`mesh`), and later the train step and loop."""
