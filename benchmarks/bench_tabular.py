"""Tabular benchmark: held-out log-likelihood and one-class anomaly AUC of ``DensityEstimator()`` on small tables.

Every real table that ships with scikit-learn plus two toys, each split once (permutation seed 0) into 75%
training and 25% test rows, standardised with the training rows' column means and standard deviations (so
every method sees the same numbers and every log-likelihood is in standardised units, nats per row):

* ``iris`` (150 x 4), ``wine`` (178 x 13), ``breast_cancer`` (569 x 30), ``diabetes`` (442 x 10);
* ``digits`` (1797 x 64), dequantised once as ``(x + u) / 17`` (``u ~ U[0, 1)``, seed 0): continuous;
* ``moons``: 1000 rows of two moons (noise 0.1); ``mixture``: 1000 rows of a 4-D mixture of three Gaussians
  with random covariances and weights (seed 0).

Methods, each fitted on the training rows only:

* ``gaussian``: one full-covariance Gaussian (maximum likelihood);
* ``gmm``: scikit-learn's ``GaussianMixture`` (full covariances), the number of components 1..10 chosen by BIC;
* ``kde``: scikit-learn's Gaussian ``KernelDensity``, the bandwidth chosen by 5-fold cross-validated
  likelihood over 24 values from 0.05 to 3;
* ``zuko``: ``zuko.flows.NSF`` with its defaults (3 layers, hidden (64, 64)) trained by Adam (lr 1e-3, batch
  size and gradient clipping as ours) for the same number of optimizer steps as our default estimator took
  on that table and seed: the same budget, no validation split;
* ``nsf`` (the headline, ``DensityEstimator()``), ``maf``, ``realnvp``, ``nice``: ``DensityEstimator(flow)``
  with the defaults it chooses from the data (:func:`pyro_flows.tabular_defaults.tabular_defaults`).

Seeds 0..``--seeds``-1 are the estimators' seeds (initialisation, validation split, shuffling; GMM's
initialisation); the split is the same for every seed. The table shows mean +- standard deviation over seeds.

Anomaly detection: for each labelled table, one class is "normal" (breast cancer: benign; wine: class 1; iris:
versicolor; digits: 0). The methods are fitted on 75% of the normal rows; the held-out normal rows and all rows of
the other classes are scored with ``score_samples`` and the ROC AUC of "normal" against "other" is reported
(higher is better), against scikit-learn's ``IsolationForest`` (200 trees), the BIC Gaussian mixture and the
cross-validated KDE.

Usage::

    python benchmarks/bench_tabular.py                  # 5 seeds, every table and method
    python benchmarks/bench_tabular.py --seeds 1 --tables iris wine --methods gaussian nsf
    python benchmarks/bench_tabular.py --quick          # seconds: a smoke run (tests/test_bench_tabular.py)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
density = importlib.import_module("bench_density")  # shared helpers: peer availability, seeded batches
from harness import Timing, machine_line, markdown_table, set_threads  # noqa: E402

TABLES = ("iris", "wine", "breast_cancer", "diabetes", "digits", "moons", "mixture")
CLASSICAL = ("gaussian", "gmm", "kde")
PRESETS = ("nsf", "maf", "realnvp", "nice")
METHODS = (*CLASSICAL, "zuko", *PRESETS)
HEADLINE = "nsf"  # DensityEstimator()'s flow
NORMAL_CLASS = {"breast_cancer": 1, "wine": 1, "iris": 1, "digits": 0}
AUC_METHODS = ("iforest", "gmm", "kde", HEADLINE)
TEST_FRACTION = 0.25
QUICK_TABLES = ("iris", "moons")


# -- data -------------------------------------------------------------------------------------------


def load_table(name: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """All rows ``(N, D)`` (float64) of table ``name`` and its class labels (None for an unlabelled table)."""
    from sklearn import datasets

    generator = torch.Generator().manual_seed(0)
    if name == "digits":
        from pyro_flows.data import digits

        x, y = digits(dequantize=True, generator=generator)
        return x.double().numpy(), y.numpy()
    if name == "moons":
        from pyro_flows.data import two_moons

        return two_moons(1000, noise=0.1, generator=generator).double().numpy(), None
    if name == "mixture":
        return _mixture(1000, np.random.default_rng(0)), None
    loaders = {
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "diabetes": datasets.load_diabetes,
    }
    if name not in loaders:
        raise ValueError(f"unknown table {name!r}; choose from {TABLES}")
    x, y = loaders[name](return_X_y=True)
    return x.astype(np.float64), (None if name == "diabetes" else y)


def _mixture(rows: int, rng: np.random.Generator, features: int = 4, components: int = 3) -> np.ndarray:
    """A mixture of ``components`` Gaussians in ``features`` dimensions with random means, covariances, weights."""
    weights = rng.dirichlet(np.full(components, 2.0))
    means = rng.normal(0.0, 3.0, size=(components, features))
    factors = rng.normal(0.0, 1.0, size=(components, features, features)) / math.sqrt(features)
    labels = rng.choice(components, size=rows, p=weights)
    noise = rng.normal(size=(rows, features))
    return means[labels] + np.einsum("nij,nj->ni", factors[labels], noise) + 0.1 * noise


def split(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training and test row indices: one permutation (``seed``), the last ``TEST_FRACTION`` of it for testing."""
    order = np.random.default_rng(seed).permutation(rows)
    cut = rows - round(TEST_FRACTION * rows)
    return order[:cut], order[cut:]


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """``train`` and ``others`` minus the training column means, over the training standard deviations."""
    mean, std = train.mean(0), train.std(0, ddof=1)
    std = np.where(std > 0, std, 1.0)
    return [(x - mean) / std for x in (train, *others)]


