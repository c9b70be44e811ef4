"""One test per reliability defect: split identity by cell name, safe overwrite, checked resume, typed
options, locks, clean interruption, consistent outputs after failures, umask-respecting files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pyrovae.cli as cli_mod
import pyrovae.runs.run as runs_mod
from pyrovae.cli import main
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.models.zoo import model_config
from pyrovae.outputs import atomic_write, dir_lock, is_temporary, staged_dir
from pyrovae.predict.iwelbo import iwelbo_over_seeds
from pyrovae.runs import load_run, train_run
from pyrovae.runs.directory import fingerprint_mismatch
from pyrovae.train.trainer import TrainConfig
from tests.helpers import make_adata

SMALL = dict(n_latent=3, decoder_hidden=8, encoder_hidden=8, embedding_encoder_hidden=8)
ONE_EPOCH = TrainConfig(max_epochs=1, batch_size=64, n_particles=1, val_particles=1)
TINY = [f"{k}={v}" for k, v in SMALL.items()] + ["max_epochs=1", "batch_size=64", "n_particles=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    data_path = root / "data.h5ad"
    make_adata().write_h5ad(data_path)
    run = root / "run"
    assert main(["train", "--data", str(data_path), "--out", str(run), "--quiet", "--set", *TINY]) == 0
    return root, data_path, run


# ---------------------------------------------------------------- 1. the split is stored by cell name


def test_evaluation_uses_the_runs_split_by_name_under_shuffle_and_subset(trained):
    root, data_path, run_dir = trained
    run = load_run(run_dir)
    base = run.load_data(str(data_path))
    stored = pd.read_csv(run_dir / "split.csv").set_index("cell")["split"]
    a = make_adata()
    shuffled = a[np.random.default_rng(1).permutation(a.n_obs)].copy()
    again = run.load_data(shuffled)
    # every cell keeps the split it had at training, whatever its position
    np.testing.assert_array_equal(again.split, stored.reindex(shuffled.obs_names).to_numpy())
    subset = a[20:].copy()
    with pytest.warns(UserWarning, match=r"the data lacks \d+ of the run's \d+ (train|val|test) cells"):
        part = run.load_data(subset)
    np.testing.assert_array_equal(part.split, stored.reindex(subset.obs_names).to_numpy())
    # no training cell turns into a test cell: the held-out IWELBO is the same cells' score
    test_names = set(base.obs.index[base.split == "test"])
    assert set(again.obs.index[again.split == "test"]) == test_names
    # what evaluation did before: the split recomputed by position turns training cells into test cells
    by_position = load_perturbation_data(shuffled, schema=run.schema)
    leaked = set(by_position.obs.index[by_position.split == "test"]) - test_names
    assert len(leaked) > len(test_names) // 2
    res = iwelbo_over_seeds(run.model, again, "test", seeds=[0], n_particles=4)
    assert res["n_cells"] == len(test_names)


def test_cells_the_run_never_saw_get_no_split(trained):
    _, data_path, run_dir = trained
    a = make_adata()
    b = make_adata(n=12, seed=5)
    b.obs_names = [f"new{i}" for i in range(12)]
    import anndata as ad

    both = ad.concat([a, b])
    with pytest.warns(UserWarning, match="12 of the data's 252 cells are not in the run's split"):
        data = load_run(run_dir).load_data(both)
    assert (data.split[-12:] == "").all()


def test_duplicated_cell_names_are_refused_before_a_run_is_made(tmp_path):
    a = make_adata()
    a.obs_names = ["c0"] * a.n_obs
    data = load_perturbation_data(a)
    with pytest.raises(ValueError, match="duplicated cell names"):
        train_run(data, model_config("cpa_vae", **SMALL), ONE_EPOCH, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------- 2. --overwrite deletes only pyrovae's own


def test_overwrite_never_deletes_user_files_or_the_input(trained, tmp_path, capsys):
    _, data_path, _ = trained
    user = tmp_path / "analysis"
    user.mkdir()
    (user / "input.h5ad").write_bytes(Path(data_path).read_bytes())
    (user / "notes.txt").write_text("mine")
    rc = main(
        ["train", "--data", str(user / "input.h5ad"), "--out", str(user), "--overwrite", "--set", *TINY]
    )
    err = capsys.readouterr().err
    assert rc == 2 and ("lies inside" in err or "nothing was deleted" in err), err
    assert (user / "notes.txt").read_text() == "mine" and (user / "input.h5ad").exists()
    # a real run is replaced; a run with a user's file in it is not
    run = tmp_path / "run"
    args = ["train", "--data", str(data_path), "--out", str(run), "--quiet", "--set", *TINY]
    assert main(args) == 0
    assert main([*args, "--overwrite"]) == 0
    (run / "notebook.ipynb").write_text("{}")
    assert main([*args, "--overwrite"]) == 2
    assert "notebook.ipynb" in capsys.readouterr().err and (run / "notebook.ipynb").exists()


def test_demo_overwrite_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.tex").write_text("x")
    assert main(["demo", "--out", str(d), "--overwrite", "--preset", "tiny"]) == 2
    assert "not a directory pyrovae wrote" in capsys.readouterr().err
    assert (d / "thesis.tex").exists()


# -------------------------------------------------------------------------- 3. resume checks the data


def test_resume_refuses_reordered_genes_other_models_and_leaves_the_run_untouched(trained, tmp_path, capsys):
    _, data_path, run_dir = trained
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".pyrovae.lock"}
    a = make_adata()
    rev = tmp_path / "rev.h5ad"
    a[:, list(reversed(a.var_names))].copy().write_h5ad(rev)
    assert main(["train", "--data", str(rev), "--out", str(run_dir), "--resume"]) == 2
    assert "different order" in capsys.readouterr().err
    assert (
        main(["train", "--data", str(data_path), "--out", str(run_dir), "--resume", "--model", "cpa_vae"])
        == 2
    )
    assert "holds a sams_vae run, not cpa_vae" in capsys.readouterr().err
    other = tmp_path / "other.h5ad"
    b = make_adata(g=25)
    b.write_h5ad(other)
    assert main(["train", "--data", str(other), "--out", str(run_dir), "--resume"]) == 2
    assert "gene mismatch" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".pyrovae.lock"}
    assert after == before  # schema.json, config.json, checkpoints: nothing touched


def test_resume_continues_with_the_stored_split_on_a_shuffled_file(trained, tmp_path):
    _, data_path, run_dir = trained
    run = tmp_path / "r"
    args = ["--quiet", "--set", *TINY]
    assert main(["train", "--data", str(data_path), "--out", str(run), *args]) == 0
    a = make_adata()
    shuffled = tmp_path / "shuffled.h5ad"
    a[np.random.default_rng(2).permutation(a.n_obs)].copy().write_h5ad(shuffled)
    split_before = (run / "split.csv").read_bytes()
    assert (
        main(["train", "--data", str(shuffled), "--out", str(run), "--resume", "--set", "max_epochs=2"]) == 0
    )
    assert (run / "split.csv").read_bytes() == split_before
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1, 2]


# ------------------------------------------------------------------ 4. options are typed, ranges checked


def test_e_notation_options_are_numbers(trained, tmp_path):
    _, data_path, _ = trained
    cfg = tmp_path / "opts.yaml"
    cfg.write_text("lr: 1e-3\nweight_decay: 1e-6\nmin_delta: 1e-4\n")
    run = tmp_path / "r"
    args = ["train", "--data", str(data_path), "--out", str(run), "--quiet", "--config", str(cfg)]
    assert main([*args, "--set", *TINY, "clip_norm=1e2", "mask_prior=5e-2", "mask_lr=1e-2"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["lr"] == 1e-3 and isinstance(saved["train"]["lr"], float)
    assert saved["train"]["clip_norm"] == 100.0 and isinstance(saved["train"]["clip_norm"], float)
    # mask_lr is also a model option (the model's own step size), and --set routes a name to the model first
    assert saved["train"]["min_delta"] == 1e-4 and saved["model"]["mask_lr"] == 1e-2
    assert saved["model"]["mask_prior"] == 0.05


def test_configs_coerce_and_validate_in_python_too():
    assert TrainConfig(lr="1e-3", batch_size="32", clip_norm="none").clip_norm is None
    assert TrainConfig(lr="1e-3").lr == 1e-3
    with pytest.raises(ValueError, match="option batch_size must be >= 1, got -5"):
        TrainConfig(batch_size=-5)
    with pytest.raises(ValueError, match="option n_latent must be >= 1"):
        model_config("sams_vae", n_latent=0)
    with pytest.raises(ValueError, match="option max_steps must be an integer"):
        TrainConfig(max_steps="many")


# --------------------------------------------------------------------------------------------- 5. locks


def test_a_second_writer_fails_fast_naming_the_holder(trained, tmp_path, capsys):
    _, data_path, _ = trained
    run = tmp_path / "r"
    with dir_lock(run):
        t0 = time.perf_counter()
        assert main(["train", "--data", str(data_path), "--out", str(run), "--set", *TINY]) == 2
        assert time.perf_counter() - t0 < 30
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "being written by" in err
    # released: now it trains
    assert main(["train", "--data", str(data_path), "--out", str(run), "--quiet", "--set", *TINY]) == 0


# ------------------------------------------------------------------- 6. Ctrl-C: one line, checkpoints ok


def test_ctrl_c_exits_130_with_one_line_and_the_run_resumes(trained, tmp_path):
    _, data_path, _ = trained
    run = tmp_path / "r"
    net = [f"{k}={v}" for k, v in SMALL.items()]
    cmd = [sys.executable, "-m", "pyrovae.cli", "train", "--data", str(data_path), "--out", str(run)]
    # no early stop and no end in sight: the run must be the one interrupted (tiny epochs take milliseconds)
    cmd += ["--quiet", "--set", *net, "max_epochs=100000", "patience=100000", "batch_size=32"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:  # a failed or timed-out wait leaves no training process behind
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "pyrovae train: interrupted; every file already written is complete (a training run continues with "
        "--resume)"
    ]
    run_ = load_run(run, checkpoint="last")  # checkpoints intact
    epochs = len(pd.read_csv(run / "metrics.csv"))
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == epochs == len(run_.metrics())


def test_ctrl_c_between_last_pt_and_metrics_leaves_them_level(tmp_path, monkeypatch):
    """An interrupt in the window after last.pt and before metrics.csv: the table is brought level."""
    real = runs_mod.write_csv
    calls = {"n": 0}

    def interrupted_once(path, rows):
        if Path(path).name == "metrics.csv" and calls["n"] == 1:  # epoch 2's row, after its last.pt
            calls["n"] += 1
            raise KeyboardInterrupt
        calls["n"] += Path(path).name == "metrics.csv"
        return real(path, rows)

    monkeypatch.setattr(runs_mod, "write_csv", interrupted_once)
    cfg = TrainConfig(max_epochs=5, batch_size=64, n_particles=1, val_particles=1)
    with pytest.raises(KeyboardInterrupt):
        train_run(
            load_perturbation_data(make_adata()),
            model_config("cpa_vae", **SMALL),
            cfg,
            tmp_path / "r",
            progress=False,
        )
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 == len(pd.read_csv(tmp_path / "r" / "metrics.csv"))


# --------------------------------------------------------------------------- 7. no half-made state


def test_a_run_failing_before_its_first_epoch_leaves_nothing(tmp_path):
    data = load_perturbation_data(make_adata())

    def boom(model):
        raise RuntimeError("failed while building")

    with pytest.raises(RuntimeError):
        train_run(
            data, model_config("cpa_vae", **SMALL), ONE_EPOCH, tmp_path / "r", progress=False, prepare=boom
        )
    assert not (tmp_path / "r").exists()
    # and the rerun is not blocked
    train_run(data, model_config("cpa_vae", **SMALL), ONE_EPOCH, tmp_path / "r", progress=False)


def test_temporary_files_of_a_killed_writer_are_cleaned(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = tmp_path / f".table.{pid}.abc123xy.tmp.csv"  # tempfile: 8 of a-z0-9_
    stale.write_text("half")
    live = tmp_path / f".table.{os.getpid()}.zzzzzzzz.tmp.csv"
    live.write_text("in progress")
    atomic_write(tmp_path / "table.csv", lambda tmp: Path(tmp).write_text("done"))
    assert not stale.exists() and live.exists() and (tmp_path / "table.csv").read_text() == "done"


def test_ate_overwrite_drops_stale_files_and_a_failed_ate_keeps_the_old_output(trained, tmp_path, capsys):
    _, data_path, run_dir = trained
    out = tmp_path / "ate"
    base = ["ate", str(run_dir), "--data", str(data_path), "--n-samples", "16", "--out", str(out)]
    assert main([*base, "--name", "first"]) == 0
    assert (out / "ate_pred_first.csv").exists()
    assert main([*base, "--name", "second", "--overwrite"]) == 0
    assert not (out / "ate_pred_first.csv").exists() and (out / "ate_pred_second.csv").exists()
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RuntimeError), staged_dir(out, "ate", overwrite=True) as stage:
        (stage / "ate_metrics.csv").write_text("partial")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in out.iterdir()) == before
    assert "partial" not in (out / "ate_metrics.csv").read_text()
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_iwelbo_never_replaces_an_existing_table_without_overwrite(trained, tmp_path, capsys):
    """A CSV at --out is the user's unless --overwrite (a table without a summary is no proof that an
    interrupted pyrovae wrote it: pyrovae's half-written files are its temporaries only)."""
    _, data_path, run_dir = trained
    out = tmp_path / "iw.csv"
    out.write_text("cell,iwelbo\nmine,1\n")  # the user's table (or one an interrupted run left)
    args = ["iwelbo", str(run_dir), "--data", str(data_path), "--particles", "2", "--seeds", "0", "--out"]
    assert main([*args, str(out)]) == 2
    assert "already exist" in capsys.readouterr().err and out.read_text() == "cell,iwelbo\nmine,1\n"
    assert main([*args, str(out), "--overwrite"]) == 0
    assert json.loads((tmp_path / "iw_summary.json").read_text())["n_particles"] == 2


