"""Trial packing: runs trained together give what each gives when trained alone by ``fit``.

On the CPU there are no streams, so the packed runs alternate step by step; the test is that
the alternation changes nothing: each run keeps its own random state (initial weights, batch
order, dropout), so histories and weights are identical to separate ``fit`` runs.
"""

from __future__ import annotations

import pytest
import torch

from medattn.config import ModelParams, TrainParams
from medattn.errors import ParamError
from medattn.training.fit import LabelledImages, TrainResult, fit
from medattn.training.packing import fit_packed


def _data(n: int = 16, size: int = 16) -> tuple[LabelledImages, LabelledImages]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = torch.randn(n, 3, size, size, generator=g) * 0.1
    images[labels == 1, :, 2:6, 2:6] += 2.0
    return LabelledImages(images, labels), LabelledImages(images[:6].clone(), labels[:6].clone())


MODEL = ModelParams(backbone="small_cnn", attention="global_pixel", K=2)
# three trials of a search: other seeds, learning rates, λ and cut-off epochs
TRIALS = [
    TrainParams(epochs=3, cutoff_epoch=1, lambda_l1=0.01, lr=0.01, batch_size=8, seed=0, device="cpu"),
    TrainParams(epochs=3, cutoff_epoch=2, lambda_l1=0.1, lr=0.005, batch_size=8, seed=1, device="cpu"),
    TrainParams(epochs=2, cutoff_epoch=0, lambda_l1=0.001, lr=0.02, batch_size=6, seed=2, device="cpu",
                weight_decay=1e-3),
]


def _same_run(packed: TrainResult, alone: TrainResult) -> None:
    assert packed.history == alone.history
    assert packed.best_epoch == alone.best_epoch
    a, b = packed.model.state_dict(), alone.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_packed_trials_give_the_histories_and_weights_of_separate_runs() -> None:
    train, val = _data()
    packed = fit_packed(MODEL, TRIALS, train, val, class_names=["a", "b"], progress=False)
    assert len(packed) == len(TRIALS)
    for outcome, tp in zip(packed, TRIALS, strict=True):
        assert isinstance(outcome, TrainResult)
        _same_run(outcome, fit(MODEL, tp, train, val, class_names=["a", "b"], progress=False))


def test_packed_runs_may_differ_in_architecture_and_use_the_fast_path() -> None:
    train, val = _data()
    models = [MODEL, ModelParams(backbone="small_cnn", attention="none")]
    trials = [TrainParams(epochs=2, cutoff_epoch=1, lr=0.01, batch_size=8, seed=s, device="cpu", fast_path="on")
              for s in (3, 4)]
    packed = fit_packed(models, trials, train, val, class_names=["a", "b"], progress=False)
    for outcome, mp, tp in zip(packed, models, trials, strict=True):
        assert isinstance(outcome, TrainResult)
        alone = fit(mp, tp, train, val, class_names=["a", "b"], progress=False)
        for got, want in zip(outcome.history, alone.history, strict=True):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_a_pruned_trial_stops_alone_and_a_stopping_one_keeps_its_best_epoch() -> None:
    train, val = _data()

    class Pruned(Exception):
        pass

    def prune_at_two(row: dict[str, float]) -> None:
        if row["epoch"] == 2:
            raise Pruned("trial pruned at epoch 2")

    callbacks = [prune_at_two, lambda row: row["epoch"] >= 1, None]
    packed = fit_packed(MODEL, TRIALS, train, val, class_names=["a", "b"], on_epoch=callbacks, progress=False)
    assert isinstance(packed[0], Pruned)
    stopped, complete = packed[1], packed[2]
    assert isinstance(stopped, TrainResult) and stopped.stopped_early and len(stopped.history) == 1
    assert isinstance(complete, TrainResult) and len(complete.history) == TRIALS[2].epochs
    _same_run(complete, fit(MODEL, TRIALS[2], train, val, class_names=["a", "b"], progress=False))


def test_mismatched_lists_are_a_clear_error() -> None:
    train, val = _data()
    with pytest.raises(ParamError, match="3 train params but 2 model params"):
        fit_packed([MODEL, MODEL], TRIALS, train, val, class_names=["a", "b"], progress=False)
    with pytest.raises(ParamError, match="at least one"):
        fit_packed(MODEL, [], train, val, class_names=["a", "b"], progress=False)
