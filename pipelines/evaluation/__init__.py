"""The evaluation protocol: FID, generation, the Table 1 sweep, distribution shift, memorization."""
