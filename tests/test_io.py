from __future__ import annotations

import os
import re
import stat

import pytest
import torch
from safetensors.torch import save_file

import rdl_functional as rf
from rdl_functional.apps.torch_baseline import torch_seed_model


def _x():
    return torch.rand(6, 2, generator=torch.Generator().manual_seed(9))


def test_state_dict_loads_strictly_into_the_equivalent_torch_model():
    model = rf.seed_model()
    params = model.init(0)
    reference = torch_seed_model()
    reference.load_state_dict(rf.to_state_dict(params), strict=True)
    assert torch.equal(reference(_x()).detach(), model(params, _x()))


def test_a_torch_state_dict_runs_in_the_equivalent_model():
    reference = torch_seed_model()
    params = rf.from_state_dict(reference.state_dict())
    assert torch.equal(rf.seed_model()(params, _x()), reference(_x()).detach())


def test_from_state_dict_rejects_what_is_not_a_tensor():
    with pytest.raises(TypeError, match=r'from_state_dict: the value at "0.weight" must be a torch.Tensor, got list'):
        rf.from_state_dict({"0.weight": [1.0]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_save_and_load_round_trip_dtype_and_nesting(tmp_path, dtype):
    params = rf.compose(rf.linear(2, 3), rf.relu, rf.compose(rf.tanh, rf.linear(3, 1))).init(0, dtype=dtype)
    path = tmp_path / "params.safetensors"
    rf.save(params, path)
    loaded = rf.load(path)
    assert loaded.keys() == params.keys() and loaded["1"] == {} and loaded["2"]["0"] == {}
    assert rf.tree_difference(params, loaded, leaves=True) is None
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(params), rf.tree_leaves(loaded), strict=True))


def test_save_handles_views_and_shared_tensors(tmp_path):
    w = torch.arange(6.0).reshape(2, 3)
    params = {"a": {"weight": w.t()}, "b": {"weight": w.t()}}
    rf.save(params, tmp_path / "p.safetensors")
    loaded = rf.load(tmp_path / "p.safetensors")
    assert torch.equal(loaded["a"]["weight"], w.t()) and torch.equal(loaded["b"]["weight"], w.t())


def test_load_reads_a_plain_safetensors_state_dict(tmp_path):
    reference = torch_seed_model()
    save_file(reference.state_dict(), tmp_path / "torch.safetensors")
    params = rf.load(tmp_path / "torch.safetensors")
    assert torch.equal(rf.seed_model()(params, _x()), reference(_x()).detach())


def test_save_replaces_a_file_whole_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "p.safetensors"
    rf.save({"w": torch.zeros(2)}, path)
    rf.save({"w": torch.ones(3)}, path)
    assert torch.equal(rf.load(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Written under a private temporary name, the file still ends up as open() would make it."""
    mask = os.umask(0o022)
    os.umask(mask)
    rf.save({"w": torch.zeros(2)}, tmp_path / "p.safetensors")
    assert stat.S_IMODE((tmp_path / "p.safetensors").stat().st_mode) == 0o666 & ~mask


def test_save_of_bad_params_writes_nothing(tmp_path):
    path = tmp_path / "p.safetensors"
    rf.save({"w": torch.zeros(2)}, path)
    with pytest.raises(TypeError, match=r'save: the leaf at "0.bias" must be a torch.Tensor, got float'):
        rf.save({"0": {"weight": torch.ones(1), "bias": 0.5}}, path)
    assert torch.equal(rf.load(path)["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_save_into_a_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        rf.save({"w": torch.zeros(2)}, tmp_path / "missing" / "p.safetensors")


def test_load_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load: no such file: '.*nothing\.safetensors'"):
        rf.load(tmp_path / "nothing.safetensors")


def test_load_of_a_truncated_file_names_it(tmp_path):
    path = tmp_path / "cut.safetensors"
    rf.save(rf.seed_model().init(0), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"load: '.*cut\.safetensors' is not a readable safetensors file"):
        rf.load(path)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + bytes(100), b"\x80\x04\x95 pickle"])
def test_load_of_a_foreign_file_names_it_and_never_unpickles(tmp_path, content):
    path = tmp_path / "foreign.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"load: '.*foreign\.bin' is not a readable safetensors file"):
        rf.load(path)


def test_load_of_a_torch_pickle_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(rf.seed_model().init(0), path)
    with pytest.raises(ValueError, match=r"model\.pt' is not a readable safetensors file"):
        rf.load(path)


@pytest.mark.parametrize("size", [1_500_000_000, 8 * 2**30])
def test_a_sparse_file_is_refused_by_its_header_before_its_bytes_are_read(tmp_path, size):
    # It was read whole first: 1.76 GB of memory at 1.5 GB, a bare MemoryError('') at 8 GB.
    import tracemalloc

    path = tmp_path / "sparse.safetensors"
    rf.save(rf.seed_model().init(0), path)
    os.truncate(path, size)  # a hole: no disk, and no memory unless read
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as caught:
            rf.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes allocated to refuse it"
    assert re.fullmatch(rf"load: '.*sparse\.safetensors' is not a readable safetensors file: its header describes a "
                        rf"file of \d+ bytes, but it holds {size} \(truncated, padded, or another format\?\)",
                        str(caught.value))


def test_a_file_too_large_for_memory_raises_a_memory_error_naming_it(tmp_path):
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    path = tmp_path / "huge.safetensors"
    header = b'{"w":{"dtype":"U8","shape":[4294967296],"data_offsets":[0,4294967296]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    os.truncate(path, 8 + len(header) + 2**32)  # whole as its header says, 4 GiB of zeros in a hole
    script = textwrap.dedent(f"""
        import resource, rdl_functional as rf
        with open("/proc/self/status") as status:
            used = next(int(line.split()[1]) for line in status if line.startswith("VmSize")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, resource.RLIM_INFINITY))
        try:
            rf.load({str(path)!r})
        except MemoryError as error:
            print(error)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"load: {str(path)!r} is {8 + len(header) + 2**32} bytes long, more than " \
                                  "this process can allocate"
