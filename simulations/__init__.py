"""Simulation harness: datasets, partitioners, backends and reports."""
