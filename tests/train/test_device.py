"""Devices: the one resolver, and device-generic training / evaluation (on CUDA where torch sees a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyrovae.models.zoo import model_config
from pyrovae.predict.iwelbo import predictive_iwelbo
from pyrovae.predict.posterior import Posterior
from pyrovae.runs import load_run, train_run
from pyrovae.runs.directory import LAST
from pyrovae.train.device import device_rng_state, resolve_device, set_device_rng_state
from pyrovae.train.trainer import TrainConfig

SMALL = dict(n_latent=3, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16)
AUTO = resolve_device("auto")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
cpu_only_torch = pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")


def test_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == resolve_device(" AUTO ")
    assert AUTO.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="must be a string"):
        resolve_device(1.5)


@cpu_only_torch
def test_cuda_on_a_cpu_only_torch_is_one_clear_line():
    for name in ("cuda", "gpu", "cuda:0", 0):
        with pytest.raises(ValueError, match="use --device cpu or auto") as err:
            resolve_device(name)
        assert "\n" not in str(err.value)


@cuda_only
def test_cuda_names_and_bad_index():
    assert resolve_device("gpu").type == "cuda" and resolve_device(0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="no such GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_device_generic_train_evaluate_resume(tiny_data, tmp_path):
    """Training, prediction and IWELBO on the auto device (CUDA if present); resume = straight run."""
    # sams_vae's freeze is a fraction of the run's planned steps, which a resume with more epochs changes:
    # the reference's settings have no such schedule
    cfg = model_config("sams_vae_reference", **SMALL)
    fast = dict(batch_size=64, lr=1e-3, n_particles=2, val_particles=2, device="auto")
    straight = train_run(tiny_data, cfg, TrainConfig(max_epochs=4, **fast), tmp_path / "a", progress=False)
    assert next(straight.model.parameters()).device.type == AUTO.type
    train_run(tiny_data, cfg, TrainConfig(max_epochs=2, **fast), tmp_path / "b", progress=False)
    state = torch.load(tmp_path / "b" / LAST, weights_only=True)
    assert ("cuda_rng" in state) == (AUTO.type == "cuda")
    resumed = train_run(
        tiny_data, cfg, TrainConfig(max_epochs=4, **fast), tmp_path / "b", resume=True, progress=False
    )
    a = [h["train_loss"] for h in straight.metrics()]
    b = [h["train_loss"] for h in resumed.metrics()]
    assert np.allclose(a, b, rtol=1e-5)  # optimiser, epoch and the CPU (and CUDA) RNG state restored
    post = Posterior.from_run(straight)
    assert post.device.type == AUTO.type
    pred = post.predict(["A+B", "control"], n_cells=8, seed=1)
    assert np.isfinite(pred.X).all()
    iw = predictive_iwelbo(straight.model, tiny_data, "test", n_particles=4, untrained=straight.untrained)
    assert np.isfinite(iw["iwelbo"]).all()
    # same seed, same numbers on the device too; a CPU copy of the run predicts finite values as well
    ate = post.model_ate(["A"], n_samples=64, seed=3)
    np.testing.assert_array_equal(ate.to_numpy(), post.model_ate(["A"], n_samples=64, seed=3).to_numpy())
    cpu = Posterior.from_run(load_run(tmp_path / "a", device="cpu"))
    assert np.isfinite(cpu.model_ate(["A"], n_samples=64).to_numpy()).all()


def test_rng_state_helpers_are_a_no_op_off_cuda():
    assert device_rng_state("cpu") == {}
    set_device_rng_state({}, "cpu")


@cuda_only
def test_cuda_rng_state_round_trip():
    dev = torch.device("cuda")
    state = device_rng_state(dev)
    a = torch.randn(5, device=dev)
    set_device_rng_state(state, dev)
    assert torch.equal(a, torch.randn(5, device=dev))
