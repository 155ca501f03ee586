"""Decode attention over K/V stored in the page pool (one query token per request)."""
