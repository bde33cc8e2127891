"""Retrieval building blocks: recall_at_k vs a brute-force loop, the data readers on tiny fixture files (and their
errors), HarMA's caption cleaning, contrastive_loss vs its float64 oracle."""
from __future__ import annotations

import json
import os

import pytest
import torch

from rspeft_fast.reference.contrastive import contrastive_loss_ref
from rspeft_fast.retrieval import DataError, clean_caption, detect_format, read_split, recall_at_k
from rspeft_fast.testing import assert_fused_close, run_fwd_bwd


# --------------------------------------------------------------------------------------------------
# recall_at_k


def _brute_force(sim, t2i, ks):
    """HarMA's evaluation loop (argsort per row / column; no ties in random similarities)."""
    n_img, n_txt = sim.shape
    img2txt = {i: [j for j in range(n_txt) if t2i[j] == i] for i in range(n_img)}
    r_i2t = []
    for i in range(n_img):
        order = torch.argsort(sim[i], descending=True).tolist()
        r_i2t.append(min(order.index(j) for j in img2txt[i]))
    r_t2i = []
    for j in range(n_txt):
        order = torch.argsort(sim[:, j], descending=True).tolist()
        r_t2i.append(order.index(t2i[j]))
    out = {f"txt_r{k}": 100.0 * sum(r < k for r in r_i2t) / n_img for k in ks}
    out.update({f"img_r{k}": 100.0 * sum(r < k for r in r_t2i) / n_txt for k in ks})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n_img = 17
    per = torch.randint(1, 8, (n_img,), generator=g)  # 1-7 captions per image
    t2i = torch.repeat_interleave(torch.arange(n_img), per)
    t2i = t2i[torch.randperm(t2i.numel(), generator=g)]  # shuffled caption order
    sim = torch.randn(n_img, t2i.numel(), generator=g)
    sim[t2i, torch.arange(t2i.numel())] += 1.0  # better than chance, so every k matters
    ks = (1, 3, 5, 10)
    got = recall_at_k(sim, t2i, ks=ks, chunk=5)  # small chunks: the chunked paths
    want = _brute_force(sim, t2i.tolist(), ks)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert got["txt_r_mean"] == pytest.approx(sum(want[f"txt_r{k}"] for k in ks) / 4)
    assert got["r_mean"] == pytest.approx(sum(want.values()) / len(want))
    assert 0 < got["img_r1"] < 100 and 0 < got["txt_r5"] <= 100


def test_recall_at_k_default_keys_ties_and_errors():
    sim = torch.rand(6, 12)
    t2i = torch.arange(12) % 6
    keys = set(recall_at_k(sim, t2i))
    assert keys == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean"}
    # a collapsed model (constant similarities) is not rewarded: ties rank against the true match
    flat = recall_at_k(torch.ones(6, 12), t2i, ks=(1, 5))
    assert flat["txt_r1"] == 0.0 and flat["img_r1"] == 0.0 and flat["img_r5"] == 0.0
    with pytest.raises(ValueError, match="N_img, N_txt"):
        recall_at_k(torch.rand(12), t2i)
    with pytest.raises(ValueError, match="txt_to_img"):
        recall_at_k(sim, t2i[:5])
    with pytest.raises(ValueError, match="no|none"):
        recall_at_k(torch.rand(7, 12), t2i)  # image 6 has no caption


# --------------------------------------------------------------------------------------------------
# readers


def _img(root, name):
    from PIL import Image

    p = os.path.join(root, name)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(p)
    return name


def test_clean_caption_is_harmas():
    assert clean_caption("  Many  GREEN trees, near a river-bank / road!\n") == "many green trees near a river bank road"
    assert clean_caption("a <person> walks (fast).") == "a person walks fast"
    assert clean_caption("one two three four", max_words=2) == "one two"


def test_harma_json(tmp_path):
    root = str(tmp_path / "imgs")
    a, b = _img(root, "a.jpg"), _img(root, "sub/b.jpg")
    prefix = str(tmp_path / "rsitmd")
    json.dump([{"image": a, "caption": "A farm.", "image_id": 0}, {"image": b, "caption": "Houses!", "image_id": 1},
               {"image": a, "caption": "Fields, green", "image_id": 0}], open(prefix + "_train.json", "w"))
    json.dump([{"image": b, "caption": ["x one", "x two", "x three"]}, {"image": a, "caption": "only one"}],
              open(prefix + "_test.json", "w"))
    assert detect_format(prefix) == "harma"
    tr = read_split(prefix, "train", images=root)
    assert tr.images == [os.path.join(root, a), os.path.join(root, b)]
    assert tr.captions == ["a farm", "houses", "fields green"] and tr.txt_to_img == [0, 1, 0]
    te = read_split(prefix, "test", "harma", images=root)
    assert te.n_images == 2 and te.n_captions == 4 and te.txt_to_img == [0, 0, 0, 1]
    json.dump([{"image": "gone.jpg", "caption": ["c"]}], open(prefix + "_val.json", "w"))
    with pytest.raises(DataError, match=r"rsitmd_val.json entry 0: image 'gone.jpg' not found"):
        read_split(prefix, "val", images=root)
    json.dump([{"image": a, "caption": ["ok", " ?! "]}], open(prefix + "_val.json", "w"))
    with pytest.raises(DataError, match=r"rsitmd_val.json entry 0: empty caption"):
        read_split(prefix, "val", images=root)


