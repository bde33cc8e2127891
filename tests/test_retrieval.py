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


def test_recall_at_k_default_keys_and_errors():
    sim = torch.rand(6, 12)
    t2i = torch.arange(12) % 6
    m = recall_at_k(sim, t2i)
    assert set(m) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean",
                      "ties", "tied_queries", "nan_queries"}
    assert m["ties"] == "argsort" and m["tied_queries"] == 0 and m["nan_queries"] == 0
    with pytest.raises(ValueError, match="N_img, N_txt"):
        recall_at_k(torch.rand(12), t2i)
    with pytest.raises(ValueError, match="txt_to_img"):
        recall_at_k(sim, t2i[:5])
    with pytest.raises(ValueError, match="no|none"):
        recall_at_k(torch.rand(7, 12), t2i)  # image 6 has no caption


@pytest.mark.parametrize("call, match", [
    (lambda: recall_at_k(torch.rand(0, 0), torch.zeros(0, dtype=torch.long)), r"sim is empty \(0, 0\)"),
    (lambda: recall_at_k(torch.rand(3, 3), torch.arange(3), ks=()), r"ks is empty"),
    (lambda: recall_at_k(torch.rand(3, 3), torch.arange(3), ks=(0,)), r"ks must be positive ints, got 0"),
    (lambda: recall_at_k(torch.rand(3, 3), torch.arange(3), ks=(1.5,)), r"ks must be positive ints, got 1.5"),
    (lambda: recall_at_k(torch.rand(3, 3), torch.arange(3), ks=5), r"ks must be a sequence"),
    (lambda: recall_at_k(torch.rand(3, 3), torch.arange(3), chunk=0), r"chunk must be a positive int, got 0"),
    (lambda: recall_at_k(torch.rand(3, 3), torch.tensor([0.0, 1.7, 2.2])), r"txt_to_img must be integer"),
    (lambda: recall_at_k(torch.rand(3, 3), [0, 1.7, 2]), r"txt_to_img must be integer"),
    (lambda: recall_at_k(torch.rand(3, 3), torch.arange(3), ties="optimistic"), r"ties='optimistic'"),
])
def test_recall_at_k_rejects_bad_arguments_in_one_line(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value) and str(e.value).startswith("recall_at_k: ")


def _itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """HarMA's evaluator, ported literally (``Retrieval.py:itm_eval``, from AMFMN / PIR): numpy in, rounded out."""
    import numpy as np

    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    r_mean = (tr_mean + ir_mean) / 2
    return {"txt_r1": round(tr1, 2), "txt_r5": round(tr5, 2), "txt_r10": round(tr10, 2), "img_r1": round(ir1, 2),
            "img_r5": round(ir5, 2), "img_r10": round(ir10, 2), "r_mean": round(r_mean, 2)}


