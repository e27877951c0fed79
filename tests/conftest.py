import pytest
import torch

from fmpaper.config import make_config
from fmpaper.data import load
from fmpaper.train import train


def write_inter(path, rows, header="user_id:token\titem_id:token\trating:float\ttimestamp:float"):
    """rows: (user, item, timestamp) -> a RecBole .inter file (rating fixed to 1)."""
    lines = [header] + [f"{u}\t{i}\t1\t{t}" for u, i, t in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_killed_after_first_epoch(cfg, out, data):
    """Train `cfg` into `out` and stop it as a kill would, right after epoch 1 is saved."""
    def die(state):
        if state["epoch"] == 1:
            raise KeyboardInterrupt                                      # as if killed here
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False, data=data, on_epoch=die)


@pytest.fixture(scope="session")
def smoke_cfg():
    return make_config("smoke")


@pytest.fixture(scope="session")
def smoke_data(smoke_cfg):
    return load(smoke_cfg.dataset, smoke_cfg.max_len, smoke_cfg.min_count, smoke_cfg.max_users)


@pytest.fixture
def tiny_cfg():
    return make_config("smoke", hidden=16, n_heads=2, inner=32, max_len=8, dropout=0.0, attn_dropout=0.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and immune to a busy machine (OpenMP spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
