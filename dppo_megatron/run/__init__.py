"""The run layer: the only place that joins the learner and the rollout side (the loop, the
rollout producer, the weight publisher, checkpoints, placement, the run directory, metrics)."""
