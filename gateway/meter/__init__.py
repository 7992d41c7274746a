"""``maas meter``: the metering reverse proxy in front of vLLM (a sidecar in the predictor pod)."""
