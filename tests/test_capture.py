"""rf.capture: a step recorded as a CUDA graph and replayed.

Without a GPU, the graph is replaced by a test double that records nothing
and reruns the function on the graph's input buffers, writing into its output
buffers, as a replay does; so everything around the graph (copies in and out,
one recording per shape, purity, the errors) is tested on the CPU. The tests
of real graphs skip without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf
from rdl_functional.graphs import Captured, _flatten

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Rerun:
    """A stand-in for a CUDA graph: a replay reruns ``fn`` on the input buffers into the same output buffers."""

    def __init__(self) -> None:
        self.recorded = 0

    def __call__(self, fn, args, warmup):
        self.recorded += 1
        outputs = fn(*args)
        buffers: list[torch.Tensor] = []
        _flatten(outputs, buffers, "test", "result")
        for buffer in buffers:  # a real recording computes nothing: its outputs hold garbage until a replay
            buffer.fill_(float("nan") if buffer.is_floating_point() else -1)

        def replay() -> None:
            new: list[torch.Tensor] = []
            _flatten(fn(*args), new, "test", "result")
            with torch.inference_mode():  # a graph's kernels write its buffers whatever mode made them
                torch._foreach_copy_(buffers, new)

        return outputs, replay


def seed_step():
    model = rf.seed_model()
    grad = rf.value_and_grad(model, rf.mse_loss)

    def step(params, x, target):
        loss, grads = grad(params, x, target)
        return loss, rf.sgd_step(params, grads, 0.1)

    return model, step


def batches(n, rows=8):
    x, labels = rf.disc_dataset(n * rows, 0)
    return [(x[i:i + rows], rf.one_hot(labels[i:i + rows], 2)) for i in range(0, n * rows, rows)]


def captured(fn, **kwargs) -> tuple[Captured, Rerun]:
    recorder = Rerun()
    return Captured(fn, warmup=1, max_shapes=kwargs.get("max_shapes", 8), name="capture(step)",
                    recorder=recorder), recorder


def test_a_captured_step_gives_the_steps_results_and_records_once_per_shape():
    model, step = seed_step()
    run, recorder = captured(step)
    ours = theirs = model.init(0)
    for x, target in batches(20):
        loss, ours = run(ours, x, target)
        expected, theirs = step(theirs, x, target)
        assert torch.equal(loss, expected)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(ours), rf.tree_leaves(theirs), strict=True))
    assert recorder.recorded == 1 and run.shapes == 1
    x, target = batches(1, rows=5)[0]
    run(ours, x, target)
    run(ours, x, target)
    assert recorder.recorded == 2 and run.shapes == 2
    assert repr(run) == "<capture of step: 2 shapes recorded>"


def test_a_captured_step_is_pure_its_results_are_new_tensors_that_later_calls_leave_alone():
    model, step = seed_step()
    run, _ = captured(step)
    params = model.init(0)
    before = rf.tree_map(torch.clone, params)
    (x1, t1), (x2, t2) = batches(2)
    x1_before = x1.clone()
    loss1, params1 = run(params, x1, t1)
    kept = rf.tree_map(torch.clone, params1), loss1.clone()
    loss2, params2 = run(params1, x2, t2)
    # The arguments are not written, and the first call's results survive the second call.
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(params), rf.tree_leaves(before), strict=True))
    assert torch.equal(x1, x1_before)
    assert torch.equal(loss1, kept[1])
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(params1), rf.tree_leaves(kept[0]), strict=True))
    # No result shares memory with the graph's buffers or with another result.
    recording = next(iter(run._recordings.values()))
    graph_memory = {t.untyped_storage().data_ptr() for t in recording.inputs + recording.outputs}
    results = [loss1, loss2, *rf.tree_leaves(params1), *rf.tree_leaves(params2)]
    pointers = [t.untyped_storage().data_ptr() for t in results]
    assert not graph_memory & set(pointers) and len(set(pointers)) == len(pointers)


def test_a_captured_step_keeps_the_results_structure_tuples_lists_and_dicts():
    run, _ = captured(lambda tree: {"a": [tree[0] * 2, (tree[1],)], "b": tree[0] + 1})
    out = run((torch.ones(2), torch.zeros(3)))
    assert list(out) == ["a", "b"] and isinstance(out["a"], list) and isinstance(out["a"][1], tuple)
    assert torch.equal(out["a"][0], torch.full((2,), 2.0)) and torch.equal(out["b"], torch.full((2,), 2.0))


def test_arguments_that_require_grad_are_copied_without_joining_an_autograd_graph():
    run, _ = captured(lambda x: x * 3)
    x = torch.ones(2, requires_grad=True)
    out = run(x)
    assert not out.requires_grad and out.grad_fn is None and torch.equal(out, torch.full((2,), 3.0))


def test_too_many_shapes_are_refused_with_what_to_do():
    run, _ = captured(lambda x: x + 1, max_shapes=2)
    run(torch.zeros(1))
    run(torch.zeros(2))
    with pytest.raises(ValueError, match=r"called with new shapes after 2 recorded; each set of shapes is a graph "
                                         r"of its own .*\(max_shapes=2\)\. Pad the inputs"):
        run(torch.zeros(3))
    run(torch.zeros(2))  # the recorded shapes still run


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(TypeError, match=r"capture\(<lambda>\): argument 1 must be a tensor, or a dict, tuple "
                                        r"or list of them, got float: a number is fixed at capture; pass one that "
                                        r"changes as a 0-dim tensor on the device"):
        rf.capture(lambda x, lr: x * lr)(torch.zeros(1), 0.1)
    with pytest.raises(TypeError, match=r"argument 0\['w'\] must be a tensor.* got str$"):
        rf.capture(lambda p: p)({"w": "no"})
    with pytest.raises(ValueError, match="needs at least one tensor argument"):
        rf.capture(lambda: torch.zeros(1))()
    with pytest.raises(TypeError, match=r"capture: <capture of <lambda>: 0 shapes recorded> is captured already"):
        rf.capture(rf.capture(lambda x: x))
    with pytest.raises(TypeError, match="capture: expected a function to capture, got int"):
        rf.capture(3)
    with pytest.raises(ValueError, match=r"capture: warmup must be an int ≥ 1, got 0"):
        rf.capture(abs, warmup=0)
    with pytest.raises(ValueError, match=r"capture: max_shapes must be an int ≥ 1, got True"):
        rf.capture(abs, max_shapes=True)


def test_cpu_tensors_are_refused_since_a_cpu_step_has_no_launches_to_save():
    model, step = seed_step()
    x, target = batches(1)[0]
    with pytest.raises(ValueError, match=r"capture\(step\): a CUDA graph needs every argument on one CUDA device, "
                                         r"got tensors on cpu \(only CUDA launches can be recorded"):
        rf.capture(step)(model.init(0), x, target)


def test_a_result_the_graph_does_not_compute_is_refused():
    run, _ = captured(lambda x: (x + 1, torch.zeros(1)))
    with pytest.raises(ValueError, match=r"the result has tensors on cpu, which the graph does not compute "
                                         r"\(the arguments are on meta\)"):
        run(torch.zeros(2, device="meta"))


def test_a_step_that_cannot_be_recorded_says_what_a_captured_step_may_do():
    def failing(fn, args, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")

    run = Captured(lambda x: x, warmup=1, max_shapes=8, name="capture(step)", recorder=failing)
    with pytest.raises(RuntimeError, match=r"capture\(step\): the step could not be recorded as a CUDA graph: "
                                           r"operation not permitted .* no \.item\(\)"):
        run(torch.zeros(1))
    assert run.shapes == 0


def test_fit_with_capture_refuses_what_a_graph_cannot_hold():
    model = rf.seed_model()
    x, labels = rf.disc_dataset(20, 0)
    common = dict(epochs=1, batch_size=10, lr=0.1, generator=0)
    with pytest.raises(ValueError, match=r"fit: capture=True records each step as a CUDA graph, so x, target and the "
                                         r"params must be on one CUDA device; they are on cpu"):
        rf.fit(model, rf.mse_loss, model.init(0), x, rf.one_hot(labels, 2), capture=True, **common)
    with pytest.raises(ValueError, match="compile=True and capture=True are two ways to run the step; choose one"):
        rf.fit(model, rf.mse_loss, model.init(0), x, rf.one_hot(labels, 2), capture=True, compile=True, **common)
    noisy = rf.compose(rf.linear(2, 4), rf.dropout(0.5), rf.linear(4, 2))
    with pytest.raises(ValueError, match="carries state or randomness, whose step takes a generator and a state"):
        rf.fit(noisy, rf.mse_loss, noisy.init(0), x, rf.one_hot(labels, 2), capture=True, **common)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_cli_says_capture_needs_cuda(capsys):
    from rdl_functional.apps.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--capture", "--epochs", "1", "--quiet"])
    assert stop.value.code == 2
    assert "--capture records CUDA graphs; it needs --device cuda (or auto on a machine with CUDA), not cpu" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------
# On a GPU


@needs_cuda
def test_a_cuda_graph_of_the_seed_step_equals_the_eager_step_and_makes_no_host_sync():
    model, step = seed_step()
    run = rf.capture(step)
    ours = theirs = model.init(0, device="cuda")
    cuda_batches = [(x.cuda(), t.cuda()) for x, t in batches(20)]
    run(ours, *cuda_batches[0])  # records
    torch.cuda.synchronize()
    losses, expected = [], []
    torch.cuda.set_sync_debug_mode("error")
    try:  # nothing in here may read a value back (assert_close would: it compares after)
        for x, target in cuda_batches:
            loss, ours = run(ours, x, target)
            losses.append(loss)
            loss, theirs = step(theirs, x, target)
            expected.append(loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected))
    for a, b in zip(rf.tree_leaves(ours), rf.tree_leaves(theirs), strict=True):
        torch.testing.assert_close(a, b)
    assert run.shapes == 1


@needs_cuda
def test_fit_with_capture_on_cuda_equals_fit_without():
    model = rf.seed_model()
    x, labels = rf.disc_dataset(250, 0)
    x, target = x.cuda(), rf.one_hot(labels, 2).cuda()
    common = dict(epochs=3, batch_size=100, generator=0, optimizer=rf.adam(1e-2))
    captured_params, history = rf.fit(model, rf.mse_loss, model.init(0, device="cuda"), x, target, capture=True,
                                      **common)
    eager_params, expected = rf.fit(model, rf.mse_loss, model.init(0, device="cuda"), x, target, **common)
    for a, b in zip(rf.tree_leaves(captured_params), rf.tree_leaves(eager_params), strict=True):
        torch.testing.assert_close(a, b)
    assert history.train_loss == pytest.approx(expected.train_loss)


def test_a_call_under_autocast_records_its_own_graph():
    run, recorder = captured(lambda x: x * 2)
    run(torch.ones(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(torch.ones(2))
        run(torch.ones(2))
    run(torch.ones(2))
    assert recorder.recorded == 2


def test_a_first_call_in_inference_mode_leaves_buffers_that_later_calls_may_write():
    run, _ = captured(lambda x: x + 1)
    with torch.inference_mode():
        first = run(torch.zeros(2))
    second = run(torch.ones(2))
    assert torch.equal(first, torch.ones(2)) and torch.equal(second, torch.full((2,), 2.0))


# ---------------------------------------------------------------------------
# A training step: rf.capture(rf.train_step(...))


@pytest.mark.parametrize("optimizer", [rf.sgd(rf.linear_schedule(0.8, 0.0, 10)), rf.sgd(0.1, momentum=0.9),
                                       rf.adam(rf.linear_schedule(1e-2, 0.0, 10))], ids=["sgd", "momentum", "adam"])
def test_a_captured_train_step_equals_the_step_and_records_once_though_rate_and_count_change(optimizer):
    from rdl_functional.transforms import CapturedStep

    model = rf.seed_model()
    step = rf.train_step(model, rf.mse_loss, optimizer)
    recorder = Rerun()
    run = CapturedStep(step, warmup=1, max_shapes=8, recorder=recorder)
    ours = theirs = rf.train_state(model, optimizer, model.init(0))
    for x, target in batches(8):
        ours, metrics = run(ours, x, target)
        theirs, expected = step(theirs, x, target)
        torch.testing.assert_close(metrics["loss"], expected["loss"])
    for a, b in zip(rf.tree_leaves({"p": ours.params, "o": ours.opt_state}),
                    rf.tree_leaves({"p": theirs.params, "o": theirs.opt_state}), strict=True):
        torch.testing.assert_close(a, b)
    assert torch.equal(ours.step, theirs.step) and int(ours.opt_state["count"]) == 8
    # The graph was recorded at the first step: the later rates and counts were inputs copied into it.
    assert recorder.recorded == 1 and run.shapes == 1
    assert repr(run) == f"<capture of the step of {model.name}, {optimizer.name}: 1 recorded>"


def test_a_captured_train_step_refuses_cpu_tensors_and_what_compiled_refuses():
    model = rf.seed_model()
    step = rf.train_step(model, rf.mse_loss, rf.sgd(0.1))
    x, target = batches(1)[0]
    with pytest.raises(ValueError, match=r"capture\(step\): a CUDA graph needs every argument on one CUDA device, "
                                         r"got tensors on cpu"):
        rf.capture(step)(rf.train_state(model, rf.sgd(0.1), model.init(0)), x, target)
    noisy = rf.compose(rf.linear(2, 4), rf.dropout(0.5), rf.linear(4, 2))
    with pytest.raises(ValueError, match=r"capture: compose\(linear\(2, 4\), dropout\(0.5\), linear\(4, 2\)\) "
                                         r"carries state or randomness"):
        rf.capture(rf.train_step(noisy, rf.mse_loss, rf.sgd(0.1)))
    assert repr(rf.capture(rf.compiled(step))).startswith("<capture of the step of compose(")


@needs_cuda
def test_a_cuda_graph_of_a_train_step_equals_the_step():
    model = rf.seed_model()
    optimizer = rf.adam(rf.linear_schedule(1e-2, 0.0, 10))
    step = rf.train_step(model, rf.mse_loss, optimizer)
    run = rf.capture(step)
    ours = theirs = rf.train_state(model, optimizer, model.init(0, device="cuda"))
    for x, target in batches(10):
        ours, _ = run(ours, x.cuda(), target.cuda())
        theirs, _ = step(theirs, x.cuda(), target.cuda())
    for a, b in zip(rf.tree_leaves(ours.params), rf.tree_leaves(theirs.params), strict=True):
        torch.testing.assert_close(a, b)
    assert run.shapes == 1


@pytest.mark.slow
def test_a_captured_compiled_step_records_the_compiled_code_and_equals_the_step(tmp_path):
    from rdl_functional.transforms import CapturedStep

    model = rf.compose(rf.linear(2, 4), rf.relu, rf.linear(4, 2))
    optimizer = rf.sgd(rf.linear_schedule(0.5, 0.0, 6), momentum=0.9)
    step = rf.train_step(model, rf.mse_loss, optimizer)
    fast = rf.compiled(step, backend="inductor", cache_dir=tmp_path)
    recorder = Rerun()
    run = CapturedStep(fast, warmup=1, max_shapes=8, recorder=recorder)
    ours = theirs = rf.train_state(model, optimizer, model.init(0))
    for x, target in batches(6):
        ours, _ = run(ours, x, target)
        theirs, _ = step(theirs, x, target)
    for a, b in zip(rf.tree_leaves(ours.params), rf.tree_leaves(theirs.params), strict=True):
        torch.testing.assert_close(a, b)
    assert recorder.recorded == 1 and [info["backend"] for info in fast.chosen.values()] == ["inductor"]
