"""Measured performance: where a training step's time goes (``breakdown``)."""
