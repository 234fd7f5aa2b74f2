"""Flower ClientApp adapter for fedlearn."""
