"""Canonicalisation passes: small classes with an exact ``modified`` flag, run once at load."""

from impq_onnx.frontend.passes.float16_to_float32 import Float16ToFloat32Pass
from impq_onnx.frontend.passes.name_nodes import NameNodesPass
from impq_onnx.frontend.passes.strip_classifier_head import StripClassifierHeadPass

__all__ = ["Float16ToFloat32Pass", "NameNodesPass", "StripClassifierHeadPass"]
