"""Loss functions the tuner chooses between."""

from __future__ import annotations

import keras

FOCAL = "focal"
CROSS_ENTROPY = "cross_entropy"
LOSSES = (FOCAL, CROSS_ENTROPY)


def create_loss(
    loss: str = FOCAL,
    *,
    gamma: float = 2.0,
    alpha: float = 0.25,
    class_balancing: bool = False,
) -> keras.losses.Loss:
    """Return Keras' binary focal loss or binary cross-entropy.

    Keras' `BinaryFocalCrossentropy` weighs positives by `alpha` and negatives
    by `1 - alpha` only when `apply_class_balancing` is on, so `alpha` has no
    effect otherwise. With `gamma=0` and no class balancing the focal loss equals
    cross-entropy.

    Raises:
        ValueError: `loss` is not one of `LOSSES`.
    """
    if loss == CROSS_ENTROPY:
        return keras.losses.BinaryCrossentropy(name=CROSS_ENTROPY)
    if loss == FOCAL:
        return keras.losses.BinaryFocalCrossentropy(
            apply_class_balancing=class_balancing,
            alpha=alpha,
            gamma=gamma,
            name=FOCAL,
        )
    raise ValueError(
        f"loss must be one of {', '.join(LOSSES)}. Received: loss={loss!r}"
    )
