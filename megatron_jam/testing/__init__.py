"""Test and benchmark support: the gloo worker pool and parallel-equivalence bodies."""
