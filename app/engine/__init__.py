"""Inference: sampling, stopping and the generation loop; no HTTP in here."""