def test_karpathy_json(tmp_path):
    root = str(tmp_path / "imgs")
    names = [_img(root, f"{i}.png") for i in range(3)]
    path = str(tmp_path / "dataset_rsicd.json")
    ims = [{"filename": names[0], "split": "train", "sentences": [{"raw": "One."}, {"raw": "Two"}]},
           {"filename": names[1], "split": "test", "sentences": [{"raw": "three"}]},
           {"filename": names[2], "split": "restval", "sentences": [{"tokens": ["four", "words"]}]}]
    json.dump({"images": ims}, open(path, "w"))
    assert detect_format(path) == "karpathy"
    tr = read_split(path, "train", images=root)
    assert tr.captions == ["one", "two", "four words"] and tr.txt_to_img == [0, 0, 1]
    assert read_split(path, "test", images=root).captions == ["three"]
    ims[1]["split"] = "dev"
    json.dump({"images": ims}, open(path, "w"))
    with pytest.raises(DataError, match=r"images\[1\]: unknown split 'dev'"):
        read_split(path, "train", images=root)


@pytest.mark.parametrize("per_caption", [True, False])
def test_precomp_txt(tmp_path, per_caption):
    root = str(tmp_path / "imgs")
    names = [_img(root, f"{i}.tif") for i in range(2)]
    d = tmp_path / "rsitmd_precomp"
    d.mkdir()
    caps = ["a b", "c d", "e f", "g h"]  # 2 per image
    (d / "test_caps.txt").write_text("\n".join(caps) + "\n")
    files = [names[0], names[0], names[1], names[1]] if per_caption else names
    (d / "test_filename.txt").write_text("\n".join(files) + "\n")
    assert detect_format(str(d)) == "precomp"
    s = read_split(str(d), "test", images=root)
    assert s.n_images == 2 and s.txt_to_img == [0, 0, 1, 1] and s.captions == caps
    (d / "test_filename.txt").write_text("\n".join(names + [names[0]]) + "\n")
    with pytest.raises(DataError, match="test_caps.txt has 4 captions"):
        read_split(str(d), "test", images=root)


def test_georsclip_csv(tmp_path):
    root = str(tmp_path / "imgs")
    names = [_img(root, f"{i}.jpg") for i in range(2)]
    one = tmp_path / "rs.csv"
    one.write_text(f"filename,title,split\n{names[0]},A River.,train\n{names[1]},Dense houses,test\n{names[0]},River bank,train\n",
                   encoding="latin-1")
    assert detect_format(str(one)) == "csv"
    tr = read_split(str(one), "train", images=root, encoding="latin-1")
    assert tr.captions == ["a river", "river bank"] and tr.txt_to_img == [0, 0]
    (tmp_path / "geo_val.csv").write_text(f"filename,title\n{names[1]},Café roofs\n", encoding="utf-8")
    assert read_split(str(tmp_path / "geo"), "val", "csv", images=root).captions == ["café roofs"]
    one.write_text(f"filename,title,split\n{names[0]},x,holdout\n")
    with pytest.raises(DataError, match=r"rs.csv row 2: unknown split 'holdout'"):
        read_split(str(one), "train", images=root)
    (tmp_path / "bad.csv").write_text("file,caption\na.jpg,x\n")
    with pytest.raises(DataError, match="expected columns 'filename' and 'title'"):
        read_split(str(tmp_path / "bad.csv"), "train", images=root)
    with pytest.raises(DataError, match="cannot tell the format"):
        read_split(str(tmp_path / "nothing"), "train")


# --------------------------------------------------------------------------------------------------
# contrastive_loss