def _tied_problem(seed, dtype):
    """Similarities with exact ties of the RSICD kind (identical captions under different images: equal columns)
    and of the coarse kind (few distinct values), 40 images with 1-6 captions each (over 16 per row: numpy's
    introsort is not stable there, so the order among equals is numpy's own)."""
    g = torch.Generator().manual_seed(seed)
    n_img = 40
    per = torch.randint(1, 7, (n_img,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(n_img), per)
    t2i = t2i[torch.randperm(t2i.numel(), generator=g)]
    n_txt = t2i.numel()
    sim = torch.randint(0, 6, (n_img, n_txt), generator=g).to(dtype) / 8  # coarse: many equal scores
    sim[t2i, torch.arange(n_txt)] += 0.25
    dup = torch.randperm(n_txt, generator=g)[:n_txt // 3]
    sim[:, dup] = sim[:, dup.roll(1)]  # identical caption embeddings: bitwise-equal columns
    sim[:3] = sim[3:6]  # and a few identical images
    return sim, t2i


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recall_at_k_argsort_ties_match_harmas_itm_eval(seed, dtype):
    sim, t2i = _tied_problem(seed, dtype)
    s = sim.numpy()
    img2txt = {i: [j for j in range(t2i.numel()) if t2i[j] == i] for i in range(sim.shape[0])}
    want = _itm_eval(s, s.T, {j: int(t2i[j]) for j in range(t2i.numel())}, img2txt)
    got = recall_at_k(sim, t2i, chunk=7)
    assert got["ties"] == "argsort" and got["tied_queries"] > 10
    for k, v in want.items():
        assert round(got[k], 2) == v, (k, got[k], v)
    # the pessimistic rule: every equal score against the model (brute force), never above argsort
    pess = recall_at_k(sim, t2i, chunk=7, ties="pessimistic")
    assert pess["ties"] == "pessimistic" and pess["tied_queries"] == got["tied_queries"]
    n_img, n_txt = sim.shape
    r_i2t = [int(((sim[i] >= sim[i][t2i == i].max()) & (t2i != i)).sum()) for i in range(n_img)]
    r_t2i = [int(((sim[:, j] >= sim[t2i[j], j]) & (torch.arange(n_img) != t2i[j])).sum()) for j in range(n_txt)]
    for k in (1, 5, 10):
        assert pess[f"txt_r{k}"] == pytest.approx(100.0 * sum(r < k for r in r_i2t) / n_img)
        assert pess[f"img_r{k}"] == pytest.approx(100.0 * sum(r < k for r in r_t2i) / n_txt)
        assert pess[f"txt_r{k}"] <= got[f"txt_r{k}"] and pess[f"img_r{k}"] <= got[f"img_r{k}"]
    assert pess["r_mean"] < got["r_mean"]


def test_recall_at_k_constant_similarities_rank_by_rule():
    t2i = torch.arange(12) % 6
    flat = recall_at_k(torch.ones(6, 12), t2i, ks=(1, 5), ties="pessimistic")
    assert flat["txt_r1"] == 0.0 and flat["img_r1"] == 0.0 and flat["img_r5"] == 0.0  # a collapsed model gets nothing
    assert flat["tied_queries"] == 6 + 12
    assert recall_at_k(torch.ones(6, 12), t2i)["tied_queries"] == 6 + 12


def test_recall_at_k_keeps_float64():
    # the true match beats the others by 1e-12: equal in float32, not in float64
    sim = torch.full((4, 4), 0.3, dtype=torch.float64)
    sim += torch.eye(4, dtype=torch.float64) * 1e-12
    for ties in ("argsort", "pessimistic"):
        m = recall_at_k(sim, torch.arange(4), ks=(1,), ties=ties)
        assert m["txt_r1"] == 100.0 and m["img_r1"] == 100.0 and m["tied_queries"] == 0, ties


def test_recall_at_k_nan_ranks_last():
    t2i = torch.arange(5)
    sim = torch.eye(5) + 0.01 * torch.arange(25.0).reshape(5, 5)
    sim[0, 0] = float("nan")  # image 0's true caption: NaN, ranks last both ways
    sim[2, 3] = float("nan")  # a NaN negative never ranks above the true match
    for ties in ("argsort", "pessimistic"):
        m = recall_at_k(sim, t2i, ks=(1, 4, 5), ties=ties)
        assert m["txt_r1"] == 80.0 and m["img_r1"] == 80.0, ties  # only query 0 misses
        assert m["txt_r4"] == 80.0 and m["txt_r5"] == 100.0  # rank 4 of 5: last
        assert m["nan_queries"] == 2 + 2
    nan = recall_at_k(torch.full((5, 5), float("nan")), t2i, ks=(1, 4))
    assert nan["r_mean"] == 0.0 and nan["nan_queries"] == 10


def test_selectable_refuses_nan_evaluations():
    from rspeft_fast.retrieval import selectable

    good = recall_at_k(torch.eye(3), torch.arange(3))
    assert selectable(good)
    bad = recall_at_k(torch.eye(3).masked_fill(torch.eye(3, dtype=torch.bool), float("nan")), torch.arange(3))
    assert bad["nan_queries"] == 6 and not selectable(bad)
    assert not selectable({**good, "r_mean": float("nan")}) and not selectable({})


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


def test_harma_train_image_must_agree_with_its_image_id(tmp_path):
    root = str(tmp_path / "imgs")
    a = _img(root, "a.jpg")
    prefix = str(tmp_path / "rsitmd")
    # entry 1 names a file that does not exist, under image 0's id: HarMA would load it and fail mid-training
    json.dump([{"image": a, "caption": "A farm.", "image_id": 0}, {"image": "gone.jpg", "caption": "Houses", "image_id": 0}],
              open(prefix + "_train.json", "w"))
    with pytest.raises(DataError, match=r"rsitmd_train.json entry 1: image 'gone.jpg' disagrees with its image_id 0, "
                                        r"which .*rsitmd_train.json entry 0 gives to image 'a.jpg'"):
        read_split(prefix, "train", images=root)


def test_captions_are_cut_at_harmas_30_words(tmp_path):
    from rspeft_fast.retrieval.readers import MAX_WORDS
    from rspeft_fast.retrieval.recipe import HARMA_RECIPE

    assert MAX_WORDS == HARMA_RECIPE.max_words == 30
    root = str(tmp_path / "imgs")
    a = _img(root, "a.jpg")
    prefix = str(tmp_path / "d")
    words = " ".join(f"w{i}" for i in range(40))
    json.dump([{"image": a, "caption": [words]}], open(prefix + "_test.json", "w"))
    assert read_split(prefix, "test", "harma", images=root).captions == [" ".join(f"w{i}" for i in range(30))]
    assert read_split(prefix, "test", "harma", images=root, max_words=None).captions == [words]
    with pytest.raises(DataError, match=r"--max-words 0: expected a positive int"):
        read_split(prefix, "test", "harma", images=root, max_words=0)


def test_data_errors_are_one_complete_line(tmp_path):
    root = str(tmp_path / "imgs")
    names = [_img(root, f"{i}.jpg") for i in range(3)]
    prefix = str(tmp_path / "rsitmd")
    json.dump([{"image": n, "caption": ["c one", "c two"]} for n in names], open(prefix + "_test.json", "w"))
    # a missing --images folder: one line, not one per image
    with pytest.raises(DataError) as e:
        read_split(prefix, "test", "harma", images=str(tmp_path / "nowhere"))
    assert str(e.value) == f"--images {tmp_path / 'nowhere'}: no such folder"
    # a Karpathy file is one .json; a HarMA prefix given to --format karpathy says so
    with pytest.raises(DataError) as e:
        read_split(prefix, "test", "karpathy", images=root)
    msg = str(e.value)
    assert "--format karpathy reads one .json file" in msg and "no such file" in msg and "\n" not in msg
    json.dump([], open(prefix + "_train.json", "w"))
    with pytest.raises(DataError, match=r"rsitmd_train.json exists: that is --format harma"):
        read_split(prefix, "test", "karpathy", images=root)
    # a HarMA format given one file
    one = str(tmp_path / "dataset_rsicd.json")
    json.dump({"images": []}, open(one, "w"))
    with pytest.raises(DataError, match=r"dataset_rsicd.json_test.json: no such file; --format harma reads PREFIX_train.json.*"
                                        r"--format karpathy\?"):
        read_split(one, "test", "harma", images=root)
    # every message names its file once (a caller prints it as it is)
    for call in (lambda: read_split(prefix, "val", "harma", images=root),
                 lambda: read_split(str(tmp_path / "x.json"), "test", "karpathy", images=root)):
        with pytest.raises(DataError) as e:
            call()
        file = str(e.value).split(":")[0]
        assert os.path.basename(file) in ("rsitmd_val.json", "x.json") and str(e.value).count(file) == 1, str(e.value)
    # missing images: listed together under the file that names them
    json.dump([{"image": "gone1.jpg", "caption": ["c"]}, {"image": "gone2.jpg", "caption": ["c"]}], open(prefix + "_val.json", "w"))
    with pytest.raises(DataError) as e:
        read_split(prefix, "val", "harma", images=root)
    assert str(e.value).startswith(f"{prefix}_val.json: 2 image(s) missing:")


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
