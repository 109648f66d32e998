"""``rdl-train``: the seed report's experiment from one command.

Argument parsing, progress and printing only; the experiment itself is
:func:`rdl_functional.run_disc`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import attrs
import torch

from .. import __version__
from .._files import atomic_write, check_writable
from .._runs import _ahead_of
from ..checkpoint import _KEY as _CHECKPOINT_KEY
from ..checkpoint import read_checkpoint
from ..distributed import PeerLost
from ..initializers import INITIALIZERS
from ..io import _load, load
from ..layers import Params
from ..optim.schedules import MAX_LR
from ..train import History, NonFiniteLoss
from ..tree import tree_leaves
from .disc import (
    DEFAULTS,
    LOSSES,
    MODELS,
    OPTIMIZERS,
    SCHEDULES,
    TUNED,
    DiscResult,
    DiscSettings,
    _resolved,
    check_params_fit,
    run_disc,
    run_disc_together,
    summarize,
)
from .disc_task import TASK as DISC
from .tasks import TASK_NAMES, Column, Comparison, TrainingTask


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line and exit code 2, not argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits, and larger ones would alias smaller ones
MAX_SEEDS = 1000  # each seed is a whole run, and --seeds trains them as one stack held in memory at once


def _int_at_least(minimum: int, maximum: int = MAX_SEED) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be ≥ {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be ≤ {maximum}, got {value}")
        return value

    return parse


def _number(rule: str, holds: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a finite float for which ``holds`` is true; ``rule`` says which in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not holds(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


_learning_rate = _number(f"a number > 0 and ≤ {MAX_LR:.4g} (float32's largest)", lambda value: 0 < value <= MAX_LR)
_non_negative = _number("a finite number ≥ 0", lambda value: value >= 0)
_probability = _number("a probability in [0, 1)", lambda value: 0 <= value < 1)


def _seeds(text: str) -> list[int]:
    """``"0-9"``, ``"3"`` or ``"0-4,8,10-11"``: seeds, ranges inclusive, no repeats."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seeds like 0-9 or 1,4,7, got {text!r}") from None
        if low < 0 or high < low:
            hint = f" (did you mean {high}-{low}?)" if high < low else ""
            raise argparse.ArgumentTypeError(f"the seed range {part.strip()} is empty or negative{hint}")
        if high > MAX_SEED:
            raise argparse.ArgumentTypeError(f"seeds must be ≤ {MAX_SEED}, got {high}")
        if len(seeds) + high - low + 1 > MAX_SEEDS:
            raise argparse.ArgumentTypeError(f"{text!r} names more than {MAX_SEEDS} seeds: each is a whole run, "
                                             "and they train as one stack held in memory at once")
        seeds.extend(range(low, high + 1))
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} names a seed twice")
    return seeds


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rdl-train",
        description=(
            "Train the seed report's model (a 2-25-25-25-2 MLP, ReLU hidden layers, Tanh output) "
            "with plain SGD (by default; a learning rate that decays linearly to 0) or another optimizer "
            "on MSE against one-hot targets, to tell whether points in [0,1]² lie inside the disc "
            "of radius 1/√(2π) centred at (0.5, 0.5). Prints the train and test accuracy, the test "
            "misclassifications, the losses and the wall time of each run. --task digits and --task adder run "
            "the other tasks (docs/tasks.md), with the same table and output flags."
        ),
    )
    parser.add_argument("--task", choices=TASK_NAMES, default="disc",
                        help="disc: the seed report's experiment (the flags below describe it); digits: "
                             "scikit-learn's 8×8 handwritten digits and a small CNN (needs the [tasks] extra); "
                             "adder: minGPT's 2-digit adder and a small transformer. The other tasks take "
                             "--epochs, --batch-size, --lr, --weight-decay, --dropout, --device, --dtype, --seed(s), "
                             "--threads and the output flags, each with the task's own default (default: "
                             "%(default)s)")
    training = parser.add_argument_group("training")
    training.add_argument("--model", choices=tuple(MODELS), default=DEFAULTS.model,
                          help="mlp: the seed model, MSE on one-hot targets; logistic: one linear layer, "
                               "cross-entropy (the baseline) (default: %(default)s)")
    training.add_argument("--epochs", type=_int_at_least(1), default=DEFAULTS.epochs,
                          help="passes over the training set; with --resume, a run of --schedule constant may be "
                               "given more (default: %(default)s)")
    training.add_argument("--batch-size", type=_int_at_least(1), default=DEFAULTS.batch_size,
                          help="points per SGD step (default: %(default)s)")
    training.add_argument("--init", choices=tuple(INITIALIZERS), default=DEFAULTS.init,
                          help="how the weights are drawn: torch.nn.init's formulas; torch_default is "
                               "torch.nn.Linear's own (default: %(default)s)")
    training.add_argument("--loss", choices=tuple(LOSSES), default=None,
                          help="mse: against one-hot targets; cross-entropy: the outputs as logits against the "
                               "labels (default: the model's own, mse for mlp, cross-entropy for logistic)")
    training.add_argument("--dropout", type=_probability, default=DEFAULTS.dropout, metavar="P",
                          help="dropout of probability P after each hidden ReLU of the MLP; the seeds then train "
                               "one after another (default: %(default)s, none)")
    training.add_argument("--batch-norm", action="store_true",
                          help="batch norm after each hidden linear layer of the MLP (torch.nn.BatchNorm1d's); "
                               "the seeds then train one after another")
    training.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULTS.optimizer,
                          help="sgd: plain SGD; momentum, nesterov: SGD with (Nesterov) momentum; adam, adamw, "
                               "rmsprop, adagrad: as torch.optim's (default: %(default)s)")
    training.add_argument("--lr", type=_learning_rate, default=None,
                          help="peak learning rate (default: tuned for each optimizer on this task: "
                               + ", ".join(f"{name} {TUNED[name]['lr']:g}" for name in OPTIMIZERS) + ")")
    training.add_argument("--momentum", type=_non_negative, default=None,
                          help="momentum of momentum, nesterov and rmsprop (default: 0.9 for momentum and "
                               "nesterov, 0 for rmsprop)")
    training.add_argument("--weight-decay", type=_non_negative, default=None,
                          help="weight decay (default: 0.01 for adamw, as torch.optim.AdamW; 0 otherwise)")
    training.add_argument("--schedule", choices=SCHEDULES, default=DEFAULTS.schedule,
                          help="linear: the rate decays linearly to 0 over the run, so SGD settles instead of "
                               "stopping wherever its gradient noise left it; constant: the same rate "
                               "throughout; cosine: cosine decay to 0; warmup-cosine: a linear warm-up over "
                               "the first 5%% of steps, then cosine decay (default: %(default)s)")
    seeds = training.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=_int_at_least(0), default=0,
                       help="seeds the data, the initial params and the shuffling (default: %(default)s)")
    seeds.add_argument("--seeds", type=_seeds, metavar="RANGE",
                       help="one run per seed, e.g. 0-9 or 0-4,8, trained together as one stack of models; "
                            "prints the median, mean ± std and worst")
    training.add_argument("--separately", action="store_true",
                          help="with --seeds, train the seeds one after another, each exactly as --seed N "
                               "would (together, rounding can differ in the last bits; this is slower)")
    training.add_argument("--init-from", metavar="PATH", type=Path,
                          help="start from params saved by --save (or rf.save) instead of drawing them (the params "
                               "only: batch norm's running statistics start afresh); a checkpoint's run goes on with "
                               "--resume PATH instead")
    training.add_argument("--compile", action="store_true",
                          help="train through torch.compile: the first step compiles (tens of seconds), later "
                               "steps run faster; results equal eager training to float rounding")
    training.add_argument("--capture", action="store_true",
                          help="with --device cuda: record each step's forward and backward pass as a CUDA graph "
                               "at the first step and replay it after, one launch a step (a plain model)")
    training.add_argument("--no-finite-check", dest="check_finite", action="store_false",
                          help="train on when the loss turns NaN or infinite (by default the run stops there, "
                               "naming the epoch and step)")
    training.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                          help="where to train: cpu, cuda (an error when there is none), or auto (cuda when torch "
                               "sees one; the first line printed says which); data and params are drawn on the CPU "
                               "and moved, so a seed names the same run everywhere (default: %(default)s)")
    training.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                          help="the floating dtype of the data and params (default: %(default)s)")
    training.add_argument("--nproc", type=_int_at_least(1, 64), default=1, metavar="N",
                          help="train data-parallel in N processes that this command starts on 127.0.0.1 (gloo), "
                               "each on its shard of every global batch; the result equals one process's to float "
                               "rounding. Under torchrun, leave it out: the processes are torchrun's "
                               "(default: %(default)s)")
    training.add_argument("--threads", type=_int_at_least(1, 1024), default=1,
                          help="torch intra-op threads; for this tiny model one is fastest, and a fixed "
                               "count keeps results reproducible (default: %(default)s)")
    output = parser.add_argument_group("output")
    output.add_argument("--plots", metavar="DIR", type=Path,
                        help="write dataset.png, history.png and decision-boundary.png to DIR; with --seeds, "
                             "seeds.png: the median test accuracy and loss per epoch, with a band from the worst "
                             "to the best seed (needs the [plot] extra)")
    output.add_argument("--save", metavar="PATH", type=Path,
                        help="write the trained params (safetensors); with --dropout or --batch-norm also the "
                             "model's state, beside it as NAME-state.safetensors")
    output.add_argument("--json", metavar="PATH", type=Path, help="write the runs and their summary as JSON")
    output.add_argument("--checkpoint", metavar="PATH", type=Path,
                        help="write the run's whole state to PATH once an epoch (see --checkpoint-every), each "
                             "write replacing the last whole or not at all; if PATH holds a checkpoint of this "
                             "very run, continue it")
    output.add_argument("--checkpoint-every", metavar="N", type=_int_at_least(1),
                        help="steps between checkpoints (default: one epoch's; each is a write and an fsync, "
                             "which for the seed model costs more than the epoch itself). It changes no result, so "
                             "it may be given anew with --resume")
    output.add_argument("--resume", metavar="PATH", type=Path,
                        help="continue the run that the checkpoint at PATH records, with its settings (a training "
                             "flag given must have the run's own value, but --nproc N and, for a run of --schedule "
                             "constant, --epochs N to extend it; --save, --json, --plots, --compare-torch may be "
                             "given again); it ends with the params and history of the run never interrupted, bit for "
                             "bit (on as many processes as it ran on; to float rounding on another number)")
    output.add_argument("--compare-torch", action="store_true",
                        help="also train the same MLP with torch.nn + autograd + the matching torch.optim "
                             "optimizer from the same params and batches, and compare accuracies, params and "
                             "wall times")
    output.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# ---------------------------------------------------------------------------
