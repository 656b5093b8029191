"""Calibration: statistics, clustering, activation ranges and weight codes, layer by layer."""
