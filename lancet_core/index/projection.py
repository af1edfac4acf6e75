"""Seeded Gaussian projection matrices, one pair per target module (LoGra-style, docs/design.md §5).

For a module with input size d_in and output size d_out, P_in is d_in × k_in and P_out is d_out × k_out, with i.i.d.
N(0, 1) entries scaled by 1/sqrt(k), so E[P Pᵀ] = I and inner products are preserved in expectation
(Johnson–Lindenstrauss). Each matrix is drawn from its own generator seeded by sha256(seed, module name, side), so the
same (seed, module, side) gives the same matrix on any machine, independently of which other modules are targeted.
k = None means "no projection" on that side (the matrix is None and callers use the raw vector).

Knows nothing about models, hooks or files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def _sub_seed(seed: int, module_name: str, side: str) -> int:
    h = hashlib.sha256(f"lancet-projection\0{seed}\0{module_name}\0{side}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def projection_matrix(
    seed: int, module_name: str, side: str, d: int, k: int | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor | None:
    """The d × k projection for one side ('in' or 'out') of one module; None when k is None (no projection)."""
    if side not in ("in", "out"):
        raise ValueError(f"side must be 'in' or 'out', got {side!r}")
    if k is None:
        return None
    if d < 1 or k < 1:
        raise ValueError(f"projection dims must be >= 1, got d={d}, k={k}")
    gen = torch.Generator().manual_seed(_sub_seed(seed, module_name, side))
    p = torch.randn(d, k, generator=gen, dtype=torch.float64) / (k**0.5)
    return p.to(dtype)


@dataclass(frozen=True)
class ModuleLayout:
    """Where one module's projected gradient sits in the stored vector: entries [offset, offset + size).

    The block is vec(P_outᵀ G P_in) in row-major order (index o * k_in + i), where G = Σ_t δ_t a_tᵀ is d_out × d_in
    (the nn.Linear weight orientation, also for GPT-2 Conv1D whose weight is stored transposed).
    """

    name: str
    d_in: int
    d_out: int
    k_in: int | None
    k_out: int | None
    offset: int

    @property
    def eff_in(self) -> int:
        return self.d_in if self.k_in is None else self.k_in

    @property
    def eff_out(self) -> int:
        return self.d_out if self.k_out is None else self.k_out

    @property
    def size(self) -> int:
        return self.eff_in * self.eff_out

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "k_in": self.k_in,
            "k_out": self.k_out,
            "offset": self.offset,
            "size": self.size,
        }

    @classmethod
    def from_json(cls, d: dict) -> ModuleLayout:
        return cls(d["name"], d["d_in"], d["d_out"], d["k_in"], d["k_out"], d["offset"])

    def matrices(
        self, seed: int, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(P_in, P_out) for this module."""
        return (
            projection_matrix(seed, self.name, "in", self.d_in, self.k_in, dtype),
            projection_matrix(seed, self.name, "out", self.d_out, self.k_out, dtype),
        )


def project_full_gradient(layout: ModuleLayout, grad_out_in: torch.Tensor, seed: int) -> torch.Tensor:
    """vec(P_outᵀ G P_in) of a full d_out × d_in gradient G (slow path; used by oracles and tests)."""
    p_in, p_out = layout.matrices(seed, grad_out_in.dtype)
    g = grad_out_in
    if p_out is not None:
        g = p_out.T @ g
    if p_in is not None:
        g = g @ p_in
    return g.reshape(-1)
