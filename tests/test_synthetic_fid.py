"""The synthetic echoes have structure Inception sees: FID between two disjoint sets of them is
far below FID to a differently-parametrised set or to noise.

With 36 images per set FID carries a large small-sample bias (identical distributions do not give
~0), so the check is relative; the margins below are 2-4x what was measured (51 vs 175 vs 443 at 32
images per set).
"""

import numpy as np
import pytest

from pipelines.data.synthetic_echonet import synthetic_frames
from pipelines.evaluation.fid import InceptionDetector, compute_features, feature_statistics, frechet_distance

N = 36  # per set; 4 sets ~ 15 s of Inception on 2 CPU cores


@pytest.fixture(scope="module")
def statistics():
    detector = InceptionDetector()
    sets = {
        "a": synthetic_frames(N, seed=0, frames_per_video=2),
        "b": synthetic_frames(N, seed=1, frames_per_video=2),
        "shifted": synthetic_frames(N, seed=2, parametrisation="shifted", frames_per_video=2),
        "noise": np.random.default_rng(0).integers(0, 256, (N, 1, 64, 64), dtype=np.uint8),
    }
    return {name: feature_statistics(compute_features(images, detector, batch_size=36)) for name, images in sets.items()}


def test_disjoint_sets_close_shifted_and_noise_far(statistics):
    fid_same = frechet_distance(*statistics["a"], *statistics["b"])
    fid_shifted = frechet_distance(*statistics["a"], *statistics["shifted"])
    fid_noise = frechet_distance(*statistics["a"], *statistics["noise"])
    assert fid_same < 0.5 * fid_shifted
    assert fid_same < 0.25 * fid_noise
    assert frechet_distance(*statistics["b"], *statistics["shifted"]) > 2 * fid_same
