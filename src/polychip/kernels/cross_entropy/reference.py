"""Output projection + softmax cross-entropy, materialising the logits (the reference).

h [N, D] (final hidden states), w [D, V] (output projection), labels [N] int, mask [N] (1 = count)
-> (sum of masked token losses (float32 scalar), number of counted tokens (float32)).
Logits are computed with float32 accumulation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(h, w, labels, mask, *, precision=None):
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32, precision=precision)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    m = mask.astype(jnp.float32)
    return jnp.sum((lse - picked) * m), jnp.sum(m)
