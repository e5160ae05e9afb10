"""Image classifiers: the CIFAR ResNets on real checkpoints and real CIFAR-10 JPEGs, image
folders and tar files, bad input, cached records, and fused classification accuracy."""
from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from arfuse.adapters.vision import (CIFAR10_CLASSES, CifarResNet, CifarResNetConfig, is_vision_model,
                                    load_vision_model)
from arfuse.errors import ArfuseError
from arfuse.scoring.classify import score_images
from arfuse.data.images import is_image_data, load_image_dataset
from arfuse.tasks.config import EvalConfig
from arfuse.tasks.heads import evaluate

TAR = "vision/cifar10-test-jpg.tar"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar_small(shared_data):
    """4 real test images of each class (40), the first files of each class folder."""
    return load_image_dataset("cifar10-test[:4]")


def _jpeg(color, size=(32, 32)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _image_folder(root: Path, classes, per_class=2, bad: str | None = None) -> Path:
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            (root / c / f"{j:04d}.jpg").write_bytes(_jpeg((20 * i, 10 * j, 100)))
    if bad:
        (root / bad).write_bytes(b"this is not a JPEG")
    return root


# ---- the architecture and the real checkpoints --------------------------------------------
@pytest.mark.parametrize("depth,params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_cifar_resnet_parameter_counts(depth, params):
    """He et al.'s CIFAR ResNets: 0.27M, 0.46M, 0.66M and 0.85M parameters (option-A shortcuts are free)."""
    model = CifarResNet(CifarResNetConfig(depth=depth))
    assert sum(p.numel() for p in model.parameters()) == params
    out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_depth_must_be_6n_plus_2():
    with pytest.raises(ArfuseError, match=r"depth 21 is not 6n \+ 2"):
        CifarResNetConfig(depth=21)


@pytest.mark.parametrize("name,depth,params", [("resnet20", 20, 269_722), ("resnet56", 56, 853_018)])
def test_names_resolve_to_the_shared_checkpoints(shared_data, name, depth, params):
    m = load_vision_model(name)
    assert m.info.name == name and m.info.num_parameters == params
    assert m.model.cfg.depth == depth and m.classes == CIFAR10_CLASSES
    assert len(m.info.identity["sha256"]) == 64
    assert is_vision_model(name) and is_vision_model(m.path) and not is_vision_model("stories260k")


def test_preprocessing_is_the_readme_normalisation(shared_data, cifar_small):
    """[0, 1] scaling then mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225), computed here by hand."""
    from PIL import Image

    m = load_vision_model("resnet20")
    with tarfile.open(shared_data / TAR) as tf:
        blob = tf.extractfile("test/airplane/0000.jpg").read()
    a = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), np.float32) / 255.0
    x = (a - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    x = torch.from_numpy(x.transpose(2, 0, 1).copy())
    assert torch.equal(m.preprocess(cifar_small.decode(0)), x)
    lp = m.logprobs(x[None])[0]
    rec = score_images(m, cifar_small, progress=False)
    assert rec.logp[0] == pytest.approx(float(lp[0]), abs=1e-5)  # batch of 1 vs 40; airplane/0000 is an airplane (label 0)


def test_real_top1_on_forty_test_images(shared_data, cifar_small):
    """Measured values on test/<class>/0000-0003.jpg of the JPEG test set (pinned)."""
    assert len(cifar_small) == 40 and cifar_small.labels == [i // 4 for i in range(40)]
    assert cifar_small.files[:2] == ["test/airplane/0000.jpg", "test/airplane/0001.jpg"]
    expect = {"resnet20": (34, 0.58895), "resnet32": (34, 0.58301), "resnet44": (32, 0.71157),
              "resnet56": (34, 0.44233)}
    for name, (right, nll) in expect.items():
        rec = score_images(load_vision_model(name), cifar_small, progress=False)
        assert int((rec.topk_ids[:, 0] == rec.target).sum()) == right, name
        assert -float(rec.logp.mean()) == pytest.approx(nll, abs=2e-4), name
        # all ten classes are kept, best first, and log p(true class) is among them
        assert rec.topk_ids.shape == (40, 10) and np.all(np.diff(rec.topk_logp, axis=1) <= 0)
        np.testing.assert_allclose(np.exp(rec.topk_logp).sum(1), 1.0, atol=1e-5)
        got = rec.topk_logp[np.arange(40), np.argmax(rec.topk_ids == rec.target[:, None], axis=1)]
        np.testing.assert_array_equal(got, rec.logp)


def test_scores_do_not_depend_on_batch_size(shared_data, cifar_small):
    m = load_vision_model("resnet32")
    a = score_images(m, cifar_small, batch_size=1, use_cache=False, progress=False)
    b = score_images(m, cifar_small, batch_size=8, use_cache=False, progress=False)
    np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)
    np.testing.assert_array_equal(a.topk_ids[:, 0], b.topk_ids[:, 0])


def test_cache_is_reused_and_a_bad_chunk_rescored(shared_data, cifar_small):
    from arfuse.scoring.cache import CacheWarning, ScoreCache
    from arfuse.scoring.classify import image_cache_key

    m = load_vision_model("resnet20")
    first = score_images(m, cifar_small, progress=False)
    cache = ScoreCache(image_cache_key(m, cifar_small, 10))
    assert cache.manifest["complete"] and cache.chunk_path(0).exists()
    cache.chunk_path(0).write_bytes(b"corrupted")
    with pytest.warns(CacheWarning, match="fails its checksum"):
        again = score_images(m, cifar_small, progress=False)
    np.testing.assert_array_equal(first.logp, again.logp)
    # another data set (other bytes) gets another key
    assert image_cache_key(m, load_image_dataset("cifar10-test[4:5]"), 10) != cache.key_fields


# ---- data: folders, tar files, slices, bad input ------------------------------------------
def test_per_class_slices(shared_data):
    half = load_image_dataset("cifar10-test[50%:51%]")  # files 0500-0509 of every class
    assert len(half) == 100 and half.files[0] == "test/airplane/0500.jpg" and half.files[-1] == "test/truck/0509.jpg"
    assert np.bincount(half.labels).tolist() == [10] * 10
    assert is_image_data("cifar10-test[:5]") and not is_image_data("wikitext2-raw-test")
    with pytest.raises(ArfuseError, match="bad slice bound 'x'"):
        load_image_dataset("cifar10-test[x:]")


def test_folder_and_tar_give_the_same_dataset(tmp_path):
    root = _image_folder(tmp_path / "imgs", ["cat", "dog", "ant"])
    ds = load_image_dataset(str(root))
    assert ds.classes == ("ant", "cat", "dog") and ds.labels == [0, 0, 1, 1, 2, 2]
    tar = tmp_path / "imgs.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(root, arcname="test")
    dt = load_image_dataset(str(tar))
    assert dt.classes == ds.classes and dt.labels == ds.labels and dt.blobs == ds.blobs
    assert dt.files[0] == "test/ant/0000.jpg"
    # a folder wrapping the class folders (test/<class>/...) reads the same
    assert load_image_dataset(str(tmp_path / "imgs")).labels == ds.labels


def test_undecodable_image_is_skipped_counted_and_reported(tmp_path, shared_data):
    root = _image_folder(tmp_path / "imgs", CIFAR10_CLASSES, per_class=1, bad="cat/0099.jpg")
    ds = load_image_dataset(str(root), classes=CIFAR10_CLASSES)
    assert len(ds) == 10 and [f for f, _ in ds.skipped] == ["cat/0099.jpg"]
    assert "cannot identify image file" in ds.skipped[0][1]
    rep = evaluate(EvalConfig("resnet32", ["resnet20"], str(root), bootstrap=0), progress=False)
    assert rep.head == "image"
    assert rep.data["skipped"] == 1 and rep.data["skipped_files"][0].startswith("cat/0099.jpg (")
    assert "skipped 1 image(s) that do not decode: cat/0099.jpg" in rep.to_markdown()
    assert any("do not decode and were skipped" in n for n in rep.notes)


def test_missing_or_unknown_class_folder_is_an_error(tmp_path):
    root = _image_folder(tmp_path / "imgs", [c for c in CIFAR10_CLASSES if c != "frog"], per_class=1)
    with pytest.raises(ArfuseError, match="class folder 'frog' missing from .*the model predicts 10 classes"):
        load_image_dataset(str(root), classes=CIFAR10_CLASSES)
    (root / "frog").mkdir()
    (root / "frog" / "0000.jpg").write_bytes(_jpeg((1, 2, 3)))
    (root / "zebra").mkdir()
    (root / "zebra" / "0000.jpg").write_bytes(_jpeg((1, 2, 3)))
    with pytest.raises(ArfuseError, match="class folder 'zebra' that the model does not predict"):
        load_image_dataset(str(root), classes=CIFAR10_CLASSES)
    (root / "empty").mkdir()
    with pytest.raises(ArfuseError, match="'empty' in .* hold no images"):
        load_image_dataset(str(root))


def test_bad_names_and_missing_packages():
    with pytest.raises(ArfuseError, match="unknown image set 'cifar10-tset'.*Did you mean 'cifar10-test'"):
        load_image_dataset("cifar10-tset")
    with pytest.raises(ArfuseError, match="does not exist"):
        load_image_dataset("no/such/folder")
    with pytest.raises(ArfuseError, match="unknown image model 'resnet21'.*Did you mean"):
        load_vision_model("resnet21")
    for spec, pkg in [("torchvision:resnet18", "torchvision"), ("timm:resnet18", "timm")]:
        try:
            __import__(pkg)
        except ImportError:
            with pytest.raises(ArfuseError, match=f"needs the {pkg} package, which is not installed: pip install {pkg}"):
                load_vision_model(spec)


def test_a_checkpoint_that_is_not_a_cifar_resnet(tmp_path):
    p = tmp_path / "other.th"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, p)
    with pytest.raises(ArfuseError, match="is not a CIFAR ResNet checkpoint"):
        load_vision_model(str(p))
    p.write_bytes(b"garbage")
    with pytest.raises(ArfuseError, match="cannot read .* as a PyTorch checkpoint"):
        load_vision_model(str(p))


