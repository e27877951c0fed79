"""fmpaper.stats against scipy and against simulation."""
import numpy as np
import pytest
from scipy import stats as sps

from fmpaper.stats import CANDIDATES, bootstrap_ci, chance_ndcg, chance_sd, wilcoxon_p


def test_wilcoxon_p_is_scipys_with_zeros_dropped():
    rng = np.random.default_rng(0)
    d = np.round(rng.normal(0.02, 0.1, 300), 2)                         # ties and zeros on purpose
    d[:20] = 0.0
    assert wilcoxon_p(d) == pytest.approx(sps.wilcoxon(d[d != 0]).pvalue, rel=1e-9)
    assert wilcoxon_p(np.zeros(50)) == 1.0
    assert wilcoxon_p(np.full(40, 0.01)) < 1e-6


def test_bootstrap_ci_agrees_with_scipy_percentile_bootstrap():
    rng = np.random.default_rng(1)
    d = rng.exponential(1.0, 400) - 0.9
    ours = bootstrap_ci(d, n_boot=20000, level=0.95, seed=3)[0]
    ref = sps.bootstrap((d,), np.mean, n_resamples=20000, confidence_level=0.95, method="percentile",
                        random_state=np.random.default_rng(4)).confidence_interval
    se = d.std() / np.sqrt(len(d))
    assert abs(ours[0] - ref.low) < 0.05 * se and abs(ours[1] - ref.high) < 0.05 * se
    # paired: columns resampled with the same users, so a column and its copy get the same interval
    two = bootstrap_ci(np.stack([d, d], 1), n_boot=500, seed=0)
    assert np.array_equal(two[0], two[1])


@pytest.mark.parametrize("n,k", [(CANDIDATES, 10), (CANDIDATES, 20), (5, 10)])
def test_chance_ndcg_against_simulation(n, k):
    rng = np.random.default_rng(2)
    rank = rng.integers(0, n, 400_000)                                  # 0-based rank of the target
    gain = np.where(rank < k, 1 / np.log2(rank + 2), 0.0)
    assert chance_ndcg(n, k) == pytest.approx(gain.mean(), abs=4 * gain.std() / np.sqrt(len(gain)))
    assert chance_sd(n, k) == pytest.approx(gain.std(), rel=0.01)
    if n == CANDIDATES:
        assert round(chance_ndcg(n, k), 4) == {10: 0.0450, 20: 0.0697}[k]
