"""pyrovae."""
