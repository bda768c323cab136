"""bnlib.experiments.data: offline datasets, standardized, and MNIST-1D's cache."""
import pytest
import torch

from bnlib.experiments import data


def test_digits_split_and_standardized():
    x_tr, y_tr, x_te, y_te = data.load_dataset("digits", seed=0)
    assert (len(x_tr), len(x_te)) == (1348, 449) and x_tr.shape[1] == 64  # 1,797 images, 25 % test
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.long
    # Standardized with the training set's own statistics: per-feature mean 0 and std 1 where
    # the feature varies (float32 of values O(1): 1e-4 is far above rounding, far below 1).
    varies = x_tr.std(0) > 0
    assert x_tr.mean(0).abs().max() < 1e-4
    assert ((x_tr.std(0, unbiased=False)[varies] - 1).abs().max()) < 1e-4
    again = data.load_dataset("digits", seed=0)
    assert all(torch.equal(a, b) for a, b in zip((x_tr, y_tr, x_te, y_te), again))
    assert not torch.equal(data.load_dataset("digits", seed=1)[1], y_tr)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="name must be one of"):
        data.load_dataset("cifar")
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_dataset("digits", test_fraction=1.0)


def test_mnist1d_is_generated_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_CACHE_DIR", str(tmp_path))
    first = data.load_dataset("mnist1d", seed=3, num_samples=300)
    (cached,) = (tmp_path / "mnist1d").iterdir()
    assert "seed3-n300" in cached.name and cached.suffix == ".npz"
    import mnist1d.data
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: pytest.fail("regenerated"))
    again = data.load_dataset("mnist1d", seed=3, num_samples=300)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not list((tmp_path / "mnist1d").glob("*.tmp*"))       # no partial file left
