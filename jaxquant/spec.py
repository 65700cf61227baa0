"""Typed, frozen, validated specifications: what to quantize and how.

`QuantSpec` describes one tensor's quantizer, `DotSpec` one contraction (both operands
and, optionally, the gradients of the backward contractions), and `Rule` binds specs to
module paths for `jaxquant.quantize_model`. Every spec is validated at construction: a bad
field raises `ValueError` naming the field and the values it allows.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from jaxquant import formats

FORMATS = formats.names()  # the registry (`jaxquant.formats`) names every format
GRANULARITIES = ("tensor", "channel", "group")
CALIBRATIONS = ("absmax", "percentile", "mse")
ROUNDINGS = ("nearest", "stochastic")
STES = ("identity", "clipped", "lsq", "pact")
LEARNED_STES = ("lsq", "pact")  # the gradient rules that learn a scale / clip
MODES = ("int", "fake")


def _check_choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How one tensor is quantized.

  Attributes:
    format: 'int' (2..8-bit or 16-bit integers), 'binary' (sign · α), 'ternary'
      ({-1, 0, 1} · α, TWN threshold 0.7·mean|x|), 'fp8_e4m3' or 'fp8_e5m2' (scaled
      cast), or a block format: 'mxfp8' / 'mxfp4' (OCP Microscaling: E4M3 / E2M1
      elements, blocks of 32 along the reduced axis with a power-of-two E8M0 scale) or
      'nvfp4' (E2M1 in blocks of 16, E4M3 block scales, an FP32 tensor scale). See
      `jaxquant.formats`.
    bits: integer width, 2..8 or 16, only meaningful for 'int' (binary is 1 bit, ternary
      2, fp8 8, the block formats their element width; for those the field is derived
      and may be left at its default). 16-bit codes (int16) cannot run in mode='int'.
    symmetric: symmetric range (zero point 0) or asymmetric (integer zero point).
    granularity: 'tensor' (one scale), 'channel' (one scale per non-reduced index) or
      'group' (the reduced axis split into groups of `group_size`).
    group_size: required for 'group'; must divide the reduced axis length. Block
      formats fix granularity='group' and group_size to their block (derived).
    calibration: 'absmax', 'percentile' (of |x|) or 'mse' (best clip ratio on a grid).
    percentile: for 'percentile' calibration, in (0, 100].
    rounding: 'nearest' or 'stochastic' (needs a PRNG key; unbiased). For 'binary',
      stochastic is BinaryConnect's: +1 with probability clip((x/α + 1)/2, 0, 1).
    ste: gradient rule: 'identity' (straight-through), 'clipped' (zero outside the clip
      range), 'lsq' (learned step size, Esser et al. 2019) or 'pact' (learned clip α,
      Choi et al. 2018). 'lsq' with symmetric=False is the paper's unsigned LSQ for
      non-negative data (activations after a ReLU): x̂ = s·clip(round(x/s), 0, 2^b − 1),
      stored with the zero point fixed at the lowest code.
    scaled: binary / ternary only. True (default): codes times a scale α per slice
      (XNOR-Net's mean|x|, TWN's mean of the kept |x|). False: the codes themselves,
      ±1 or {−1, 0, 1} (BinaryConnect, Courbariaux et al. 2015; BNN activations,
      Hubara et al. 2016).
    lsq_grad_scale: LSQ multiplies the step size's gradient by 1/sqrt(N·Q_P) (Esser et
      al. 2019, sec. 2.2; N elements per step, Q_P the top code); False drops that
      factor (the paper's ablation). Only meaningful with ste='lsq'.
    full_range: symmetric 'int' only. False (default): the restricted codes
      ±(2^(b−1) − 1) with scale = absmax / (2^(b−1) − 1) (15 levels at 4 bits, {−1, 0, 1}
      at 2). True: all 2^b codes −2^(b−1) .. 2^(b−1) − 1 with scale = absmax / (qmax + 0.5),
      qmax = 2^(b−1) − 1, so +absmax rounds to qmax and −absmax to −qmax − 1, each within
      half a step (16 levels −8..7 at 4 bits, −2..1 at 2). Zero stays exact.
    static: activation specs only: how the quantization range is chosen. None (default):
      static for a per-tensor spec once `jq.calibrate` stored a range, else dynamic (the
      batch's own range). True: static, a range from `jq.calibrate` (per-tensor only;
      serving or `jq.convert` without one is an error; while 'quant_stats' is mutable,
      in training and calibration, the batch's own range is used until one exists).
      False: always dynamic (`jq.calibrate` stores no range). Weight specs leave it None.
  """
  format: str = "int"
  bits: int = 8
  symmetric: bool = True
  granularity: str = "channel"
  group_size: Optional[int] = None
  calibration: str = "absmax"
  percentile: float = 99.9
  rounding: str = "nearest"
  ste: str = "identity"
  scaled: bool = True
  lsq_grad_scale: bool = True
  full_range: bool = False
  static: Optional[bool] = None

  def __post_init__(self):
    _check_choice("format", self.format, FORMATS)
    fmt = formats.get(self.format)
    fmt.check(self)
    for name, value in fmt.derived(self).items():
      object.__setattr__(self, name, value)
    if not isinstance(self.symmetric, bool):
      raise ValueError(f"symmetric={self.symmetric!r} must be a bool (True or False)")
    _check_choice("granularity", self.granularity, GRANULARITIES)
    if self.granularity == "group":
      if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
        raise ValueError(f"group_size={self.group_size!r} is required for granularity='group'; "
                         "choose a positive int")
    elif self.group_size is not None:
      raise ValueError(f"group_size={self.group_size!r} is only allowed with granularity='group'")
    _check_choice("calibration", self.calibration, CALIBRATIONS)
    if not isinstance(self.percentile, (int, float)) or not 0.0 < float(self.percentile) <= 100.0:
      raise ValueError(f"percentile={self.percentile!r} is not allowed; choose a float in (0, 100]")
    _check_choice("rounding", self.rounding, ROUNDINGS)
    if self.rounding == "stochastic" and not fmt.stochastic:
      raise ValueError(f"rounding='stochastic' is only allowed with format="
                       f"{formats.either(formats.having('stochastic'))} (got "
                       f"format={self.format!r}); choose rounding='nearest'")
    if not isinstance(self.scaled, bool):
      raise ValueError(f"scaled={self.scaled!r} must be a bool")
    if not self.scaled and not fmt.unscaled:
      raise ValueError(f"scaled=False is only allowed with format="
                       f"{formats.either(formats.having('unscaled'))} "
                       f"(got format={self.format!r})")
    _check_choice("ste", self.ste, STES)
    if not fmt.zero_point and not self.symmetric:
      raise ValueError(f"symmetric=False is not allowed for format={self.format!r}; "
                       f"only format={formats.either(formats.having('zero_point'))} has a "
                       "zero point")
    if not fmt.learned_scale and self.learned:
      raise ValueError(f"ste={self.ste!r} is only allowed with format="
                       f"{formats.either(formats.having('learned_scale'))}; "
                       "choose one of ['identity', 'clipped']")
    if not isinstance(self.lsq_grad_scale, bool):
      raise ValueError(f"lsq_grad_scale={self.lsq_grad_scale!r} must be a bool")
    if not self.lsq_grad_scale and self.ste != "lsq":
      raise ValueError(f"lsq_grad_scale=False only applies to ste='lsq' (got "
                       f"ste={self.ste!r}); leave it at True")
    if not isinstance(self.full_range, bool):
      raise ValueError(f"full_range={self.full_range!r} must be a bool (True or False)")
    if self.full_range and (not fmt.full_range or not self.symmetric):
      raise ValueError(f"full_range=True is only allowed with format="
                       f"{formats.either(formats.having('full_range'))}, symmetric=True "
                       f"(got format={self.format!r}, symmetric={self.symmetric}); "
                       "asymmetric int already uses every code")
    if self.static not in (None, True, False):
      raise ValueError(f"static={self.static!r} must be None (static once calibrated, for "
                       "per-tensor specs), True or False")
    if self.static and self.granularity != "tensor":
      raise ValueError(f"static=True needs granularity='tensor' (got "
                       f"{self.granularity!r}): a per-token or per-group range depends on "
                       "the rows of each batch, so no calibrated range can stand for it; "
                       "use static=False (dynamic) for per-token activations")
    if self.static and self.learned:
      raise ValueError(f"static=True is not allowed with ste={self.ste!r}: the learned "
                       "scale is the range; leave static=None")

  @property
  def effective_bits(self) -> int:
    """Information bits per value: `bits` for int, 1 binary, 2 ternary, 8 for fp8, the
    element width of a block format (its shared scales not counted)."""
    return formats.get(self.format).effective_bits(self)

  @property
  def storage_bits(self) -> int:
    """Bits per stored code in serving weights: codes are packed into bytes, so 1 for
    binary, 2 for ternary / int2, 4 for int3–4 and E2M1, 16 for int16, and a whole byte
    otherwise (block scales not counted)."""
    return formats.get(self.format).storage_bits(self)

  @property
  def learned(self) -> Optional[str]:
    """'lsq' or 'pact' when the spec has a learned quantity (a trainable step size or
    clip α), else None."""
    return self.ste if self.ste in LEARNED_STES else None

  @property
  def is_integer(self) -> bool:
    """True when values are integers that fit an int8 container (2..8-bit int, binary,
    ternary): the codes an s8 dot runs on."""
    return formats.get(self.format).int8_codes(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotSpec:
  """How one contraction (dot_general / einsum / conv) is quantized.

  Attributes:
    lhs: spec of the left operand (activations), or None to keep it float.
    rhs: spec of the right operand (weights), or None to keep it float.
    grad: when set, both backward contractions (d lhs and d rhs) also run quantized,
      the incoming gradient quantized with this spec (its rounding is usually
      'stochastic'). None: backward dots run in float on the (fake-)quantized operands.
    mode: 'int' runs a real s8×s8→s32 contraction with scales applied to the output
      (needs integer formats on both quantized operands); 'fake' runs a float
      contraction of dequantized operands.
  """
  lhs: Optional[QuantSpec] = None
  rhs: Optional[QuantSpec] = None
  grad: Optional[QuantSpec] = None
  mode: str = "int"

  def __post_init__(self):
    for name in ("lhs", "rhs", "grad"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, QuantSpec):
        raise ValueError(f"{name}={value!r} must be a jaxquant.QuantSpec or None")
    _check_choice("mode", self.mode, MODES)
    if self.grad is not None:
      if self.grad.learned:
        raise ValueError(f"grad.ste={self.grad.ste!r} is not allowed; gradients have no "
                         "learned scale; choose one of ['identity', 'clipped']")
      if (not formats.get(self.grad.format).uniform_int or not self.grad.is_integer
          or not self.grad.symmetric or self.grad.granularity == "group"):
        raise ValueError("grad must be a symmetric format='int' spec with granularity "
                         "'tensor' or 'channel' (got "
                         f"format={self.grad.format!r}, symmetric={self.grad.symmetric}, "
                         f"granularity={self.grad.granularity!r})")
    if self.mode == "int":
      for name in ("lhs", "rhs"):
        value = getattr(self, name)
        if value is not None and not value.is_integer:
          raise ValueError(f"{name}.format={value.format!r} cannot run in mode='int' (no "
                           "int8 codes); choose mode='fake' for fp8, int16 and the block "
                           "formats")


PTQ_METHODS = ("gptq", "awq", "smoothquant")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQ:
  """A post-training algorithm that `jq.convert` runs on a layer's weight, from the
  statistics `jq.calibrate` collected for it.

  Attributes:
    method: 'gptq' (Frantar et al. 2022: error-compensating, row-by-row quantization
      with the inverse Hessian of the layer inputs), 'awq' (Lin et al. 2023: per-input-
      channel scales s = mean|x|^α, α searched on a grid to minimize the layer's output
      error; the input is divided by s), or 'smoothquant' (Xiao et al. 2022: s_j =
      max|x_j|^α / max|w_j|^(1−α) moves activation outliers into the weight; W8A8).
    percdamp: GPTQ damping, λ = percdamp · mean(diag H).
    act_order: GPTQ processes rows by decreasing diag H.
    alpha: SmoothQuant's migration strength, in [0, 1].
    grid: AWQ's number of α steps in [0, 1].
  """
  method: str = "gptq"
  percdamp: float = 0.01
  act_order: bool = True
  alpha: float = 0.5
  grid: int = 20

  def __post_init__(self):
    _check_choice("method", self.method, PTQ_METHODS)
    if not isinstance(self.percdamp, (int, float)) or not 0.0 <= float(self.percdamp) < 1.0:
      raise ValueError(f"percdamp={self.percdamp!r} must be a float in [0, 1)")
    if not isinstance(self.act_order, bool):
      raise ValueError(f"act_order={self.act_order!r} must be a bool")
    if not isinstance(self.alpha, (int, float)) or not 0.0 <= float(self.alpha) <= 1.0:
      raise ValueError(f"alpha={self.alpha!r} must be a float in [0, 1]")
    if not isinstance(self.grid, int) or isinstance(self.grid, bool) or self.grid < 1:
      raise ValueError(f"grid={self.grid!r} must be a positive int")


@dataclasses.dataclass(frozen=True)
class Rule:
  """Quantize the layers whose '/'-joined module path fully matches `pattern`.

  `weight=None` with `act` set is activation-only; `act=None` is weight-only; `grad` set
  runs the backward contractions quantized too; `ptq` names a post-training algorithm
  that `jq.convert` runs on the weight (statistics from `jq.calibrate`). First matching
  rule wins.
  """
  pattern: str
  weight: Optional[QuantSpec] = dataclasses.field(default=None, kw_only=True)
  act: Optional[QuantSpec] = dataclasses.field(default=None, kw_only=True)
  grad: Optional[QuantSpec] = dataclasses.field(default=None, kw_only=True)
  mode: str = dataclasses.field(default="int", kw_only=True)
  ptq: Optional[PTQ] = dataclasses.field(default=None, kw_only=True)

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise ValueError(f"pattern={self.pattern!r} must be a str (a regex over module paths)")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"pattern={self.pattern!r} is not a valid regex: {e}") from None
    # DotSpec validates the specs' kinds and the mode with the same messages.
    try:
      self.dot_spec()
    except ValueError as e:
      msg = (str(e).replace("lhs=", "act=").replace("rhs=", "weight=")
             .replace("lhs.", "act.").replace("rhs.", "weight."))
      raise ValueError(f"Rule({self.pattern!r}): {msg}") from None
    act = self.act
    if act is not None and act.learned and act.granularity != "tensor":
      raise ValueError(f"Rule({self.pattern!r}): act.ste={act.ste!r} learns one "
                       "activation scale per layer; set act granularity='tensor'")
    if act is not None and act.granularity == "group" and not formats.get(act.format).block_size:
      raise ValueError(f"Rule({self.pattern!r}): act granularity='group' is not supported; "
                       "choose 'tensor' or 'channel' (one scale per row)")
    for name in ("weight", "grad"):
      value = getattr(self, name)
      if value is not None and value.static is not None:
        raise ValueError(f"Rule({self.pattern!r}): {name}.static={value.static!r} is only "
                         f"meaningful for act= specs ({name}s are quantized from their own "
                         "values); leave it None")
    if self.grad is not None and (act is None or self.weight is None):
      raise ValueError(f"Rule({self.pattern!r}): grad= (quantized backward) needs both "
                       "weight= and act= specs")
    if self.ptq is not None:
      if not isinstance(self.ptq, PTQ):
        raise ValueError(f"Rule({self.pattern!r}): ptq={self.ptq!r} must be a jaxquant.PTQ")
      w = self.weight
      if (w is None or not formats.get(w.format).uniform_int or not w.is_integer
          or w.rounding != "nearest" or w.learned):
        raise ValueError(f"Rule({self.pattern!r}): ptq={self.ptq.method!r} needs an int "
                         "weight= spec of 2..8 bits with nearest rounding and no learned "
                         "scale")
      if self.ptq.method == "smoothquant" and act is None:
        raise ValueError(f"Rule({self.pattern!r}): ptq='smoothquant' migrates activation "
                         "outliers into the weight; it needs an act= spec (W8A8)")

  def dot_spec(self) -> DotSpec:
    """The DotSpec this rule gives a matched layer (activations lhs, weights rhs)."""
    return DotSpec(lhs=self.act, rhs=self.weight, grad=self.grad, mode=self.mode)

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None
