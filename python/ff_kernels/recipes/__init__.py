"""Training recipes: a config dataclass plus a class that implements :class:`ff_kernels.train.Recipe`.

``RECIPES`` maps the name used on the command line (``ff-train NAME``) to the recipe class;
each class has ``Config`` (its dataclass) and is built as ``Recipe(config)``.
"""

from .supervised_mnist import SupervisedMNIST, SupervisedMNISTConfig

RECIPES = {SupervisedMNIST.name: SupervisedMNIST}

__all__ = ["RECIPES", "SupervisedMNIST", "SupervisedMNISTConfig"]
