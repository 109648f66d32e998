"""``rdl-train``: run the seed report's experiment from one command.

Argument parsing and printing only; the experiment itself is
:func:`rdl_functional.run_disc`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import torch

from . import __version__
from .experiment import DEFAULTS, SCHEDULES, DiscResult, DiscSettings, run_disc


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line and exit code 2, not argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be ≥ {minimum}, got {value}")
        return value

    return parse


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rdl-train",
        description=(
            "Train the seed report's model (a 2-25-25-25-2 MLP, ReLU hidden layers, Tanh output) "
            "with plain SGD (no momentum; by default a learning rate that decays linearly to 0) "
            "on MSE against one-hot targets, to tell whether points in [0,1]² lie "
            "inside the disc of radius 1/√(2π) centred at (0.5, 0.5). Prints the train and test "
            "accuracy, the test misclassifications, the losses and the wall time."
        ),
    )
    parser.add_argument("--epochs", type=_int_at_least(0), default=DEFAULTS.epochs,
                        help="passes over the training set (default: %(default)s)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=DEFAULTS.batch_size,
                        help="points per SGD step (default: %(default)s)")
    parser.add_argument("--lr", type=_learning_rate, default=DEFAULTS.lr,
                        help="learning rate of the first step (default: %(default)s)")
    parser.add_argument("--schedule", choices=SCHEDULES, default=DEFAULTS.schedule,
                        help="linear: the rate decays linearly to 0 over the run, so SGD settles instead of "
                             "stopping wherever its gradient noise left it; constant: the same rate "
                             "throughout (default: %(default)s)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="seeds the data, the initial params and the shuffling (default: %(default)s)")
    parser.add_argument("--threads", type=_int_at_least(1), default=1,
                        help="torch intra-op threads; for this tiny model one is fastest, and a fixed "
                             "count keeps results reproducible (default: %(default)s)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


_HEADER = (
    f"{'seed':>4}  {'train acc':>9}  {'test acc':>8}  {'test errors':>11}  "
    f"{'train loss':>10}  {'test loss':>9}  {'time':>8}"
)


def _row(result: DiscResult) -> str:
    return (
        f"{result.seed:>4}  {result.train_accuracy:>9.1%}  {result.test_accuracy:>8.1%}  "
        f"{result.test_errors:>11d}  {result.train_loss:>10.4f}  {result.test_loss:>9.4f}  "
        f"{result.seconds:>6.2f} s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rdl-train`` and ``python -m rdl_functional``."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = DiscSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule)
    rate = f"lr {settings.lr:g}" + (" decaying linearly to 0" if settings.schedule == "linear" else " (constant)")
    print(
        f"rdl-train {__version__}: 2-25-25-25-2 MLP (ReLU, Tanh output), MSE on one-hot targets, plain SGD\n"
        f"{settings.epochs} epochs, batch size {settings.batch_size}, {rate}, "
        f"{settings.n_train} train / {settings.n_test} test points, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}\n"
    )
    print(_HEADER)
    print(_row(run_disc(args.seed, settings)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
