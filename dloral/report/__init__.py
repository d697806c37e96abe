"""Tables and figures made from the benchmark results table."""
