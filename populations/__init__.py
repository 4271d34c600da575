"""Optimizee task populations: task families that meta-training samples."""
