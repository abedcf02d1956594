"""SAEFE: steer SigLIP image search through sparse-autoencoder features, offline."""

__version__ = "0.1.0"