# ---- fusion, exact search and the accuracy curve on real records ---------------------------
def test_fused_accuracy_choose_on_one_half_report_on_the_other(shared_data, tmp_path):
    """resnet56 + resnet20: the weight is chosen on [:3] per class and reported on [3:6];
    every number of the report is recomputed here from the records by brute force."""
    from arfuse.search.accuracy import brute_force_right
    from arfuse.tasks.classification import full_logprobs

    rep = evaluate(EvalConfig("resnet56", ["resnet20"], "cifar10-test[3:6]", valid="cifar10-test[:3]", bootstrap=200),
                   progress=False)
    assert rep.search == "accuracy" and "accuracy-optimal on the validation data (cifar10-test[:3])" in rep.weight_source
    test = load_image_dataset("cifar10-test[3:6]")
    big = score_images(load_vision_model("resnet56"), test, progress=False)
    small = score_images(load_vision_model("resnet20"), test, progress=False)
    pl, ps = np.exp(full_logprobs(big)), np.exp(full_logprobs(small))
    rows = {r.kind: r.metrics for r in rep.rows}
    assert rows["large"]["right"] == int((pl.argmax(1) == big.target).sum())
    assert rows["small"]["right"] == int((ps.argmax(1) == big.target).sum())
    assert rows["fused"]["right"] == int(brute_force_right(pl, ps, big.target, rep.k).sum())
    assert rows["uniform"]["right"] == int(brute_force_right(pl, ps, big.target, 1.0).sum())
    # the accuracy chosen on the validation half is the maximum of a grid there (exact curve >= any grid)
    val = load_image_dataset("cifar10-test[:3]")
    vb = np.exp(full_logprobs(score_images(load_vision_model("resnet56"), val, progress=False)))
    vs_rec = score_images(load_vision_model("resnet20"), val, progress=False)
    vs = np.exp(full_logprobs(vs_rec))
    grid = np.geomspace(1e-3, 1e3, 2001)
    best_grid = max(brute_force_right(vb, vs, vs_rec.target, k).sum() for k in grid)
    assert brute_force_right(vb, vs, vs_rec.target, rep.k).sum() == best_grid
    # the NLL optimum on the reported half is a stationary point of the mixture NLL
    o = rep.nll_optimum
    f = lambda w: -np.mean(np.log(w * np.exp(big.logp.astype(np.float64)) + (1 - w) * np.exp(small.logp.astype(np.float64))))  # noqa: E731
    assert f(o["w"]) <= min(f(o["w"] - 1e-4), f(o["w"] + 1e-4))
    assert o["accuracy"] == pytest.approx(brute_force_right(pl, ps, big.target, o["k"]).mean())
    sets = rep.sets
    assert sets["S1_llm_wrong_slm_right"]["size"] + sets["S2_llm_right_slm_wrong"]["size"] + sets["S3_agree"]["size"] == 30
    assert rows["fused"]["right"] - rows["large"]["right"] == sets["flips_wrong_to_right"] - sets["flips_right_to_wrong"]
    d = rep.to_dict()
    assert d["data"]["images"] == 30 and d["valid"]["images"] == 30 and "resnet56" in rep.to_markdown()
    # the plotted step curve is the exact gain: at the used k it is fused minus large, in points
    edges = np.asarray(rep.curve["edges"])
    seg = int(np.searchsorted(edges[1:-1], rep.k, side="right"))
    assert rep.curve["gain_pp"][seg] == pytest.approx(100 * (rows["fused"]["right"] - rows["large"]["right"]) / 30)
    png = Path(rep.plot(str(tmp_path / "acc.png")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_given_weight_one_is_the_large_model_and_overlap_is_refused(shared_data):
    rep = evaluate(EvalConfig("resnet44", ["resnet20"], "cifar10-test[:2]", weights=[1.0, 0.0], bootstrap=0),
                   progress=False)
    rows = {r.kind: r.metrics for r in rep.rows}
    assert rows["fused"]["right"] == rows["large"]["right"] and rows["fused"]["nll"] == pytest.approx(rows["large"]["nll"])
    assert math.isinf(rep.k) and rep.search == "given"
    with pytest.raises(ArfuseError, match="in both .* choose the weight on disjoint data"):
        evaluate(EvalConfig("resnet44", ["resnet20"], "cifar10-test[:2]", valid="cifar10-test[1:3]"), progress=False)
    with pytest.raises(ArfuseError, match="exact accuracy search is for two models"):
        EvalConfig("resnet44", ["resnet20", "resnet32"], "cifar10-test[:2]", objective="accuracy")
    with pytest.raises(ArfuseError, match="weight 1.5 is outside"):
        EvalConfig("resnet44", ["resnet20"], "cifar10-test[:2]", weights=[1.5, -0.5])
    with pytest.raises(ArfuseError, match="the cosine rule is not applied to image classifiers"):
        evaluate(EvalConfig("resnet44", ["resnet20"], "cifar10-test[:2]", rule="cosine", rule_params={"power": 1.0}))
    with pytest.raises(ArfuseError, match="different kinds .*resnet44 is an image model.*is a causal model"):
        evaluate(EvalConfig("resnet44", ["stories260k"], "cifar10-test[:2]"))


def test_law_analysis_runs_on_the_resnet_family(shared_data):
    """The members handed to arfuse.search.law: every pair, k* equal to the exact optimum on the records."""
    from arfuse.search import optimal_weight
    from arfuse.search.law import analyse_family
    from arfuse.tasks.law import family_members

    members, info = family_members(["resnet20", "resnet32", "resnet56"], "cifar10-test[:3]", progress=False)
    assert info["tokens"] == 30 and info["unit"] == "image" and [m.num_parameters for m in members] == [269_722, 464_154, 853_018]
    rep = analyse_family(members, info).to_dict()
    pairs = {(p["llm"], p["slm"]): p for p in rep["pairs"]}
    assert set(pairs) == {("resnet32", "resnet20"), ("resnet56", "resnet20"), ("resnet56", "resnet32")}
    p = pairs[("resnet56", "resnet20")]
    assert p["r"] == pytest.approx(853_018 / 269_722)
    k = optimal_weight(members[2].records.logp, members[0].records.logp).k
    assert p["ppl"]["k_star"] == pytest.approx(k, rel=1e-9) and p["acc"]["exact"]