def _features(b, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(dtype)
    txt = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(dtype)
    ids = torch.randint(0, max(b // 2, 1), (b,), generator=g)  # repeated ids: several captions of one image
    return img, txt, ids


@pytest.mark.parametrize("b,d", [(13, 32), (7, 5), (1, 8)])
def test_contrastive_loss_matches_oracle(b, d):
    from rspeft_fast import contrastive_loss

    img, txt, ids = _features(b, d, torch.float32, seed=b)
    tau = torch.tensor(0.07)
    out, grads = run_fwd_bwd(lambda i, t, s: contrastive_loss(i, t, ids=ids, temperature=s), img, txt, tau)
    eager, eg = run_fwd_bwd(lambda i, t, s: contrastive_loss_ref(i, t, ids, s, dtype=torch.float32), img, txt, tau)
    ref, rg = run_fwd_bwd(lambda i, t, s: contrastive_loss_ref(i, t, ids, s), img.double(), txt.double(), tau.double())
    assert out.dtype == torch.float32
    assert_fused_close(out, eager.float(), ref, name="contrastive loss")
    assert_fused_close(list(grads), [g.float() for g in eg], list(rg), name="contrastive grads (img, txt, temperature)")
    if b > 1:
        assert all(g is not None and g.abs().sum() > 0 for g in grads[:2])
    else:  # one pair: softmax over one logit, the loss is exactly 0
        assert out.item() == 0.0


def test_contrastive_loss_targets_dtype_and_errors():
    from rspeft_fast import contrastive_loss

    img, txt, _ = _features(9, 16, torch.float32, seed=3)
    # ids=None: the pair is the only positive, as ids = arange
    assert torch.equal(contrastive_loss(img, txt), contrastive_loss(img, txt, ids=torch.arange(9)))
    # soft targets differ from one-hot ones when ids repeat
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5])
    assert not torch.allclose(contrastive_loss(img, txt, ids=ids), contrastive_loss(img, txt))
    # 16-bit features and autocast: computed in fp32
    lo = contrastive_loss(img.bfloat16(), txt.bfloat16(), ids=ids, temperature=0.05)
    assert lo.dtype == torch.float32
    assert_fused_close(lo, contrastive_loss_ref(img.bfloat16(), txt.bfloat16(), ids, 0.05, dtype=torch.bfloat16).float(),
                       contrastive_loss_ref(img.bfloat16().double(), txt.bfloat16().double(), ids, 0.05), name="bf16 features")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert contrastive_loss(img, txt, ids=ids).dtype == torch.float32
    with pytest.raises(ValueError, match="both be"):
        contrastive_loss(img, txt[:3])
    with pytest.raises(ValueError, match="ids must be integer"):
        contrastive_loss(img, txt, ids=torch.zeros(9))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        contrastive_loss(img, txt, temperature=0.0)
    with pytest.raises(RuntimeError, match="process group"):
        contrastive_loss(img, txt, gather=True)


def test_embedded_scene_set_is_deterministic_with_distinct_paraphrases():
    from rspeft_fast.data.scenes import COLOURS, COVERS, LAYOUTS, CaptionedScenes

    a = CaptionedScenes.split("val", scale=0.1)
    b = CaptionedScenes.split("val", scale=0.1)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and a.txt_to_img == b.txt_to_img
    assert a.images.shape == (6, 3, 32, 32) and a.images.dtype == torch.uint8 and a.images.float().std() > 20
    assert len(a.captions) == 5 * 6 and a.txt_to_img == [i for i in range(6) for _ in range(5)]
    for i, (cover, colour, layout) in enumerate(a.attributes):
        caps = a.captions[5 * i:5 * i + 5]
        assert len(set(caps)) == 5  # paraphrases, not copies
        for c in caps:  # each names the three attributes in one of their wordings
            low = c.lower()
            assert any(w in low for w in COVERS[cover]) and any(w in low for w in COLOURS[colour][1])
            assert any(w in low for w in LAYOUTS[layout])
    assert not torch.equal(CaptionedScenes.split("test", scale=0.1).images, a.images)  # disjoint draws per split


def test_retrieval_objective_is_contrastive_plus_weighted_triplet():
    """The job's objective: contrastive (ids, τ) + w * weighted triplet (margin, gamma, ids); diagonal_only drops the
    ids from the triplet term only (HarMA's mask), triplet_weight=0 leaves the contrastive term."""
    from rspeft_fast.reference.triplet import weighted_triplet_ref
    from rspeft_fast.retrieval.job import retrieval_loss

    img, txt, ids = _features(12, 16, torch.float32, seed=9)
    tau = torch.tensor(0.05)
    con = contrastive_loss_ref(img, txt, ids, tau)
    with_ids = weighted_triplet_ref(img.double(), txt.double(), 0.3, 1.5, False, ids)
    diag = weighted_triplet_ref(img.double(), txt.double(), 0.3, 1.5, False, None)
    assert diag > with_ids  # same-image captions count as negatives without ids
    kw = dict(margin=0.3, gamma=1.5, triplet_impl="reference")
    for w, d, trip in ((1.0, False, with_ids), (0.5, True, diag), (0.0, False, 0.0)):
        got = retrieval_loss(img, txt, tau, ids, triplet_weight=w, diagonal_only=d, **kw)
        want = con + w * trip
        assert_fused_close(got, (con.float() + w * torch.as_tensor(trip).float()), want, name=f"objective w={w} diagonal_only={d}")
