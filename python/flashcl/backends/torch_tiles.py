"""The pure-PyTorch backend: the primitives over tiles of S = s * x @ y.T.

S never exists whole. It is produced one (block_rows x block_cols) tile at a time,
used, and dropped; backward recomputes the tiles instead of storing them. The tile
sides are chosen from N, M, D and a memory budget (see `choose_tiles`) and can be
forced with the `tiling` context manager. Runs on any device torch runs on; it is
the reference the compiled backends are tested against.

Precision: half inputs are upcast tile by tile and multiplied in fp32; fp32 inputs
follow torch.get_float32_matmul_precision() because this is plain torch.matmul;
fp64 inputs stay fp64 (gradcheck needs it).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..checks import statistics_dtype

# Tile-sized buffers alive at once: S, the two exponentials of backward, and slack
# for the temporaries of logsumexp in forward.
TILE_BUFFERS = 4
DEFAULT_MEMORY_BUDGET = 32 * 2**20
MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class Tiling:
    block_rows: Optional[int] = None
    block_cols: Optional[int] = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET


# The innermost `tiling` scope is last. A plain list, not a ContextVar, because torch.compile
# can trace reading it; the scope is therefore per process, not per thread.
_tiling_scopes: list = [Tiling()]


@contextlib.contextmanager
def tiling(
    block_rows: Optional[int] = None,
    block_cols: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> Iterator[Tiling]:
    """Override the torch backend's tile sides or memory budget (bytes) in a scope.

    A loss captures the tiling when its forward runs and its backward uses the same,
    so `backward()` may be called outside the `with` block.
    """
    for name, value in (("block_rows", block_rows), ("block_cols", block_cols),
                        ("memory_budget", memory_budget)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"tiling: {name} must be a positive int or None, got {value!r}")
    chosen = Tiling(block_rows, block_cols, memory_budget or DEFAULT_MEMORY_BUDGET)
    _tiling_scopes.append(chosen)
    try:
        yield chosen
    finally:
        _tiling_scopes.pop()


def choose_tiles(n: int, m: int, d: int, itemsize: int, tiles: Tiling) -> Tuple[int, int]:
    """Largest tile whose live buffers fit the budget: halve the longer free side until they do."""
    rows = min(n, tiles.block_rows or n)
    cols = min(m, tiles.block_cols or m)

    def live_bytes(r: int, c: int) -> int:
        return itemsize * (TILE_BUFFERS * r * c + (r + c) * d)

    while live_bytes(rows, cols) > tiles.memory_budget:
        rows_free = tiles.block_rows is None and rows > MIN_BLOCK
        cols_free = tiles.block_cols is None and cols > MIN_BLOCK
        if rows_free and (rows >= cols or not cols_free):
            rows = (rows + 1) // 2
        elif cols_free:
            cols = (cols + 1) // 2
        else:
            break
    return rows, cols


def _blocks(length: int, block: int) -> Iterator[slice]:
    for start in range(0, length, block):
        yield slice(start, min(start + block, length))


def _diagonal_of_tile(tile: Tensor, rows: slice, cols: slice) -> Tensor:
    """The entries of a tile that lie on the global diagonal i == j (may be empty)."""
    return tile.diagonal(offset=rows.start - cols.start)


def _leave_out(logits: Tensor, i: slice, j: slice, exclude_diagonal: bool, guide, dtype) -> Tensor:
    """The tile with its left-out entries at -inf: the diagonal (exclude_diagonal) and, with
    guide = (gx, gy, threshold), every (i, j) whose guide similarity gx_i . gy_j exceeds threshold_i."""
    if exclude_diagonal:
        _diagonal_of_tile(logits, i, j).fill_(-torch.inf)
    if guide is not None:
        guide_x, guide_y, threshold = guide
        guided = guide_x[i].to(dtype) @ guide_y[j].to(dtype).T
        logits.masked_fill_(guided > threshold[i, None], -torch.inf)
    return logits


def logsumexp(logits: Tensor, dim: int) -> Tensor:
    """torch.logsumexp, except that an infinite logit gives NaN, not inf: softmax's inf - inf, so
    non-finite input is non-finite exactly where the textbook loss's (and the kernels') is. (A sum of
    exponentials of finite fp32 logits cannot reach inf: only an infinite logit makes it.)
    Differentiable, for flashcl._core's whole-S path."""
    lse = torch.logsumexp(logits, dim)
    return lse.masked_fill(lse == torch.inf, torch.nan)


def softplus(z: Tensor) -> Tensor:
    """log(1 + e^z) to the last bit in every dtype (torch's softplus switches to z above a threshold)."""
    return z.clamp(min=0) + torch.log1p(torch.exp(-z.abs()))


