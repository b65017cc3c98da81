"""Sweeps: typed config, trial backend, Ray runner, result store, energy and leaderboards."""
