"""Video data: frame sources and (later) dataset readers, degradation and samplers."""
