"""Scaling laws: loss laws (laws.py), the compute-optimal planner (search.py), fitting (fit.py)."""
