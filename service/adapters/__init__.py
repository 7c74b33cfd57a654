"""Adapters to what genrelay talks to: Deep-Image, Cloud Storage, Google's OIDC keys."""
