"""Model-free baselines of perturbation effects, fitted on training cells only.

- :func:`linear_baseline_ates` (:mod:`pyrovae.baselines.linear`): the PCA + ridge linear model of
  Ahlmann-Eltze, Huber and Anders (Nature Methods 2025), which also predicts unseen single perturbations;
- :func:`no_change_ates`, :func:`matching_mean_ates` (:mod:`pyrovae.baselines.simple`): the zero effect and
  systema's matching mean for combinations;
- :func:`baseline_ates` (:mod:`pyrovae.baselines.ate`): ``train_mean``, ``additive``,
  ``global_mean``;
- :func:`all_baseline_ates`: all of them at once, as :func:`pyrovae.evaluate.score.ate_report` scores them;
- :mod:`pyrovae.baselines.grn`: GRN edge scores from the data (``|correlation|``, ``|DE|``, deconvolved DE);
- :mod:`pyrovae.baselines.unseen`: perturbations with no training cell (zero effect, mean seen effect, the
  gene's own knock-down through a GRN).
"""

from pyrovae.baselines.ate import baseline_ates, baseline_ates_from_counts
from pyrovae.baselines.grn import correlation_grn, de_grn, deconvolved_de_grn, deconvolved_grn
from pyrovae.baselines.linear import linear_baseline_ates, linear_effects, two_sided_ridge
from pyrovae.baselines.simple import all_baseline_ates, matching_mean_ates, no_change_ates
from pyrovae.baselines.unseen import propagate_knockdown, unseen_perturbation_baselines

__all__ = [
    "all_baseline_ates",
    "correlation_grn",
    "de_grn",
    "deconvolved_de_grn",
    "deconvolved_grn",
    "propagate_knockdown",
    "unseen_perturbation_baselines",
    "baseline_ates",
    "baseline_ates_from_counts",
    "linear_baseline_ates",
    "linear_effects",
    "matching_mean_ates",
    "no_change_ates",
    "two_sided_ridge",
]
