"""The two primitives from fused kernels: what the Triton and CUDA backends share.

A kernel family brings three operators (registered with torch.library, so torch.compile
sees them as opaque nodes with fake implementations):

    lse_forward(x, y, scale, exclude_diagonal, merge_columns) -> (row_lse, col_lse)
        primitive 1: fp32 row LSE of S = scale * x @ y.T; with merge_columns also its column
        LSE, from the same pass (else col_lse comes back empty).
    softplus_sums(x, y, scale, bias, exclude_diagonal) -> (softplus_sums, sigmoid_sums)
        primitive 1' (the sigmoid family): fp32 row sums of softplus(S + bias) and of
        sigmoid(S + bias), bias a one-element fp32 tensor.
    weighted_products(a, b, scale, row_w, row_off, col_w, col_off, pos_index, pos_coeff,
                      positives_by, exclude_diagonal, row_start, row_end, sigmoid) -> fp32 (row_end - row_start, D)
        the product of primitive 2: rows [row_start, row_end) of G @ b, with
        G_rc = row_w_r f(S_rc - row_off_r) + col_w_c f(S_rc - col_off_c) + positives,
        S = scale * a @ b.T, f = exp (sigmoid=False) or the logistic sigmoid, and the positive
        pairs given by row (positives_by=POSITIVES_BY_ROW: row r's positive is column
        pos_index[r]) or by column (POSITIVES_BY_COLUMN: column c's positive is row pos_index[c]).
        A family with the "values" capability also takes values= (a tensor of b's rows and its own
        width Dv): it returns rows of G @ values instead, G still computed from (a, b, scale).

A family with the "guide" capability (docs/design.md, "Guide mask") also takes, in lse_forward
and weighted_products, after every other argument,

    guide_a, guide_b, threshold, threshold_by_row
        guide features of a's and b's rows (a's dtype, their own width Dg, any strides) and an fp32
        unit-stride threshold: entry (r, c) is left out, as the diagonal is, where the unscaled fp32
        T_rc = guide_a[r] . guide_b[c] > threshold[r] (threshold_by_row) or > threshold[c] (not):
        out of the row and column LSEs, out of G's row and column terms (not the positives).

`FusedKernels` turns those into the primitives: dx is the products of (x, y); dy the products
of (y, x) with the terms swapped (and the guide's operands, its threshold then indexed by the
kernel's columns); ds = x . (G y); rows go in chunks of whole waves of resident
programs, about SCRATCH_BYTES of fp32 output each (see `rows_per_chunk`).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what both kernel families take
SCRATCH_BYTES = 32 * 2**20
MIN_CHUNK_ROWS = 128
# weighted_products' positives_by, here once for both families: the Triton kernel reads these names,
# csrc/launchers.h has them as kNoPositives, kPositivesByRow, kPositivesByColumn (a test compares).
NO_POSITIVES, POSITIVES_BY_ROW, POSITIVES_BY_COLUMN = 0, 1, 2


def lse_forward_fake(x, y, scale, exclude_diagonal, merge_columns):
    """The shapes lse_forward returns, for torch.compile's fake tensors."""
    return (x.new_empty(x.shape[0], dtype=torch.float32),
            x.new_empty(y.shape[0] if merge_columns else 0, dtype=torch.float32))


def softplus_sums_fake(x, y, scale, bias, exclude_diagonal):
    """The shapes softplus_sums returns, for torch.compile's fake tensors."""
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32)


def weighted_products_fake(a, b, scale, row_w, row_off, col_w, col_off, pos_index, pos_coeff, positives_by,
                           exclude_diagonal, row_start, row_end, sigmoid=False, values=None):
    """The shape weighted_products returns, for torch.compile's fake tensors."""
    width = a.shape[1] if values is None else values.shape[1]
    return a.new_empty(row_end - row_start, width, dtype=torch.float32)


