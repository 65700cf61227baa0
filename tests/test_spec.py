"""Spec validation: every bad field of QuantSpec / DotSpec / Rule raises ValueError naming
the field; good specs are frozen and report their derived properties."""
import dataclasses
import re

import pytest

import jaxquant as jq

QS = jq.QuantSpec


@pytest.mark.parametrize("fmt", ["int", "binary", "ternary", "fp8_e4m3", "fp8_e5m2"])
def test_valid_formats_construct(fmt):
  spec = QS(format=fmt)
  assert spec.format == fmt
  assert spec.is_integer == (fmt in ("int", "binary", "ternary"))


@pytest.mark.parametrize("fmt,bits,expected", [
    ("int", 2, 2), ("int", 4, 4), ("int", 8, 8), ("binary", 8, 1), ("ternary", 8, 2),
    ("fp8_e4m3", 8, 8), ("fp8_e5m2", 8, 8)])
def test_effective_bits(fmt, bits, expected):
  assert QS(format=fmt, bits=bits).effective_bits == expected


def test_quantspec_is_frozen_and_keyword_only():
  spec = QS()
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.bits = 4
  with pytest.raises(TypeError):
    QS("int")  # keyword-only


def test_specs_are_hashable_and_compare_by_value():
  # Specs are nondiff (static) arguments of custom VJPs: they must hash by value.
  assert hash(QS(bits=4)) == hash(QS(bits=4)) and QS(bits=4) == QS(bits=4)
  assert jq.DotSpec(lhs=QS()) == jq.DotSpec(lhs=QS())


@pytest.mark.parametrize("kwargs,field", [
    (dict(format="int4"), "format"),
    (dict(format=None), "format"),
    (dict(bits=1), "bits"),
    (dict(bits=9), "bits"),
    (dict(bits=0), "bits"),
    (dict(bits=8.0), "bits"),
    (dict(bits=True), "bits"),
    (dict(symmetric="yes"), "symmetric"),
    (dict(symmetric=1), "symmetric"),
    (dict(granularity="row"), "granularity"),
    (dict(granularity="group"), "group_size"),  # group without group_size
    (dict(granularity="group", group_size=0), "group_size"),
    (dict(granularity="group", group_size=2.0), "group_size"),
    (dict(granularity="channel", group_size=4), "group_size"),
    (dict(calibration="minmax"), "calibration"),
    (dict(percentile=0.0), "percentile"),
    (dict(percentile=100.5), "percentile"),
    (dict(percentile=-1), "percentile"),
    (dict(percentile="99"), "percentile"),
    (dict(percentile=float("nan")), "percentile"),
    (dict(rounding="floor"), "rounding"),
    (dict(format="fp8_e4m3", rounding="stochastic"), "rounding"),
    (dict(format="int", scaled=False), "scaled"),
    (dict(format="fp8_e4m3", scaled=False), "scaled"),
    (dict(format="ternary", rounding="stochastic"), "rounding"),
    (dict(ste="straight"), "ste"),
    (dict(format="binary", ste="lsq"), "ste"),
    (dict(format="ternary", ste="pact"), "ste"),
    (dict(format="fp8_e5m2", ste="lsq"), "ste"),
    (dict(format="binary", symmetric=False), "symmetric"),
    (dict(format="fp8_e4m3", symmetric=False), "symmetric"),
])
def test_bad_quantspec_names_field(kwargs, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    QS(**kwargs)


@pytest.mark.parametrize("bits", range(2, 9))
def test_all_int_bits_allowed(bits):
  assert QS(bits=bits, symmetric=False).bits == bits


def test_boundary_values_allowed():
  QS(percentile=100.0)
  QS(percentile=1e-3)
  QS(granularity="group", group_size=1)
  QS(rounding="stochastic", ste="lsq")
  QS(ste="pact")
  QS(ste="pact", symmetric=False)  # the ReLU case: clip to [0, α]


@pytest.mark.parametrize("kwargs,field", [
    (dict(lhs=QS(), rhs="int8"), "rhs"),
    (dict(lhs=jq.DotSpec()), "lhs"),  # wrong kind of spec
    (dict(grad=jq.Rule(".*")), "grad"),
    (dict(lhs=QS(), mode="float"), "mode"),
    (dict(lhs=QS(), rhs=QS(), grad=QS(ste="lsq")), "grad.ste"),
    (dict(lhs=QS(), rhs=QS(), grad=QS(ste="pact")), "grad.ste"),
    (dict(lhs=QS(), rhs=QS(), grad=QS(symmetric=False)), "grad"),
    (dict(lhs=QS(), rhs=QS(), grad=QS(format="fp8_e4m3"), mode="fake"), "grad"),
    (dict(lhs=QS(), rhs=QS(), grad=QS(granularity="group", group_size=2)), "grad"),
    (dict(lhs=QS(format="fp8_e4m3"), rhs=QS()), "lhs.format"),  # mode='int' with fp8
    (dict(lhs=QS(), rhs=QS(format="fp8_e5m2")), "rhs.format"),
])
def test_bad_dotspec_names_field(kwargs, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    jq.DotSpec(**kwargs)


def test_dotspec_fp8_allowed_in_fake_mode():
  spec = jq.DotSpec(lhs=QS(format="fp8_e4m3"), rhs=QS(format="fp8_e5m2"), mode="fake")
  assert spec.mode == "fake"
  # Binary / ternary have integer codes: allowed in int mode.
  jq.DotSpec(lhs=QS(format="binary"), rhs=QS(format="ternary"), mode="int")


@pytest.mark.parametrize("args,kwargs,field", [
    (("(unclosed",), {}, "pattern"),  # invalid regex
    (("a[",), {}, "pattern"),
    ((3,), {}, "pattern"),
    ((".*",), dict(weight=jq.DotSpec()), "weight"),  # wrong kind of spec
    ((".*",), dict(act="int8"), "act"),
    ((".*",), dict(grad=3), "grad"),
    ((".*",), dict(weight=QS(), mode="both"), "mode"),
    ((".*",), dict(weight=QS(), act=QS(), grad=QS(ste="lsq")), "grad.ste"),
])
def test_bad_rule_names_field(args, kwargs, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    jq.Rule(*args, **kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(weight=QS(format="fp8_e4m3")), "weight.format"),
    (dict(act=QS(format="fp8_e5m2")), "act.format"),
])
def test_rule_fp8_in_int_mode_names_rule_field(kwargs, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    jq.Rule(".*", **kwargs)


def test_rule_fp8_in_int_mode_raises():
  with pytest.raises(ValueError, match="mode"):
    jq.Rule(".*", weight=QS(format="fp8_e4m3"))
  jq.Rule(".*", weight=QS(format="fp8_e4m3"), mode="fake")


def test_rule_dot_spec_and_fullmatch():
  w, a, g = QS(bits=4), QS(symmetric=False), QS(rounding="stochastic")
  rule = jq.Rule(r"encoder/layer_\d+/dense", weight=w, act=a, grad=g, mode="fake")
  assert rule.dot_spec() == jq.DotSpec(lhs=a, rhs=w, grad=g, mode="fake")
  assert rule.matches("encoder/layer_12/dense")
  assert not rule.matches("encoder/layer_12/dense_out")  # fullmatch, not search
  assert not rule.matches("x/encoder/layer_1/dense")
  with pytest.raises(dataclasses.FrozenInstanceError):
    rule.pattern = ".*"
