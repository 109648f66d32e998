"""What the image layers share: their arguments read as torch reads them, and one check of the input's layout.

Images are channels first, ``(batch, channels, *spatial)``, as torch.nn and its kernels take them
(docs/concepts.md, "Layouts"). Where the shapes can tell, an input in the other layout is refused with the
permute that fixes it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

# For 1 and 2 spatial dimensions: the layout taken, the channels-last one it may be confused with, the fix.
_LAYOUTS = {
    1: ("(N, C, L)", "(N, L, C)", "x.permute(0, 2, 1)"),
    2: ("(N, C, H, W)", "(N, H, W, C)", "x.permute(0, 3, 1, 2)"),
}


def as_tuple(where: str, name: str, value: Any, n: int, minimum: int) -> tuple[int, ...]:
    """``value`` (an int, or a tuple or list of ``n`` ints) as a tuple of ``n`` ints ≥ ``minimum``, as torch's
    ``_pair`` reads a conv's or pool's ``kernel_size``, ``stride``, ``padding``, ``dilation``."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        what = "an int" if n == 1 else f"an int or a tuple of {n} ints"
        raise ValueError(f"{where}: {name} must be {what} ≥ {minimum}, got {value!r}")
    return values


def layout(spatial: int) -> str:
    return _LAYOUTS[spatial][0] if spatial in _LAYOUTS else f"(N, C, {', '.join('*' * spatial)})"


def check_image(where: str, x: Any, spatial: int | None, channels: int | None = None) -> None:
    """Refuse an ``x`` that is not ``(N, C, *spatial)`` (``spatial=None``: any number ≥ 0 of spatial dimensions)
    with ``C == channels`` (``None``: any). A channels-last ``x`` is named as such where the shapes tell."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    taken = layout(spatial) if spatial is not None else "(N, C, *)"
    if spatial is not None and x.dim() == spatial + 1 and (channels is None or x.shape[0] == channels):
        raise ValueError(f"{where}: x has shape {tuple(x.shape)}, which reads as one example without its batch "
                         f"dimension; this layer takes a batch {taken}: x.unsqueeze(0)")
    if x.dim() != (spatial + 2 if spatial is not None else max(x.dim(), 2)):
        raise ValueError(f"{where}: x must have {spatial + 2 if spatial is not None else 'at least 2'} dimensions "
                         f"{taken}, channels first, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        if x.dim() > 2 and x.shape[-1] == channels:
            first, last, fix = _LAYOUTS.get(x.dim() - 2, ("(N, C, *)", "(N, *, C)", "x.movedim(-1, 1)"))
            raise ValueError(f"{where}: x has {x.shape[1]} channels at dim 1 but the layer takes {channels}; it looks "
                             f"channels-last {last} — this layer takes channels first {first}: {fix}")
        raise ValueError(f"{where}: x has {x.shape[1]} channels at dim 1 but the layer takes {channels} "
                         f"(x is {tuple(x.shape)}, channels first {taken})")


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool = False) -> int:
    """torch's output length of a conv or pool along one dimension (``pooling_output_shape`` for ``ceil_mode``)."""
    span = dilation * (kernel - 1) + 1
    out = (size + 2 * padding - span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # torch's rule: the last window starts inside the input or its left padding
    return out


def check_spans(where: str, x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], ceil_mode: bool = False) -> None:
    """Refuse a kernel that leaves no output along a spatial dimension: one that spans more than the padded
    input, or with ``ceil_mode`` (where torch lets the last window hang over the end) an output length < 1."""
    names = "HW" if len(kernel) == 2 else "L"
    for i, size in enumerate(x.shape[2:]):
        span = dilation[i] * (kernel[i] - 1) + 1
        out = output_size(size, kernel[i], stride[i], padding[i], dilation[i], ceil_mode)
        if out < 1 or (not ceil_mode and size + 2 * padding[i] < span):
            raise ValueError(f"{where}: the kernel spans {span} along {names[i]} (dilation·(kernel − 1) + 1) but the "
                             f"padded input is {size + 2 * padding[i]} ({names[i]} = {size} + 2·padding {padding[i]}) "
                             f"for x of shape {tuple(x.shape)}; use a smaller kernel, more padding or a larger input")


def check_windows(where: str, x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                  padding: tuple[int, ...], dilation: tuple[int, ...], ceil_mode: bool = False) -> None:
    """For a pool: :func:`check_spans`, and refuse a window that reads no input position (all padding, or
    dilated over the input), whose max torch's kernel leaves at −∞ with an index out of bounds."""
    check_spans(where, x, kernel, stride, padding, dilation, ceil_mode)
    names = "HW" if len(kernel) == 2 else "L"
    for i, size in enumerate(x.shape[2:]):
        k, s, p, d = kernel[i], stride[i], padding[i], dilation[i]
        out = output_size(size, k, s, p, d, ceil_mode)
        # Only a window starting in the padding can miss the input: the first ⌈p/s⌉ and those from (size + p)/s.
        starts = [*range(min(out, p // s + 1)), *range(max(p // s + 1, (size + p) // s), out)]
        for o in starts:
            if not any(0 <= o * s - p + j * d < size for j in range(k)):
                raise ValueError(f"{where}: output {o} along {names[i]} has a window that covers no input position "
                                 f"(it reads {[o * s - p + j * d for j in range(k)]}, x has {size} along "
                                 f"{names[i]}; kernel {k}, stride {s}, padding {p}, dilation {d}, ceil_mode "
                                 f"{ceil_mode}); use less padding or dilation, or ceil_mode=False")
