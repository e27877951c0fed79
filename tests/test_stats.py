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


def test_holm_against_a_hand_computation():
    from fmpaper.stats import holm
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.2])
    # sorted: 0.005*5=0.025, 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> 0.09 (monotone), 0.2*1=0.2
    expected = np.array([0.04, 0.09, 0.09, 0.025, 0.2])
    np.testing.assert_allclose(holm(p), expected)
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])            # capped at 1
    assert len(holm([])) == 0


def test_hierarchical_interval_widens_when_seeds_disagree():
    from fmpaper.stats import hierarchical_ci
    rng = np.random.default_rng(5)
    users = rng.normal(0, 0.05, 1000)
    seed_shift = np.array([0.012, 0.000, -0.006, 0.020])                # seed spread dominates
    d = seed_shift[:, None] + users[None, :] + rng.normal(0, 0.01, (4, 1000))
    users_only = bootstrap_ci(d.mean(0), n_boot=4000, seed=1)[0]
    both = hierarchical_ci(d[:, :, None], n_boot=4000, seed=1)[0]
    assert (both[1] - both[0]) > 3 * (users_only[1] - users_only[0])
    assert users_only[0] > 0 and both[0] < 0 < both[1]                 # "better" only if seeds are ignored
    # one seed: the paired user bootstrap
    one = hierarchical_ci(d[:1, :, None], n_boot=4000, seed=2)[0]
    ref = bootstrap_ci(d[0], n_boot=4000, seed=3)[0]
    assert np.allclose(one, ref, atol=0.1 * (ref[1] - ref[0]))


def test_verdict_words_follow_the_adjusted_p():
    import pandas as pd

    from fmpaper.stats import verdicts
    t = pd.DataFrame({"p_holm": [0.01, 0.01, 0.2, 0.01], "ci_low": [0.1, -0.3, 0.1, -0.1],
                      "ci_high": [0.3, -0.1, 0.3, 0.1]})
    assert verdicts(t) == ["better", "worse", "not resolved", "not resolved"]
