"""The prepared-data cache: fitted preprocessing + preprocessed tensors stored as safetensors, bit-exact."""

from __future__ import annotations

import warnings

import pytest
import torch

from ltdd.config import DataConfig
from ltdd.data import cache as pcache
from ltdd.data import prepare_data
from ltdd.data.transforms import Preprocessor

CFG = DataConfig(dataset="digits", imbalance_factor=10, max_per_class=100, zca=True, probe_per_class=3)


def _files(folder):
    return sorted(folder.glob("prepared-*.safetensors"))


def _assert_same(a, b):
    for name in ("train_x", "train_y", "test_x", "test_y", "probe_x", "probe_y"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, msg=name)
    assert a.describe() == b.describe()
    st_a, st_b = a.preprocessor.state_dict(), b.preprocessor.state_dict()
    assert st_a.keys() == st_b.keys()
    for k in st_a:
        torch.testing.assert_close(st_a[k], st_b[k], rtol=0, atol=0, msg=k)
    # the restored preprocessor maps both ways exactly like the fitted one
    px = torch.rand(4, a.channels, *a.im_size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.preprocessor.to_model_space(px), b.preprocessor.to_model_space(px), rtol=0, atol=0)
    torch.testing.assert_close(a.preprocessor.to_pixels(a.train_x[:4]), b.preprocessor.to_pixels(a.train_x[:4]),
                               rtol=0, atol=0)


def test_cached_equals_uncached(tmp_path, monkeypatch):
    uncached = prepare_data(CFG, cache_dir=False)
    first = prepare_data(CFG, cache_dir=tmp_path, cache_prepared=True)  # miss: fits, then writes
    assert len(_files(tmp_path)) == 1
    _assert_same(uncached, first)

    def no_fit(self, images):  # a hit must not fit (nor apply) anything
        raise AssertionError("Preprocessor.fit called on a cache hit")

    monkeypatch.setattr(Preprocessor, "fit", no_fit)
    second = prepare_data(CFG, cache_dir=tmp_path, cache_prepared=True)
    _assert_same(uncached, second)
    assert second.preprocessor.whitener.shape == (1, 16, 16)
    second.train_x.add_(0)  # tensors are ordinary writable memory, not a read-only mapping


def test_key_separates_configs(tmp_path):
    prepare_data(CFG, cache_dir=tmp_path, cache_prepared=True)
    for change in ({"zca_eps": 0.05}, {"imbalance_factor": 20}, {"seed": 1}, {"normalize": False},
                   {"probe_per_class": 0}):
        cfg = DataConfig(**{**CFG.__dict__, **change})
        got = prepare_data(cfg, cache_dir=tmp_path, cache_prepared=True)
        _assert_same(prepare_data(cfg, cache_dir=False), got)
    assert len(_files(tmp_path)) == 6


def test_auto_mode_skips_cheap_preprocessing(tmp_path):
    prepare_data(CFG, cache_dir=tmp_path)  # digits ZCA is 256-dimensional: not worth a file
    assert _files(tmp_path) == []
    prepare_data(CFG, cache_dir=tmp_path, cache_prepared=False)
    assert _files(tmp_path) == []
    pre = Preprocessor(zca=True)
    assert pcache.worth_caching(pre, 22406, 3 * 32 * 32)
    assert not pcache.worth_caching(pre, 1500, 256)
    assert not pcache.worth_caching(Preprocessor(zca=False), 22406, 3 * 32 * 32)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_unusable_cache_is_rebuilt(tmp_path, damage):
    ref = prepare_data(CFG, cache_dir=tmp_path, cache_prepared=True)
    (path,) = _files(tmp_path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x04not a safetensors file" * 10)
    else:  # a valid safetensors file with the wrong key / tensors
        from safetensors.torch import save_file

        save_file({"train_x": torch.zeros(1)}, str(path), metadata={"key": "{}"})
    with pytest.warns(UserWarning, match="ignoring unusable prepared-data cache"):
        got = prepare_data(CFG, cache_dir=tmp_path, cache_prepared=True)
    _assert_same(ref, got)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: the next load is a clean hit
        _assert_same(ref, prepare_data(CFG, cache_dir=tmp_path, cache_prepared=True))


def test_no_temporary_files_left_and_prune(tmp_path, monkeypatch):
    prepare_data(CFG, cache_dir=tmp_path, cache_prepared=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setenv("LTDD_PREPARED_CACHE_GB", "0")  # budget 0: only the file just written survives
    cfg = DataConfig(**{**CFG.__dict__, "imbalance_factor": 20})
    prepare_data(cfg, cache_dir=tmp_path, cache_prepared=True)
    files = _files(tmp_path)
    assert len(files) == 1
    # the survivor is the new entry: loading it again is a hit (and needs no fit)
    monkeypatch.setattr(Preprocessor, "fit", lambda self, x: (_ for _ in ()).throw(AssertionError("fit")))
    prepare_data(cfg, cache_dir=tmp_path, cache_prepared=True)
