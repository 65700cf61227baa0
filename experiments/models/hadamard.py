"""Orthogonal Hadamard matrices of orders 2^k · (p + 1), and x · H along the last axis.

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I, so H / √n is orthogonal.
Two constructions, combined by Kronecker products (H_a ⊗ H_b is Hadamard of order a·b):

  - Sylvester: H_1 = [1], H_2m = [[H_m, H_m], [H_m, −H_m]] (orders 2^k);
  - Paley I (Paley 1933): for a prime p ≡ 3 (mod 4), with the Jacobsthal matrix
    Q[i, j] = χ(j − i) (χ the quadratic character mod p: 0, +1 on squares, −1 else),
    H = I + [[0, 1ᵀ], [−1, Q]] has order p + 1 (p = 11 gives 12, p = 19 gives 20).

So SmolLM2's widths all have one: 576 = 12 · 12 · 4, 1536 = 12 · 128, 64 = 2^6. QuaRot
(Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs") uses the
same Kronecker trick for non-power-of-2 widths.

`apply(x, n)` multiplies by the orthogonal H_n without forming it: x is reshaped to
[..., n_1, ..., n_k] and each factor contracts its own axis, (n_1 + ... + n_k) multiply-
adds per element instead of n. The matrices are built in numpy (float64) and cached.
"""
from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _is_power_of_two(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _is_prime(p: int) -> bool:
  return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def sylvester(n: int) -> np.ndarray:
  """The ±1 Sylvester Hadamard matrix of order n (a power of 2), float64."""
  if not _is_power_of_two(n):
    raise ValueError(f"sylvester: order n={n} must be a power of 2")
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def paley(p: int) -> np.ndarray:
  """The ±1 Paley-I Hadamard matrix of order p + 1, for a prime p ≡ 3 (mod 4), float64."""
  if not (_is_prime(p) and p % 4 == 3):
    raise ValueError(f"paley: p={p} must be a prime congruent to 3 mod 4")
  squares = {(i * i) % p for i in range(1, p)}
  chi = np.array([0.0] + [1.0 if r in squares else -1.0 for r in range(1, p)])
  idx = np.arange(p)
  jacobsthal = chi[(idx[None, :] - idx[:, None]) % p]  # Q[i, j] = χ(j − i)
  s = np.zeros((p + 1, p + 1))
  s[0, 1:] = 1.0
  s[1:, 0] = -1.0
  s[1:, 1:] = jacobsthal
  return np.eye(p + 1) + s


@functools.lru_cache(maxsize=None)
def factor_orders(n: int) -> Tuple[int, ...]:
  """Orders whose Kronecker product is n: Paley orders p + 1 (the smallest that leaves a
  decomposable rest first: 576 -> (12, 12, 4), 1536 -> (12, 128)), then one power of 2
  (`(n,)` itself when n is a power of 2). A ValueError names n when there is none."""
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"Hadamard order n={n!r} must be a positive int")
  if _is_power_of_two(n):
    return (n,)
  for m in range(12, n + 1, 4):  # a Paley order m = p + 1 dividing n (not a power of 2)
    if n % m == 0 and not _is_power_of_two(m) and _is_prime(m - 1) and (m - 1) % 4 == 3:
      try:
        rest = factor_orders(n // m)
        return (m,) + (rest if rest != (1,) else ())
      except ValueError:
        continue
  raise ValueError(f"no Hadamard matrix of order n={n} from Sylvester (2^k) and Paley "
                   "(p + 1, p prime ≡ 3 mod 4) factors")


def _factor(m: int) -> np.ndarray:
  return sylvester(m) if _is_power_of_two(m) else paley(m - 1)


@functools.lru_cache(maxsize=None)
def factors(n: int) -> Tuple[np.ndarray, ...]:
  """The orthogonal (÷√order) factors whose Kronecker product is `matrix(n)`."""
  return tuple(_factor(m) / np.sqrt(m) for m in factor_orders(n))


def matrix(n: int) -> np.ndarray:
  """The orthogonal Hadamard matrix H_n (H_n H_nᵀ = I), float64: the Kronecker product
  of `factors(n)`."""
  h = np.ones((1, 1))
  for f in factors(n):
    h = np.kron(h, f)
  return h


def apply(x: jax.Array, n: int) -> jax.Array:
  """x · H_n along the last axis (of size n), in x's dtype, H_n = `matrix(n)`.

  With H_n = F_1 ⊗ ... ⊗ F_k, element i of the last axis is the multi-index
  (i_1, ..., i_k) (row-major), and (x · H_n)[j] = Σ_i x[i] Π_a F_a[i_a, j_a]."""
  if x.shape[-1] != n:
    raise ValueError(f"hadamard.apply: last axis {x.shape[-1]} != order n={n}")
  fs = factors(n)
  lead = x.shape[:-1]
  y = x.reshape(lead + tuple(f.shape[0] for f in fs))
  for a, f in enumerate(fs):
    axis = len(lead) + a
    y = jnp.moveaxis(jnp.tensordot(y, jnp.asarray(f, x.dtype), axes=((axis,), (0,))),
                     -1, axis)
  return y.reshape(x.shape)
