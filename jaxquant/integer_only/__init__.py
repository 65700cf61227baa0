"""Integer-only inference: `to_integer`, `IntegerProgram` (see program.py)."""
from jaxquant.integer_only.program import IntegerProgram, to_integer
from jaxquant.integer_only.ir import IntegerOnlyError

__all__ = ["IntegerProgram", "IntegerOnlyError", "to_integer"]
