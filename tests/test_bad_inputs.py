"""The bad-input catalogue: every case runs through the CLI as a user would and must answer with one clear
line that names the problem (exit code 2), or with a warning line where pyrovae accepts the input (exit 0),
never with a traceback. ``CASES`` is the catalogue; the README's "Bad input" section summarises it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyrovae.cli import main
from pyrovae.outputs import dir_lock
from tests.helpers import make_adata

TINY = [
    "n_latent=3",
    "decoder_hidden=8",
    "encoder_hidden=8",
    "embedding_encoder_hidden=8",
    "max_epochs=1",
    "batch_size=128",
    "n_particles=1",
    "val_particles=1",
]


# ------------------------------------------------------------------------------------------- data files


def _write(a, path: Path) -> str:
    a.write_h5ad(path)
    return str(path)


def _variant(name: str, root: Path) -> str:
    """A data file with one defect (``name``), written on first use."""
    path = root / f"{name}.h5ad"
    if path.exists():
        return str(path)
    a = make_adata()
    if name == "float_counts":
        a.X = sp.csr_matrix(np.log1p(a.X.toarray()))
    elif name == "negative":
        x = a.X.toarray()
        x[0, 0] = -1
        a.X = sp.csr_matrix(x)
    elif name == "nan_values":
        x = a.X.toarray()
        x[0, 0] = np.nan
        a.X = x
    elif name == "nan_labels":
        a.obs["perturbation"] = a.obs["perturbation"].astype(object)
        a.obs.iloc[0, a.obs.columns.get_loc("perturbation")] = np.nan
    elif name == "empty_label":
        a.obs.iloc[0, a.obs.columns.get_loc("perturbation")] = " "
    elif name == "dangling_sep":
        a.obs["perturbation"] = a.obs["perturbation"].replace({"A+B": "A+"})
    elif name == "no_controls":
        a.obs["perturbation"] = a.obs["perturbation"].replace({"control": "A"})
    elif name == "Control_label":
        a.obs["perturbation"] = a.obs["perturbation"].replace({"control": "Control-NT"})
    elif name == "only_controls":
        a.obs["perturbation"] = "control"
    elif name == "dup_genes":
        a.var_names = ["g0"] * 2 + [f"g{j}" for j in range(2, a.n_vars)]
    elif name == "dup_cells":
        a.obs_names = ["c0"] * 2 + [f"c{i}" for i in range(2, a.n_obs)]
    elif name == "bad_split":
        a.obs["split"] = np.where(np.arange(a.n_obs) % 2, "train", "holdout")
    elif name == "no_train":
        a.obs["split"] = np.where(np.arange(a.n_obs) % 2, "val", "test")
    elif name == "all_zero":
        a.X = sp.csr_matrix(a.shape, dtype=np.float32)
    elif name == "zero_genes":
        a = a[:, []].copy()
    elif name == "zero_cells":
        a = a[[]].copy()
    elif name == "singles_only":
        a = a[a.obs["perturbation"] != "A+B"].copy()
    elif name == "zero_library":
        x = a.X.toarray()
        x[:3] = 0
        a.X = sp.csr_matrix(x)
    elif name == "controls_test_only":
        lab = a.obs["perturbation"].to_numpy()
        a.obs["split"] = np.where(lab == "control", "test", np.where(np.arange(a.n_obs) % 5, "train", "val"))
    elif name == "no_val":
        a.obs["split"] = np.where(np.arange(a.n_obs) % 5, "train", "test")
    elif name == "test_only_pert":
        lab = a.obs["perturbation"].astype(str)
        a.obs["split"] = np.where(
            lab.str.contains("B"), "test", np.where(np.arange(a.n_obs) % 5, "train", "val")
        )
    elif name == "plus_labels":
        a.obs["perturbation"] = a.obs["perturbation"].replace({"A+B": "A+C"})
    elif name == "repeat_label":
        a.obs["perturbation"] = a.obs["perturbation"].replace({"A+B": "A+A"})
    elif name == "few_cells":
        a = a[:24].copy()
    elif name == "genes_reordered":
        a = a[:, list(reversed(a.var_names))].copy()
    elif name == "genes_changed":
        a.var_names = [f"h{j}" for j in range(a.n_vars)]
    elif name == "shuffled":
        a = a[np.random.default_rng(0).permutation(a.n_obs)].copy()
    elif name == "subset":
        a = a[20:].copy()
    elif name == "extra_cells":
        b = make_adata(n=12, seed=3)
        b.obs_names = [f"new{i}" for i in range(b.n_obs)]
        a = ad.concat([a, b])
    elif name == "unknown_pert":
        a.obs["perturbation"] = a.obs["perturbation"].replace({"B": "Z"})
    elif name == "near_duplicate":  # PG01 / pg01
        lab = a.obs["perturbation"].astype(str).replace({"A": "PG01", "A+B": "PG01+B"}).to_numpy()
        lab[np.flatnonzero(lab == "PG01")[:10]] = "pg01"
        a.obs["perturbation"] = lab
    elif name == "nfc_nfd":  # one name in two Unicode forms
        lab = a.obs["perturbation"].astype(str).replace({"A": "Caf\u00e9", "A+B": "Caf\u00e9+B"}).to_numpy()
        lab[np.flatnonzero(lab == "Caf\u00e9")[:10]] = "Cafe\u0301"
        a.obs["perturbation"] = lab
    elif name in ("nan_text", "none_text"):  # obs[...].astype(str) of missing labels
        lab = a.obs["perturbation"].astype(object).to_numpy()
        lab[np.flatnonzero(lab == "B")[:5]] = np.nan if name == "nan_text" else None
        a.obs["perturbation"] = pd.Series(lab, index=a.obs_names).astype(str).to_numpy()
    elif name == "doubled":  # the run's cells and labels, other counts
        a.X = a.X * 2
    elif name == "relabelled":
        lab = a.obs["perturbation"].astype(str).to_numpy()
        lab[:8] = np.where(lab[:8] == "A", "B", "A")
        a.obs["perturbation"] = lab
    elif name == "fold":  # a split column whose test cells include the run's training cells
        a.obs["fold"] = np.where(np.arange(a.n_obs) % 3 == 0, "test", "train")
    elif name == "newer_anndata":  # an element encoded by a (hypothetical) newer anndata
        path = _write(a, path)
        with h5py.File(path, "r+") as f:
            f["X"].attrs["encoding-version"] = "9.0.0"
        return path
    elif name == "sim":
        assert main(["simulate", "--preset", "tiny", "--out", str(path)]) == 0
        return str(path)
    elif name != "good":
        raise KeyError(name)
    return _write(a, path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = _variant("good", root)
    run = root / "run"
    assert main(["train", "--data", good, "--out", str(run), "--quiet", "--set", *TINY]) == 0
    files = {"root": root, "good": good, "run": str(run)}
    files["locked"] = str(root / "run_locked")
    shutil.copytree(run, files["locked"])
    (root / "notes.csv").write_text("a,b\n1,2\n")
    (root / "text.h5ad").write_text("not hdf5 at all\n")
    raw = Path(good).read_bytes()
    (root / "truncated.h5ad").write_bytes(raw[: len(raw) // 3])
    (root / "broken.yaml").write_text("lr: [1e-3\nn_latent: 4\n")
    (root / "list.yaml").write_text("- lr\n- 1e-3\n")
    (root / "nested.yaml").write_text("model:\n  n_latent: 4\n")
    (root / "typo.yaml").write_text("lr: 1e-3\nbatch_size: lots\n")
    (root / "userdir").mkdir()
    (root / "userdir" / "my_notes.txt").write_text("precious")
    (root / "leading_zero.yaml").write_text("n_latent: 010\n")
    (root / "sexagesimal.yaml").write_text("max_epochs: 1:30\n")
    (root / "duplicate.yaml").write_text("lr: 1e-3\nn_latent: 4\nlr: 1e-2\n")
    # a user's folder that happens to hold files named like a run's (no pyrovae marker)
    (root / "lookalike").mkdir()
    for f in ("config.json", "schema.json"):
        (root / "lookalike" / f).write_text("{}")
    (root / "lookalike" / "analysis.txt").write_text("precious")
    (root / "existing.csv").write_text("cell,score\nmine,1\n")
    run2 = root / "run2"  # another run with the same shapes
    assert main(["train", "--data", good, "--out", str(run2), "--quiet", "--set", *TINY, "seed=1"]) == 0
    files["run2"] = str(run2)
    return files


def _run_copy(env, name: str) -> str:
    """A fresh copy of the trained run (for cases that damage it)."""
    dst = env["root"] / f"run_{name}"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(env["run"], dst)
    return str(dst)


def _damage(env, name: str) -> str:
    run = Path(_run_copy(env, name))
    if name == "truncated_ckpt":
        raw = (run / "best.pt").read_bytes()
        (run / "best.pt").write_bytes(raw[: len(raw) // 2])
    elif name == "garbage_ckpt":
        (run / "best.pt").write_bytes(b"\x00garbage" * 50)
    elif name == "pickled_ckpt":
        state = torch.load(run / "best.pt", weights_only=True)
        state["payload"] = _Evil()
        torch.save(state, run / "best.pt")
    elif name == "shape_ckpt":
        state = torch.load(run / "best.pt", weights_only=True)
        k = next(iter(state["model"]))
        state["model"][k] = torch.zeros(7, 7, 7)
        torch.save(state, run / "best.pt")
    elif name == "corrupt_config":
        (run / "config.json").write_text('{"model": {"n_lat')
    elif name == "foreign_file":
        (run / "my_analysis.ipynb").write_text("{}")
    elif name == "incomplete":
        for f in ("best.pt", "last.pt", "metrics.csv"):
            (run / f).unlink()
    elif name == "no_last":  # deleted by hand after training
        (run / "last.pt").unlink()
    elif name == "tmp_lookalike":  # user files that only look like pyrovae's temporaries
        (run / ".notes.tmp.txt").write_text("mine")
        (run / ".backup.old-2020").write_text("mine")
    elif name in ("edited_config", "edited_value", "edited_schema"):
        cfg_file = run / ("schema.json" if name == "edited_schema" else "config.json")
        cfg = json.loads(cfg_file.read_text())
        if name == "edited_config":
            cfg["model"] = ["n_latent", 3]
        elif name == "edited_value":
            cfg["model"]["n_latent"] = "three"
        else:
            cfg["treatments"] = cfg["treatments"][:1]
        cfg_file.write_text(json.dumps(cfg))
    elif name == "linked_best":  # another run's checkpoint of the same shapes, linked in
        (run / "best.pt").unlink()
        (run / "best.pt").symlink_to(Path(env["run2"]) / "best.pt")
    return str(run)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


# ------------------------------------------------------------------------------------------- catalogue

D = "{data:%s}"  # a data variant
GOOD, RUN, ROOT = "{good}", "{run}", "{root}"

#: (id, argv, exit code, regex the stderr must match). ``{data:NAME}`` is a data variant, ``{dmg:NAME}`` a
#: damaged copy of the trained run, ``{new}`` a fresh output path.
CASES: list[tuple[str, list[str], int, str]] = [
    # --- files and formats
    ("missing file", ["train", "--data", "{root}/nope.h5ad", "--out", "{new}"], 2, r"no such file"),
    ("not h5ad suffix", ["train", "--data", "{root}/notes.csv", "--out", "{new}"], 2, r"is not an \.h5ad"),
    ("truncated h5ad", ["train", "--data", "{root}/truncated.h5ad", "--out", "{new}"], 2, r"truncated, corrupt"),
    ("text named h5ad", ["train", "--data", "{root}/text.h5ad", "--out", "{new}"], 2, r"cannot read .*text"),
    ("directory as data", ["train", "--data", "{root}", "--out", "{new}"], 2, r"is a directory"),
    ("corrupt h5ad in ate", ["ate", RUN, "--data", "{root}/truncated.h5ad", "--out", "{new}"], 2, r"truncated"),
    # --- obs / var / X
    ("missing pert key", ["train", "--data", GOOD, "--out", "{new}", "--perturbation-key", "guide"], 2,
     r"obs has no column 'guide'"),
    ("missing layer", ["train", "--data", GOOD, "--out", "{new}", "--layer", "counts"], 2,
     r"no layer 'counts'"),
    ("normalised counts", ["train", "--data", D % "float_counts", "--out", "{new}"], 2,
     r"non-integer values.*likelihood=normal"),
    ("negative counts", ["train", "--data", D % "negative", "--out", "{new}"], 2, r"negative values"),
    ("NaN values", ["train", "--data", D % "nan_values", "--out", "{new}"], 2, r"NaN or infinite"),
    ("NaN labels", ["train", "--data", D % "nan_labels", "--out", "{new}"], 2, r"missing \(NaN\) label"),
    ("empty label", ["train", "--data", D % "empty_label", "--out", "{new}"], 2, r"empty perturbation label"),
    ("dangling separator", ["train", "--data", D % "dangling_sep", "--out", "{new}"], 2,
     r"empty part around the separator"),
    ("no control cells", ["train", "--data", D % "no_controls", "--out", "{new}"], 2, r"no control cells"),
    ("control label near match", ["train", "--data", D % "Control_label", "--out", "{new}",
                                  "--control-label", "control-nt"], 2, r"did you mean 'Control-NT'"),
    ("only controls", ["train", "--data", D % "only_controls", "--out", "{new}"], 2, r"no perturbed cells"),
    ("duplicated genes", ["train", "--data", D % "dup_genes", "--out", "{new}"], 2, r"duplicated gene names"),
    ("duplicated cells", ["train", "--data", D % "dup_cells", "--out", "{new}", "--set", *TINY], 2,
     r"duplicated cell names.*obs_names_make_unique"),
    ("all-zero matrix", ["train", "--data", D % "all_zero", "--out", "{new}"], 2, r"is all zeros"),
    ("zero genes", ["train", "--data", D % "zero_genes", "--out", "{new}"], 2, r"x 0 genes"),
    ("zero cells", ["train", "--data", D % "zero_cells", "--out", "{new}"], 2, r"0 cells"),
    # --- splits
    ("missing split column", ["train", "--data", GOOD, "--out", "{new}", "--split-key", "fold"], 2,
     r"no split column 'fold'"),
    ("bad split values", ["train", "--data", D % "bad_split", "--out", "{new}", "--split-key", "split"], 2,
     r"unknown split value\(s\) \['holdout'\]"),
    ("empty training split", ["train", "--data", D % "no_train", "--out", "{new}", "--split-key", "split"], 2,
     r"training split is empty"),
    ("heldout with cells mode", ["train", "--data", GOOD, "--out", "{new}", "--heldout", "0.5"], 2,
     r"only applies to split mode 'combinations'"),
    ("heldout fraction > 1", ["train", "--data", GOOD, "--out", "{new}", "--split-mode", "combinations",
                              "--heldout", "2"], 2, r"must be in \(0, 1\]"),
    ("heldout unknown label", ["train", "--data", GOOD, "--out", "{new}", "--split-mode", "combinations",
                               "--heldout", "A+Q"], 2, r"are not combination labels"),
    ("combinations without combos", ["train", "--data", D % "singles_only", "--out", "{new}",
                                     "--split-mode", "combinations"], 2, r"needs combination labels"),
    ("split seed negative", ["train", "--data", GOOD, "--out", "{new}", "--split-seed", "-1"], 2,
     r"a seed must be >= 0"),
    # --- options (--set / --config): typed and ranged
    ("lr not a number", ["train", "--data", GOOD, "--out", "{new}", "--set", "lr=fast"], 2,
     r"option lr must be a number"),
    ("lr nan", ["train", "--data", GOOD, "--out", "{new}", "--set", "lr=nan"], 2, r"option lr must be a finite"),
    ("batch_size negative", ["train", "--data", GOOD, "--out", "{new}", "--set", "batch_size=-5"], 2,
     r"option batch_size must be >= 1"),
    ("batch_size zero", ["train", "--data", GOOD, "--out", "{new}", "--set", "batch_size=0"], 2,
     r"option batch_size must be >= 1"),
    ("n_latent zero", ["train", "--data", GOOD, "--out", "{new}", "--set", "n_latent=0"], 2,
     r"option n_latent must be >= 1"),
    ("n_latent text", ["train", "--data", GOOD, "--out", "{new}", "--set", "n_latent=abc"], 2,
     r"option n_latent must be an integer"),
    ("n_latent fractional", ["train", "--data", GOOD, "--out", "{new}", "--set", "n_latent=2.5"], 2,
     r"option n_latent must be an integer"),
    ("n_particles zero", ["train", "--data", GOOD, "--out", "{new}", "--set", "n_particles=0"], 2,
     r"option n_particles must be >= 1"),
    ("max_epochs zero", ["train", "--data", GOOD, "--out", "{new}", "--set", "max_epochs=0"], 2,
     r"option max_epochs must be >= 1"),
    ("seed text", ["train", "--data", GOOD, "--out", "{new}", "--set", "seed=abc"], 2,
     r"option seed must be an integer"),
    ("seed negative", ["train", "--data", GOOD, "--out", "{new}", "--set", "seed=-3"], 2,
     r"option seed must be >= 0"),
    ("patience zero", ["train", "--data", GOOD, "--out", "{new}", "--set", "patience=0"], 2,
     r"option patience must be >= 1"),
    ("weight_decay negative", ["train", "--data", GOOD, "--out", "{new}", "--set", "weight_decay=-1e-3"], 2,
     r"option weight_decay must be >= 0"),
    ("clip_norm zero", ["train", "--data", GOOD, "--out", "{new}", "--set", "clip_norm=0"], 2,
     r"option clip_norm must be > 0"),
    ("mask_prior above 1", ["train", "--data", GOOD, "--out", "{new}", "--set", "mask_prior=1.5"], 2,
     r"option mask_prior must be < 1"),
    ("mask_lr text", ["train", "--data", GOOD, "--out", "{new}", "--set", "mask_lr=quick"], 2,
     r"option mask_lr must be a number"),
    ("unknown likelihood", ["train", "--data", GOOD, "--out", "{new}", "--set", "likelihood=zinb"], 2,
     r"option likelihood must be one of"),
    ("unknown guide", ["train", "--data", GOOD, "--out", "{new}", "--set", "guide=full"], 2,
     r"option guide must be one of"),
    ("unknown option", ["train", "--data", GOOD, "--out", "{new}", "--set", "n_latnet=3"], 2,
     r"unknown option\(s\) \['n_latnet'\]"),
    ("override without =", ["train", "--data", GOOD, "--out", "{new}", "--set", "lr"], 2,
     r"must look like key=value"),
    ("device not a device", ["train", "--data", GOOD, "--out", "{new}", "--set", "device=banana"], 2,
     r"is not a torch device"),
    ("config file missing", ["train", "--data", GOOD, "--out", "{new}", "--config", "{root}/no.yaml"], 2,
     r"no such options file"),
    ("config broken YAML", ["train", "--data", GOOD, "--out", "{new}", "--config", "{root}/broken.yaml"], 2,
     r"cannot read options file .*line \d+"),
    ("config is a list", ["train", "--data", GOOD, "--out", "{new}", "--config", "{root}/list.yaml"], 2,
     r"must be a mapping"),
    ("config nested", ["train", "--data", GOOD, "--out", "{new}", "--config", "{root}/nested.yaml"], 2,
     r"nested mappings"),
    ("config bad value", ["train", "--data", GOOD, "--out", "{new}", "--config", "{root}/typo.yaml"], 2,
     r"option batch_size must be an integer"),
    # --- outputs: never lose or leak what the user wrote
    ("existing run", ["train", "--data", GOOD, "--out", RUN], 2, r"already holds a run.*--resume.*--overwrite"),
    ("overwrite a user dir", ["train", "--data", GOOD, "--out", "{root}/userdir", "--overwrite"], 2,
     r"not a directory pyrovae wrote.*nothing was deleted"),
    ("overwrite a run with user files", ["train", "--data", GOOD, "--out", "{dmg:foreign_file}",
                                         "--overwrite"], 2, r"holds files pyrovae did not write \(my_analysis"),
    ("out is a file", ["train", "--data", GOOD, "--out", GOOD, "--overwrite"], 2, r"is a file"),
    ("data inside out", ["train", "--data", "{root}/good.h5ad", "--out", "{root}", "--overwrite"], 2,
     r"lies inside .*would delete it|not a directory pyrovae wrote"),
    ("locked run", ["train", "--data", GOOD, "--out", "{locked}", "--overwrite"], 2,
     r"is being written by pid \d+"),
    # --- resume: the stored run decides
    ("resume non-run", ["train", "--data", GOOD, "--out", "{root}/userdir", "--resume"], 2,
     r"is not a pyrovae run"),
    ("resume incomplete run", ["train", "--data", GOOD, "--out", "{dmg:incomplete}", "--resume"], 2,
     r"stopped before its first (epoch|checkpoint)"),
    ("resume and overwrite", ["train", "--data", GOOD, "--out", RUN, "--resume", "--overwrite"], 2,
     r"pass one of them"),
    ("resume other model", ["train", "--data", GOOD, "--out", RUN, "--resume", "--model", "cpa_vae"], 2,
     r"holds a sams_vae run, not cpa_vae"),
    ("resume change model option", ["train", "--data", GOOD, "--out", RUN, "--resume", "--set", "n_latent=5"],
     2, r"cannot change model options \['n_latent'\]"),
    ("resume reordered genes", ["train", "--data", D % "genes_reordered", "--out", RUN, "--resume"], 2,
     r"different order"),
    ("resume other genes", ["train", "--data", D % "genes_changed", "--out", RUN, "--resume"], 2,
     r"gene mismatch"),
    ("resume lacks training cells", ["train", "--data", D % "subset", "--out", "{copy}", "--resume",
                                     "--set", "max_epochs=2"], 2, r"of its \d+ (train|val) cells are missing"),
    ("resume bad lr", ["train", "--data", GOOD, "--out", RUN, "--resume", "--set", "lr=fast"], 2,
     r"option lr must be a number"),
    # --- evaluation commands
    ("iwelbo on non-run", ["iwelbo", "{root}/userdir", "--data", GOOD], 2, r"is not a pyrovae run"),
    ("iwelbo on a missing run", ["iwelbo", "{root}/no_such_run", "--data", GOOD], 2,
     r"run directory .*no_such_run does not exist"),
    ("iwelbo out json", ["iwelbo", RUN, "--data", GOOD, "--out", "{root}/x.json"], 2, r"must end in \.csv"),
    ("iwelbo zero particles", ["iwelbo", RUN, "--data", GOOD, "--particles", "0"], 2, r"must be >= 1"),
    ("iwelbo negative seed", ["iwelbo", RUN, "--data", GOOD, "--seeds", "-1"], 2, r"a seed must be >= 0"),
    ("iwelbo other genes", ["iwelbo", RUN, "--data", D % "genes_changed", "--out", "{new}.csv"], 2,
     r"gene mismatch"),
    ("iwelbo reordered genes", ["iwelbo", RUN, "--data", D % "genes_reordered", "--out", "{new}.csv"], 2,
     r"different order"),
    ("ate zero samples", ["ate", RUN, "--data", GOOD, "--n-samples", "0"], 2, r"argument --n-samples: must be >= 1"),
    ("ate zero top-k", ["ate", RUN, "--data", GOOD, "--top-k", "0"], 2, r"argument --top-k: must be >= 1"),
    ("ate negative library", ["ate", RUN, "--data", GOOD, "--library", "-3"], 2, r"--library must be a finite number > 0"),
    ("ate negative ceiling splits", ["ate", RUN, "--data", GOOD, "--ceiling-splits", "-1"], 2, r"argument --ceiling-splits: must be >= 0"),
    ("ate zero mc seeds", ["ate", RUN, "--data", GOOD, "--mc-seeds", "0"], 2, r"argument --mc-seeds: must be >= 1"),
    ("ate unknown perturbation", ["ate", RUN, "--data", D % "unknown_pert", "--out", "{new}"], 2,
     r"unknown perturbation\(s\) Z"),
    ("ate truncated checkpoint", ["ate", "{dmg:truncated_ckpt}", "--data", GOOD, "--out", "{new}"], 2,
     r"checkpoint .*best\.pt is corrupt, truncated"),
    ("ate garbage checkpoint", ["ate", "{dmg:garbage_ckpt}", "--data", GOOD, "--out", "{new}"], 2,
     r"corrupt, truncated or not a pyrovae checkpoint"),
    ("ate pickled checkpoint", ["ate", "{dmg:pickled_ckpt}", "--data", GOOD, "--out", "{new}"], 2,
     r"refuses to unpickle"),
    ("ate tampered shapes", ["ate", "{dmg:shape_ckpt}", "--data", GOOD, "--out", "{new}"], 2,
     r"does not fit the run's model"),
    ("corrupt config.json", ["ate", "{dmg:corrupt_config}", "--data", GOOD, "--out", "{new}"], 2,
     r"config\.json .* is corrupt or truncated"),
    ("ate overwrite a user dir", ["ate", RUN, "--data", GOOD, "--n-samples", "8", "--out", "{root}/userdir",
                                  "--overwrite"], 2, r"not a directory pyrovae wrote.*nothing was deleted"),
    ("sample out not h5ad", ["sample", RUN, "--perturbation", "A", "--out", "{root}/s.csv"], 2,
     r"must end in \.h5ad"),
    ("sample library data without data", ["sample", RUN, "--perturbation", "A", "--out", "{new}.h5ad",
                                          "--library", "data"], 2, r"needs --data"),
    ("sample zero cells", ["sample", RUN, "--perturbation", "A", "--out", "{new}.h5ad", "--n-cells", "0"], 2,
     r"must be >= 1"),
    ("sample unknown perturbation", ["sample", RUN, "--perturbation", "Q", "--out", "{new}.h5ad"], 2,
     r"unknown perturbation\(s\) Q"),
    ("sample onto its input", ["sample", RUN, "--perturbation", "A", "--out", GOOD, "--data", GOOD,
                               "--overwrite"], 2, r"is the input --data"),
    ("simulate out not h5ad", ["simulate", "--preset", "tiny", "--out", "{root}/sim.csv"], 2, r"must end in \.h5ad"),
    ("simulate existing", ["simulate", "--preset", "tiny", "--out", GOOD], 2, r"exists; pass --overwrite"),
    ("simulate negative seed", ["simulate", "--seed", "-1", "--out", "{new}.h5ad"], 2, r"a seed must be >= 0"),
    ("demo overwrite a user dir", ["demo", "--out", "{root}/userdir", "--overwrite", "--preset", "tiny"], 2,
     r"not a directory pyrovae wrote"),
    ("demo zero epochs", ["demo", "--out", "{new}", "--epochs", "0"], 2, r"must be >= 1"),
    ("grn of a non-GPO run", ["grn", RUN, "--out", "{new}.csv"], 2, r"GPO|gpo"),
    ("grn min-prob out of range", ["grn", RUN, "--out", "{new}.csv", "--min-prob", "2"], 2, r"must be in \[0, 1\]"),
    # --- accepted, with a warning line
    ("warn: zero-library cells", ["train", "--data", D % "zero_library", "--out", "{new}", "--set", *TINY], 0,
     r"warning: 3 cells have no counts at all"),
    ("warn: no controls in train", ["train", "--data", D % "controls_test_only", "--out", "{new}",
                                    "--split-key", "split", "--set", *TINY], 0,
     r"warning: no control cells .* in the training split"),
    ("warn: no validation split", ["train", "--data", D % "no_val", "--out", "{new}", "--split-key", "split",
                                   "--set", *TINY], 0, r"warning: no validation cells"),
    ("warn: perturbation only in test", ["train", "--data", D % "test_only_pert", "--out", "{new}",
                                         "--split-key", "split", "--set", *TINY], 0,
     r"warning: 1 perturbation\(s\) have no training cell \(B\)"),
    ("warn: '+' labels, other separator", ["train", "--data", D % "plus_labels", "--out", "{new}",
                                           "--combo-sep", ";", "--set", *TINY], 0,
     r"warning: labels contain '\+' but the combination separator is ';'"),
    ("warn: A+A", ["train", "--data", D % "repeat_label", "--out", "{new}", "--set", *TINY], 0,
     r"warning: label\(s\) \['A\+A'\] name the same perturbation more than once"),
    ("warn: a handful of cells", ["train", "--data", D % "few_cells", "--out", "{new}", "--set", *TINY], 0,
     r"warning: only \d+ training cells"),
    ("warn: replacing an incomplete run", ["train", "--data", GOOD, "--out", "{dmg:incomplete}", "--set", *TINY],
     0, r"warning: replacing the incomplete run"),
    ("warn: evaluation data lacks run cells", ["iwelbo", RUN, "--data", D % "subset", "--particles", "2",
                                               "--seeds", "0", "--out", "{new}.csv"], 0,
     r"warning: the data lacks \d+ of the run's \d+ test cells"),
    ("warn: cells the run never saw", ["iwelbo", RUN, "--data", D % "extra_cells", "--particles", "2",
                                       "--seeds", "0", "--out", "{new}.csv"], 0,
     r"warning: 12 of the data's \d+ cells are not in the run's split"),
    # --- round two (issue 27): outputs pyrovae does not own, run identity, resume semantics
    ("train into a folder that looks like a run", ["train", "--data", GOOD, "--out", "{root}/lookalike",
                                                   "--set", *TINY], 2, r"lookalike already holds files"),
    ("train onto a run whose last.pt was deleted", ["train", "--data", GOOD, "--out", "{dmg:no_last}",
                                                    "--set", *TINY], 2, r"whose last\.pt is missing"),
    ("resume a run whose last.pt was deleted", ["train", "--data", GOOD, "--out", "{dmg:no_last}", "--resume"],
     2, r"has no last\.pt \(deleted or moved by hand"),
    ("overwrite keeps temp-lookalike user files", ["train", "--data", GOOD, "--out", "{dmg:tmp_lookalike}",
                                                   "--overwrite", "--set", *TINY], 2,
     r"holds files pyrovae did not write \(\.backup\.old-2020, \.notes\.tmp\.txt\)"),
    ("iwelbo onto an existing CSV", ["iwelbo", RUN, "--data", GOOD, "--out", "{root}/existing.csv"], 2,
     r"existing\.csv already exist\(s\); pass --overwrite"),
    ("iwelbo onto the run's split.csv", ["iwelbo", RUN, "--data", GOOD, "--out", RUN + "/split.csv",
                                         "--overwrite"], 2, r"split\.csv is a file of the pyrovae run"),
    ("iwelbo onto the run's metrics.csv", ["iwelbo", RUN, "--data", GOOD, "--out", RUN + "/metrics.csv",
                                           "--overwrite"], 2, r"metrics\.csv is a file of the pyrovae run"),
    ("grn onto the run's config.json", ["grn", RUN, "--out", RUN + "/config.json", "--overwrite"], 2,
     r"config\.json is a file of the pyrovae run"),
    ("sample onto the run's adata.h5ad", ["sample", RUN, "--perturbation", "A", "--out", RUN + "/adata.h5ad",
                                       "--overwrite"], 2, r"adata\.h5ad is a file of the pyrovae run"),
    ("warn: split key marks trained cells as test", ["iwelbo", RUN, "--data", D % "fold", "--split-key",
                                                     "fold", "--particles", "2", "--seeds", "0",
                                                     "--out", "{new}.csv"], 0,
     r"warning: \d+ of the 80 test cells chosen by the split column 'fold' are cells the run has seen "
     r"\(\d+ it trained on"),
    ("warn: ate on trained cells via split key", ["ate", RUN, "--data", D % "fold", "--split-key", "fold",
                                                  "--n-samples", "8", "--out", "{new}"], 0,
     r"warning: \d+ of the 80 test cells .* are cells the run has seen"),
    ("resume with another seed", ["train", "--data", GOOD, "--out", RUN, "--resume", "--set", "seed=4"], 2,
     r"cannot change seed when resuming"),
    ("resume with another split key", ["train", "--data", D % "fold", "--out", RUN, "--resume",
                                       "--split-key", "fold"], 2,
     r"cannot resume .* with other data options: split_key='fold' \(the run's: None\)"),
    ("resume on relabelled cells", ["train", "--data", D % "relabelled", "--out", RUN, "--resume"], 2,
     r"cannot resume .* not the data it was trained on: .* 8 have another label"),
    ("resume on doubled counts", ["train", "--data", D % "doubled", "--out", RUN, "--resume"], 2,
     r"cannot resume .* 240 have other counts \(e\.g\. c0: library size"),
    ("warn: evaluation data with other counts", ["iwelbo", RUN, "--data", D % "doubled", "--particles", "2",
                                                 "--seeds", "0", "--out", "{new}.csv"], 0,
     r"warning: the data is not the run's training data: .*240 have other counts"),
    ("best.pt linked from another run", ["iwelbo", "{dmg:linked_best}", "--data", GOOD, "--out", "{new}.csv"],
     2, r"best\.pt, a link to .*run2/best\.pt belongs to another run"),
    ("cradle_vae n_qc mismatch", ["train", "--data", GOOD, "--out", "{new}", "--model", "cradle_vae", "--set",
                                  *TINY, "n_qc=2"], 2, r"option n_qc=2 does not match the data's 1 QC column"),
    ("h5ad of a newer anndata", ["iwelbo", RUN, "--data", D % "newer_anndata", "--out", "{new}.csv"], 2,
     r"cannot decode .*written by a newer anndata; upgrade anndata"),
    # --- round two: weak answers made clear
    ("config leading zero", ["train", "--data", GOOD, "--out", "{new}", "--config", "{root}/leading_zero.yaml"],
     2, r"option n_latent=010 has a leading zero"),
    ("config sexagesimal", ["train", "--data", GOOD, "--out", "{new}", "--config", "{root}/sexagesimal.yaml"],
     2, r"option max_epochs must be an integer .*'1:30'"),
    ("config duplicate key", ["train", "--data", GOOD, "--out", "{new}", "--config", "{root}/duplicate.yaml"],
     2, r"cannot read options file .*line 3.*option 'lr' is given twice"),
    ("lr hexadecimal", ["train", "--data", GOOD, "--out", "{new}", "--set", "lr=0x10"], 2,
     r"option lr must be a number .*got '0x10'"),
    ("lr zero", ["train", "--data", GOOD, "--out", "{new}", "--set", "lr=0"], 2, r"lr=0 never moves the parameters"),
    ("lr underflows", ["train", "--data", GOOD, "--out", "{new}", "--set", "lr=1e-400"], 2,
     r"option lr=1e-400 underflows to 0"),
    ("n_latent huge", ["train", "--data", GOOD, "--out", "{new}", "--set", "n_latent=1000000000000"], 2,
     r"option n_latent must be <= 65536"),
    ("seed 2**64", ["train", "--data", GOOD, "--out", "{new}", "--set", "seed=18446744073709551616"], 2,
     r"option seed must be <= 4294967295"),
    ("split seed 2**64", ["train", "--data", GOOD, "--out", "{new}", "--split-seed", "18446744073709551616"], 2,
     r"a seed must be <= 4294967295"),
    ("grn_target unknown", ["train", "--data", GOOD, "--out", "{new}", "--set", "grn_target=bogus"], 2,
     r"option grn_target must be one of \['cell', 'group'\]"),
    ("warn: grn_threshold above every target", ["train", "--data", D % "sim", "--out", "{new}", "--model",
                                                "gpo_vae", "--set", *TINY, "grn_threshold=50"], 0,
     r"warning: grn_threshold=50 is at or above every GRN alignment target"),
    ("grn min-prob nan", ["grn", RUN, "--out", "{new}.csv", "--min-prob", "nan"], 2,
     r"--min-prob is a probability and must be in \[0, 1\], got nan"),
    ("grn edge-threshold 5", ["grn", RUN, "--out", "{new}.csv", "--edge-threshold", "5"], 2,
     r"--edge-threshold is a probability and must be in \[0, 1\], got 5"),
    ("ate library inf", ["ate", RUN, "--data", GOOD, "--library", "inf"], 2, r"--library must be a finite number"),
    ("family of another model", ["train", "--data", GOOD, "--out", "{new}", "--model", "sams_vae", "--set",
                                 "family=cpa"], 2, r"sams_vae is family='sams': it cannot be changed.*cpa_vae"),
    ("empty combination separator", ["train", "--data", GOOD, "--out", "{new}", "--combo-sep", ""], 2,
     r"separator of combination labels cannot be empty"),
    ("warn: labels differing in case", ["train", "--data", D % "near_duplicate", "--out", "{new}", "--set",
                                        *TINY], 0,
     r"warning: 1 perturbation name\(s\) differ only in case or Unicode form \('PG01' / 'pg01'\)"),
    ("warn: labels in NFC and NFD", ["train", "--data", D % "nfc_nfd", "--out", "{new}", "--set", *TINY], 0,
     r"warning: 1 perturbation name\(s\) differ only in case or Unicode form \('Cafe\\u0301' / 'Caf\\xe9'\)"),
    ("warn: labels 'nan' from astype(str)", ["train", "--data", D % "nan_text", "--out", "{new}", "--set",
                                             *TINY], 0, r"warning: 5 cells are labelled 'nan': a missing value"),
    ("warn: labels 'None' from astype(str)", ["train", "--data", D % "none_text", "--out", "{new}", "--set",
                                              *TINY], 0, r"warning: 5 cells are labelled 'None': a missing value"),
    ("edited config.json", ["iwelbo", "{dmg:edited_config}", "--data", GOOD, "--out", "{new}.csv"], 2,
     r"config\.json 'model' is not a mapping \(edited by hand\?\)"),
    ("edited config value", ["iwelbo", "{dmg:edited_value}", "--data", GOOD, "--out", "{new}.csv"], 2,
     r"config\.json / schema\.json do not describe a model .*option n_latent must be an integer"),
    ("edited schema.json", ["iwelbo", "{dmg:edited_schema}", "--data", GOOD, "--out", "{new}.csv"], 2,
     r"schema\.json 'train_treatment_counts' has 2 entries for 1 treatments"),
    ("iwelbo repeated seeds", ["iwelbo", RUN, "--data", GOOD, "--seeds", "0", "0"], 2,
     r"--seeds 0 0 repeats a seed"),
]  # fmt: skip


def _fill(arg: str, env, counter: list[int]) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key.startswith("data:"):
            return _variant(key[5:], env["root"])
        if key.startswith("dmg:"):
            return _damage(env, key[4:])
        if key == "new":
            counter[0] += 1
            return str(env["root"] / f"out{counter[0]:03d}")
        if key == "copy":
            return _run_copy(env, "copy")
        return str(env[key])

    return re.sub(r"\{([a-z0-9]+(?::[A-Za-z_]+)?)\}", sub, arg)


_COUNTER = [0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_catalogue(case, env, capsys):
    name, argv, code, pattern = case
    argv = [_fill(a, env, _COUNTER) for a in argv]
    holder = None
    if "{locked}" in case[1]:  # another process holds the run's lock
        holder = dir_lock(env["locked"])
        holder.__enter__()
    try:
        try:
            rc = main(argv)
        except SystemExit as err:  # argparse's own errors (usage + one error line)
            rc = err.code
    finally:
        if holder is not None:
            holder.__exit__(None, None, None)
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    assert rc == code, (name, rc, out.err[-800:])
    assert re.search(pattern, out.err, re.S), (name, out.err[-800:])
    if code == 2:
        errors = [ln for ln in out.err.splitlines() if "error:" in ln]
        assert len(errors) == 1, errors


def test_catalogue_size_and_classes():
    assert len(CASES) >= 150
    warned = [c for c in CASES if c[2] == 0]
    assert warned and all("warning:" in c[3] for c in warned)


def test_failed_runs_leave_nothing_and_user_files_survive(env):
    """None of the refusals above deleted the user's directory or left half-made runs behind."""
    assert (env["root"] / "userdir" / "my_notes.txt").read_text() == "precious"
    assert (env["root"] / "lookalike" / "analysis.txt").read_text() == "precious"
    assert (env["root"] / "lookalike" / "config.json").read_text() == "{}"
    assert (env["root"] / "existing.csv").read_text() == "cell,score\nmine,1\n"
    assert not (Path(env["run"]) / "split_summary.json").exists()
    assert Path(env["good"]).exists()
    for p in env["root"].glob("out*"):
        if p.is_dir():  # outputs of accepted cases are complete runs; refused ones left no directory
            assert (p / "config.json").exists() or (p / "ate_summary.json").exists(), p
    json.loads((Path(env["run"]) / "config.json").read_text())
    pd.read_csv(Path(env["run"]) / "split.csv")


