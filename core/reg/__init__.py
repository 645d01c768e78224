"""Regularisers for DEQ training: Jacobian regularisation, power method, fixed-point correction."""
from core.reg.fp_correction import fp_correction, register_weight_func
from core.reg.jacobian import jac_loss, jac_loss_weight, jac_reg
from core.reg.power_method import power_method

__all__ = ["jac_reg", "jac_loss", "jac_loss_weight", "power_method", "fp_correction", "register_weight_func"]
