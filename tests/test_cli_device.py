"""``--device`` on every command that runs a model (train, iwelbo, ate, sample, grn, demo): ``cpu`` and
``auto`` both work (``auto`` is the CPU here unless torch sees a GPU); an unusable device is exit 2 with one
line."""

from __future__ import annotations

import json

import pytest
import torch

from pyrovae.cli import main

NET = ["n_latent=3", "decoder_hidden=16", "encoder_hidden=16", "embedding_encoder_hidden=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    data = root / "tiny.h5ad"
    assert main(["simulate", "--preset", "tiny", "--seed", "0", "--out", str(data)]) == 0
    out = {}
    for model, device in (("sams_vae", "cpu"), ("gpo_vae", "auto")):
        run = root / model
        args = [
            "train",
            "--data",
            str(data),
            "--model",
            model,
            "--out",
            str(run),
            "--quiet",
            "--device",
            device,
        ]
        assert main([*args, "--set", *NET, "max_epochs=1", "batch_size=128"]) == 0
        out[model] = run
    return root, data, out


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_every_command_takes_device(runs, device, capsys):
    root, data, run = runs
    sams, gpo = str(run["sams_vae"]), str(run["gpo_vae"])
    tag = device
    commands = [
        [
            "iwelbo",
            sams,
            "--data",
            str(data),
            "--particles",
            "4",
            "--seeds",
            "0",
            "--out",
            str(root / f"iw_{tag}.csv"),
        ],
        ["ate", sams, "--data", str(data), "--n-samples", "50", "--out", str(root / f"ate_{tag}")],
        ["sample", sams, "--perturbation", "PG01", "--n-cells", "5", "--out", str(root / f"s_{tag}.h5ad")],
        ["grn", gpo, "--out", str(root / f"grn_{tag}.csv")],
    ]
    for cmd in commands:
        assert main([*cmd, "--device", device]) == 0, cmd[0]
    out = root / f"demo_{tag}"
    assert (
        main(["demo", "--preset", "tiny", "--epochs", "1", "--out", str(out), "--quiet", "--device", device])
        == 0
    )
    want = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    assert json.loads((out / "summary.json").read_text())["device"].startswith(want)
    capsys.readouterr()


def test_train_records_the_resolved_device(runs):
    _, _, run = runs
    cfg = json.loads((run["sams_vae"] / "config.json").read_text())
    assert cfg["train"]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")
@pytest.mark.parametrize("command", ["train", "iwelbo", "ate", "sample", "grn", "demo"])
def test_cuda_on_a_cpu_only_torch_is_exit_2_with_one_line(runs, command, tmp_path, capsys):
    _, data, run = runs
    sams = str(run["sams_vae"])
    args = {
        "train": ["train", "--data", str(data), "--out", str(tmp_path / "r")],
        "iwelbo": ["iwelbo", sams, "--data", str(data), "--out", str(tmp_path / "i.csv")],
        "ate": ["ate", sams, "--data", str(data), "--out", str(tmp_path / "a")],
        "sample": ["sample", sams, "--perturbation", "PG01", "--out", str(tmp_path / "s.h5ad")],
        "grn": ["grn", str(run["gpo_vae"]), "--out", str(tmp_path / "g.csv")],
        "demo": ["demo", "--preset", "tiny", "--out", str(tmp_path / "d")],
    }[command]
    capsys.readouterr()
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pyrovae {command}: error:") and "CUDA" in err and "\n" not in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()  # refused before any work
