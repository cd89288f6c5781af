"""`make bench`: throughput of the services as ratios of baselines measured in the same run."""
