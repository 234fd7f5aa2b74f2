"""fedlearn: federated and privacy-preserving collaborative learning on Flower."""

__version__ = "0.1.0"
