"""Benchmarks, figures and reports built on es_l2o."""
