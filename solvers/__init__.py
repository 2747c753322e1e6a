"""Rematerialization solvers, one module per method; solvers.registry looks them up by name."""
