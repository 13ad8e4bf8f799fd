"""1×1 convolutions on the sparse matrix kernel (issue 12.8): a CNN ticket's pointwise layers.

A 1×1 convolution with stride 1, no padding and one group is a matrix product over pixels:
NCHW → (N·H·W, C_in) times the (C_out, C_in) weight. So a pruned pointwise convolution runs on
the same measured kernel choice as a :class:`~ticketlab.sparse.engine.SparseLinear` over
N·H·W "tokens" — and where that choice is dense (a layer not sparse enough, or a size where
MKL wins), the original convolution runs on the NCHW input untouched. Where the product alone
would win, the whole sparse path (the NHWC gather, the product, the strided view back) is
timed once against the convolution at that input size, and kept only if it is faster by the
margin: at 1×1 or 2×2 pixels the gather costs more than the product saves. Depthwise and 3×3
convolutions, BatchNorm and activations stay PyTorch: MobileNetV2's 1×1 convolutions are about
27–44 % of its forward at 32 px (README, Vision tickets), which bounds what any kernel gains.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ticketlab.sparse.calibration import (
    DEFAULT_MARGIN,
    CalibrationTable,
    time_candidates,
    token_bucket,
)
from ticketlab.sparse.engine import DENSE, RewriteContext, SparseLinear, register_rewrite


def is_pointwise(module: nn.Module) -> bool:
    """A plain 1×1 convolution: a matrix product over pixels."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
            and module.stride == (1, 1) and module.padding in ((0, 0), "valid")
            and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


class SparseConv1x1(nn.Conv2d):
    """A pointwise ``nn.Conv2d`` whose product runs on ticketlab's kernel where measured faster.

    Built by swapping the class of the (copied) convolution, as the fused encoder layers are:
    the same module, weight (shared, not copied) and name, so a layer that stays dense costs
    one dictionary lookup more than the original, not a module call. ``linear`` is a
    :class:`SparseLinear` over a (C_out, C_in) view of the same weight.
    """

    linear: SparseLinear
    confirmed: dict[tuple[int, int], bool]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, table: CalibrationTable,
                  margin: float = DEFAULT_MARGIN) -> SparseConv1x1:
        out_ch, in_ch = conv.weight.shape[:2]
        view = nn.Linear(in_ch, out_ch, bias=conv.bias is not None)
        view.weight = nn.Parameter(conv.weight.detach().view(out_ch, in_ch), requires_grad=False)
        view.bias = conv.bias
        conv.__class__ = cls
        conv.linear = SparseLinear(view, table, margin)
        conv.linear.pixels_per_example = None  # H·W, seen at the first call (for bench)
        #: (rows, threads) -> whether this layer runs sparse there: the kernel choice is sparse
        #: and the whole sparse path measured faster than the convolution
        conv.confirmed = {}
        return conv  # type: ignore[return-value]

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not self.linear._fast_path(x):
            return self._dense(x)
        n, c, h, w = x.shape
        key = (n * h * w, torch.get_num_threads())
        use = self.confirmed.get(key)  # the per-call path: one lookup
        if use is None:
            self.linear.pixels_per_example = h * w
            use = self.linear.decide(key[0], key[1]) != DENSE and self._whole_path_wins(
                x, key[1])
            self.confirmed[key] = use
        return self._sparse(x) if use else self._dense(x)

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # NHWC rows: one pixel each
        y = self.linear.run(rows)
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)  # NCHW shape, channels-last strides

    def _whole_path_wins(self, x: torch.Tensor, threads: int) -> bool:
        """Time the convolution against the whole sparse path on this input (CPU time on one
        thread, wall time on several); a loss makes the layer dense for this size."""
        clock = time.process_time if threads == 1 else time.perf_counter
        paths = {DENSE: lambda: self._dense(x), "sparse": lambda: self._sparse(x)}
        timings = time_candidates(paths, rounds=5, budget_s=0.5, clock=clock)
        wins = timings.get("sparse", float("inf")) < timings[DENSE] * (1 - self.linear.margin)
        if not wins:  # so decide() (and bench's count of sparse layers) says dense too
            bucket = token_bucket(x.shape[0] * x.shape[2] * x.shape[3])
            self.linear.kernels[(bucket, threads)] = DENSE
            self.linear._seen.clear()
        return wins


def _conv_rule(module: nn.Module, ctx: RewriteContext) -> nn.Module | None:
    if id(module) in ctx.targets and is_pointwise(module):
        return SparseConv1x1.from_conv(module, ctx.table, ctx.margin)  # type: ignore[arg-type]
    return None


register_rewrite(nn.Conv2d, _conv_rule)
