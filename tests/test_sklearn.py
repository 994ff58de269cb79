"""DensityEstimator as a scikit-learn citizen: scikit-learn's own estimator checks, clone, Pipeline, GridSearchCV,
cross_val_score and check_is_fitted (issue 13.3). scikit-learn is an optional dependency: skipped without it."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import pyro_flows as pf
from pyro_flows.estimator import NotFittedError

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError as SklearnNotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402
from sklearn.utils.validation import check_is_fitted  # noqa: E402

TINY = dict(transforms=1, hidden=(8,), max_epochs=2)
EXPECTED_FAILURES = {
    # it passes each name of __init__'s signature as a keyword, the name of **flow_kwargs included; the
    # constructor refuses an option the flow's factory does not take (a typo) at once rather than at fit
    "check_do_not_raise_errors_in_init_or_set_params": "the constructor refuses an unknown factory option at once",
}


def bimodal(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.where(rng.random((rows, 1)) < 0.5, -2.0, 2.0)
    return centres + 0.3 * rng.standard_normal((rows, 2))


def test_scikit_learns_estimator_checks_pass():
    # float64: in float32 a row's log-density can change in its last bit with the batch's size (BLAS picks other
    # kernels), and check_methods_subset_invariance asks for 1e-7
    results = check_estimator(
        pf.DensityEstimator("maf", dtype="float64", **TINY), expected_failed_checks=EXPECTED_FAILURES, on_fail=None
    )
    failed = {r["check_name"]: str(r["exception"])[:200] for r in results if r["status"] == "failed"}
    assert not failed
    assert {r["check_name"] for r in results if r["status"] == "xfail"} <= set(EXPECTED_FAILURES)
    assert sum(r["status"] == "passed" for r in results) >= 35


def test_clone_and_set_params_carry_the_factorys_options():
    est = pf.DensityEstimator("nsf", transforms=2, bins=4, bound=3.0)
    copy = clone(est)
    assert copy.get_params() == est.get_params() and copy.get_params()["bins"] == 4
    assert repr(copy) == "DensityEstimator(transforms=2, bins=4, bound=3.0)"
    copy.set_params(bins=6, max_epochs=1).fit(bimodal(64), progress=False)
    splines = [m.transform_map for m in copy.flow_.modules() if hasattr(m, "transform_map")]
    assert len(splines) == 2 and all(spline.bins == 6 for spline in splines)
    assert est.get_params()["bins"] == 4  # the original is untouched
    with pytest.raises(TypeError, match="takes no keyword argument 'binz'"):
        copy.set_params(binz=3)


def test_not_fitted_is_scikit_learns_not_fitted():
    est = pf.DensityEstimator(**TINY)
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(est)
    with pytest.raises(NotFittedError) as error:
        est.score_samples(np.zeros((2, 2)))
    assert isinstance(error.value, (ValueError, AttributeError))  # what scikit-learn code catches
    check_is_fitted(est.fit(bimodal(40), progress=False))


def test_pipeline_scores_after_its_transformers():
    X = bimodal(200) * [1.0, 50.0] + [0.0, 1000.0]
    pipe = make_pipeline(StandardScaler(), pf.DensityEstimator("realnvp", **TINY)).fit(X)  # y=None positional
    est, scaler = pipe[-1], pipe[0]
    np.testing.assert_allclose(pipe.score_samples(X[:7]), est.score_samples(scaler.transform(X[:7])))
    assert pipe.score(X) == pytest.approx(est.score(scaler.transform(X)))


def test_cross_val_score_is_the_held_out_log_likelihood_of_each_fold():
    X, est = bimodal(150), pf.DensityEstimator("maf", **TINY)
    scores = cross_val_score(est, X, cv=KFold(3))
    by_hand = [clone(est).fit(X[train]).score(X[test]) for train, test in KFold(3).split(X)]
    np.testing.assert_allclose(scores, by_hand, rtol=1e-6)


def test_grid_search_picks_the_better_training_budget_by_held_out_likelihood():
    X = bimodal(300)
    search = GridSearchCV(
        pf.DensityEstimator("nsf", transforms=2, hidden=(16,), validation_fraction=0.0), {"max_epochs": [1, 40]}, cv=3
    ).fit(X)
    means = search.cv_results_["mean_test_score"]
    assert np.isfinite(means).all() and means[1] > means[0] + 0.3
    assert search.best_params_ == {"max_epochs": 40} and search.best_estimator_.get_params()["max_epochs"] == 40


def test_fit_params_pass_through_a_pipeline():
    X = bimodal(100)
    pipe = make_pipeline(StandardScaler(), pf.DensityEstimator("maf", **TINY))
    pipe.fit(X, densityestimator__max_epochs=3, densityestimator__progress=False)
    assert len(pipe[-1].history_.train_loss) == 3


def test_a_table_too_small_for_the_validation_split_says_how_many_rows_it_needs():
    with pytest.raises(ValueError, match=re.escape("validation_fraction=0.1 of 4 rows holds out 0 rows; a validation")):
        pf.DensityEstimator(**TINY).fit(np.random.default_rng(0).normal(size=(4, 2)), validation_fraction=0.1)
    with pytest.raises(ValueError, match=re.escape("needs at least 6 rows at this fraction")):
        pf.DensityEstimator(**TINY).fit(torch.randn(4, 2), validation_fraction=0.1)
