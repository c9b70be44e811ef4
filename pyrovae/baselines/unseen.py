"""Model-free predictions for perturbations with no training cell: the zero effect, the mean seen effect,
and the gene's own knock-down pushed through a GRN (``|DE|`` or deconvolved)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pyrovae.baselines.grn import deconvolved_grn
from pyrovae.evaluate.empirical import empirical_ate

__all__ = ["propagate_knockdown", "unseen_perturbation_baselines"]


def propagate_knockdown(direct: np.ndarray, knock: np.ndarray, hops: int = 3) -> np.ndarray:
    """Shift of every gene when the genes of ``knock`` are shifted and it propagates along ``direct``.

    s = knock (I - B)^{-1} with B = ``direct`` (row = regulator) when its spectral radius is below 1 (a
    DAG's B is nilpotent, so this is exact), else the truncated series knock sum_{h=0}^{hops} B^h (an
    estimated B with cycles may not converge).

    Args:
        direct: (n, n) direct effects B.
        knock: (n,) or (A, n) initial shifts (e.g. the knock-down on the perturbed gene).
    """
    b = np.asarray(direct, dtype=np.float64)
    k = np.asarray(knock, dtype=np.float64)
    n = b.shape[0]
    if b.shape != (n, n) or k.shape[-1] != n:
        raise ValueError(f"direct must be (n, n) and knock (..., n); got {b.shape} and {k.shape}")
    if n and np.max(np.abs(np.linalg.eigvals(b))) < 1 - 1e-9:
        return np.linalg.solve((np.eye(n) - b).T, k.T).T
    out, term = k.copy(), k.copy()
    for _ in range(hops):
        term = term @ b
        out = out + term
    return out


def _cut_inputs(direct: np.ndarray, j: int | None) -> np.ndarray:
    """B without the edges into gene j: an intervention fixes j's shift (an estimated B may have cycles)."""
    if j is None:
        return direct
    out = direct.copy()
    out[:, j] = 0.0
    return out


def unseen_perturbation_baselines(
    data,
    perturbations: Sequence[str],
    unseen: Sequence[str],
    nodes: Sequence[str] | None = None,
    transform: str = "perturbseq",
    split: str = "train",
    ridge: float = 1e-2,
) -> dict[str, pd.DataFrame]:
    """Predicted ATEs of perturbation labels some of whose treatments have no training cell.

    Each label is the sum of its components' effects (additive in the ATE scale): a *seen* component
    contributes its empirical ATE on the ``split`` cells; an *unseen* gene j contributes, per baseline,

    - ``zero_effect``: nothing (the control's state: what a model that ignores j predicts);
    - ``seen_mean``: the mean ATE of all seen single perturbations;
    - ``grn_de``: the knock-down of j itself (the mean self-ATE of the seen perturbed genes, on gene j)
      pushed through the signed DE GRN (seen genes' ATE rows, per unit of their own knock-down). j has no
      row in a DE GRN (no cell perturbs it), so the push stops at j: only gene j moves;
    - ``grn_deconvolved``: the same knock-down pushed (:func:`propagate_knockdown`) through the direct
      effects B of :func:`deconvolved_grn`, fitted on the seen perturbations' ATEs (targets: every gene;
      regulators: the GRN ``nodes``), so j's outgoing edges are estimated from how its shift co-varies with
      the other genes' across the seen interventions; the edges into j are cut (the intervention fixes j).

    Args:
        data: :class:`~pyrovae.data.perturbation_data.PerturbationData` (read with the run's schema).
        perturbations: target labels (rows of the outputs).
        unseen: treatment names without training cells.
        nodes: GRN genes allowed as regulators (default: the data's treatments that are genes).
        transform: ``"perturbseq"`` or ``"mean"`` (as the ATE being predicted).

    Returns:
        {name: DataFrame (len(perturbations), G)} indexed by label; a NaN row where a seen component has
        no ``split`` cell of its own.
    """
    idx = data.indices(split)
    labels = np.asarray(data.labels)[idx].astype(str)
    genes = [str(g) for g in data.genes]
    gpos = {g: i for i, g in enumerate(genes)}
    unseen_set = {str(u) for u in unseen}
    singles = sorted(
        {lab for lab in labels.tolist() if lab != data.control_label and data.sep not in lab} - unseen_set
    )
    seen_ate = empirical_ate(
        data.rows(idx), labels, data.control_label, groups=singles, genes=genes, transform=transform
    )
    ate = seen_ate.to_numpy(dtype=np.float64)
    gene_singles = [i for i, t in enumerate(singles) if t in gpos]
    iv = np.asarray([gpos[singles[i]] for i in gene_singles], dtype=np.int64)
    self_shift = float(np.mean(ate[gene_singles, iv])) if len(iv) else 0.0
    nodes = [t for t in data.treatments if str(t) in gpos] if nodes is None else [str(n) for n in nodes]
    regulators = np.zeros(len(genes), dtype=bool)
    regulators[[gpos[n] for n in nodes if n in gpos]] = True
    direct = deconvolved_grn(ate[gene_singles], iv, ridge=ridge, regulators=regulators)
    G = len(genes)

    def knock(j: str) -> np.ndarray:
        v = np.zeros(G)
        if j in gpos:
            v[gpos[j]] = self_shift
        return v

    unseen_rows = {
        "zero_effect": lambda j: np.zeros(G),
        "seen_mean": lambda j: ate.mean(0) if len(ate) else np.zeros(G),
        "grn_de": knock,
        "grn_deconvolved": lambda j: propagate_knockdown(_cut_inputs(direct, gpos.get(j)), knock(j)),
    }
    seen_pos = {t: i for i, t in enumerate(singles)}
    out = {}
    for name, fn in unseen_rows.items():
        rows = []
        for lab in perturbations:
            row = np.zeros(G)
            for comp in [] if str(lab) == data.control_label else str(lab).split(data.sep):
                if comp in unseen_set:
                    row = row + fn(comp)
                elif comp in seen_pos:
                    row = row + ate[seen_pos[comp]]
                else:
                    row = row + np.nan
            rows.append(row)
        out[name] = pd.DataFrame(
            np.asarray(rows).reshape(len(perturbations), G),
            index=pd.Index([str(p) for p in perturbations], name="perturbation"),
            columns=genes,
        )
    return out
