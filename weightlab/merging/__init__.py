"""Model merging: per-tensor methods (a registry), NAN coefficients, and the streaming executor."""

from weightlab.merging.coefficients import nan_coefficients
from weightlab.merging.config import MergeConfig
from weightlab.merging.methods import METHODS
from weightlab.merging.run import MergeReport, merge
from weightlab.options import NanOptions

__all__ = ["METHODS", "MergeConfig", "MergeReport", "NanOptions", "merge", "nan_coefficients"]
