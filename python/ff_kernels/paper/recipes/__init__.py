"""Training recipes: a config dataclass plus a class that implements :class:`ff_kernels.paper.train.Recipe`.

``RECIPES`` maps the name used on the command line (``ff-train NAME``) to the recipe class;
each class has ``Config`` (its dataclass) and is built as ``Recipe(config)``.
"""

from .aesop import AesopFF
from .backprop_mnist import BackpropMNIST, BackpropMNISTConfig
from .cifar_backprop import CifarBackprop
from .cifar_ff import CifarFF
from .jitter_mnist import JitterMNIST, JitterMNISTConfig
from .local_mnist import LocalMNIST, LocalMNISTConfig
from .recurrent_mnist import RecurrentMNIST
from .supervised_mnist import SupervisedMNIST, SupervisedMNISTConfig
from .unsupervised_mnist import UnsupervisedMNIST, UnsupervisedMNISTConfig

RECIPES = {recipe.name: recipe for recipe in (
    SupervisedMNIST, JitterMNIST, BackpropMNIST, UnsupervisedMNIST, LocalMNIST, AesopFF, RecurrentMNIST, CifarFF,
    CifarBackprop,
)}

__all__ = [
    "RECIPES", "BackpropMNIST", "BackpropMNISTConfig", "JitterMNIST", "JitterMNISTConfig", "LocalMNIST",
    "LocalMNISTConfig", "SupervisedMNIST", "SupervisedMNISTConfig", "UnsupervisedMNIST", "UnsupervisedMNISTConfig",
]
