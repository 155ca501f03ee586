"""Scatter new K/V rows into the page pool."""
