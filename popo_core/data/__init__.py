"""Prompts: datasets and templates, and the task registry (train and held-out problems with their verifier)."""
