"""Utilities: initialisation, gradient checkpointing, variational dropout, state packing."""
from core.utils.dropout import (VariationalDropout, VariationalDropout1d, VariationalDropout2d,
                                VariationalDropout3d, VariationalDropToken1d, VariationalDropToken2d,
                                VariationalDropToken3d, reset_dropout)
from core.utils.init import mixed_init
from core.utils.mem_gc import mem_gc

__all__ = ["mixed_init", "mem_gc", "reset_dropout", "VariationalDropout", "VariationalDropout1d",
           "VariationalDropout2d", "VariationalDropout3d", "VariationalDropToken1d",
           "VariationalDropToken2d", "VariationalDropToken3d"]