# Checks made before any training, so that a bad path costs nothing


def _fail(message: str) -> NoReturn:
    print(f"rdl-train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_output_file(flag: str, path: Path) -> None:
    try:
        check_writable(path, flag)
    except OSError as error:
        _fail(str(error))


def _check_plot_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        _fail(f"--plots {path}: is a file; --plots takes a folder to write the pictures into")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _fail(f"--plots {path}: cannot create the folder ({error.strerror or error})")
    if not os.access(path, os.W_OK):
        _fail(f"--plots {path}: the folder is not writable")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _fail("--plots needs matplotlib: pip install 'rdl_functional[plot]'")


def _check_args(args: argparse.Namespace) -> None:
    single = args.seeds is None or len(args.seeds) == 1
    for flag, value in (("--save", args.save), ("--compare-torch", args.compare_torch)):
        if value and not single:
            _fail(f"{flag} describes one run; use --seed N rather than --seeds")
    if args.compare_torch and args.model != "mlp":
        _fail(f"--compare-torch trains the seed MLP; it does not apply to --model {args.model}")
    if args.compare_torch and args.loss == "cross-entropy":
        _fail("--compare-torch trains with MSE, as the seed report did; it does not apply to --loss cross-entropy")
    if (args.dropout or args.batch_norm) and args.model != "mlp":
        _fail(f"--dropout and --batch-norm go into the seed MLP; they do not apply to --model {args.model}")
    if args.batch_norm and (DEFAULTS.n_train % args.batch_size == 1 or args.batch_size == 1):
        _fail(f"--batch-norm: batches of {args.batch_size} leave {'every' if args.batch_size == 1 else 'the last'} "
              f"batch of an epoch ({DEFAULTS.n_train} points) one row, which batch norm cannot normalize in "
              "training; choose another --batch-size")
    if args.nproc > 1 or _launched_by_torchrun():
        how = f"--nproc {args.nproc}" if args.nproc > 1 else "torchrun"
        if args.seeds is not None and len(args.seeds) > 1:
            _fail(f"{how} trains one run data-parallel; use --seed N rather than --seeds")
        for flag, value in (("--compile", args.compile), ("--capture", args.capture),
                            ("--compare-torch", args.compare_torch)):
            if value:
                _fail(f"{how} does not take {flag} yet")
        processes = args.nproc if args.nproc > 1 else int(os.environ["WORLD_SIZE"])
        smallest = min(args.batch_size, DEFAULTS.n_train % args.batch_size or args.batch_size)
        if (args.dropout or args.batch_norm) and smallest < processes:
            _fail(f"{how}: with --dropout or --batch-norm every process needs rows of every batch, but batches of "
                  f"{args.batch_size} over {DEFAULTS.n_train} points leave {smallest} row(s) in "
                  f"{'each' if smallest == args.batch_size else 'the last'} for {processes} processes; choose "
                  "another --batch-size")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args.device_chosen = True  # the header says so
    if args.device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda: torch sees no CUDA device on this machine (use --device cpu, or auto)")
    if args.compare_torch and (args.device != "cpu" or args.dtype != "float32"):
        _fail("--compare-torch compares on the CPU in float32; leave out --device and --dtype")
    if args.capture and args.device != "cuda":
        _fail(f"--capture records CUDA graphs; it needs --device cuda (or auto on a machine with CUDA), not "
              f"{args.device}")
    if args.capture and (args.dropout or args.batch_norm or args.compile):
        _fail("--capture records a plain model's step; it does not apply with --dropout, --batch-norm or --compile")
    if args.compile and (args.dropout or args.batch_norm):
        _fail("--compile compiles a plain model's step; it does not apply with --dropout or --batch-norm")
    if args.compile and args.optimizer != "sgd":
        _fail(f"--compile trains with plain SGD; it does not apply to --optimizer {args.optimizer}")
    if args.momentum is not None and args.optimizer not in ("momentum", "nesterov", "rmsprop"):
        _fail(f"--momentum applies to momentum, nesterov and rmsprop, not to --optimizer {args.optimizer}")
    if args.optimizer in ("momentum", "nesterov") and args.momentum == 0:
        _fail(f"--optimizer {args.optimizer} needs --momentum > 0 (use --optimizer sgd for none)")
    if args.checkpoint is not None and not single:
        _fail("--checkpoint records one run; use --seed N rather than --seeds")
    if args.checkpoint_every is not None and args.checkpoint is None and args.resume is None:
        _fail("--checkpoint-every goes with --checkpoint PATH (or --resume PATH)")
    checkpoint = args.checkpoint or args.resume
    for flag, path in (("--save", args.save), ("--json", args.json)):
        if path is not None and checkpoint is not None and path.resolve() == checkpoint.resolve():
            _fail(f"{flag} {path}: that is the checkpoint's own file; choose another path")
    for flag, path in (("--save", args.save), ("--json", args.json), ("--checkpoint", args.checkpoint)):
        if path is not None:
            _check_output_file(flag, path)
    if args.save is not None and args.save.is_file() and args.save.resolve() != (args.resume or Path()).resolve():
        try:
            load(args.save)
        except (OSError, ValueError):
            _fail(f"--save {args.save}: the file exists and is not a safetensors file of params; refusing to "
                  "replace it (remove it, or choose another path)")
    if args.plots is not None:
        _check_plot_dir(args.plots)


def _state_path(path: Path) -> Path:
    """Where --save writes a stateful model's state: beside the params, ``NAME-state.SUFFIX``."""
    return path.with_name(f"{path.stem}-state{path.suffix or '.safetensors'}")


def _initial_params(path: Path | None) -> Params | None:
    if path is None:
        return None
    try:
        params, metadata = _load(path, "load")
    except (OSError, ValueError) as error:
        _fail(f"--init-from: {error}")
    if _CHECKPOINT_KEY in metadata:
        _fail(f"--init-from {path}: the file is a checkpoint (of --checkpoint or fit(..., checkpoint=)), not params "
              f"saved by --save; to continue its run, use --resume {path}")
    return params


# ---------------------------------------------------------------------------
# Progress, on stderr


def _latest(history: History | list[History]) -> tuple[float, float, float]:
    """The last loss, train and test accuracy; the medians of them over a stack of models."""
    histories = history if isinstance(history, list) else [history]

    return tuple(statistics.median(getattr(h, name)[-1] for h in histories)  # type: ignore[return-value]
                 for name in ("train_loss", "train_accuracy", "test_accuracy"))


def _progress(label: str, epochs: int, quiet: bool, stream: TextIO) -> tuple[Callable | None, Callable[[], None]]:
    """A fit callback that shows progress (medians, for a stack of models), and a function that closes it."""
    if quiet or epochs == 0:
        return None, lambda: None
    if stream.isatty():
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc=label, unit="epoch", file=stream, leave=False, dynamic_ncols=True)

        def update(epoch: int, params: Params, history: History | list[History]) -> None:
            loss, train, test = _latest(history)
            bar.set_postfix_str(f"loss {loss:.4f}  train {train:.1%}  test {test:.1%}", refresh=False)
            bar.update(1)
            if epoch == epochs:  # show the end state, however fast the run was
                bar.refresh()

        return update, bar.close
    every = max(1, epochs // 10)

    def line(epoch: int, params: Params, history: History | list[History]) -> None:
        if epoch % every == 0 or epoch == epochs:
            loss, train, test = _latest(history)
            print(f"{label}  epoch {epoch:>{len(str(epochs))}}/{epochs}  loss {loss:.4f}  "
                  f"train acc {train:.1%}  test acc {test:.1%}", file=stream, flush=True)

    return line, lambda: None


# ---------------------------------------------------------------------------
# Tables, on stdout

def _row(label: str, figures: dict[str, float], columns: tuple[Column, ...], percent_digits: int = 1) -> str:
    def cell(column: Column) -> str:
        value = figures[column.key]
        if column.kind == "percent":
            return f"{value:.{percent_digits}%}"
        if column.kind == "count":
            return f"{value:g}" if label.isdigit() else f"{value:.1f}"
        return f"{value:.4f}" if column.kind == "loss" else f"{value:.2f} s"

    widths = (6, *(column.width for column in columns))
    return "  ".join(f"{text:>{width}}" for text, width in zip((label, *map(cell, columns)), widths, strict=True))


def _print_table(results: list[Any], summary: dict[str, dict[str, float]],
                 columns: tuple[Column, ...] = DISC.columns) -> None:
    """One row per run, and with several, their median, mean, std and worst: the task's columns after "seed"."""
    widths = (6, *(column.width for column in columns))
    print("  ".join(f"{name:>{width}}" for name, width in zip(("seed", *(c.header for c in columns)), widths,
                                                                strict=True)))
    for result in results:
        print(_row(str(result.seed), result.summary(), columns))
    if len(results) > 1:
        print("  ".join("-" * width for width in widths))
        for statistic in ("median", "mean", "std", "worst"):
            print(_row(statistic, {name: values[statistic] for name, values in summary.items()}, columns, 2))
        test = summary["test_accuracy"]
        print(f"\ntest accuracy over {len(results)} seeds: median {test['median']:.2%}, "
              f"mean {test['mean']:.2%} ± {test['std']:.2%}, worst {test['worst']:.2%}")


def _disc_json(settings: DiscSettings) -> dict[str, Any]:
    """The disc's settings as --json records them: the values trained with."""
    return {"model": settings.model, "epochs": settings.epochs, "batch_size": settings.batch_size,
            "optimizer": settings.optimizer, "lr": settings.rate, "momentum": settings.tuned("momentum"),
            "weight_decay": settings.tuned("weight_decay"), "schedule": settings.schedule, "init": settings.init,
            "dropout": settings.dropout, "batch_norm": settings.batch_norm, "device": settings.device,
            "dtype": settings.dtype, "processes": int(os.environ.get("WORLD_SIZE", "1")),
            "loss": settings.loss or ("mse" if settings.model == "mlp" else "cross-entropy"),
            "n_train": settings.n_train, "n_test": settings.n_test}


def _write_outputs(args: argparse.Namespace, results: list[Any], settings: Any, summary: dict[str, Any],
                   task: TrainingTask = DISC) -> None:
    """--save, --plots and --json, after training; a failed write is one line and exit 1."""
    try:
        if args.save is not None:
            from ..io import save

            save(results[0].params, args.save)
            print(f"saved the trained params to {args.save}")
            if results[0].model_state is not None and tree_leaves(results[0].model_state):
                state_path = _state_path(args.save)
                save(results[0].model_state, state_path)
                print(f"saved the model's state (batch norm's running statistics) to {state_path}")
        if args.plots is not None:
            print(f"wrote {', '.join(task.plots(args.plots, results, settings))} to {args.plots}")
        if args.json is not None:
            recorded = _disc_json(settings) if task is DISC else attrs.asdict(settings)
            document = {
                "task": task.name,
                "settings": {**recorded, "threads": torch.get_num_threads(), "torch": torch.__version__,
                             "rdl_functional": __version__},
                "runs": [result.summary() for result in results],
                "summary": summary,
            }
            text = json.dumps(_json_safe(document), indent=2, allow_nan=False) + "\n"
            atomic_write(args.json, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            print(f"wrote {args.json}")
    except OSError as error:  # a write that failed after training (a full disk, a file-size limit): exit 1, as a
        # failed checkpoint write; the library's message names the file, an OSError from elsewhere its filename
        named = str(error) if error.filename is None and not error.strerror else \
            f"cannot write {error.filename or 'the output'}: {error.strerror or error}"
        print(f"rdl-train: error: {named}", file=sys.stderr)
        raise SystemExit(1) from None


def _print_comparison(comparison: Comparison) -> None:
    """The run and its torch.nn twin's, side by side, and the largest difference of their params."""
    rows = "".join(f"  {label:<22}{ours:>15{spec}}{theirs:>11{spec}}\n" for label, ours, theirs, spec in
                   comparison.figures)
    print(f"\n{comparison.twin}, from the same params and batches:\n"
          f"  {'':<22}{'rdl_functional':>15}{'torch.nn':>11}\n{rows}"
          f"  {'training wall time':<22}{comparison.seconds:>13.2f} s{comparison.torch_seconds:>9.2f} s\n"
          f"  max |parameter difference|: {comparison.max_param_difference:.3g}"
          f"  (time ratio {comparison.seconds / comparison.torch_seconds:.2f}×)")


_RECORDED = ("epochs", "batch_size", "lr", "schedule", "model", "compile", "capture", "optimizer", "momentum",
             "weight_decay", "init", "loss", "dropout", "batch_norm", "device", "dtype")  # DiscSettings' flags
_CALLER = ("init_from", "check_finite", "threads")  # the rest of a run, as rdl-train records it
_MISSING = object()


def _typed(argv: list[str]) -> dict[str, Any]:
    """The flags given on the command line, by dest, with their parsed values: a second parse without defaults."""
    parser = _parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions}


def _shown(action: argparse.Action, value: Any) -> str:
    """A flag's value in words: on/off for a switch, "none" for no value."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "on" if value == action.const else "off"
    return "none" if value is None else str(value)


def _validated(action: argparse.Action, value: Any, where: str) -> Any:
    """A value a checkpoint records for ``action``'s flag, checked as the parser checks a typed one."""
    flag = action.option_strings[0]
    if value is _MISSING:
        _fail(f"{where}: the checkpoint's record of its rdl-train run has no value for {flag}")
    problem = None
    if value is None:
        problem = None if action.default is None else "none, where the flag takes a value"
    elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        problem = None if isinstance(value, bool) else f"{value!r}, not true or false"
    elif action.choices is not None:
        problem = None if value in action.choices else f"{value!r}, not one of {', '.join(map(str, action.choices))}"
    elif action.type is Path:
        if not isinstance(value, str) or not value:
            problem = f"{value!r}, not a path"
        else:
            return Path(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        problem = f"{value!r}, not a number"
    else:
        try:
            return action.type(str(value))
        except argparse.ArgumentTypeError as error:
            problem = f"{value!r}, which {flag} refuses ({error})"
    if problem:
        _fail(f"{where}: the checkpoint records {flag} {problem}: a damaged or hand-made record")
    return value


def _checkpoint_run(path: Path, where: str, checkpoint: Any) -> dict[str, Any]:
    """The rdl-train run a checkpoint records, by dest, each value checked by the parser's own validators."""
    shown = f"{where} {path}"
    info = checkpoint.settings.get("info")
    caller = info.get("caller") if isinstance(info, dict) else None
    if not isinstance(caller, dict) or caller.get("program") != "rdl-train":
        _fail(f"{shown}: the checkpoint was not written by rdl-train (use rf.fit(..., checkpoint=PATH) with the "
              f"same arguments to continue it{', or choose another path' if where == '--checkpoint' else ''})")
    settings = info.get("settings")
    if not isinstance(settings, dict):
        _fail(f"{shown}: the checkpoint's record of its rdl-train run has no settings")
    for name in ("n_train", "n_test"):
        if settings.get(name) != getattr(DEFAULTS, name):
            _fail(f"{shown}: the checkpoint records a run of {name} {settings.get(name)!r}; rdl-train trains on "
                  f"{getattr(DEFAULTS, name)} points")
    recorded = {**settings, "epochs": checkpoint.settings.get("epochs", _MISSING), "seed": info.get("seed", _MISSING),
                **{name: caller.get(name, _MISSING) for name in _CALLER}}
    actions = _actions(_parser())
    return {dest: _validated(actions[dest], recorded.get(dest, _MISSING), shown)
            for dest in (*_RECORDED, "seed", *_CALLER)}


def _resume_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    """``--resume PATH``: the run's settings, seed and checkpoint path, taken from the checkpoint into ``args``.

    A training flag given as well must have the run's value (compared as trained with: ``--lr 0.8`` is SGD's
    default), or it is refused by name; ``--epochs`` may extend the run, which :func:`_accept_checkpoint` checks.
    """
    checkpoint = _read_resumed(args)
    run = _checkpoint_run(args.resume, "--resume", checkpoint)
    typed, actions = _typed(argv), _actions(parser)
    if "seeds" in typed and typed["seeds"] != [run["seed"]]:
        _fail(f"--resume {args.resume}: the checkpoint records one run, of seed {run['seed']}; leave out --seeds")
    differ = []
    for dest, value in typed.items():
        if dest in run and dest != "epochs":
            now = (value.resolve() if dest == "init_from" else _auto_device() if (dest, value) == ("device", "auto")
                   else value)
            if now != run[dest]:
                differ.append(f"{actions[dest].option_strings[0]} {_shown(actions[dest], now)} here, "
                              f"{_shown(actions[dest], run[dest])} in the run")
    if differ:
        _fail(f"--resume {args.resume}: the checkpoint records a run of other settings ({'; '.join(differ)}); leave "
              "those flags out: --resume takes the run's settings from its checkpoint")
    for dest, value in run.items():
        if dest != "epochs" or "epochs" not in typed:
            setattr(args, dest, value)
    args.seeds, args.checkpoint = None, args.resume


def _auto_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _accept_checkpoint(args: argparse.Namespace, settings: DiscSettings) -> None:
    """With ``--checkpoint PATH`` (or ``--resume PATH``) holding a checkpoint: refuse it, by flag name, if it
    records another run, compared by the values trained with (fit then checks the rest, and says when it resumes
    through :func:`_say_resuming`). A run of another
    ``--epochs`` is the same run extended when its rate does not depend on its length (``--schedule constant``)."""
    path = args.checkpoint
    if path is None or not path.exists():
        return
    try:
        checkpoint = read_checkpoint(path)
    except (OSError, ValueError):
        return  # fit says what is wrong with it, naming the file
    task = _task_of(checkpoint)
    if task != "disc":
        _fail(f"--checkpoint {path} is a checkpoint of --task {task}, not of this --task disc run; choose another "
              f"path (or --resume {path} to go on with that run)")
    where = "--resume" if args.resume is not None else "--checkpoint"
    run, actions = _checkpoint_run(path, where, checkpoint), _actions(_parser())
    now = {**_resolved(settings), "seed": args.seed, "init_from": args.init_from.resolve() if args.init_from else None,
           "check_finite": args.check_finite, "threads": args.threads}
    differ = [f"{actions[dest].option_strings[0]} {_shown(actions[dest], run[dest])} in the checkpoint, "
              f"{_shown(actions[dest], now[dest])} now" for dest in run if dest != "epochs" and run[dest] != now[dest]]
    if differ:
        _fail(f"--checkpoint {path}: the checkpoint records another run ({'; '.join(differ)}); give the flags it was "
              f"written with (or rdl-train --resume {path}), or choose another path")
    if now["epochs"] != run["epochs"]:
        ahead = _ahead_of(checkpoint, now["epochs"])
        if ahead:
            _fail(f"{where} {path}: the checkpoint {ahead}, more than --epochs {now['epochs']}")
        if run["schedule"] != "constant":
            _fail(f"{where} {path}: the run's rate, {settings.describe_rate()} (--schedule {run['schedule']}), is "
                  f"tied to its {run['epochs']} epochs, so it cannot go on to --epochs {now['epochs']}: only a run "
                  f"of --schedule constant can be extended (or give --epochs {run['epochs']})")


def _say_resuming(path: Path, epochs: int) -> Callable[[Any], None]:
    """What fit calls once it has accepted the checkpoint (never before): where the run resumes."""

    def say(checkpoint: Any) -> None:
        finished = " (the run is finished)" if checkpoint.epochs_done == epochs else ""
        print(f"resuming from {path}: {checkpoint.epochs_done} of {epochs} epochs done, step "
              f"{checkpoint.steps}{finished}\n", flush=True)

    return say


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` (the workers train; they start no workers of their own)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _json_safe(value: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers (Python would write NaN, which is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def _group_timeout() -> float:
    """The process group's timeout (``$RDL_DIST_TIMEOUT``, 60 s by default), or one line and exit code 2."""
    from ..distributed import group_timeout

    try:
        return group_timeout()
    except ValueError as error:
        _fail(str(error))


def _join_group(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int, int]:
    """Under torchrun or ``--nproc``, in each process: join the process group, within its timeout, and check that
    every rank was started with the same training flags (resolved, after ``--resume``); one line and a non-zero
    exit on every rank otherwise, never a hang. Returns ``(rank, world size)``."""
    from ..distributed import _disagreement, init_from_environment

    dist = torch.distributed
    try:
        init_from_environment(_group_timeout())
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        training = next(group for group in parser._action_groups if group.title == "training")
        # Not --nproc (how to run, not what), nor a flag left to a default resolved later (--lr: the optimizer's
        # tuned rate; --loss: the model's own): typed or not, fit compares the value it resolves to.
        flags = {action.option_strings[0]: getattr(args, action.dest) for action in training._group_actions
                 if action.dest != "nproc" and action.default is not None}
        flags.update({"--checkpoint": args.checkpoint, "--checkpoint-every": args.checkpoint_every,
                      "--resume": args.resume})
        found = _disagreement("rdl-train", {flag: str(value) if isinstance(value, Path) else value
                                            for flag, value in flags.items()}, device)
    except RuntimeError as error:  # the group could not be joined, or a peer died before agreeing
        if dist.is_initialized():
            dist.destroy_process_group()
        print(f"rdl-train: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    rank, size = dist.get_rank(), dist.get_world_size()
    if found is not None:
        other, flag, theirs, first = found
        dist.destroy_process_group()
        _fail(f"the {size} processes of a data-parallel run must train the same run, but rank {other} was started "
              f"with {flag} {theirs}, rank 0 with {flag} {first} (start every process with the same flags)")
    return rank, size


def _spawn_workers(argv: list[str], nproc: int, stopped_limit: float) -> int:
    """``--nproc N``: start N copies of this command as the ranks of a gloo group on 127.0.0.1, wait for them, and
    if one fails or stays stopped for ``stopped_limit`` seconds, end the others (a collective would otherwise wait
    for it until the group's timeout)."""
    import signal
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # a free port, chosen by the OS
        port = probe.getsockname()[1]
    # Ctrl-C or a SIGTERM to the launcher reaches the workers (Ctrl-C at a terminal reaches them anyway, as the
    # launcher's process group): each writes nothing half, rank 0 says where the checkpoint is, and the launcher
    # waits for them rather than leave them running.
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: received.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    workers: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank)}
            # -P (Python ≥ 3.11): the installed package, not a checkout that happens to be the current folder.
            safe = ["-P"] if sys.version_info >= (3, 11) else []
            env[_LAUNCHER] = str(os.getpid())
            workers.append(subprocess.Popen([sys.executable, *safe, "-m", "rdl_functional", *argv], env=env))
        return _watch(workers, nproc, received, stopped_limit)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_LAUNCHER = "RDL_TRAIN_LAUNCHER_PID"  # set by --nproc's launcher for its workers
_KILL_AFTER_S = 10.0  # how long a worker has to end after a SIGTERM (or the launcher's signal) before a SIGKILL


def _die_with_launcher() -> None:
    """In a worker that ``--nproc`` started: a SIGTERM when the launcher dies, however it dies (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing), and an exit now if it died before this ran."""
    import ctypes
    import signal

    launcher = int(os.environ[_LAUNCHER])
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # the launcher is gone already: nobody waits for this worker
        sys.exit(143)


def _watch(workers: list[Any], nproc: int, received: list[int], stopped_limit: float) -> int:
    """Wait for the workers; end them all when one fails or stays stopped (SIGSTOP, SIGTSTP) for ``stopped_limit``
    seconds (the group's timeout: as long as its peers' collectives wait for it), and pass on a signal the launcher
    received. Never without a limit: a worker that a SIGTERM does not end gets SIGKILL after ``_KILL_AFTER_S``."""
    import signal
    import time

    stopped_for, last = [0.0] * nproc, time.monotonic()
    while True:
        if received:
            return _pass_on(workers, nproc, received)
        # Time counts as a worker's stop only between two looks of a running launcher: when the whole group is
        # stopped (Ctrl-Z) and continued, the launcher's own pause is no worker's fault.
        now = time.monotonic()
        tick, last = min(now - last, 0.5), now
        codes = [worker.poll() for worker in workers]
        stops = [_stop_signal(worker) if code is None else None for worker, code in zip(workers, codes, strict=True)]
        stopped_for = [held + tick if stop else 0.0 for held, stop in zip(stopped_for, stops, strict=True)]
        failed = [f"worker {rank} of {nproc} exited with {code}" for rank, code in enumerate(codes)
                  if code not in (None, 0)]
        if failed or max(stopped_for) >= stopped_limit:
            stopped = [f"worker {rank} of {nproc} was stopped by "
                       f"{signal.Signals(stop).name if stop in signal.valid_signals() else f'signal {stop}'}"
                       + (f" for {stopped_limit:g} s" if stopped_for[rank] >= stopped_limit else "")
                       for rank, stop in enumerate(stops) if stop]
            killed = _stop(workers, signal.SIGTERM, _KILL_AFTER_S)
            print(f"rdl-train: error: {', '.join(failed + stopped)}; ended the others{_killed(killed, nproc)}",
                  file=sys.stderr)
            return 1
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.05)


def _pass_on(workers: list[Any], nproc: int, received: list[int]) -> int:
    """The launcher got SIGINT or SIGTERM: the workers get it too (and end), then the launcher exits with it."""
    import signal
    import time

    signal_number = received[0]
    deadline = time.monotonic() + 1.0  # a Ctrl-C at a terminal reached them too: let them finish
    while time.monotonic() < deadline and any(worker.poll() is None for worker in workers):
        time.sleep(0.05)
    killed = _stop(workers, signal_number, _KILL_AFTER_S, hurry=lambda: len(received) > 1)  # a second: at once
    if killed:  # rank 0 says "interrupted" when it can; here, what it could not say
        print(f"rdl-train: interrupted by {signal.Signals(signal_number).name}{_killed(killed, nproc)}",
              file=sys.stderr)
    return 128 + signal_number


def _stop(workers: list[Any], signal_number: int, grace: float, hurry: Callable[[], bool] = lambda: False
          ) -> list[int]:
    """Send ``signal_number`` to each worker still running, then SIGCONT (a stopped process acts on no other
    signal; it keeps the first pending till then), give them ``grace`` seconds (or until ``hurry()``), SIGKILL the
    rest, and reap them all. Returns the ranks that needed the SIGKILL."""
    import signal
    import time

    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal_number)
            worker.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not hurry() and any(worker.poll() is None for worker in workers):
        time.sleep(0.05)
    killed = [rank for rank, worker in enumerate(workers) if worker.poll() is None]
    for rank in killed:
        workers[rank].kill()
    for worker in workers:
        worker.wait()
    return killed


def _killed(ranks: list[int], nproc: int) -> str:
    if not ranks:
        return ""
    return f" (SIGKILL to worker{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {nproc}, not ended " \
           f"{_KILL_AFTER_S:g} s after the signal)"


def _stop_signal(worker: Any) -> int | None:
    """The signal that stopped ``worker`` (SIGSTOP, SIGTSTP, ...), ``None`` when it runs (or the system cannot
    tell): ``waitid`` with ``WNOWAIT`` peeks at the child's state without reaping it, which ``Popen`` still does."""
    if not all(hasattr(os, name) for name in ("waitid", "WNOWAIT", "WSTOPPED", "CLD_STOPPED")):
        return None
    try:
        found = os.waitid(os.P_PID, worker.pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped already
        return None
    return found.si_status if found is not None and found.si_code == os.CLD_STOPPED else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rdl-train`` and ``python -m rdl_functional``."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.task != "disc" or (args.resume is not None and _checkpoint_task(args.resume) != "disc"):
        return _train_task(args, argv)
    if args.resume is not None:
        _resume_settings(parser, args, argv)
    if args.nproc > 1 and not _launched_by_torchrun():
        _check_args(args)  # here, once, before any worker starts
        return _spawn_workers(_without_nproc(argv), args.nproc, _group_timeout())
    rank, size = 0, 1
    if os.environ.get(_LAUNCHER, "").isdigit():
        _die_with_launcher()
    if _launched_by_torchrun():
        rank, size = _join_group(parser, args)
        if rank != 0:  # only rank 0 prints, plots and writes files
            sys.stdout = open(os.devnull, "w")
            args.save = args.json = args.plots = None
            args.quiet = True
    if size == 1:
        return _train(args, rank, size)
    code: int | str | None = 1
    try:
        code = _train(args, rank, size)
    except SystemExit as done:  # a refusal (_fail) has printed its line: this rank ends with its code below
        code = done.code
    finally:
        # Torn down here, not at the interpreter's exit, where gloo's threads can abort the process.
        torch.distributed.destroy_process_group()
    # And out at once: the interpreter's teardown still aborted a rank now and then ("terminate called without an
    # active exception", exit -6) after a run that had ended well. Its files are whole: every write is atomic.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1 if code else 0)


def _train(args: argparse.Namespace, rank: int, size: int) -> int:
    """The run itself, in this process (one rank of a data-parallel run when ``size > 1``)."""
    args.seeds_text = ",".join(map(str, args.seeds)) if args.seeds else ""
    _check_args(args)
    init_params = _initial_params(args.init_from)
    torch.set_num_threads(args.threads)
    settings = DiscSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                            model=args.model, compile=args.compile, capture=args.capture, optimizer=args.optimizer,
                            momentum=args.momentum, weight_decay=args.weight_decay, init=args.init, loss=args.loss,
                            dropout=args.dropout, batch_norm=args.batch_norm, device=args.device,
                            dtype=args.dtype)
    print(f"rdl-train {__version__}: {settings.task.description}, {settings.describe()}\n"
          f"{settings.epochs} epoch{'' if settings.epochs == 1 else 's'}, batch size {settings.batch_size}, "
          f"{settings.describe_rate()}, "
          f"{settings.n_train} train / {settings.n_test} test points, "
          f"{torch.get_num_threads()} thread(s){f' in each of {size} processes' if size > 1 else ''}"
          f"{f' on {args.device} (chosen by --device auto)' if getattr(args, 'device_chosen', False) else ''}, "
          f"torch {torch.__version__}\n", flush=True)
    if init_params is not None:
        try:
            check_params_fit(settings.task.model, init_params, getattr(torch, settings.dtype))
        except ValueError as error:
            _fail(f"--init-from {args.init_from}: {error}")
    _accept_checkpoint(args, settings)
    seeds = args.seeds or [args.seed]
    together = len(seeds) > 1 and not (args.separately or args.compile or args.capture or args.dropout
                                       or args.batch_norm)
    runs = [(f"seeds {args.seeds_text}", lambda c: run_disc_together(seeds, settings, init_params=init_params,
                                                                    callback=c, check_finite=args.check_finite))] \
        if together else \
        [(f"seed {seed}", lambda c, s=seed: [run_disc(
            s, settings, init_params=init_params, callback=c, checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every, check_finite=args.check_finite,
            on_resume=_say_resuming(args.checkpoint, settings.epochs) if args.checkpoint is not None else None,
            checkpoint_info={"program": "rdl-train",
                             "init_from": str(args.init_from.resolve()) if args.init_from else None,
                             "check_finite": args.check_finite,
                             "threads": args.threads})]) for seed in seeds]
    results: list[DiscResult] = []
    for label, train in runs:
        callback, close = _progress(label, settings.epochs, args.quiet, sys.stderr)
        try:
            results.extend(train(callback))
        except ValueError as error:  # what the settings could not be checked for before training
            _fail(str(error))
        except OSError as error:  # a checkpoint write that failed (a full disk, a file-size limit): the file
            close()               # names itself, and the last checkpoint written is kept whole
            print(f"rdl-train: error: {error}", file=sys.stderr)
            if size > 1:  # out at once, as below: a peer may be inside a collective
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            return 1
        except PeerLost as error:  # another rank died or stopped: one line, not a traceback, and out at once
            close()
            kept = (f"; {args.checkpoint} holds the run up to its last checkpoint" if args.checkpoint is not None
                    and args.checkpoint.exists() else "")
            print(f"rdl-train: error: {error}{kept}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        except NonFiniteLoss as error:
            close()
            print(f"rdl-train: {str(error).replace('pass check_finite=False', 'pass --no-finite-check')}",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            close()
            if rank == 0:  # rank 0 speaks for the run
                nproc = f" --nproc {size}" if size > 1 else ""
                kept = (f"; {args.checkpoint} holds the run up to its last checkpoint: rdl-train --resume "
                        f"{args.checkpoint}{nproc} goes on" if args.checkpoint is not None
                        and args.checkpoint.exists() else "")
                print(f"rdl-train: interrupted{kept}", file=sys.stderr)
            if size > 1:
                # Out at once: the process group's threads, torn down at the interpreter's exit while a peer may
                # be inside a collective, would abort the process instead. Files are whole (every write is atomic).
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
            return 130
        finally:
            close()
    summary = summarize(results)  # of one run too: --json has the same shape for any number of seeds
    _print_table(results, summary)
    _write_outputs(args, results, settings, summary)
    if args.compare_torch:
        _print_comparison(DISC.compare_torch(results[0].seed, settings))
    return 0


# ---------------------------------------------------------------------------
# The other tasks (--task digits, adder): one process, the seeds one after another

_DISC_ONLY = {  # flags of the disc alone, and why another task does not take them
    "model": "chooses the disc's model", "init": "chooses how the disc's MLP is drawn",
    "loss": "chooses the disc's loss", "batch_norm": "goes into the disc's MLP",
    "optimizer": "chooses the disc's optimizer", "momentum": "sets the disc's optimizer",
    "schedule": "chooses the disc's rate schedule", "compile": "compiles the disc's step",
    "capture": "captures the disc's step", "init_from": "starts the disc from saved params",
}
_NOT_IN_TASK = {"dropout": "its model has no dropout"}  # a setting of some tasks, and why another lacks it
_ANY_TASK = {"task", "seed", "seeds", "separately", "threads", "quiet", "json", "plots", "save", "checkpoint",
             "checkpoint_every", "resume", "compare_torch", "check_finite", "nproc"}


def _checkpoint_task(path: Path) -> str:
    """The task whose run the checkpoint at ``path`` records (a checkpoint without one is the disc's, whose path
    says what is wrong with an unreadable file)."""
    try:
        task = _task_of(read_checkpoint(path))
    except (OSError, ValueError):
        return "disc"
    return task if task in TASK_NAMES else "disc"


def _task_of(checkpoint: Any) -> Any:
    """The task a checkpoint's run records (a disc checkpoint records none)."""
    info = checkpoint.settings.get("info")
    return info.get("task", "disc") if isinstance(info, dict) else "disc"


def _recorded_run(path: Path) -> tuple[str, int] | None:
    """The task and the epochs of the run that the checkpoint at ``path`` records (a checkpoint without a task is
    the disc's); None where there is no readable checkpoint, which fit itself then explains."""
    try:
        checkpoint = read_checkpoint(path)
    except (OSError, ValueError):
        return None
    return _task_of(checkpoint), checkpoint.settings.get("epochs")


def _check_checkpoint_task(args: argparse.Namespace, task: TrainingTask) -> None:
    """--checkpoint PATH of a file that records a run of another task: say which, before training."""
    recorded = _recorded_run(args.checkpoint) if args.checkpoint is not None and args.resume is None else None
    if recorded is not None and recorded[0] != task.name:
        _fail(f"--checkpoint {args.checkpoint} is a checkpoint of --task {recorded[0]}, not of this --task "
              f"{task.name} run; choose another path (or --resume {args.checkpoint} to go on with that run)")


def _not_extended(args: argparse.Namespace, task: TrainingTask, settings: Any) -> str | None:
    """fit's refusal to take the checkpoint's run on to another length, in the CLI's terms (None if that is not
    the case): the task's rate schedule is tied to the run's length."""
    recorded = _recorded_run(args.checkpoint) if args.checkpoint is not None else None
    if recorded is None or recorded[0] != task.name or recorded[1] == settings.epochs:
        return None
    flag = f"--resume {args.resume}" if args.resume is not None else f"--checkpoint {args.checkpoint}"
    return (f"{flag}: the run it records has {recorded[1]} epochs and --task {task.name}'s rate schedule is tied to "
            f"the run's length, so it cannot be extended to --epochs {settings.epochs}; give --epochs {recorded[1]}"
            f"{' (or leave it out)' if args.resume is not None else ''}, or remove {args.checkpoint} to start afresh")


def _task_named(name: str) -> TrainingTask:
    from .tasks import TASKS_BY_NAME

    try:
        return TASKS_BY_NAME[name]
    except ModuleNotFoundError as error:
        if error.name == f"{__package__}.{name}":
            _fail(f"--task {name}: this installation of rdl_functional has no {name} task")
        raise


def _task_settings(task: TrainingTask, given: dict[str, Any], where: str) -> Any:
    try:
        return task.settings(**given)
    except (TypeError, ValueError) as error:
        _fail(f"{where}: {error}")


def _refuse_flags(task: TrainingTask, typed: dict[str, Any], actions: dict[str, argparse.Action]) -> None:
    for dest in typed:
        if dest in _ANY_TASK or dest in task.flags:
            continue
        flag, takes = actions[dest].option_strings[0], ", ".join(actions[d].option_strings[0] for d in task.flags)
        if dest in _DISC_ONLY:
            _fail(f"{flag} {_DISC_ONLY[dest]}; --task {task.name} does not take it (it takes {takes} and the output "
                  "flags)")
        why = _NOT_IN_TASK.get(dest, "its runs have no such setting")
        _fail(f"--task {task.name} does not take {flag} ({why}); it takes {takes} and the output flags")


def _read_resumed(args: argparse.Namespace) -> Any:
    """The checkpoint ``--resume`` names, read and checked; one line and exit 2 for a file it cannot take, or with
    ``--checkpoint`` (the run writes to the file it continues)."""
    if args.checkpoint is not None:
        _fail(f"--resume {args.resume} writes to the checkpoint it continues; leave out --checkpoint "
              f"{args.checkpoint}")
    try:
        return read_checkpoint(args.resume)
    except (OSError, ValueError) as error:
        _fail(f"--resume: {error}")


def _task_resume(args: argparse.Namespace, typed: dict[str, Any], actions: dict[str, argparse.Action]
                 ) -> tuple[TrainingTask, Any]:
    """``--resume PATH`` of a task's checkpoint: the task, its settings (``--epochs`` may be given anew) and, into
    ``args``, the seed and the checkpoint path; a training flag given with another value is refused by name."""
    checkpoint = _read_resumed(args)
    info = checkpoint.settings.get("info")
    info = info if isinstance(info, dict) else {}
    recorded = info.get("task", "disc")  # a disc checkpoint records no task
    if "task" in typed and typed["task"] != recorded:
        _fail(f"--resume {args.resume}: the checkpoint records a run of --task {recorded}; leave out --task")
    caller = info.get("caller")
    if not isinstance(caller, dict) or caller.get("program") != "rdl-train" or not isinstance(info.get("seed"), int):
        _fail(f"--resume {args.resume}: the checkpoint was not written by rdl-train (use the task's run function "
              "with checkpoint=PATH and the same arguments to continue it)")
    task = _task_named(recorded)
    if ("seeds" in typed and typed["seeds"] != [info["seed"]]) or ("seed" in typed and typed["seed"] != info["seed"]):
        _fail(f"--resume {args.resume}: the checkpoint records one run, of seed {info['seed']}; leave out "
              "--seed and --seeds")
    _refuse_flags(task, typed, actions)
    settings = _task_settings(task, {**info["settings"], "epochs": typed.get("epochs", checkpoint.settings["epochs"])},
                              f"--resume {args.resume}")
    differ = [f"{actions[dest].option_strings[0]} {value} here, {getattr(settings, dest)} in the run"
              for dest, value in typed.items() if dest in task.flags and dest != "epochs"
              and value != getattr(settings, dest)]
    if differ:
        _fail(f"--resume {args.resume}: the checkpoint records a run of other settings ({'; '.join(differ)}); leave "
              "those flags out: --resume takes the run's settings from its checkpoint")
    args.task, args.seed, args.seeds, args.checkpoint = task.name, info["seed"], None, args.resume
    args.check_finite = bool(caller.get("check_finite", True))
    args.threads = typed.get("threads", caller.get("threads", args.threads))
    return task, settings


def _check_task_args(args: argparse.Namespace, task: TrainingTask, settings: Any) -> None:
    name, single = task.name, args.seeds is None or len(args.seeds) == 1
    where = (getattr(settings, "device", "cpu"), getattr(settings, "dtype", "float32"))
    if args.compare_torch and where != ("cpu", "float32"):
        _fail("--compare-torch compares on the CPU in float32; leave out --device and --dtype")
    if args.nproc > 1 or _launched_by_torchrun():
        _fail(f"{'--nproc' if args.nproc > 1 else 'torchrun'} trains the disc data-parallel; --task {name} trains "
              "in one process")
    for flag, value in (("--save", args.save), ("--compare-torch", args.compare_torch),
                        ("--checkpoint", args.checkpoint)):
        if value and not single:
            _fail(f"{flag} describes one run; use --seed N rather than --seeds")
    if args.checkpoint_every is not None and args.checkpoint is None:
        _fail("--checkpoint-every goes with --checkpoint PATH (or --resume PATH)")
    for flag, path in (("--save", args.save), ("--json", args.json)):
        if path is not None and args.checkpoint is not None and path.resolve() == args.checkpoint.resolve():
            _fail(f"{flag} {path}: that is the checkpoint's own file; choose another path")
        if path is not None:
            _check_output_file(flag, path)
    if args.checkpoint is not None and args.resume is None:
        _check_output_file("--checkpoint", args.checkpoint)
    if args.plots is not None:
        _check_plot_dir(args.plots)


def _train_task(args: argparse.Namespace, argv: list[str]) -> int:
    """``--task digits`` or ``adder`` (or ``--resume`` of their checkpoint): the seeds one after another, then the
    table, the outputs and the comparison with torch, as the disc's."""
    typed, actions = _typed(argv), _actions(_parser())
    if args.resume is not None:
        task, settings = _task_resume(args, typed, actions)
    else:
        task = _task_named(args.task)
        _refuse_flags(task, typed, actions)
        given = {dest: value for dest, value in typed.items() if dest in task.flags}
        if given.get("device") == "auto":
            given["device"] = _auto_device()
        if given.get("device") == "cuda" and not torch.cuda.is_available():
            _fail("--device cuda: torch sees no CUDA device on this machine (use --device cpu, or auto)")
        settings = _task_settings(task, given, f"--task {task.name}")
    _check_task_args(args, task, settings)
    _check_checkpoint_task(args, task)
    torch.set_num_threads(args.threads)
    print(f"rdl-train {__version__} --task {task.name}: {task.describe(settings)}\n"
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}\n", flush=True)
    caller = {"program": "rdl-train", "check_finite": args.check_finite, "threads": args.threads}
    results = []
    for seed in args.seeds or [args.seed]:
        callback, close = _progress(f"seed {seed}", settings.epochs, args.quiet, sys.stderr)
        try:
            results.append(task.run(
                seed, settings, callback=callback, checkpoint=args.checkpoint, check_finite=args.check_finite,
                checkpoint_every=args.checkpoint_every,
                checkpoint_info=caller if args.checkpoint is not None else None,
                on_resume=_say_resuming(args.checkpoint, settings.epochs) if args.checkpoint is not None else None))
        except ImportError as error:  # a task's optional dependency: the message names the extra to install
            _fail(str(error))
        except ValueError as error:
            _fail(_not_extended(args, task, settings) or str(error))
        except OSError as error:
            print(f"rdl-train: error: {error}", file=sys.stderr)
            return 1
        except NonFiniteLoss as error:
            print(f"rdl-train: {str(error).replace('pass check_finite=False', 'pass --no-finite-check')}",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            kept = (f"; {args.checkpoint} holds the run up to its last checkpoint: rdl-train --resume "
                    f"{args.checkpoint} goes on" if args.checkpoint is not None and args.checkpoint.exists() else "")
            print(f"rdl-train: interrupted{kept}", file=sys.stderr)
            return 130
        finally:
            close()
    summary = task.summarize(results)  # of one run too: --json has the same shape for any number of seeds
    _print_table(results, summary, task.columns)
    _write_outputs(args, results, settings, summary, task)
    if args.compare_torch:
        _print_comparison(task.compare_torch(results[0].seed, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
