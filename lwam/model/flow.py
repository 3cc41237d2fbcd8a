"""Flow-matching schedule of the video branch (docs/model.md, "Training objective").

sigma = shift*u / (1 + (shift-1)*u), u ~ U(0, 1); t = 1000*sigma; x_t = (1-sigma) x0 + sigma eps;
target v = eps - x0. The per-sample weight is a Gaussian bump in t centred at 500, shifted so that it is
zero at t = 0 and t = 1000, and normalised to mean 1 over the shifted timestep grid.
"""
from __future__ import annotations

import math

import torch

from lwam.config import FlowConfig


class FlowMatching:
    def __init__(self, cfg: FlowConfig):
        self.cfg = cfg
        self.T = float(cfg.num_train_timesteps)
        grid_u = torch.linspace(1.0, 0.0, cfg.weight_grid + 1, dtype=torch.float64, device="cpu")[:-1]
        grid_t = self.T * self.shift_sigma(grid_u)
        self._norm = float(self._bump(grid_t).mean())

    def shift_sigma(self, u: torch.Tensor) -> torch.Tensor:
        s = self.cfg.shift
        return s * u / (1 + (s - 1) * u)

    def _bump(self, t: torch.Tensor) -> torch.Tensor:
        """Unnormalised weight: exp(-2((t-c)/T)^2) minus its value at the ends, clipped at 0."""
        c = self.cfg.weight_center
        floor = math.exp(-2 * (max(c, self.T - c) / self.T) ** 2)
        return (torch.exp(-2 * ((t.double() - c) / self.T) ** 2) - floor).clamp_min(0)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] in [0, T] -> w(t) [B] fp32, mean 1 over the shifted grid."""
        return (self._bump(t) / self._norm).float()

    def sample(self, batch: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (sigma [B], t [B]) with u ~ U(0, 1)."""
        u = torch.rand(batch, generator=generator, device=device if generator is None else generator.device)
        sigma = self.shift_sigma(u).to(device)
        return sigma, sigma * self.T

    @staticmethod
    def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0, eps [B, ...]; sigma [B] -> x_t."""
        s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - s) * x0 + s * eps

    @staticmethod
    def target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return eps - x0
