"""Small feed-forward classifiers: an MLP and the MNIST-1D 1-D CNN.

Plain Linen built only from standard layers (nn.Dense, nn.Conv) so that quantization
can be applied from outside by intercepting those layers; no state besides 'params'.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


ACTIVATIONS = ("relu", "identity")


class MLP(nn.Module):
  """Flatten, then `Dense [-> LayerNorm] -> ReLU` per hidden width, then a linear head.

  Attributes:
    num_classes: output logits.
    features: hidden widths, one Dense layer each.
    layer_norm: a LayerNorm after each hidden Dense (`norm_0`, `norm_1`, ...).
    activation: 'relu', or 'identity' for a binarized network (BNN, Hubara et al.
      2016), where the next layer's binary activation quantizer is the nonlinearity
      (sign, with the straight-through gradient on |x| <= 1 that the LayerNorm keeps
      in range).

  Module paths: `dense_0`, `dense_1`, ..., `head`.
  """

  num_classes: int
  features: Sequence[int] = (256, 256)
  layer_norm: bool = False
  activation: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps `[B, ...]` inputs to `[B, num_classes]` logits."""
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"MLP activation {self.activation!r}: choose one of {ACTIVATIONS}")
    h = jnp.reshape(x, (x.shape[0], -1))
    for i, width in enumerate(self.features):
      h = nn.Dense(width, name=f"dense_{i}")(h)
      if self.layer_norm:
        h = nn.LayerNorm(name=f"norm_{i}")(h)
      if self.activation == "relu":
        h = nn.relu(h)
    return nn.Dense(self.num_classes, name="head")(h)


class CNN1D(nn.Module):
  """The MNIST-1D convolutional baseline (Greydanus 2020, "Scaling down deep learning").

  Mirrors the reference `ConvBase` model of the MNIST-1D project: three stride-2
  convolutions with 25 channels (kernels 5, 3, 3, one zero of padding on each side),
  ReLU after each, then flatten and one Dense layer. On a 40-long signal the lengths
  go 40 -> 19 -> 10 -> 5, so the head sees 5 * 25 = 125 features (5,210 parameters for 10 classes).
  The paper reports ~94% test accuracy on the default MNIST-1D split.

  Attributes:
    num_classes: output logits.
    channels: channels of every conv layer.
    kernel_sizes: one kernel width per conv layer (its length sets the depth).
    strides: one stride per conv layer.
    padding: zeros added on each side of every conv input.

  Module paths: `conv_0`, `conv_1`, `conv_2`, `head`.
  """

  num_classes: int
  channels: int = 25
  kernel_sizes: Sequence[int] = (5, 3, 3)
  strides: Sequence[int] = (2, 2, 2)
  padding: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps `[B, L, C]` (or `[B, L]`, read as C=1) signals to `[B, num_classes]`."""
    if len(self.kernel_sizes) != len(self.strides):
      raise ValueError(
          f"kernel_sizes {tuple(self.kernel_sizes)} and strides "
          f"{tuple(self.strides)} must have the same length"
      )
    h = x[:, :, None] if x.ndim == 2 else x
    for i, (kernel, stride) in enumerate(zip(self.kernel_sizes, self.strides)):
      h = nn.Conv(
          self.channels,
          kernel_size=(kernel,),
          strides=(stride,),
          padding=((self.padding, self.padding),),
          name=f"conv_{i}",
      )(h)
      h = nn.relu(h)
    h = jnp.reshape(h, (h.shape[0], -1))
    return nn.Dense(self.num_classes, name="head")(h)