def rows_per_chunk(dim: int, wave_rows: Optional[int] = None, rows: Optional[int] = None) -> int:
    """Rows per launch of the products: about SCRATCH_BYTES of fp32 output, in whole waves.

    wave_rows: the rows one wave of resident programs covers on the GPU (rows per program x programs
    a multiprocessor holds at once x multiprocessors; see `FusedKernels`). Every program sweeps all
    columns, so a launch of fewer programs than the GPU holds leaves multiprocessors idle for a whole
    sweep, and one past a wave costs another sweep: the budget's rows are rounded up to whole waves
    (at N = 65536, D = 768 on 132 multiprocessors with 128-row programs, one per multiprocessor:
    4 launches of 16896 rows, 52 MiB of scratch each, where 10922-row chunks would run 7 launches
    of 86 programs). A chunk never exceeds the `rows` there are, so the scratch stays O(N D).
    """
    budget = max(MIN_CHUNK_ROWS, SCRATCH_BYTES // (4 * dim))
    if wave_rows:
        budget = -(-budget // wave_rows) * wave_rows
    return budget if rows is None else max(1, min(budget, rows))


def float32_threshold(threshold: Tensor) -> Tensor:
    """A guide threshold as the kernels read it: fp32, unit stride, and the same strict comparison
    with the fp32 guide similarity T. A wider threshold is rounded toward -inf: for an fp32 T,
    T > h exactly when T exceeds the largest fp32 at or below h (round to nearest could move a tie)."""
    if threshold.dtype == torch.float32:
        return threshold.contiguous()
    down = threshold.float()
    above = down.double() > threshold.double()
    return torch.where(above, torch.nextafter(down, torch.full_like(down, -torch.inf)), down).contiguous()


def resolve_deterministic(deterministic: Optional[bool]) -> bool:
    """An explicit choice, else torch.use_deterministic_algorithms' setting."""
    return torch.are_deterministic_algorithms_enabled() if deterministic is None else deterministic


class FusedKernels:
    """Primitives 1, 1' and 2 of docs/design.md from a kernel family's operators.

    deterministic (default: torch.are_deterministic_algorithms_enabled()) makes the LSEs
    bit-identical run to run; the products always are. A family whose kernels are
    autotuned must also pin their config when deterministic (the Triton backend does).
    """

    def __init__(self, name: str, lse_forward: Callable, weighted_products: Callable,
                 softplus_sums: Optional[Callable] = None, deterministic: Optional[bool] = None,
                 resident_rows: Optional[Callable[[torch.dtype], int]] = None, values: bool = False,
                 guide: bool = False):
        self.name = name
        # The rows one multiprocessor works on at once (rows per program x resident programs), by input dtype.
        self._resident_rows = resident_rows
        self._lse_forward = lse_forward
        self._softplus_sums = softplus_sums
        self._products = weighted_products
        self.deterministic = resolve_deterministic(deterministic)
        # The sigmoid family needs its forward operator; its products take a flag of the same operator.
        self.functions = ("exp", "sigmoid") if softplus_sums is not None else ("exp",)
        if values:  # its products take values= (primitive 2's values operands)
            self.functions = (*self.functions, "values")
        if guide:  # its forward and products take a guide mask (guide_a, guide_b, threshold, threshold_by_row)
            self.functions = (*self.functions, "guide")

    def lse(self, x: Tensor, y: Tensor, scale: Tensor, *, rows: bool = True, cols: bool = False,
            exclude_diagonal: bool = False, guide: Optional[Tuple[Tensor, Tensor, Tensor]] = None
            ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        on_xy, on_yx = self._guide_arguments(x, guide)
        # Merging the column statistics of one pass across programs happens in an order that
        # varies run to run, so a deterministic run takes the rows of S.T in a second pass.
        if rows and cols and not self.deterministic:
            return self._lse_forward(x, y, scale, exclude_diagonal, True, **on_xy)
        row_lse = self._lse_forward(x, y, scale, exclude_diagonal, False, **on_xy)[0] if rows else None
        col_lse = self._lse_forward(y, x, scale, exclude_diagonal, False, **on_yx)[0] if cols else None
        return row_lse, col_lse

    def _guide_arguments(self, x: Tensor, guide: Optional[Tuple[Tensor, Tensor, Tensor]]) -> Tuple[dict, dict]:
        """The operators' guide arguments for launches on (x, y) and on (y, x); none without a guide, so a
        family without the capability never sees them. On (y, x) the kernel's rows are y's: the guide's
        operands swap and the threshold, one per row of x, is indexed by the kernel's columns."""
        if guide is None:
            return {}, {}
        if "guide" not in self.functions:
            raise ValueError(f"the {self.name} kernels take no guide mask; the torch backend does")
        guide_x, guide_y, threshold = guide
        if guide_x.dtype != x.dtype or guide_y.dtype != x.dtype:
            raise ValueError(f"the {self.name} kernels take guide features of the similarity's dtype, got "
                             f"{guide_x.dtype} and {guide_y.dtype} for {x.dtype} features")
        threshold = float32_threshold(threshold)
        return (dict(guide_a=guide_x, guide_b=guide_y, threshold=threshold, threshold_by_row=True),
                dict(guide_a=guide_y, guide_b=guide_x, threshold=threshold, threshold_by_row=False))

    def holds_whole(self, x: Tensor, y: Tensor) -> bool:
        """The kernels never build S whole: every loss runs through them."""
        return False

    def softplus_sums(self, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *,
                      exclude_diagonal: bool = False) -> Tuple[Tensor, Tensor]:
        return self._softplus_sums(x, y, scale, bias.reshape(1), exclude_diagonal)

    def _chunks(self, a: Tensor, b: Tensor, scale: Tensor, row_term, col_term, positives, positives_by,
                exclude_diagonal, function, values: Optional[Tensor] = None, guide: Optional[dict] = None):
        """(rows, G[rows] @ b) in fp32 (G[rows] @ values with values), a chunk of rows at a time.
        guide: the operators' guide arguments for this launch (`_guide_arguments`)."""
        (w, off), (v, q) = row_term or (None, None), col_term or (None, None)
        index, coeff = positives or (None, None)
        # A family without values or a guide never sees those arguments.
        extra = {**({} if values is None else dict(values=values)), **(guide or {})}
        chunk = rows_per_chunk(a.shape[1] if values is None else values.shape[1], self._wave_rows(a), a.shape[0])
        for start in range(0, a.shape[0], chunk):
            end = min(start + chunk, a.shape[0])
            yield slice(start, end), self._products(
                a, b, scale, w, off, v, q, index, coeff,
                positives_by if positives is not None else NO_POSITIVES, exclude_diagonal, start, end,
                function == "sigmoid", **extra)

    def _wave_rows(self, a: Tensor) -> Optional[int]:
        if a.device.type != "cuda" or self._resident_rows is None:
            return None
        return self._resident_rows(a.dtype) * torch.cuda.get_device_properties(a.device).multi_processor_count

    def weighted_grad(
        self, x: Tensor, y: Tensor, scale: Tensor, *,
        a: Optional[Tensor] = None, o: Optional[Tensor] = None,
        b: Optional[Tensor] = None, p: Optional[Tensor] = None,
        positives: Optional[Tuple[Tensor, Tensor]] = None,
        exclude_diagonal: bool = False,
        need_dx: bool = True, need_dy: bool = True, need_ds: bool = False, function: str = "exp",
        values: Optional[Tuple[Tensor, Tensor]] = None, guide: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        if function not in self.functions:
            raise ValueError(f"the {self.name} kernels have no {function} weight function")
        if values is not None and "values" not in self.functions:
            raise ValueError(f"the {self.name} kernels take no values operands")
        on_xy, on_yx = self._guide_arguments(x, guide)
        # The kernels read these vectors with unit stride. (They keep G within the half-precision
        # range themselves, a row at a time, whatever the weights.)
        row_term = None if a is None else (a.contiguous(), o.contiguous())
        col_term = None if b is None else (b.contiguous(), p.contiguous())
        positives = None if positives is None else (positives[0].contiguous(), positives[1].contiguous())
        if values is not None:
            return self._value_products(x, y, scale, row_term, col_term, positives, exclude_diagonal, function,
                                        values, need_dx, need_dy, need_ds, on_xy, on_yx)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
        dy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_dy else None
        ds = torch.zeros((), dtype=torch.float32, device=x.device) if need_ds else None
        if need_dx or need_ds:
            for rows, gy in self._chunks(x, y, scale, row_term, col_term, positives, POSITIVES_BY_ROW,
                                         exclude_diagonal, function, guide=on_xy):
                if need_ds:
                    ds += torch.sum(gy * x[rows].float())
                if need_dx:
                    dx[rows] = gy.mul_(scale)
        if need_dy:
            for cols, gtx in self._chunks(y, x, scale, col_term, row_term, positives, POSITIVES_BY_COLUMN,
                                          exclude_diagonal, function, guide=on_yx):
                dy[cols] = gtx.mul_(scale)
        return dx, dy, ds

    def _value_products(self, x, y, scale, row_term, col_term, positives, exclude_diagonal, function, values,
                        need_dx, need_dy, need_ds, on_xy, on_yx):
        """weighted_grad with values = (vx, vy): G vy, G^T vx and sum_ij G_ij (vx_i . vy_j), unscaled, fp32."""
        vx, vy = values
        if vx.dtype != x.dtype or vy.dtype != y.dtype:
            raise ValueError(f"the {self.name} kernels take values of the similarity's dtype, got {vx.dtype} and "
                             f"{vy.dtype} for {x.dtype} features")
        vx, vy = vx.contiguous(), vy.contiguous()
        gy = torch.empty(x.shape[0], vy.shape[1], dtype=torch.float32, device=x.device) if need_dx else None
        gtx = torch.empty(y.shape[0], vx.shape[1], dtype=torch.float32, device=x.device) if need_dy else None
        ds = torch.zeros((), dtype=torch.float32, device=x.device) if need_ds else None
        if need_dx or need_ds:
            for rows, chunk in self._chunks(x, y, scale, row_term, col_term, positives, POSITIVES_BY_ROW,
                                            exclude_diagonal, function, vy, on_xy):
                if need_ds:
                    ds += torch.sum(chunk * vx[rows].float())
                if need_dx:
                    gy[rows] = chunk
        if need_dy:
            for cols, chunk in self._chunks(y, x, scale, col_term, row_term, positives, POSITIVES_BY_COLUMN,
                                            exclude_diagonal, function, vx, on_yx):
                gtx[cols] = chunk
        return gy, gtx, ds