# ------------------------------------------------------------------------------- the Python API's answers

#: (id, call on a trained model (or the class), regex of the one-line error). The API raises (no CLI).
API_CASES = [
    ("get_ate n_samples=0", lambda m, tmp: m.get_ate(["A"], n_samples=0), ValueError,
     r"n_samples must be >= 1, got 0"),
    ("to_arviz n_draws=0", lambda m, tmp: m.to_arviz(n_draws=0), ValueError, r"option n_draws must be >= 1, got 0"),
    ("save onto a file", lambda m, tmp: m.save(tmp / "notes.txt"), FileExistsError,
     r"notes\.txt is a file; save\(\) writes a directory there"),
    ("setup_anndata heldout=2", lambda m, tmp: m.setup_anndata(make_adata(), split_mode="combinations",
                                                               heldout=2), ValueError,
     r"heldout=2: a fraction of the combinations must be in \(0, 1\]"),
    ("setup_anndata heldout without combinations", lambda m, tmp: m.setup_anndata(make_adata(), heldout=0.5),
     ValueError, r"heldout=0\.5 only applies to split_mode='combinations'"),
]  # fmt: skip


@pytest.fixture(scope="module")
def api_model():
    import pyrovae

    adata = make_adata()
    pyrovae.Model.setup_anndata(adata)
    model = pyrovae.Model(adata, model="sams_vae", n_latent=3, decoder_hidden=8, encoder_hidden=8)
    model.train(max_epochs=1, batch_size=128, n_particles=1, val_particles=1, progress=False)
    return model


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_arguments(case, api_model, tmp_path):
    _, call, error, pattern = case
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(error, match=pattern) as info:
        call(api_model, tmp_path)
    assert "\n" not in str(info.value)
    assert (tmp_path / "notes.txt").read_text() == "mine"
