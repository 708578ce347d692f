"""Bluesky plans: calibration, autofocus and their composition into scans."""