# The elementwise function f of primitive 2's G = a_i f(S_ij - o_i) + b_j f(S_ij - p_j).
WEIGHT_FUNCTIONS = {"exp": torch.exp, "sigmoid": torch.sigmoid}


def _weights(logits, a, o, b, p, i: slice, j: slice, function: str) -> Tensor:
    """The tile of G = a_i f(S_ij - o_i) + b_j f(S_ij - p_j), either term optional."""
    f = WEIGHT_FUNCTIONS[function]
    weights = None
    if a is not None:
        weights = f(torch.sub(logits, o[i, None])).mul_(a[i, None])
    if b is not None:
        col_term = f(torch.sub(logits, p[None, j]))
        weights = col_term.mul_(b[None, j]) if weights is None else weights.addcmul_(col_term, b[None, j])
    return weights


class TorchTiles:
    """Primitives 1, 1' and 2 of docs/design.md in chunked PyTorch, for both weight functions."""

    name = "torch"
    # "values": primitive 2's values operands (see weighted_grad); "guide": both primitives' guide mask (see lse)
    functions = (*WEIGHT_FUNCTIONS, "values", "guide")

    def __init__(self, tiles: Optional[Tiling] = None):
        self.tiles = tiles or _tiling_scopes[-1]
        self._kept = None  # the last one-tile lse's operands and logits, for its backward (see _take_kept)

    def _tile_grid(self, x: Tensor, y: Tensor) -> Tuple[int, int]:
        itemsize = torch.finfo(statistics_dtype(x.dtype)).bits // 8
        return choose_tiles(x.shape[0], y.shape[0], x.shape[1], itemsize, self.tiles)

    def holds_whole(self, x: Tensor, y: Tensor) -> bool:
        """Whether S of these operands is one tile within the memory budget: a loss may then build it
        whole, with autograd's own operators (see flashcl._core)."""
        rows, cols = self._tile_grid(x, y)
        return rows >= x.shape[0] and cols >= y.shape[0]

    # A loss's backend lives from its forward to its backward, so when S is one tile the forward's
    # tile is kept for the backward to reuse: a small batch then costs the textbook loss's three
    # products, not four, within the memory budget. Only for the very same, unmodified operands; a
    # compiled graph keeps nothing on the side (it cannot mutate the backend) and recomputes.
    @staticmethod
    def _tile_key(x: Tensor, y: Tensor, scale: Tensor, exclude_diagonal: bool):
        return (x, y, scale), (exclude_diagonal, x._version, y._version, scale._version)

    def _keep(self, x, y, scale, exclude_diagonal, logits) -> None:
        if not torch.compiler.is_compiling():
            self._kept = (*self._tile_key(x, y, scale, exclude_diagonal), logits)

    def _take_kept(self, x, y, scale, exclude_diagonal) -> Optional[Tensor]:
        """The forward's tile of these very operands, once, or None."""
        if torch.compiler.is_compiling() or self._kept is None:
            return None
        (operands, state, logits), self._kept = self._kept, None
        same = all(a is b for a, b in zip(operands, (x, y, scale)))
        return logits if same and state == self._tile_key(x, y, scale, exclude_diagonal)[1] else None

    def lse(
        self,
        x: Tensor,
        y: Tensor,
        scale: Tensor,
        *,
        rows: bool = True,
        cols: bool = False,
        exclude_diagonal: bool = False,
        guide: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """r_i = log sum_j exp(S_ij) and/or c_j = log sum_i exp(S_ij), from one product per tile.

        guide = (gx, gy, threshold) leaves out every entry whose guide similarity gx_i . gy_j
        exceeds threshold_i, as exclude_diagonal leaves out the diagonal (docs/design.md, "Guide mask").
        """
        dtype = statistics_dtype(x.dtype)
        n, m = x.shape[0], y.shape[0]
        block_rows, block_cols = self._tile_grid(x, y)
        s = scale.to(dtype)
        row_lse = torch.full((n,), -torch.inf, dtype=dtype, device=x.device) if rows else None
        col_lse = torch.full((m,), -torch.inf, dtype=dtype, device=x.device) if cols else None
        for i in _blocks(n, block_rows):
            x_scaled = x[i].to(dtype) * s
            for j in _blocks(m, block_cols):
                logits = _leave_out(x_scaled @ y[j].to(dtype).T, i, j, exclude_diagonal, guide, dtype)
                if block_rows >= n and block_cols >= m and guide is None:
                    self._keep(x, y, scale, exclude_diagonal, logits)
                if rows:
                    row_lse[i] = torch.logaddexp(row_lse[i], logsumexp(logits, dim=1))
                if cols:
                    col_lse[j] = torch.logaddexp(col_lse[j], logsumexp(logits, dim=0))
        return row_lse, col_lse

    def softplus_sums(self, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *,
                      exclude_diagonal: bool = False) -> Tuple[Tensor, Tensor]:
        """Primitive 1 for the sigmoid family: the row sums of softplus(S_ij + bias) and of its
        derivative sigmoid(S_ij + bias), from one product per tile."""
        dtype = statistics_dtype(x.dtype)
        block_rows, block_cols = self._tile_grid(x, y)
        s, bias = scale.to(dtype), bias.to(dtype)
        sums = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
        slopes = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
        for i in _blocks(x.shape[0], block_rows):
            x_scaled = x[i].to(dtype) * s
            for j in _blocks(y.shape[0], block_cols):
                logits = torch.addmm(bias, x_scaled, y[j].to(dtype).T)
                if exclude_diagonal:
                    _diagonal_of_tile(logits, i, j).fill_(-torch.inf)  # softplus and sigmoid of -inf: 0
                sums[i] += softplus(logits).sum(dim=1)
                slopes[i] += torch.sigmoid(logits).sum(dim=1)
        return sums, slopes

    def weighted_grad(
        self,
        x: Tensor,
        y: Tensor,
        scale: Tensor,
        *,
        a: Optional[Tensor] = None,
        o: Optional[Tensor] = None,
        b: Optional[Tensor] = None,
        p: Optional[Tensor] = None,
        positives: Optional[Tuple[Tensor, Tensor]] = None,
        exclude_diagonal: bool = False,
        need_dx: bool = True,
        need_dy: bool = True,
        need_ds: bool = False,
        function: str = "exp",
        values: Optional[Tuple[Tensor, Tensor]] = None,
        guide: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """dx = s G y, dy = s G^T x, ds = sum_ij G_ij (x_i . y_j), with
        G_ij = a_i f(S_ij - o_i) + b_j f(S_ij - p_j) [+ c_i at j = t_i for positives=(t, c)],
        f = exp or sigmoid (`function`).

        values = (vx, vy) (N x Dv and M x Dv): G, still computed from (x, y, scale), multiplies
        them instead: G vy, G^T vx and sum_ij G_ij (vx_i . vy_j), unscaled, in the statistics dtype.
        guide = (gx, gy, threshold): the entries `lse` leaves out for it have no exponential term.
        """
        dtype = statistics_dtype(x.dtype)
        n, m = x.shape[0], y.shape[0]
        s = scale.to(dtype)
        vx, vy = values if values is not None else (x, y)  # what G multiplies
        kept = self._take_kept(x, y, scale, exclude_diagonal) if function == "exp" else None  # one tile, if any
        kept = kept if guide is None else None  # a guided lse keeps no tile: this one is another call's
        block_rows, block_cols = self._tile_grid(x, y)
        # Unscaled accumulators G @ vy and G^T @ vx; ds = vx . (G vy) needs the former.
        gy = torch.zeros(n, vy.shape[1], dtype=dtype, device=x.device) if (need_dx or need_ds) else None
        gtx = torch.zeros(m, vx.shape[1], dtype=dtype, device=x.device) if need_dy else None
        ds = torch.zeros((), dtype=dtype, device=x.device) if need_ds else None
        for i in _blocks(n, block_rows):
            x_block = x[i].to(dtype)
            vx_block = x_block if values is None else vx[i].to(dtype)
            if a is not None or b is not None:
                x_scaled = x_block * s
                for j in _blocks(m, block_cols):
                    y_block = y[j].to(dtype)
                    logits = kept if kept is not None else x_scaled @ y_block.T
                    weights = _weights(_leave_out(logits, i, j, exclude_diagonal, guide, dtype), a, o, b, p, i, j,
                                       function)
                    if gy is not None:
                        gy[i].addmm_(weights, y_block if values is None else vy[j].to(dtype))
                    if gtx is not None:
                        gtx[j].addmm_(weights.T, vx_block)
            # The sparse positive term and ds, a row block at a time: no N x D temporaries.
            if positives is not None:
                targets, coeff = positives[0][i], positives[1][i, None].to(dtype)
                if gy is not None:
                    gy[i].addcmul_(vy[targets].to(dtype), coeff)
                if gtx is not None:
                    gtx.index_add_(0, targets, vx_block * coeff)
            if need_ds:
                ds += torch.sum(gy[i] * vx_block)
        if values is not None:
            return gy if need_dx else None, gtx, ds
        dx = gy.mul_(s).to(x.dtype) if need_dx else None
        dy = gtx.mul_(s).to(y.dtype) if need_dy else None
        return dx, dy, ds
