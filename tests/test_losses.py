"""Values of the losses that `create_loss` builds, against hand-computed numbers."""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tabmodel.losses import CROSS_ENTROPY, FOCAL, create_loss  # noqa: E402

# One positive predicted at 0.8 and one negative predicted at 0.3, so the
# probability of the true class, p_t, is 0.8 and 0.7.
LABELS = np.array([[1.0], [0.0]], dtype="float32")
PREDICTIONS = np.array([[0.8], [0.3]], dtype="float32")

# Binary cross-entropy: mean of -log(p_t) = (-log 0.8 - log 0.7) / 2.
CROSS_ENTROPY_VALUE = (-math.log(0.8) - math.log(0.7)) / 2

# Focal loss with gamma=2: mean of (1 - p_t)^2 * -log(p_t)
# = (0.2^2 * 0.223144 + 0.3^2 * 0.356675) / 2 = 0.0205132.
FOCAL_VALUE = (0.2**2 * -math.log(0.8) + 0.3**2 * -math.log(0.7)) / 2

# With class balancing, alpha=0.25 weighs the positive row by 0.25 and the
# negative row by 0.75: (0.25 * 0.0089257 + 0.75 * 0.0321007) / 2 = 0.0131535.
BALANCED_FOCAL_VALUE = (
    0.25 * 0.2**2 * -math.log(0.8) + 0.75 * 0.3**2 * -math.log(0.7)
) / 2


def loss_value(loss, labels=LABELS, predictions=PREDICTIONS) -> float:
    return float(loss(labels, predictions))


def test_focal_gamma_zero_equals_cross_entropy():
    focal = create_loss(FOCAL, gamma=0.0, class_balancing=False)
    cross_entropy = create_loss(CROSS_ENTROPY)
    assert loss_value(focal) == pytest.approx(loss_value(cross_entropy), abs=1e-6)


def test_cross_entropy_hand_computed():
    assert loss_value(create_loss(CROSS_ENTROPY)) == pytest.approx(
        CROSS_ENTROPY_VALUE, abs=1e-6
    )


@pytest.mark.parametrize(
    "loss",
    [
        create_loss(CROSS_ENTROPY),
        create_loss(FOCAL, gamma=2.0),
        create_loss(FOCAL, gamma=2.0, class_balancing=True),
    ],
    ids=["cross_entropy", "focal", "focal_balanced"],
)
def test_perfect_predictions_near_zero(loss):
    assert loss_value(loss, LABELS, LABELS) < 1e-5


def test_focal_hand_computed():
    loss = create_loss(FOCAL, gamma=2.0, alpha=0.25, class_balancing=False)
    assert loss_value(loss) == pytest.approx(FOCAL_VALUE, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.9])
def test_focal_alpha_ignored_without_balancing(alpha):
    loss = create_loss(FOCAL, gamma=2.0, alpha=alpha, class_balancing=False)
    assert loss_value(loss) == pytest.approx(FOCAL_VALUE, abs=1e-6)


def test_focal_balanced_hand_computed():
    loss = create_loss(FOCAL, gamma=2.0, alpha=0.25, class_balancing=True)
    assert loss_value(loss) == pytest.approx(BALANCED_FOCAL_VALUE, abs=1e-6)


def test_invalid_loss_name_raises():
    with pytest.raises(ValueError, match="hinge"):
        create_loss("hinge")
