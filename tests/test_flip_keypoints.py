"""Horizontal flips of targets with keypoints (maskrcnn/data/augment.py):
the left-right permutation derived from keypoint names (COCO's people give
the standard pairs), x' = W - x as the boxes, visibility kept, unlabeled
points (0, 0, 0), flipping twice is the identity, and the flipped
keypoints sit on the flipped image's pixels they marked."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.data import (
    SHAPE_KEYPOINT_NAMES,
    RandomHorizontalFlip,
    ShapesDataset,
    flip_keypoints,
    horizontal_flip,
    keypoint_flip_permutation,
)

# COCO's person keypoints, in the order of its person_keypoints files.
COCO_PERSON_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)  # fmt: skip


def test_coco_person_names_give_the_standard_pairs():
    assert keypoint_flip_permutation(COCO_PERSON_KEYPOINT_NAMES) == [
        0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]  # fmt: skip


def test_permutation_ignores_case_and_keeps_unsided_names():
    names = ["Left Hand", "head", "right-foot", "RIGHT HAND", "left-foot", "leftover", "brightness"]
    # "leftover" and "brightness" contain the letters but not the words.
    assert keypoint_flip_permutation(names) == [3, 1, 4, 0, 2, 5, 6]
    # The shapes' corners name no side: the names alone keep them in place.
    assert keypoint_flip_permutation(SHAPE_KEYPOINT_NAMES) == [0, 1, 2, 3]


@pytest.mark.parametrize("names, message", [
    (["left_eye", "nose"], r"'left_eye' has no mirror keypoint 'right_eye'"),
    (["Nose", "nose"], "differ only in case"),
])  # fmt: skip
def test_permutation_rejects_names_without_a_mirror(names, message):
    with pytest.raises(ValueError, match=message):
        keypoint_flip_permutation(names)


def random_keypoints(count: int, num_keypoints: int, width: int, height: int, seed: int = 0) -> torch.Tensor:
    """[count, J, 3] keypoints with visibilities 0, 1, 2; unlabeled ones (0, 0, 0)."""
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, num_keypoints, 2, generator=generator) * torch.tensor([width, height])
    visibility = torch.randint(0, 3, (count, num_keypoints, 1), generator=generator).float()
    return torch.cat([xy, visibility], dim=-1) * (visibility > 0)


def test_flip_twice_is_the_identity_and_keeps_visibility():
    permutation = keypoint_flip_permutation(COCO_PERSON_KEYPOINT_NAMES)
    keypoints = random_keypoints(5, 17, width=60, height=40)
    assert (keypoints[..., 2] == 0).any() and (keypoints[..., 2] == 1).any()
    once = flip_keypoints(keypoints, 60, permutation)
    assert torch.equal(once[..., 2], keypoints[:, permutation, 2])
    torch.testing.assert_close(once[..., 0], torch.where(keypoints[:, permutation, 2] > 0,
                                                         60 - keypoints[:, permutation, 0], 0.0))
    assert torch.equal(once[..., 1], keypoints[:, permutation, 1])
    assert torch.equal(once[once[..., 2] == 0], torch.zeros(int((once[..., 2] == 0).sum()), 3))
    twice = flip_keypoints(once, 60, permutation)
    assert torch.equal(twice[..., 1:], keypoints[..., 1:])
    torch.testing.assert_close(twice, keypoints, rtol=0, atol=4e-6)  # 60 - (60 - x) rounds in float32
    assert flip_keypoints(keypoints[:0], 60, permutation).shape == (0, 17, 3)


def test_flipped_keypoints_mark_the_flipped_pixels():
    """A dot of brightness (j + 1) / J at the pixel of each labeled keypoint
    j (at its centre): in the flipped image, keypoint j's pixel has the
    brightness of the keypoint it was before the swap."""
    height, width, num_keypoints = 24, 37, len(COCO_PERSON_KEYPOINT_NAMES)
    permutation = keypoint_flip_permutation(COCO_PERSON_KEYPOINT_NAMES)
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randperm(height * width, generator=generator)[:num_keypoints]  # distinct pixels
    rows, columns = pixels // width, pixels % width
    visibility = torch.tensor([2.0, 1.0, 0.0] * 6)[:num_keypoints]
    keypoints = torch.stack([columns + 0.5, rows + 0.5, visibility], dim=1)[None]
    keypoints = keypoints * (visibility[None, :, None] > 0)
    image = torch.zeros(3, height, width)
    brightness = (torch.arange(num_keypoints) + 1.0) / num_keypoints
    labeled = visibility > 0
    image[:, rows[labeled], columns[labeled]] = brightness[labeled]
    boxes = torch.tensor([[0.0, 0.0, width, height]])
    flipped_image, flipped = horizontal_flip(image, {"boxes": boxes, "keypoints": keypoints},
                                             keypoint_permutation=permutation)
    assert torch.equal(flipped_image, image.flip(-1))
    for j in range(num_keypoints):
        x, y, v = flipped["keypoints"][0, j].tolist()
        assert v == visibility[permutation[j]]
        if v > 0:
            assert flipped_image[0, int(y), int(x)] == brightness[permutation[j]], j
        else:
            assert (x, y) == (0.0, 0.0)


def test_flip_needs_a_valid_permutation_for_keypoints():
    image, target = ShapesDataset(1, image_size=32, seed=1, keypoints=True)[0]
    with pytest.raises(ValueError, match="needs keypoint_permutation"):
        horizontal_flip(image, target)
    with pytest.raises(ValueError, match="swap pairs of the 4 keypoints"):
        horizontal_flip(image, target, keypoint_permutation=[0, 1, 2])
    with pytest.raises(ValueError, match="its own inverse"):
        RandomHorizontalFlip(1.0, keypoint_permutation=[1, 2, 0, 3])
    # Targets without keypoints flip as before, with or without one.
    plain = {key: value for key, value in target.items() if key != "keypoints"}
    assert torch.equal(horizontal_flip(image, plain)[1]["boxes"],
                       horizontal_flip(image, plain, keypoint_permutation=[0, 1, 2, 3])[1]["boxes"])


def test_random_flip_flips_keypoints_with_the_boxes():
    image, target = ShapesDataset(1, image_size=(40, 56), seed=4, min_shapes=3, keypoints=True)[0]
    permutation = [0, 3, 2, 1]
    flipped_image, flipped = RandomHorizontalFlip(1.0, keypoint_permutation=permutation)(image, target)
    assert torch.equal(flipped["keypoints"], flip_keypoints(target["keypoints"], 56, permutation))
    # A labeled keypoint inside its box stays inside its flipped box.
    for boxes, keypoints in ((target["boxes"], target["keypoints"]), (flipped["boxes"], flipped["keypoints"])):
        x, labeled = keypoints[..., 0], keypoints[..., 2] > 0
        assert bool(((x >= boxes[:, :1]) & (x <= boxes[:, 2:3]) | ~labeled).all())
