"""The class losses, nll and cross-entropy: torch's kernels on rows ``(-1, classes)``, the classes last."""

from __future__ import annotations

import torch
from torch import Tensor

from ._loss_core import (
    Loss,
    LossPullback,
    check_pred,
    check_same_dtype,
    check_weight,
    cotangent,
    options_name,
    reduction_code,
)
from .trace import reads_values

_aten = torch.ops.aten


def _check_labels(where: str, logits: Tensor, labels: Tensor, ignore_index: int) -> None:
    check_pred(where, logits)
    if logits.dim() < 1:
        raise ValueError(f"{where}: logits must have shape (..., classes), got {tuple(logits.shape)}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"{where}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{where}: labels must be int64 class indices, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{where}: labels must have shape {tuple(logits.shape[:-1])} to match the logits, got {tuple(labels.shape)}"
        )
    classes = logits.shape[-1]
    # Read where a read is free and allowed (reads_values); elsewhere torch's kernel refuses a label out of range
    # (a replayed record too), and leaves out one equal to ignore_index, as here.
    if not reads_values(labels) or not labels.numel():
        return
    kept = labels[labels != ignore_index]
    if kept.numel() and (kept.min() < 0 or kept.max() >= classes):
        ignored = "" if ignore_index == -100 else f" (or be ignore_index={ignore_index})"  # -100: the default
        raise ValueError(
            f"{where}: labels must lie in [0, {classes}){ignored}, got values in "
            f"[{int(kept.min())}, {int(kept.max())}]"
        )


def _check_ignore_index(where: str, ignore_index: object) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{where}: ignore_index must be an int (a label to leave out), got {ignore_index!r}")
    return ignore_index


def _check_class_weight(where: str, weight: Tensor | None, logits: Tensor) -> None:
    if weight is not None:
        check_same_dtype(where, "weight", weight, logits)
        if tuple(weight.shape) != (logits.shape[-1],):
            raise ValueError(f"{where}: weight must have shape ({logits.shape[-1]},), one entry per class, "
                             f"got {tuple(weight.shape)}")


def _class_weight(where: str, weight: object) -> Tensor | None:
    weight = check_weight(where, "weight", weight)
    if weight is not None and weight.dim() != 1:
        raise ValueError(f"{where}: weight must be 1-d, one entry per class, got shape {tuple(weight.shape)}")
    return weight


