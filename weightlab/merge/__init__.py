"""Model merging: per-tensor methods (a registry), NAN coefficients, and the streaming executor."""

from weightlab.merge.coefficients import nan_coefficients
from weightlab.merge.config import MergeConfig
from weightlab.merge.methods import METHODS
from weightlab.merge.run import MergeReport, merge
from weightlab.options import NanOptions

__all__ = ["METHODS", "MergeConfig", "MergeReport", "NanOptions", "merge", "nan_coefficients"]
