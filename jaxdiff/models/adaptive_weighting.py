"""sCM's adaptive weighting w_phi(t): a small MLP on the time alone (arXiv 2410.11081 Sec. 4.2)."""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxdiff.models.layers import timestep_embedding


class AdaptiveWeighting(nn.Module):
    """w_phi(c_noise) [B] -> [B]: DDPM's positional embedding of 1000 c_noise (TrigFlow's t in
    [0, pi/2] spread over DDPM's step range), Dense(width) -> SiLU -> Dense(1), the last layer
    zero-initialised so training starts from w = 0 (EDM2's uncertainty head starts the same)."""

    width: int = 64

    @nn.compact
    def __call__(self, c_noise: jax.Array) -> jax.Array:
        h = nn.silu(nn.Dense(self.width)(timestep_embedding(1000.0 * c_noise, self.width)))
        return nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[:, 0]