# -- methods: each fits on standardised training rows and returns a function that scores rows ------------

Scorer = Callable[[np.ndarray], np.ndarray]


def fit_gaussian(train: np.ndarray, seed: int) -> Scorer:
    from scipy.stats import multivariate_normal

    gaussian = multivariate_normal(train.mean(0), np.cov(train.T, bias=True), allow_singular=True)
    return lambda x: np.atleast_1d(gaussian.logpdf(x))


def fit_gmm(train: np.ndarray, seed: int) -> Scorer:
    from sklearn.mixture import GaussianMixture

    best, best_bic = None, math.inf
    for k in range(1, 11):
        if k * (train.shape[1] + 1) > len(train):  # more parameters per component than rows: stop
            break
        model = GaussianMixture(k, covariance_type="full", random_state=seed, n_init=1, reg_covar=1e-4).fit(train)
        bic = model.bic(train)
        if bic < best_bic:
            best, best_bic = model, bic
    return best.score_samples


def fit_kde(train: np.ndarray, seed: int) -> Scorer:
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.neighbors import KernelDensity

    grid = {"bandwidth": np.geomspace(0.05, 3.0, 24)}
    folds = KFold(5, shuffle=True, random_state=seed)
    return GridSearchCV(KernelDensity(kernel="gaussian"), grid, cv=folds).fit(train).best_estimator_.score_samples


def fit_iforest(train: np.ndarray, seed: int) -> Scorer:
    from sklearn.ensemble import IsolationForest

    return IsolationForest(n_estimators=200, random_state=seed).fit(train).score_samples


def fit_estimator(flow: str, train: np.ndarray, seed: int) -> tuple[Scorer, int]:
    """``DensityEstimator(flow)`` with its data-chosen defaults; the scorer and the optimizer steps it took."""
    import pyro_flows as pf

    estimator = pf.DensityEstimator(flow, seed=seed).fit(train, progress=False)
    if estimator.kept_start_:  # no epoch beat the fitted Gaussian on the validation rows (fit's warning, muted here)
        print(f"  {flow} seed {seed}: kept the fitted Gaussian", file=sys.stderr, flush=True)
    return estimator.score_samples, estimator.history_.steps


def fit_zuko(train: np.ndarray, seed: int, steps: int, batch_size: int) -> Scorer:
    """zuko's default NSF trained for ``steps`` Adam steps (lr 1e-3, gradient norm clipped at 5)."""
    import zuko

    torch.manual_seed(seed)
    flow = zuko.flows.NSF(train.shape[1])
    z = torch.as_tensor(train, dtype=torch.float32)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    for index in density.batches(len(z), batch_size, steps, seed + 1):
        loss = -flow().log_prob(z[index]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
        optimizer.step()

    @torch.no_grad()
    def score(x: np.ndarray) -> np.ndarray:
        return flow().log_prob(torch.as_tensor(x, dtype=torch.float32)).double().numpy()

    return score


CLASSICAL_FITS = {"gaussian": fit_gaussian, "gmm": fit_gmm, "kde": fit_kde, "iforest": fit_iforest}


# -- runs ---------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One method on one table: a value per seed (mean test log-likelihood or AUC), the seconds, or why n/a."""

    values: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values) if self.values else None

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def _batch_size(rows: int, features: int) -> int:
    from pyro_flows.tabular_defaults import tabular_defaults

    return int(tabular_defaults(HEADLINE, rows, features)["batch_size"])


