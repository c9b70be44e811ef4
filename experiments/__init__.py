"""Scripts that reproduce the SAMS-VAE and GPO-VAE papers' experiments (see experiments/README.md)."""
