import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.training import SGDSettings, lr_schedule, train

SETTINGS = SGDSettings(iterations=12, lr=0.1, momentum=0.9, weight_decay=0.0005, step_every=8, gamma=0.1, seed=3,
                       checkpoint_every=3)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def batches(fail_at: int | None = None):
    """Separable 3-class data drawn from the sampler's rng; raises at call `fail_at` to simulate a kill."""
    calls = {"n": 0}

    def next_batch(rng: np.random.Generator):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt("killed")
        labels = rng.integers(3, size=32)
        inputs = rng.normal(size=(32, 4)) + np.eye(4)[labels] * 3
        return torch.from_numpy(inputs).float(), torch.from_numpy(labels)
    return next_batch


def test_loss_goes_down(tmp_path):
    losses = train(tiny_model(), batches(), SETTINGS, tmp_path / "ckpt", "cpu").losses
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])


def test_warmup_raises_the_learning_rate_linearly_then_the_steps_apply():
    optimizer = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    schedule = lr_schedule(optimizer, dataclasses.replace(SETTINGS, warmup=4, step_every=6))
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.025, 0.04375, 0.0625, 0.08125, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize("warmup", [0, 10])  # 10: killed during the warm-up
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, warmup):
    settings = dataclasses.replace(SETTINGS, warmup=warmup)
    uninterrupted = tiny_model()
    train(uninterrupted, batches(), settings, tmp_path / "a", "cpu", threads=2)

    resumed = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        train(resumed, batches(fail_at=8), settings, tmp_path / "b", "cpu", threads=2)  # killed in iteration 8
    assert (tmp_path / "b").is_file()  # the checkpoint after iteration 6
    torch.manual_seed(12345)  # the global RNG moved on meanwhile: the checkpoint must restore it
    torch.set_num_threads(1)  # and the process now has another thread count: the checkpoint's wins
    fresh = tiny_model()
    losses = train(fresh, batches(), settings, tmp_path / "b", "cpu").losses
    assert torch.get_num_threads() == 2
    assert len(losses) == 12
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name


def test_named_losses_are_summed_and_kept_apart(tmp_path):
    def two_losses(model, batch):
        inputs, targets = batch
        logits = model(inputs)
        return {"classification": nn.functional.cross_entropy(logits, targets), "penalty": logits.pow(2).mean() * 0.01}
    history = train(tiny_model(), batches(), SETTINGS, tmp_path / "ckpt", "cpu", loss_of=two_losses)
    assert set(history.parts) == {"classification", "penalty"}
    assert np.allclose(history.losses, np.add(history.parts["classification"], history.parts["penalty"]), atol=1e-5)
