"""Training: optimizer, sharded train state, the jitted train step, the run log and the loop."""
