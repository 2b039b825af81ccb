"""Device mesh, logical-axis sharding rules, multi-process start-up."""