def _nll_loss(reduction: str = "mean", ignore_index: int = -100, *, weight: Tensor | None = None) -> Loss:
    mode = reduction_code("nll_loss", reduction)
    ignore_index = _check_ignore_index("nll_loss", ignore_index)
    weight = _class_weight("nll_loss", weight)
    name = options_name("nll_loss", **{key: value for key, value, default in [
        ("reduction", reduction, "mean"), ("ignore_index", ignore_index, -100), ("weight", weight, None)]
        if value is not default and value != default})

    def check(where: str, pred: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The kernels' layout: ``(batch, classes)`` and ``(batch,)``, or one example's ``(classes,)`` and ``()``."""
        _check_labels(where, pred, labels, ignore_index)
        _check_class_weight(where, weight, pred)
        if pred.dim() > 2:
            return pred.reshape(-1, pred.shape[-1]), labels.reshape(-1)
        return pred, labels

    def apply(pred: Tensor, labels: Tensor) -> Tensor:
        flat, flat_labels = check(f"{name}.apply", pred, labels)
        return _aten.nll_loss_forward(flat, flat_labels, weight, mode, ignore_index)[0].reshape(
            labels.shape if mode == 0 else ())

    def vjp(pred: Tensor, labels: Tensor) -> tuple[Tensor, LossPullback]:
        flat, flat_labels = check(f"{name}.vjp", pred, labels)
        value, total_weight = _aten.nll_loss_forward(flat, flat_labels, weight, mode, ignore_index)
        value = value.reshape(labels.shape) if mode == 0 else value

        def pullback(g: Tensor) -> Tensor:
            g = cotangent(f"{name} pullback", g, value)
            # dpred[i, yᵢ] = −g wᵧ / Σ wᵧ (kept labels) for the mean (−g wᵧ for the sum, −gᵢ wᵧ for 'none'), 0 elsewhere
            dflat = _aten.nll_loss_backward(g.reshape(flat_labels.shape) if mode == 0 else g, flat, flat_labels,
                                            weight, mode, ignore_index, total_weight)
            return dflat.reshape(pred.shape)

        return value, pullback

    return Loss(apply=apply, vjp=vjp, name=name, options=_nll_loss)


def _smoothing_term(log_p: Tensor, flat: Tensor, weight: Tensor | None, mode: int,
                    ignore_index: int) -> tuple[Tensor, LossPullback]:
    """Label smoothing's term ``−Σ_c w_c log p_c`` on the kept rows, reduced as nll is (the mean divides by the
    kept rows, or their weights' sum), and its pullback to ``d(log p)``: F.cross_entropy's composite, op by op."""
    ignored = flat == ignore_index
    weights = None if weight is None else weight.view(1, -1)
    smooth = (-(log_p * weights).sum(1) if weights is not None else -log_p.sum(1)).masked_fill(ignored, 0.0)
    if mode == 1:
        kept = weight.gather(0, flat.masked_select(~ignored)).sum() if weight is not None else (~ignored).sum()
        smooth = smooth.sum() / kept
    elif mode == 2:
        smooth = smooth.sum()

    def pullback(d: Tensor) -> Tensor:
        # d(log p)[n, c] = −d w_c (/ kept for the mean), 0 on ignored rows
        d = (d / kept if mode == 1 else d).expand(flat.shape) if mode else d
        d = (-d.masked_fill(ignored, 0)).unsqueeze(1).expand(log_p.shape)
        return d * weights if weights is not None else d

    return smooth, pullback


def _labels(logits: Tensor, labels: Tensor, weight: Tensor | None, mode: int, ignore_index: int,
            smoothing: float) -> tuple[Tensor, LossPullback]:
    """F.cross_entropy on class labels: its kernels on the rows; with label smoothing ε over C classes,
    ``L = (1 − ε) nll + (ε/C) smooth`` as its composite computes it."""
    classes = logits.shape[-1]
    log_p = _aten._log_softmax.default(logits.reshape(-1, classes), 1, False)
    flat = labels.reshape(-1)
    value, total_weight = _aten.nll_loss_forward.default(log_p, flat, weight, mode, ignore_index)
    if smoothing:
        smooth, smooth_pullback = _smoothing_term(log_p, flat, weight, mode, ignore_index)
        value = value * (1 - smoothing) + smooth * (smoothing / classes)
    value = value.reshape(labels.shape) if mode == 0 else value

    def pullback(g: Tensor) -> Tensor:
        # dz = (softmax(z) − onehot(y)) g / rows: nll_loss_backward puts −g/rows at each label, and
        # _log_softmax_backward_data maps d(log p) to dz = d − softmax(z) Σ d: the kernels autograd runs.
        g = g.reshape(-1) if mode == 0 else g
        if not smoothing:
            d_log_p = _aten.nll_loss_backward.default(g, log_p, flat, weight, mode, ignore_index, total_weight)
        else:
            d_log_p = smooth_pullback(g * (smoothing / classes)) + _aten.nll_loss_backward.default(
                g * (1 - smoothing), log_p, flat, weight, mode, ignore_index, total_weight)
        return _aten._log_softmax_backward_data.default(d_log_p, log_p, 1, log_p.dtype)

    return value, pullback


def _probabilities(where: str, logits: Tensor, target: Tensor, weight: Tensor | None, mode: int,
                   smoothing: float) -> tuple[Tensor, LossPullback]:
    """F.cross_entropy on class probabilities ``target`` of the logits' shape: its composite's ops on the rows."""
    if target.shape != logits.shape:
        if target.shape == logits.shape[:-1]:
            raise TypeError(f"{where}: labels must be int64 class indices, got {target.dtype} (probability targets "
                            f"have the logits' shape {tuple(logits.shape)})")
        raise ValueError(f"{where}: probability targets must have the logits' shape {tuple(logits.shape)}, got "
                         f"{tuple(target.shape)} (or pass int64 class labels of shape {tuple(logits.shape[:-1])})")
    check_same_dtype(where, "target", target, logits)
    classes = logits.shape[-1]
    log_p = _aten._log_softmax.default(logits.reshape(-1, classes), 1, False)
    rows = log_p.shape[0]
    t = target.reshape(-1, classes)
    t = t * (1 - smoothing) + smoothing / classes if smoothing else t  # t' = (1 − ε) t + ε/C
    weights = None if weight is None else weight.view(1, classes)
    product = log_p * t * weights if weights is not None else log_p * t
    # L = −Σ_c w_c t'_c log p_c, summed over the classes, then reduced over the rows (the mean divides by rows)
    if mode == 0:
        value = (-product.sum(1)).reshape(logits.shape[:-1])
    else:
        value = -product.sum() / rows if mode == 1 else -product.sum()

    def pullback(g: Tensor) -> Tensor:
        # d(log p) = −g w t' (/ rows for the mean), then _log_softmax_backward_data: dz = d − softmax(z) Σ d
        if mode == 0:
            d = (-g.reshape(-1)).unsqueeze(1).expand(log_p.shape)
        else:
            d = (-(g / rows) if mode == 1 else -g).expand(log_p.shape)
        d = d * weights * t if weights is not None else d * t
        return _aten._log_softmax_backward_data.default(d, log_p, 1, log_p.dtype)

    return value, pullback


def _label_smoothing(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: label_smoothing must be a number in [0, 1], got {value!r}")
    return float(value)


def _cross_entropy_loss(*, weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                        label_smoothing: float = 0.0) -> Loss:
    where = "cross_entropy_loss"
    mode, weight = reduction_code(where, reduction), _class_weight(where, weight)
    ignore_index, smoothing = _check_ignore_index(where, ignore_index), _label_smoothing(where, label_smoothing)
    name = options_name(where, **{key: value for key, value, default in [
        ("weight", weight, None), ("ignore_index", ignore_index, -100), ("reduction", reduction, "mean"),
        ("label_smoothing", smoothing, 0.0)] if value is not default and value != default})

    def forward(at: str, logits: Tensor, target: Tensor) -> tuple[Tensor, LossPullback]:
        _check_class_weight(at, weight, check_pred(at, logits))
        if isinstance(target, Tensor) and target.is_floating_point():
            return _probabilities(at, logits, target, weight, mode, smoothing)
        _check_labels(at, logits, target, ignore_index)
        return _labels(logits, target, weight, mode, ignore_index, smoothing)

    def apply(logits: Tensor, target: Tensor) -> Tensor:
        return forward(f"{name}.apply", logits, target)[0]

    def vjp(logits: Tensor, target: Tensor) -> tuple[Tensor, LossPullback]:
        value, rows_pullback = forward(f"{name}.vjp", logits, target)

        def pullback(g: Tensor) -> Tensor:
            return rows_pullback(cotangent(f"{name} pullback", g, value)).view(logits.shape)

        return value, pullback

    return Loss(apply=apply, vjp=vjp, name=name, options=_cross_entropy_loss)
