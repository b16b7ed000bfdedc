"""Tests of the drawings (``maskrcnn.visualize``): masks marked so that
they stand out from objects of their own colour, captions sized to the
image and never overlapping."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskrcnn.visualize import (blend_masks, caption_font, detection_grid, draw_detections, label_color,
                                place_captions, text_color)


def test_mask_has_outline_stripes_and_dark_rim_even_on_an_object_of_its_colour():
    colour = label_color(1)
    pixels = torch.tensor(colour, dtype=torch.uint8).expand(40, 40, 3).clone()  # a flat object of that colour
    pixels[:, :5] = 0  # and a dark strip at the left
    masks = torch.zeros(1, 1, 40, 40)
    masks[0, 0, 10:30, 10:30] = 1
    out = blend_masks(pixels, masks, torch.tensor([1]), threshold=0.5, alpha=0.35, outline=2)
    assert out[10, 20].tolist() == list(colour) and out[29, 20].tolist() == list(colour)  # the edge
    assert (out[9, 20] < pixels[9, 20]).all()  # the rim just outside is darker
    assert torch.equal(out[:8], pixels[:8])  # away from the mask: untouched
    inside = out[12:28, 12:28].reshape(-1, 3)
    assert len({tuple(p) for p in inside.tolist()}) == 1  # tint and stripes agree on a flat colour...
    grey = torch.full((40, 40, 3), 128, dtype=torch.uint8)
    striped = blend_masks(grey, masks, torch.tensor([1]), threshold=0.5, alpha=0.35, outline=2)[12:28, 12:28]
    assert len({tuple(p) for p in striped.reshape(-1, 3).tolist()}) == 2  # ...and show as stripes elsewhere


def test_overlapping_masks_best_wins_with_an_edge_between():
    masks = torch.zeros(2, 1, 30, 30)
    masks[0, 0, 5:20, 5:20] = 1
    masks[1, 0, 10:25, 10:25] = 1
    out = blend_masks(torch.full((30, 30, 3), 128, dtype=torch.uint8), masks, torch.tensor([1, 2]), threshold=0.5,
                      alpha=0.35, outline=1, hatch=0)
    assert out[19, 15].tolist() == list(label_color(1))  # first detection's edge over the second's area
    assert out[20, 15].tolist() == list(label_color(2))  # the second's edge next to it


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 190), st.integers(0, 190), st.integers(4, 120), st.integers(4, 120),
                          st.integers(20, 90), st.integers(8, 20)), min_size=1, max_size=25))
def test_captions_never_overlap_and_stay_inside(specs):
    boxes = [(x, y, min(x + w, 200), min(y + h, 200)) for x, y, w, h, _, _ in specs]
    sizes = [(cw, ch) for *_, cw, ch in specs]
    places = place_captions(boxes, sizes, width=200, height=200)
    placed = [p for p in places if p is not None]
    for i, a in enumerate(placed):
        assert 0 <= a[0] and 0 <= a[1] and a[2] <= 200 and a[3] <= 200
        for b in placed[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    for place, (w, h) in zip(places, sizes):
        assert place is None or (place[2] - place[0], place[3] - place[1]) == (w, h)
    assert places[0] is not None  # the best detection always gets its caption


def test_caption_goes_above_its_box_when_there_is_room():
    assert place_captions([(50, 60, 120, 140)], [(40, 12)], width=200, height=200) == [(50, 48, 90, 60)]
    # No room above: as high as the image allows, over the box's top edge.
    assert place_captions([(50, 5, 120, 140)], [(40, 12)], width=200, height=200) == [(50, 0, 90, 12)]
    # Taken by a better detection's caption: right above that one.
    assert place_captions([(50, 60, 120, 140)] * 2, [(40, 12)] * 2, width=200, height=200) == [
        (50, 48, 90, 60), (50, 36, 90, 48)]


def test_captions_scale_with_the_image_and_contrast_with_their_background():
    assert caption_font(128, 128).size == 11 and caption_font(256, 256).size == 12
    assert caption_font(800, 1333).size == 36 and caption_font(480, 640).size == 22
    assert text_color((255, 255, 0)) == (0, 0, 0) and text_color((40, 40, 200)) == (255, 255, 255)


def test_drawn_picture_of_crowded_detections():
    """Many detections of one spot: every caption drawn is apart, and the
    picture has the image's size."""
    image = torch.rand(3, 256, 256)
    count = 12
    boxes = torch.tensor([[100.0 + i, 100.0 + i, 160.0 + i, 150.0 + i] for i in range(count)])
    masks = torch.zeros(count, 1, 256, 256)
    masks[:, :, 110:140, 110:150] = 1
    found = dict(boxes=boxes, labels=torch.arange(count) % 3 + 1, scores=torch.linspace(0.99, 0.5, count),
                 masks=masks)
    drawn = draw_detections(image, found, class_names=["bg", "circle", "square", "triangle"])
    assert drawn.size == (256, 256) and drawn.mode == "RGB"
    grid = detection_grid([image, image[:, :128]], [found, {k: v[:0] for k, v in found.items()}],
                          class_names=["bg", "circle", "square", "triangle"], scale=2)
    assert grid.size == (2 * (512 + 4) + 4, 512 + 4 + 4)
    assert np.asarray(grid).shape == (520, 1036, 3)
