"""MSLR (Yao and Mihalcea, 2022): the three variants, one file each, re-exported together.

See :mod:`miles.strategies.mslr_base` for the method, its sources and our reading of the paper.
"""

from miles.strategies.mslr_base import MEANS, smooth_lrs
from miles.strategies.mslr_d import MSLRDynamic
from miles.strategies.mslr_k import MSLRKeep
from miles.strategies.mslr_s import MSLRSmooth

__all__ = ["MEANS", "MSLRDynamic", "MSLRKeep", "MSLRSmooth", "smooth_lrs"]
