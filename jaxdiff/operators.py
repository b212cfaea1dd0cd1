"""Linear degradation operators y = A x with their Moore-Penrose pseudo-inverses A^+.

DDNM (arXiv 2212.00490 Sec. 3.1) splits any x into its range-space part A^+ A x, which the
measurement fixes, and its null-space part (I - A^+ A) x, which the model fills in. Every operator
here has full row rank, so A A^+ = I and A^+ A is the orthogonal projection onto the range of
A^T: a mask keeps the known pixels (A = A^+ = diag(m)), average pooling by `factor` keeps block
means (A^+ = nearest up-sampling), grey keeps the channel mean (A^+ = copying it to every
channel). Consistency models' zero-shot editing (arXiv 2303.01469 Alg. 4) uses the same
projections, written there as an orthogonal transform and a mask. Operators are pytrees: the
mask is traced, the kind and factor are static. Images are NHWC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.registry import lookup


@flax.struct.dataclass
class Operator:
    """A linear operator `kind` of `OPERATORS`: mask (known pixels 1), or a pooling factor."""

    kind: str = flax.struct.field(pytree_node=False)
    factor: int = flax.struct.field(pytree_node=False, default=1)
    mask: jax.Array | None = None

    def apply(self, x: jax.Array) -> jax.Array:
        """y = A x."""
        return OPERATORS[self.kind].apply(self, x)

    def pinv(self, y: jax.Array) -> jax.Array:
        """A^+ y, the least-norm x with A x = y."""
        return OPERATORS[self.kind].pinv(self, y)

    def project(self, x: jax.Array) -> jax.Array:
        """A^+ A x, the part of x the measurement sees (an orthogonal projection)."""
        return self.pinv(self.apply(x))


def _pool(op: Operator, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    k = op.factor
    return x.reshape(b, h // k, k, w // k, k, c).mean(axis=(2, 4))


def _upsample(op: Operator, y: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(y, op.factor, axis=1), op.factor, axis=2)


def _check_mask(mask, shape: tuple[int, ...], factor: int) -> None:
    del factor
    m = np.asarray(mask)
    try:
        fits = np.broadcast_shapes(m.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"mask of shape {m.shape} does not broadcast to the images' shape "
                         f"{shape}")
    if not np.all((m == 0) | (m == 1)):
        raise ValueError(f"mask must hold only 0 (generate) and 1 (keep), got values "
                         f"{np.unique(m)[:5].tolist()}")


def _check_pool(mask, shape: tuple[int, ...], factor: int) -> None:
    del mask
    if len(shape) != 4 or not (isinstance(factor, int) and factor >= 1) \
            or shape[1] % factor or shape[2] % factor:
        raise ValueError(f"downsample needs NHWC images whose height and width divide by "
                         f"factor={factor!r}, got shape {shape}")


def _check_grey(mask, shape: tuple[int, ...], factor: int) -> None:
    del mask, factor
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"grey (colourisation) needs NHWC images of 3 channels, got shape "
                         f"{shape}")


@dataclasses.dataclass(frozen=True)
class OperatorEntry:
    """A: x -> y, A^+: y -> x, the measurement's shape from the images', and the argument check."""

    apply: Callable[[Operator, jax.Array], jax.Array]
    pinv: Callable[[Operator, jax.Array], jax.Array]
    measured_shape: Callable[[tuple[int, ...], int], tuple[int, ...]]
    check: Callable[[object, tuple[int, ...], int], None]
    takes_mask: bool = False


OPERATORS: dict[str, OperatorEntry] = {
    "mask": OperatorEntry(lambda op, x: op.mask * x, lambda op, y: op.mask * y,
                          lambda shape, k: shape, _check_mask, takes_mask=True),
    "downsample": OperatorEntry(_pool, _upsample,
                                lambda s, k: (s[0], s[1] // k, s[2] // k, s[3]), _check_pool),
    "grey": OperatorEntry(lambda op, x: x.mean(axis=-1, keepdims=True),
                          lambda op, y: jnp.broadcast_to(y, y.shape[:-1] + (3,)),
                          lambda s, k: (*s[:-1], 1), _check_grey),
}


def make_operator(kind: str, image_shape: tuple[int, ...], *, factor: int = 1,
                  mask=None) -> Operator:
    """The operator `kind` for images of `image_shape` [B, ...], checked (one clear line)."""
    entry = lookup(OPERATORS, kind, "operator")
    if entry.takes_mask != (mask is not None):
        raise ValueError(f"operator {kind!r} " + ("needs a mask" if entry.takes_mask else
                                                  "takes no mask"))
    entry.check(mask, tuple(image_shape), factor)
    return Operator(kind, factor, None if mask is None
                    else jnp.broadcast_to(jnp.asarray(mask, jnp.float32), image_shape))


def measured_shape(op: Operator, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of y = A x for x of `image_shape`."""
    return OPERATORS[op.kind].measured_shape(tuple(image_shape), op.factor)
