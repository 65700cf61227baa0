"""jaxquant: quantization research toolkit for JAX/Flax.

The curated public API; everything else is internal.
"""
from jaxquant import observers, ptq
from jaxquant.bn_fold import FoldedConvBN, FoldedDenseBN
from jaxquant.calibrate import calibrate
from jaxquant.compute import ComputeReport, LayerCompute, compute_report
from jaxquant.conv import conv_general_dilated, make_conv
from jaxquant.convert import convert
from jaxquant.dot import dot_general, make_dot_general
from jaxquant.dot_options import DotOptions
from jaxquant.einsum import einsum
from jaxquant.export import export_serving, load_exported
from jaxquant.fake_quant import OperandState, fake_quant
from jaxquant.integer_only import IntegerOnlyError, IntegerProgram, to_integer
from jaxquant.layout import WeightLayout, make_layout
from jaxquant.qtensor import QTensor, pack, unpack
from jaxquant.quantize import dequantize, quantize, quantize_weight
from jaxquant.size import SizeReport, TensorSize, size_report
from jaxquant.spec import PTQ, DotSpec, QuantSpec, Rule
from jaxquant.transform import FloatLayersWarning, quantize_model

__all__ = [
    "QuantSpec", "DotSpec", "Rule", "QTensor", "quantize", "dequantize", "fake_quant",
    "pack", "unpack", "dot_general", "einsum", "conv_general_dilated", "make_dot_general",
    "make_conv", "quantize_model", "calibrate", "convert", "size_report", "SizeReport", "TensorSize",
    "OperandState", "WeightLayout", "make_layout", "quantize_weight", "observers",
    "PTQ", "ptq", "to_integer", "IntegerProgram", "IntegerOnlyError", "export_serving",
    "load_exported", "FoldedConvBN", "FoldedDenseBN", "compute_report", "ComputeReport",
    "LayerCompute", "DotOptions", "FloatLayersWarning",
]
__version__ = "0.1.0"
