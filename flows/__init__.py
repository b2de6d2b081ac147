"""ganflow's edges: command line, orchestration, distribution and tracking."""
