"""A small ResNet for NHWC images: original post-activation basic blocks (He et al. 2016).

BatchNorm is replaced by GroupNorm (Wu & He 2018) so the model carries no batch
statistics: `model.apply({'params': p}, x)` is pure, which is what quantization
transforms and sharded training steps expect.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _check_groups(width: int, groups: int) -> None:
  if width % groups:
    raise ValueError(f"norm_groups={groups} must divide every width, not {width}")


class BasicBlock(nn.Module):
  """Two 3x3 convs with GroupNorm; identity shortcut, or 1x1 conv + norm on a change.

  Attributes:
    width: output channels.
    stride: spatial stride of the first conv (and of the projection shortcut).
    norm_groups: GroupNorm groups.

  Module paths: `conv1`, `norm1`, `conv2`, `norm2`, and `proj`, `proj_norm` when the
  shortcut needs a projection.
  """

  width: int
  stride: int = 1
  norm_groups: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps `[B, H, W, C]` to `[B, ceil(H/stride), ceil(W/stride), width]`."""
    _check_groups(self.width, self.norm_groups)
    strides = (self.stride, self.stride)
    h = nn.Conv(self.width, (3, 3), strides=strides, padding="SAME", use_bias=False,
                name="conv1")(x)
    h = nn.relu(nn.GroupNorm(num_groups=self.norm_groups, name="norm1")(h))
    h = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, name="conv2")(h)
    h = nn.GroupNorm(num_groups=self.norm_groups, name="norm2")(h)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.width:
      shortcut = nn.Conv(self.width, (1, 1), strides=strides, use_bias=False,
                         name="proj")(x)
      shortcut = nn.GroupNorm(num_groups=self.norm_groups, name="proj_norm")(shortcut)
    return nn.relu(h + shortcut)


class ResNetStage(nn.Module):
  """`num_blocks` BasicBlocks at one width; the first one applies `stride`.

  Module paths: `block_0`, `block_1`, ...
  """

  width: int
  num_blocks: int
  stride: int = 1
  norm_groups: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps `[B, H, W, C]` to `[B, ceil(H/stride), ceil(W/stride), width]`."""
    for b in range(self.num_blocks):
      x = BasicBlock(self.width, stride=self.stride if b == 0 else 1,
                     norm_groups=self.norm_groups, name=f"block_{b}")(x)
    return x


class ResNet(nn.Module):
  """Stem conv, stages of `BasicBlock`s, global average pool, linear head.

  The first stage keeps the resolution; each later stage halves it with a stride-2
  first block. Sized for tiny images (8x8 digits): no max-pool, 3x3 stem.

  Attributes:
    num_classes: output logits.
    widths: channels per stage (its length is the number of stages).
    blocks_per_stage: `BasicBlock`s in each stage.
    norm_groups: GroupNorm groups; must divide every width.

  Module paths: `stem`, `stem_norm`, `stage_{s}/block_{b}/...`, `head`.
  """

  num_classes: int
  widths: Sequence[int] = (16, 32)
  blocks_per_stage: int = 1
  norm_groups: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps `[B, H, W, C]` images to `[B, num_classes]` logits."""
    if not self.widths or self.blocks_per_stage < 1:
      raise ValueError("ResNet needs at least one stage and one block per stage")
    for width in self.widths:
      _check_groups(width, self.norm_groups)
    h = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, name="stem")(x)
    h = nn.relu(nn.GroupNorm(num_groups=self.norm_groups, name="stem_norm")(h))
    for s, width in enumerate(self.widths):
      h = ResNetStage(width, self.blocks_per_stage, stride=1 if s == 0 else 2,
                      norm_groups=self.norm_groups, name=f"stage_{s}")(h)
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(h)
