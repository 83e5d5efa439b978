"""SyntheticShapes: determinism, disjoint splits, geometry, captions, prompt list."""
import numpy as np
import pytest
import torch

from opensora_duca.data import synthetic as S
from opensora_duca.registry import DATASETS, build_module


def test_registered_and_item_format():
    ds = build_module(dict(type="SyntheticShapes", length=7), DATASETS)
    assert len(ds) == 7
    item = ds[3]
    v = item["video"]
    assert v.dtype == torch.float32 and v.shape == (3, 8, 32, 32)
    assert v.min() >= -1 and v.max() <= 1
    assert item["text"] == S.caption_for(item["color"], item["shape"], item["direction"])
    assert item["seed"] == 3


def test_same_seed_same_clip_and_dataset_seed_matters():
    a, b = S.SyntheticShapes(length=20), S.SyntheticShapes(length=20)
    for i in range(20):
        assert torch.equal(a[i]["video"], b[i]["video"]) and a[i]["text"] == b[i]["text"]
    c = S.SyntheticShapes(length=20, seed=1)
    assert any(not torch.equal(a[i]["video"], c[i]["video"]) for i in range(20))


def test_splits_disjoint():
    tr, ho = S.SyntheticShapes("train", length=500), S.SyntheticShapes("heldout", length=500)
    seeds_tr = {tr.item_seed(i) for i in range(len(tr))}
    seeds_ho = {ho.item_seed(i) for i in range(len(ho))}
    assert not seeds_tr & seeds_ho
    assert ho[0]["seed"] == S.HELDOUT_SEED_OFFSET
    # the clips differ too (same index, different split)
    assert sum(torch.equal(tr[i]["video"], ho[i]["video"]) for i in range(50)) < 5


def test_motion_and_frame_bounds():
    ds = S.SyntheticShapes("heldout", length=200)
    seen = set()
    for i in range(200):
        it = ds[i]
        seen.add((it["color"], it["shape"], it["direction"]))
        fg = (it["video"] > -1).any(0)  # [T, H, W]
        dx, dy = S.DIRECTION_VECTORS[it["direction"]]
        area = S.shape_mask(it["shape"]).sum()
        cs = []
        for t in range(8):
            assert fg[t].sum() == area  # whole shape inside the frame in every frame
            ys, xs = torch.nonzero(fg[t], as_tuple=True)
            cs.append((xs.float().mean(), ys.float().mean()))
        assert torch.isclose(cs[-1][0] - cs[0][0], torch.tensor(float(dx * S.SPEED * 7)))
        assert torch.isclose(cs[-1][1] - cs[0][1], torch.tensor(float(dy * S.SPEED * 7)))
    assert len({c for c, _, _ in seen}) == len(S.COLORS)
    assert {d for _, _, d in seen} == set(S.DIRECTIONS)


def test_edge_start_crosses_the_frame():
    rnd, edge = S.SyntheticShapes("heldout", length=120), \
        S.SyntheticShapes("heldout", length=120, start="edge")
    far = S.IMAGE_SIZE - S.SHAPE_SIZE
    for i in range(120):
        a, b = rnd[i], edge[i]
        # the same attributes and random stream; only the start along the motion changes
        assert (a["text"], a["direction"]) == (b["text"], b["direction"])
        dx, dy = S.DIRECTION_VECTORS[b["direction"]]
        x_last, y_last = b["x0"] + dx * S.SPEED * 7, b["y0"] + dy * S.SPEED * 7
        if dx:  # starts touching the border behind it, the orthogonal coordinate as before
            assert b["x0"] == (far if dx < 0 else 0) and b["y0"] == a["y0"]
            assert 0 <= x_last <= far
        elif dy:
            assert b["y0"] == (far if dy < 0 else 0) and b["x0"] == a["x0"]
            assert 0 <= y_last <= far
        else:
            assert (b["x0"], b["y0"]) == (a["x0"], a["y0"])
            assert torch.equal(a["video"], b["video"])
    with pytest.raises(ValueError, match=r"start='middle'.*accepted.*edge"):
        S.SyntheticShapes(start="middle")


def test_cross_start_is_edge_start_centred_across_the_motion():
    edge, cross = S.SyntheticShapes("train", length=120, start="edge"), \
        S.SyntheticShapes("train", length=120, start="cross")
    mid = (S.IMAGE_SIZE - S.SHAPE_SIZE) // 2
    for i in range(120):
        a, b = edge[i], cross[i]
        assert a["text"] == b["text"]
        dx, dy = S.DIRECTION_VECTORS[b["direction"]]
        if dx:
            assert (b["x0"], b["y0"]) == (a["x0"], mid)
        elif dy:
            assert (b["x0"], b["y0"]) == (mid, a["y0"])
        else:
            assert torch.equal(a["video"], b["video"])
        fg = (b["video"] > -1).any(0)  # the whole shape stays inside: same area every frame
        assert all(fg[t].sum() == S.shape_mask(b["shape"]).sum() for t in range(8))


def test_centre_start_is_cross_start_with_still_shapes_in_the_centre():
    cross, centre = S.SyntheticShapes("train", length=120, start="cross"), \
        S.SyntheticShapes("train", length=120, start="centre")
    mid = (S.IMAGE_SIZE - S.SHAPE_SIZE) // 2
    stills = 0
    for i in range(120):
        a, b = cross[i], centre[i]
        assert a["text"] == b["text"]
        if b["direction"] == "still":
            stills += 1
            assert (b["x0"], b["y0"]) == (mid, mid)
            assert torch.equal(b["video"][:, 0], b["video"][:, -1])
        else:
            assert torch.equal(a["video"], b["video"])
    assert stills > 10


def test_captions_and_prompts():
    assert S.caption_for("red", "circle", "left") == "a red circle moving left"
    assert S.caption_for("blue", "square", "still") == "a blue square staying still"
    assert S.parse_caption("A Blue square, staying still.") == dict(
        color="blue", shape="square", direction="still")
    prompts = S.caption_set()
    assert len(prompts) == len(set(prompts)) == 105 >= 50
    assert set(prompts) == set(S.all_captions())
    assert prompts == S.caption_set()  # fixed
    first = S.caption_set(35)
    assert {S.parse_caption(p)["color"] for p in first} == set(S.COLORS)
    assert {S.parse_caption(p)["direction"] for p in first} == set(S.DIRECTIONS)
    words = {w for p in prompts for w in p.split()}
    assert words == set(S.VOCABULARY)


@pytest.mark.parametrize("kwargs,key", [
    (dict(split="test"), "split"), (dict(length=0), "length"),
    (dict(image_size=12), "image_size"), (dict(num_frames=0), "num_frames")])
def test_bad_arguments_name_key(kwargs, key):
    with pytest.raises(ValueError) as e:
        S.SyntheticShapes(**kwargs)
    assert key in str(e.value) or "fit" in str(e.value)


def test_bad_values_name_key_value_and_accepted():
    with pytest.raises(ValueError, match=r"color='purple'.*accepted.*red"):
        S.caption_for("purple", "circle", "left")
    with pytest.raises(ValueError, match="accepted"):
        S.parse_caption("a purple circle moving left")
    with pytest.raises(IndexError):
        S.SyntheticShapes(length=3)[3]


def test_to_uint8_roundtrip():
    it = S.SyntheticShapes(length=1)[0]
    u8 = S.to_uint8(it["video"])
    assert u8.dtype == np.uint8 and u8.shape == (8, 32, 32, 3)
    assert torch.equal(S.to_tensor(u8), it["video"])