def test_resumed_metrics_keep_integer_columns(trained, tmp_path):
    _, data_path, _ = trained
    run = tmp_path / "r"
    assert main(["train", "--data", str(data_path), "--out", str(run), "--quiet", "--set", *TINY]) == 0
    assert main(["train", "--data", str(data_path), "--out", str(run), "--resume", "--quiet",
                 "--set", "max_epochs=2"]) == 0  # fmt: skip
    table = pd.read_csv(run / "metrics.csv", dtype=str)
    assert list(table["epoch"]) == ["1", "2"]  # not "1.0": integers stay integers after a resume
    assert all(v.isdigit() for v in table["step"])


# ---------------------------------------------------------------------------------------- 9. umask


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write(tmp_path / "f.csv", lambda tmp: Path(tmp).write_text("x"))
        with staged_dir(tmp_path / "ate_x", "ate", overwrite=False) as stage:
            atomic_write(stage / "ate_metrics.csv", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.csv").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "ate_x" / "ate_metrics.csv").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "ate_x").stat().st_mode) == 0o777 & ~mask


# ---------------------------------------------------------------------------------------- 10. small


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--version"])
    assert err.value.code == 0 and capsys.readouterr().out.startswith("pyrovae ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch_is_one_line(trained, tmp_path, capsys):
    _, data_path, _ = trained
    rc = main(
        ["train", "--data", str(data_path), "--out", str(tmp_path / "r"), "--set", *TINY, "device=cuda"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "device 'cuda' asked for CUDA, but" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


# ------------------------------------------------ round two (issue 27): ownership, identity, resume, limits


def _train_cli(data_path, out, *extra) -> int:
    return main(["train", "--data", str(data_path), "--out", str(out), "--quiet", *extra])


def test_a_user_folder_with_run_like_files_is_refused_untouched(trained, tmp_path, capsys):
    """Only a directory carrying pyrovae's marker is an incomplete run; a folder that merely holds a
    config.json and a schema.json is the user's, with or without --overwrite."""
    _, data_path, _ = trained
    folder = tmp_path / "analysis"
    folder.mkdir()
    files = {"config.json": '{"mine": 1}', "schema.json": "{}", "results.txt": "precious"}
    for name, text in files.items():
        (folder / name).write_text(text)
    assert _train_cli(data_path, folder, "--set", *TINY) == 2
    assert _train_cli(data_path, folder, "--overwrite", "--set", *TINY) == 2
    assert "nothing was deleted" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in folder.iterdir()} == files


def test_a_run_whose_last_pt_was_deleted_is_not_replaced_without_overwrite(trained, tmp_path, capsys):
    _, data_path, run_dir = trained
    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    (run / "last.pt").unlink()
    before = sorted(p.name for p in run.iterdir())
    assert _train_cli(data_path, run, "--set", *TINY) == 2
    assert "last.pt is missing" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before and (run / "best.pt").exists()
    assert _train_cli(data_path, run, "--overwrite", "--set", *TINY) == 0  # replaced when asked


def test_overwrite_keeps_files_that_only_look_like_temporaries(trained, tmp_path, capsys):
    _, data_path, run_dir = trained
    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    for name in (".notes.tmp.txt", ".backup.old-2020", ".draft.123.staging-area"):
        (run / name).write_text("mine")
    assert _train_cli(data_path, run, "--overwrite", "--set", *TINY) == 2
    assert "did not write" in capsys.readouterr().err
    assert (run / ".notes.tmp.txt").read_text() == "mine" and (run / ".backup.old-2020").exists()
    assert not is_temporary(".notes.tmp.txt") and not is_temporary(".backup.old-2020")
    assert is_temporary(".metrics.123.ab_cd9xy.tmp.csv") and is_temporary(".ate_test.7.staging-k2j4l5m6")


def test_outputs_never_name_a_file_the_run_owns(trained, capsys):
    _, data_path, run_dir = trained
    split_before = (run_dir / "split.csv").read_bytes()
    for name in ("split.csv", "metrics.csv"):
        args = ["iwelbo", str(run_dir), "--data", str(data_path), "--out", str(run_dir / name), "--overwrite"]
        assert main(args) == 2
        assert "is a file of the pyrovae run" in capsys.readouterr().err
    assert (run_dir / "split.csv").read_bytes() == split_before
    assert load_run(run_dir).load_data(str(data_path)).indices("test").size > 0  # still evaluable


def test_resume_applies_new_optimiser_settings(trained, tmp_path):
    """--resume --set lr=... trains with the new rate (config.json records only what happened)."""
    _, data_path, run_dir = trained
    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    assert (
        _train_cli(data_path, run, "--resume", "--set", "max_epochs=2", "lr=5e-3", "weight_decay=0.01") == 0
    )
    groups = torch.load(run / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    # the mask logits keep the model's own step size (sams_vae's mask_lr 0.02); every other group the new lr
    assert {g["lr"] for g in groups} - {0.02} == {5e-3}
    assert max(g["weight_decay"] for g in groups) == 0.01
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 5e-3


def test_nan_mid_run_keeps_the_checkpoints_and_resumes_with_a_lower_rate(trained, tmp_path, capsys):
    _, data_path, run_dir = trained
    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    last = (run / "last.pt").read_bytes()
    assert _train_cli(data_path, run, "--resume", "--set", "max_epochs=3", "lr=1e4", "clip_norm=none") == 2
    err = capsys.readouterr().err
    assert "error: the training loss became nan" in err and "Traceback" not in err
    assert (run / "last.pt").read_bytes() == last  # the last good checkpoint is intact
    assert _train_cli(data_path, run, "--resume", "--set", "max_epochs=2", "lr=1e-3") == 0
    assert len(pd.read_csv(run / "metrics.csv")) == 2


def test_the_run_knows_its_data(trained, tmp_path):
    """fingerprint.json (labels and library sizes by cell, a checksum) and the run id in checkpoints."""
    _, data_path, run_dir = trained
    fp = json.loads((run_dir / "fingerprint.json").read_text())
    assert fp["n_cells"] == 240 and len(fp["checksum"]) == 64
    for ckpt in ("best.pt", "last.pt"):
        assert torch.load(run_dir / ckpt, weights_only=True)["run_id"] == fp["run_id"]
    run = load_run(run_dir)
    a = make_adata()
    assert fingerprint_mismatch(fp, run.load_data(a)) is None  # the same data: silent
    a.X = a.X * 2
    with pytest.warns(UserWarning, match=r"240 have other counts \(e\.g\. c0: library size"):
        run.load_data(a)
    b = make_adata()[::-1].copy()  # the same cells in another order: the same data
    assert fingerprint_mismatch(fp, run.load_data(b)) is None
    other = tmp_path / "other"
    assert _train_cli(data_path, other, "--set", *TINY, "seed=3") == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(run_dir, mixed)
    shutil.copy(other / "best.pt", mixed / "best.pt")  # same shapes, another run
    with pytest.raises(ValueError, match="belongs to another run"):
        load_run(mixed)


def test_split_key_marking_training_cells_as_test_is_named(trained, tmp_path, capsys):
    _, _, run_dir = trained
    a = make_adata()
    a.obs["fold"] = np.where(np.arange(a.n_obs) % 3 == 0, "test", "train")
    path = tmp_path / "fold.h5ad"
    a.write_h5ad(path)
    run = load_run(run_dir)
    data = run.load_data(str(path), split_key="fold")
    seen = run.seen_cells(data, "test")
    stored = pd.read_csv(run_dir / "split.csv").set_index("cell")["split"]
    chosen = a.obs_names[a.obs["fold"] == "test"]
    assert seen == {k: int((stored.reindex(chosen) == k).sum()) for k in ("train", "val")}
    args = ["iwelbo", str(run_dir), "--data", str(path), "--split-key", "fold", "--particles", "2", "--seeds"]
    assert main([*args, "0", "--out", str(tmp_path / "iw.csv")]) == 0
    err = capsys.readouterr().err
    assert f"{seen['train'] + seen['val']} of the 80 test cells" in err and "not held-out" in err


def test_ctrl_c_while_starting_is_one_line(trained, tmp_path):
    """Ctrl-C during the imports and argument parsing (the first seconds) exits 130 with one line."""
    _, data_path, _ = trained
    code = (
        "import sys; sys.stderr.write('ready\\n'); sys.stderr.flush()\n"
        "from pyrovae.cli import main\n"
        f"sys.exit(main(['train', '--data', {str(data_path)!r}, '--out', {str(tmp_path / 'r')!r}]))"
    )
    for delay in (0.3, 1.0):  # in the imports of the subcommands (torch, pyro, anndata: seconds)
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr.readline() == "ready\n"
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            err = proc.communicate(timeout=120)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 130, err[-2000:]
        assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    assert not (tmp_path / "r").exists()


def test_ctrl_c_in_argument_parsing_is_caught(monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "build_parser", interrupted)
    assert main(["train"]) == 130
    assert capsys.readouterr().err == "pyrovae: interrupted while starting; nothing was written\n"
