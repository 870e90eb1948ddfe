"""Metrics computed from what sites release: fairness sums, image-sample quality."""
