"""FD-shapes: the shipped encoder's Frechet distance is ~0 for a set against itself and grows with blur and noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.fid import feature_statistics, frechet_distance
from benchmarks.geneval.prompts import generate_metadata
from benchmarks.shapes.fd import encoder_features, fd_shapes, reference_renders
from benchmarks.shapes.probes import degrade
from rtdmd.errors import UserError
from rtdmd.world.shapes import WorldSpec, parse_caption, scene_for_metadata, scene_satisfies, to_uint8

SPEC = WorldSpec(classes=("circle", "square", "triangle", "cross"))
META = generate_metadata(list(SPEC.classes), per_task=8, exclude_color_class=None)


@pytest.fixture(scope="module")
def sets():
    torch.set_num_threads(1)
    ref = reference_renders(META, per_prompt=2, seed=0, spec=SPEC)
    gen = reference_renders(META, per_prompt=2, seed=1, spec=SPEC)  # other layouts and free colours
    return ref, gen


def test_reference_renders_are_deterministic_and_true(sets):
    ref, _ = sets
    assert ref.shape == (2 * len(META), 3, 32, 32) and ref.dtype == torch.float32
    again = reference_renders(META[:3], per_prompt=2, seed=0, spec=SPEC)
    assert torch.equal(again, ref[:6])  # prompt-major, each image from (seed, prompt, k) alone
    from rtdmd.seeding import numpy_generator

    for i in (0, 5, len(META) - 1):
        scene = scene_for_metadata(META[i], numpy_generator(0, "fd-shapes-reference", i, 1), SPEC)
        assert scene_satisfies(scene, META[i])
    with pytest.raises(UserError):
        reference_renders(META, per_prompt=0, spec=SPEC)
    with pytest.raises(UserError):
        reference_renders([parse_caption("a photo of a ring")], spec=SPEC)  # not a class of this world


def test_fd_of_a_set_with_itself_is_zero(sets):
    ref, gen = sets
    # zero up to the matrix square root's rounding on a rank-deficient covariance (64-d features, 64 images)
    assert abs(fd_shapes(ref, ref)) < 1e-4 * fd_shapes(gen, ref)
    # the same images as uint8 arrays (as read from PNG files) give the same value
    assert fd_shapes(to_uint8(ref), ref) == pytest.approx(fd_shapes(ref, ref), abs=1e-3)


def test_fd_uses_the_one_frechet_function(sets):
    ref, gen = sets
    mu1, s1 = feature_statistics(encoder_features(gen))
    mu2, s2 = feature_statistics(encoder_features(ref))
    assert fd_shapes(gen, ref) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-9)


def test_fd_grows_with_blur_and_noise(sets):
    ref, gen = sets
    rng = np.random.default_rng(0)
    base = fd_shapes(gen, ref)
    blur = [fd_shapes(degrade(gen, rng, b, 0.0), ref) for b in (0.6, 1.2, 2.0)]
    noise = [fd_shapes(degrade(gen, rng, 0.0, n), ref) for n in (0.03, 0.08, 0.15)]
    assert base < blur[0] < blur[1] < blur[2]
    assert base < noise[0] < noise[1] < noise[2]


def test_input_errors(sets):
    ref, _ = sets
    with pytest.raises(UserError, match="at least 2"):
        fd_shapes(ref[:1], ref)
    with pytest.raises(UserError, match="FD-shapes takes"):
        fd_shapes(ref.numpy().transpose(0, 2, 3, 1), ref)  # float HWC is ambiguous: refused
