"""The neural-DE studies: ``leanfit run neural-de`` (local against global error regularisation) and ``leanfit bench
neural-de`` (the solver against torchdiffeq and torchode)."""
