"""The benchmark harness: methods x datasets x metrics -> one tidy results table."""
