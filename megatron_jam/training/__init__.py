"""Training: arguments, data for the embedded tiny default, and the loop."""