def _fit(method: str, train: np.ndarray, seed: int, steps: dict[int, int]) -> Scorer:
    """Fit ``method``; ``steps`` records the headline estimator's optimizer steps per seed (zuko's budget)."""
    if method in CLASSICAL_FITS:
        return CLASSICAL_FITS[method](train, seed)
    if method == "zuko":
        if seed not in steps:
            raise RuntimeError(f"zuko's budget is the {HEADLINE} estimator's steps: run {HEADLINE} first")
        return fit_zuko(train, seed, steps[seed], _batch_size(*train.shape))
    scorer, taken = fit_estimator(method, train, seed)
    if method == HEADLINE:
        steps[seed] = taken
    return scorer


def _ordered(methods: Sequence[str]) -> list[str]:
    """``methods`` with the headline estimator first when zuko needs its budget."""
    return sorted(methods, key=lambda m: m != HEADLINE) if "zuko" in methods else list(methods)


def _held_out(method: str, train: np.ndarray, test: np.ndarray, seed: int, steps: dict[int, int]) -> float:
    return float(np.mean(_fit(method, train, seed, steps)(test)))


def _auc(method: str, train: np.ndarray, test: np.ndarray, seed: int, is_normal: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(is_normal, _fit(method, train, seed, {})(test)))


def _run_cell(cell: Cell, score: Callable[..., float], *args: object) -> None:
    """Append ``score(*args)`` and its seconds to ``cell``, or mark the cell n/a with the error."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = score(*args)
    except Exception as error:  # noqa: BLE001 - a failing method is reported as n/a, the run goes on
        cell.error = f"{type(error).__name__}: {error}"
        return
    cell.values.append(value)
    cell.seconds.append(time.perf_counter() - start)


def likelihood(
    tables: Sequence[str], methods: Sequence[str], seeds: Sequence[int], log: Callable[[str], None] = print
) -> dict[str, dict[str, Cell]]:
    """Mean held-out log-likelihood (standardised units, nats per row) of each method on each table."""
    results: dict[str, dict[str, Cell]] = {}
    for table in tables:
        x, _ = load_table(table)
        train_rows, test_rows = split(len(x))
        train, test = standardise(x[train_rows], x[test_rows])
        row = results[table] = {m: Cell() for m in methods}
        for seed in seeds:
            steps: dict[int, int] = {}
            for method in _ordered(methods):
                if row[method].error is None:
                    _run_cell(row[method], _held_out, method, train, test, seed, steps)
            log(f"{table} seed {seed}: " + ", ".join(f"{m} {_show(row[m].values[-1:])}" for m in methods))
    return results


def anomaly(
    tables: Sequence[str], methods: Sequence[str], seeds: Sequence[int], log: Callable[[str], None] = print
) -> dict[str, dict[str, Cell]]:
    """ROC AUC of each method's ``score_samples`` on one-class splits (:data:`NORMAL_CLASS`)."""
    results: dict[str, dict[str, Cell]] = {}
    for table in (t for t in tables if t in NORMAL_CLASS):
        x, y = load_table(table)
        normal = np.flatnonzero(y == NORMAL_CLASS[table])
        train_rows, held_out = split(len(normal))
        test_rows = np.concatenate((normal[held_out], np.flatnonzero(y != NORMAL_CLASS[table])))
        is_normal = np.isin(test_rows, normal)
        train, test = standardise(x[normal[train_rows]], x[test_rows])
        row = results[table] = {m: Cell() for m in methods}
        for seed in seeds:
            for method in methods:
                if row[method].error is None:
                    _run_cell(row[method], _auc, method, train, test, seed, is_normal)
            log(f"{table} AUC seed {seed}: " + ", ".join(f"{m} {_show(row[m].values[-1:])}" for m in methods))
    return results


# -- report ---------------------------------------------------------------------------------------------


