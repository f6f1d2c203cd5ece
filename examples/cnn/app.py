"""The CNN of McMahan et al. 2017 on synthetic 28x28 images: a compute-bound benchmark app.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data" (AISTATS 2017), Sec. 3: "a CNN with two 5x5
convolution layers (the first with 32 channels, the second with 64, each followed with
2x2 max pooling), a fully connected layer with 512 units and ReLu activation, and a final
softmax output layer (1,663,370 total parameters)". With 'same' padding the second pooling
leaves 7x7x64 = 3,136 features, which gives exactly that count.

The data are ``simulations.datasets.synthetic_images`` (class patterns + shifts + noise),
generated in memory: MNIST-shaped tensors without a download. Use it to measure
throughput with a realistic model; use ``examples/digits`` or ``examples/synthetic`` for
accuracy studies.

App contract: ``NAME``, ``DEFAULT_CLIENT_CONFIG``, ``build_model()``, ``load_dataset()``.
"""

from __future__ import annotations

from torch import nn
from torch.utils.data import TensorDataset

from simulations.datasets import synthetic_images

NAME = "cnn"

DEFAULT_CLIENT_CONFIG: dict[str, float | int] = {"local_epochs": 1, "batch_size": 32, "lr": 0.05}

IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
NUM_TRAIN = 6_000
NUM_TEST = 1_000
TRAIN_SEED = 0
TEST_SEED = 1
PATTERN_SEED = 0
NUM_PARAMETERS = 1_663_370  # as reported by McMahan et al. 2017

_DATASET: tuple[TensorDataset, TensorDataset] | None = None


def build_model() -> nn.Module:
    """conv5x5(1->32) ReLU pool2 -> conv5x5(32->64) ReLU pool2 -> fc 3136->512 ReLU -> fc 512->10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(7 * 7 * 64, 512),
        nn.ReLU(),
        nn.Linear(512, NUM_CLASSES),
    )


def load_dataset() -> tuple[TensorDataset, TensorDataset]:
    """(train, test): 6,000 / 1,000 images float32 [N, 1, 28, 28], labels int64; cached.

    Train and test use different sample seeds and the same class patterns, so they are
    disjoint draws of the same task and identical in every process.
    """
    global _DATASET
    if _DATASET is None:
        train = synthetic_images(NUM_TRAIN, TRAIN_SEED, IMAGE_SHAPE, NUM_CLASSES, pattern_seed=PATTERN_SEED)
        test = synthetic_images(NUM_TEST, TEST_SEED, IMAGE_SHAPE, NUM_CLASSES, pattern_seed=PATTERN_SEED)
        _DATASET = (TensorDataset(*train), TensorDataset(*test))
    return _DATASET
