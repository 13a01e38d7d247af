"""fedrec simulation."""
