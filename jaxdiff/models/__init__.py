"""Flax networks. They hold no diffusion mathematics."""
