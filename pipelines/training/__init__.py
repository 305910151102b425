"""Library code behind the top-level scripts."""
