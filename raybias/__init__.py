"""raybias: fair image classifiers from group-balanced diffusion-generated data, on Ray."""

__version__ = "0.1.0"
