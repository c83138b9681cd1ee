"""FPT feature cache: content/config keys, verified reads, recompute on corruption, resumable preload."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_fpt

from fastprompt import FPT
from fastprompt.data import FeatureCache, FeatureDataset, preload

IMG = 32


class Images(torch.utils.data.Dataset):
    """(image, label) items; counts loads and can fail once at a chosen index (an interrupted run)."""

    def __init__(self, count: int = 6, fail_at: int | None = None) -> None:
        generator = torch.Generator().manual_seed(5)
        self.images = torch.randn(count, 3, IMG, IMG, generator=generator)
        self.fail_at, self.loads = fail_at, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        if index == self.fail_at:
            self.fail_at = None
            raise KeyboardInterrupt("simulated interruption")
        self.loads += 1
        return self.images[index], index % 3


class CountingFPT:
    """Delegates to an FPT and counts the images its frozen branch computed."""

    def __init__(self, model: FPT) -> None:
        self.model, self.computed = model, 0

    def extract_features(self, images):
        self.computed += len(images)
        return self.model.extract_features(images)

    def feature_signature(self):
        return self.model.feature_signature()

    def parameters(self):
        return self.model.parameters()


def test_key_follows_content_and_configuration_not_file_names(tmp_path):
    cache, model = FeatureCache(tmp_path / "cache"), tiny_fpt()
    image = torch.randn(3, IMG, IMG)
    key = cache.key(model, image=image)
    assert cache.key(model, image=image.clone()) == key
    assert cache.key(model, image=image + 1e-3) != key
    assert cache.key(model, image=image.half()) != key
    for changed in (tiny_fpt(token_ratio=0.3), tiny_fpt(token_importance="cls"), tiny_fpt(layers=[1])):
        assert cache.key(changed, image=image) != key
    assert FeatureCache(tmp_path / "cache", dtype=torch.bfloat16).key(model, image=image) != key
    assert cache.key(model, image=image, preprocess="resize-512") != key
    with torch.no_grad():
        model.backbone.blocks[0].attn.qkv.weight[0, 0] += 1.0  # weights changed in place after a key was made
    assert cache.key(model, image=image) != key
    model.backbone.load_state_dict(tiny_fpt().backbone.state_dict())
    assert cache.key(model, image=image) == key

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "img.png").write_bytes(b"first image bytes")
    (tmp_path / "b" / "img.png").write_bytes(b"second image bytes")
    (tmp_path / "b" / "copy.png").write_bytes(b"first image bytes")
    by_path = {name: cache.key(model, path=tmp_path / name) for name in ("a/img.png", "b/img.png", "b/copy.png")}
    assert by_path["a/img.png"] != by_path["b/img.png"]  # same name, different content
    assert by_path["a/img.png"] == by_path["b/copy.png"]  # same content, different name
    with pytest.raises(ValueError, match="exactly one"):
        cache.key(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_and_size_per_image(tmp_path, dtype):
    cache, model = FeatureCache(tmp_path, dtype=dtype), tiny_fpt()
    image = torch.randn(1, 3, IMG, IMG)
    features = {name: tensor[0] for name, tensor in model.extract_features(image).items()}
    key = cache.key(model, image=image[0])
    size = cache.save(key, features)
    loaded = cache.load(key)
    for name in ("keys", "values"):
        assert loaded[name].dtype == dtype and loaded[name].shape == (2, 4, 3, 8)
        torch.testing.assert_close(loaded[name], features[name].to(dtype), rtol=0, atol=0)
    payload = 2 * 2 * 4 * 3 * 8 * torch.finfo(dtype).bits // 8
    assert payload < size < payload + 1024  # tensors plus a small header
    assert cache.bytes_per_image() == size == cache.path(key).stat().st_size


def test_cached_training_equals_online_forward(tmp_path):
    cache, model = FeatureCache(tmp_path, dtype=torch.float32), tiny_fpt()
    dataset = Images(count=4)
    report = preload(model, dataset, cache, batch_size=3, progress=False)
    loader = torch.utils.data.DataLoader(FeatureDataset(cache, report.keys, dataset), batch_size=4)
    features, _, labels = next(iter(loader))
    model.eval()
    x = dataset.images
    torch.testing.assert_close(model.forward_features_cached(features, model.resize_for_side(x)), model(x))
    assert labels.tolist() == [0, 1, 2, 0]


def corrupt(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[-3] ^= 0xFF  # inside the tensor bytes: only the checksum notices
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"\x00" * 4)


@pytest.mark.parametrize("how", ["truncate", "flip", "garbage"])
def test_corrupt_entry_is_detected_and_recomputed(tmp_path, how):
    cache, model = FeatureCache(tmp_path), tiny_fpt()
    dataset = Images(count=3)
    keys = preload(model, dataset, cache, progress=False).keys
    good = cache.load(keys[1])
    corrupt(cache.path(keys[1]), how)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert cache.load(keys[1]) is None
    assert not cache.path(keys[1]).exists()

    corrupt_again = cache.path(keys[1])
    cache.save(keys[1], good)
    corrupt(corrupt_again, how)
    counting = CountingFPT(model)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        report = preload(counting, dataset, cache, progress=False)
    assert (report.computed, report.skipped, counting.computed) == (1, 2, 1)
    torch.testing.assert_close(cache.load(keys[1]), good, rtol=0, atol=0)

    corrupt(cache.path(keys[2]), how)
    training = FeatureDataset(cache, keys, dataset, model=model, source=dataset)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        features, _, label = training[2]
    assert label == 2 and cache.load(keys[2]) is not None
    corrupt(cache.path(keys[0]), how)
    with pytest.warns(RuntimeWarning, match="corrupt"), pytest.raises(RuntimeError, match="preload"):
        FeatureDataset(cache, keys, dataset)[0]


def test_entry_under_another_key_is_rejected(tmp_path):
    cache, model = FeatureCache(tmp_path), tiny_fpt()
    keys = preload(model, Images(count=2), cache, progress=False).keys
    cache.path(keys[1]).write_bytes(cache.path(keys[0]).read_bytes())
    with pytest.warns(RuntimeWarning, match="another key"):
        assert cache.load(keys[1]) is None


def test_interrupted_preload_resumes_where_it_stopped(tmp_path, capsys):
    cache = FeatureCache(tmp_path)
    dataset = Images(count=7, fail_at=5)
    first = CountingFPT(tiny_fpt())
    with pytest.raises(KeyboardInterrupt):
        preload(first, dataset, cache, batch_size=2)
    assert first.computed == 4 and len(cache.entries()) == 4  # two full batches were written before the stop
    second = CountingFPT(tiny_fpt())
    report = preload(second, dataset, cache, batch_size=2)
    assert (report.computed, report.skipped, second.computed) == (3, 4, 3)
    assert len(set(report.keys)) == 7 == len(cache.entries())
    assert report.bytes_per_image == cache.bytes_per_image() > 0
    assert f"{report.bytes_per_image:,.0f} bytes per image" in capsys.readouterr().out


def test_preload_progress_counts_only_images_done(tmp_path, monkeypatch):
    from fastprompt.data import cache as cache_module

    positions, written = [], []  # at every bar update: the bar's count and the entries on disk

    class Bar:  # records what tqdm would show
        def __init__(self, total=None, **kwargs):
            self.total, self.n = total, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, step):
            self.n += step
            positions.append(self.n)
            written.append(len(cache.entries()))

        def set_postfix(self, **kwargs):
            pass

    monkeypatch.setattr(cache_module, "tqdm", Bar)
    cache = FeatureCache(tmp_path)
    preload(tiny_fpt(), Images(count=7), cache, batch_size=3, progress=False)
    assert positions[-1] == 7 and positions == written  # never ahead of the features written (batches of 3)
    positions.clear()
    report = preload(tiny_fpt(), Images(count=7), cache, batch_size=3, progress=False)
    assert report.skipped == 7 and positions == list(range(1, 8))  # cached images count one by one


def test_preload_by_file_loads_only_missing_images(tmp_path):
    cache, model = FeatureCache(tmp_path / "cache"), tiny_fpt()
    dataset = Images(count=4)
    paths = []
    for index in range(4):
        path = tmp_path / f"image{index}.raw"
        path.write_bytes(dataset.images[index].numpy().tobytes())
        paths.append(path)
    preload(model, torch.utils.data.Subset(dataset, [0, 1]), cache, paths=paths[:2], progress=False)
    dataset.loads = 0
    report = preload(model, dataset, cache, paths=paths, progress=False)
    assert (report.computed, report.skipped, dataset.loads) == (2, 2, 2)
    with pytest.raises(ValueError, match="4 items"):
        preload(model, dataset, cache, paths=paths[:3], progress=False)


def test_preload_from_a_loader(tmp_path):
    cache, model = FeatureCache(tmp_path), tiny_fpt()
    dataset = Images(count=5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    report = preload(model, loader, cache, progress=False)
    assert report.keys == [cache.key(model, image=image) for image in dataset.images]
    assert preload(model, loader, cache, progress=False).skipped == 5


def test_training_from_the_cache_runs_only_fusion_and_side(tmp_path):
    cache, model = FeatureCache(tmp_path), tiny_fpt()
    dataset = Images(count=4)
    keys = preload(model, dataset, cache, progress=False).keys
    side = torch.utils.data.TensorDataset(model.resize_for_side(dataset.images), torch.arange(4) % 3)
    features, side_images, labels = next(iter(torch.utils.data.DataLoader(FeatureDataset(cache, keys, side), 4)))
    assert features["keys"].dtype == torch.float16 and side_images.shape == (4, 3, 16, 16)
    blocks_run = []
    model.backbone.blocks[0].register_forward_pre_hook(lambda *args: blocks_run.append(1))
    F.cross_entropy(model.train().forward_features_cached(features, side_images), labels).backward()
    assert not blocks_run and model.side.head.weight.grad is not None
