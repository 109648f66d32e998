"""The seed experiment written the usual torch.nn way: the baseline of the whole-process row.

Run as ``python benchmarks/torch_train.py EPOCHS``; it does what ``rdl-train
--epochs EPOCHS --quiet`` does (same data, params, batches, schedule, one
thread, the same per-epoch measurements and final report), with torch.nn,
autograd and torch.optim.SGD.
"""

import sys
import time

import torch
import torch.nn.functional as F


def main(epochs: int) -> None:
    start = time.perf_counter()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, x_test = torch.rand(1000, 2, generator=g), torch.rand(1000, 2, generator=g)
    radius_squared = 1 / (2 * torch.pi)
    labels = ((x - 0.5).square().sum(1) < radius_squared).long()
    labels_test = ((x_test - 0.5).square().sum(1) < radius_squared).long()
    target, target_test = F.one_hot(labels, 2).float(), F.one_hot(labels_test, 2).float()
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 25), torch.nn.ReLU(), torch.nn.Linear(25, 25), torch.nn.ReLU(),
        torch.nn.Linear(25, 25), torch.nn.ReLU(), torch.nn.Linear(25, 2), torch.nn.Tanh(),
    )  # fmt: skip
    for module in model:  # draw the initial params from g, as rf.seed_model().init(g) does
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.kaiming_uniform_(module.weight, a=5**0.5, generator=g)
            bound = 1 / module.weight.shape[1] ** 0.5
            torch.nn.init.uniform_(module.bias, -bound, bound, generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.8)
    total, count = epochs * 10, 0
    for _ in range(epochs):
        for rows in torch.randperm(1000, generator=g).split(100):
            optimizer.param_groups[0]["lr"] = 0.8 * (1 - count / total)
            optimizer.zero_grad()
            F.mse_loss(model(x[rows]), target[rows]).backward()
            optimizer.step()
            count += 1
        with torch.no_grad():  # what rf.fit records after every epoch
            for inputs, targets in ((x, target), (x_test, target_test)):
                pred = model(inputs)
                F.mse_loss(pred, targets).item()
                (pred.argmax(1) == targets.argmax(1)).double().mean().item()
    with torch.no_grad():
        errors = int((model(x_test).argmax(1) != labels_test).sum())
    print(f"test accuracy {1 - errors / 1000:.1%}, {errors} errors, {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
