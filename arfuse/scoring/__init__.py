"""Scoring: windows (each token scored exactly once), per-token records, the on-disk cache."""
