"""Flower ServerApp adapter for fedlearn."""
