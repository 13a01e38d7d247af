"""fedrec fedrec."""