def _show(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def table(results: dict[str, dict[str, Cell]], digits: int = 2, best_of: Sequence[str] = CLASSICAL) -> str:
    """A markdown table: rows are tables, columns methods (mean ± sd over seeds; "(n=k)" where a cell has fewer
    seeds than the most), plus the headline's margin over the best of ``best_of`` (positive: the headline is
    better) and the worst preset's margin over one Gaussian (negative: a preset falls below it)."""
    methods = _methods(results)
    seeds = max((len(c.values) for row in results.values() for c in row.values()), default=0)
    margin = HEADLINE in methods and any(m in methods for m in best_of)
    presets = [m for m in PRESETS if m in methods]
    floor = "gaussian" in methods and bool(presets)
    rivals = "/".join(m for m in best_of if m in methods)
    head = ["table", *methods] + ([f"{HEADLINE} − best of {rivals}"] if margin else [])
    head += ["worst preset − gaussian"] if floor else []
    rows = []
    for name, row in results.items():
        cells = [name] + [_cell(row.get(m, Cell()), digits, seeds) for m in methods]
        if margin:
            best = [row[m].mean for m in best_of if m in row and row[m].mean is not None]
            ours = row.get(HEADLINE, Cell()).mean
            cells.append(f"{ours - max(best):+.{digits}f}" if best and ours is not None else "n/a")
        if floor:
            means = [row[m].mean for m in presets if m in row and row[m].mean is not None]
            gaussian = row.get("gaussian", Cell()).mean
            cells.append(f"{min(means) - gaussian:+.{digits}f}" if means and gaussian is not None else "n/a")
        rows.append(cells)
    errors = [f"{t}/{m}: {c.error}" for t, row in results.items() for m, c in row.items() if c.error]
    return "\n".join([markdown_table(head, rows)] + ([""] + [f"n/a {e}" for e in errors] if errors else []))


def _methods(results: dict[str, dict[str, Cell]]) -> list[str]:
    """Every method of any table, in the order they first appear."""
    return list(dict.fromkeys(m for row in results.values() for m in row))


def _cell(cell: Cell, digits: int, seeds: int) -> str:
    if cell.error is not None or not cell.values:
        return "n/a"
    shown = _show(cell.values, digits)
    return shown + (f" (n={len(cell.values)})" if 0 < len(cell.values) < seeds else "")


def seconds_table(results: dict[str, dict[str, Cell]]) -> str:
    """Median fit-and-score seconds per method and table."""
    methods = _methods(results)
    rows = []
    for name, row in results.items():
        medians = [Timing(row[m].seconds).median if m in row else None for m in methods]
        rows.append([name] + ["n/a" if t is None else f"{t:.1f}" for t in medians])
    return markdown_table(["table", *methods], rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="run seeds 0..N-1")
    parser.add_argument("--seed", type=int, nargs="+", help="run only these seeds (for runs in parallel)")
    parser.add_argument("--json", help="also write the raw values per seed to this file")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="print the tables of runs written by --json")
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--auc-methods", nargs="*", choices=AUC_METHODS, default=list(AUC_METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 seed, iris and moons: a smoke run")
    args = parser.parse_args(argv)
    if args.merge:
        scores, aucs = merge(args.merge)
        report(scores, aucs)
        return 0
    if args.quick:
        args.seeds, args.tables = 1, [t for t in args.tables if t in QUICK_TABLES]
    seeds = args.seed if args.seed is not None else list(range(args.seeds))
    set_threads(args.threads)
    print(machine_line(), flush=True)
    log = lambda text: print(text, file=sys.stderr, flush=True)
    start = time.perf_counter()
    scores = likelihood(args.tables, args.methods, seeds, log)
    aucs = anomaly(args.tables, args.auc_methods, seeds, log) if args.auc_methods else {}
    if args.json:
        Path(args.json).write_text(json.dumps({"likelihood": _plain(scores), "auc": _plain(aucs)}))
    report(scores, aucs)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    return 0


def _plain(results: dict[str, dict[str, Cell]]) -> dict:
    return {t: {m: asdict(c) for m, c in row.items()} for t, row in results.items()}


def merge(paths: Sequence[str]) -> tuple[dict[str, dict[str, Cell]], dict[str, dict[str, Cell]]]:
    """The results of several ``--json`` runs (e.g. one per table and seed, run in parallel), seeds pooled."""
    merged: tuple[dict[str, dict[str, Cell]], dict[str, dict[str, Cell]]] = ({}, {})
    for path in paths:
        raw = json.loads(Path(path).read_text())
        for results, kind in zip(merged, ("likelihood", "auc"), strict=True):
            for name, row in raw[kind].items():
                for method, cell in row.items():
                    into = results.setdefault(name, {}).setdefault(method, Cell())
                    into.values += cell["values"]
                    into.seconds += cell["seconds"]
                    into.error = into.error or cell["error"]
    return merged


def report(scores: dict[str, dict[str, Cell]], aucs: dict[str, dict[str, Cell]]) -> None:
    """Print the likelihood, seconds and AUC tables."""
    seeds = max((len(c.values) for row in scores.values() for c in row.values()), default=0)
    print(f"Held-out mean log-likelihood (standardised units, nats per row; {seeds} seeds)\n")
    print(table(scores))
    print("\nSeconds per fit (median)\n")
    print(seconds_table(scores))
    if aucs:
        print(f"\nOne-class ROC AUC ({seeds} seeds)\n")
        print(table(aucs, digits=3, best_of=("iforest", "gmm", "kde")))


if __name__ == "__main__":
    sys.exit(main())
