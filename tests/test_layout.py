"""Layout chooser and validation: every world size 1..8 gets a valid layout on every model."""

from __future__ import annotations

import pytest

from comfyui_xdit_cogvideo.layout import Layout, LayoutError, candidate_layouts, check_layout, choose_layout

MODELS = {"2b": 30, "5b": 48, "tiny": 6}


@pytest.mark.parametrize("heads", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("use_cfg", [True, False])
def test_every_world_size_has_a_valid_layout(heads, world, use_cfg):
    layout = choose_layout(world, heads=heads, use_cfg=use_cfg)
    assert layout.world_size == world
    check_layout(layout, heads=heads, use_cfg=use_cfg, world_size=world)
    assert layout == candidate_layouts(world, heads=heads, use_cfg=use_cfg)[0]


def test_chooser_prefers_cfg_then_ulysses_then_ring():
    assert choose_layout(2, heads=30, use_cfg=True) == Layout(2, 1, 1)
    assert choose_layout(4, heads=48, use_cfg=True) == Layout(2, 2, 1)
    assert choose_layout(8, heads=48, use_cfg=True) == Layout(2, 4, 1)
    # 2b: 30 heads, ulysses 4 does not divide -> ulysses 2 x ring 2.
    assert choose_layout(8, heads=30, use_cfg=True) == Layout(2, 2, 2)
    assert choose_layout(4, heads=30, use_cfg=False) == Layout(1, 2, 2)
    assert choose_layout(7, heads=48, use_cfg=True) == Layout(1, 1, 7)
    assert choose_layout(5, heads=30, use_cfg=True) == Layout(1, 5, 1)
    assert choose_layout(6, heads=48, use_cfg=True) == Layout(2, 3, 1)


def test_partial_choice_fills_the_rest():
    assert choose_layout(8, heads=48, use_cfg=True, ulysses=2) == Layout(2, 2, 2)
    assert choose_layout(4, heads=48, use_cfg=True, cfg=1) == Layout(1, 4, 1)
    assert choose_layout(4, heads=30, use_cfg=True, ring=4) == Layout(1, 1, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(world=4, heads=30, use_cfg=True, ulysses=4), "does not divide the model's 30 attention heads"),
    (dict(world=2, heads=48, use_cfg=False, cfg=2), "needs classifier-free guidance"),
    (dict(world=4, heads=48, use_cfg=True, cfg=2, ulysses=4, ring=1), "uses 8 ranks but the pool has 4"),
    (dict(world=4, heads=48, use_cfg=True, cfg=3), "cfg degree must be 1 or 2"),
    (dict(world=3, heads=48, use_cfg=True, cfg=2), "no valid layout for 3 ranks"),
])
def test_impossible_layouts_are_explained(kwargs, match):
    world = kwargs.pop("world")
    with pytest.raises(LayoutError, match=match):
        choose_layout(world, **kwargs)


def test_parse():
    assert Layout.parse("cfg2xulysses2xring2") == Layout(2, 2, 2)
    assert Layout.parse("ring4") == Layout(1, 1, 4)
    assert Layout.parse("2,1,3") == Layout(2, 1, 3)
    with pytest.raises(LayoutError, match="cannot parse"):
        Layout.parse("pipefusion2")


def test_rank_coordinates_are_cfg_then_ring_then_ulysses():
    layout = Layout(2, 2, 2)
    assert [layout.coords(r) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
