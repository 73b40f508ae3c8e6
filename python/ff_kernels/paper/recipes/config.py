"""The settings the recipes share: their options, declared once, and the config classes that group them.

Every recipe's config is a dataclass built from these bases:

    RecipeConfig        every recipe: epochs, batch size, learning rate, weight decay, seed, device, data
    EvaluatedConfig     + evaluation schedule, subsets and the validation split (all but aesop)
    MnistConfig         + the IDX data set (the MNIST recipes)
    FFConfig            + what every FF recipe's optimizer and loss share (a mixin)

Settings found in some recipes only are declared here once as an :class:`Option` and used as a
field by the recipes that have them, each with its own default, e.g. ``width: int = WIDTH(2000)``.
Where a default comes from is said beside the recipe's field (the paper's section, or Hinton's
released Matlab code ffnew.m); the evidence behind the choices is in RESULTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import functional
from ..data.mnist import DATASETS, UNVERIFIED
from ..options import Option, check_options
from .schedule import LR_SCHEDULES, SCHEDULE_HELP

EPOCHS = Option("number of epochs", min=1)
BATCH_SIZE = Option("rows per batch", min=1)
LR = Option("learning rate of the FF layers", above=0)
WEIGHT_DECAY = Option("FF layers' weight decay", min=0)
SEED = Option("seed of the initialization and of every random draw of the run", min=-(2**63), max=2**64 - 1)  # torch's range
DEVICE = Option("cpu, cuda, cuda:1, ...")
DATA_DIR = Option("folder with the recipe's data set", none="$FF_KERNELS_DATA/<data set> or download")
MNIST_DIR = Option("folder with the four IDX files of MNIST, Fashion-MNIST or KMNIST",
                   none="$FF_KERNELS_DATA/<dataset> or download")
DATASET = Option(f"the IDX data set: {', '.join(DATASETS[:-1])}, recognized by the files' published sha256, or "
                 f"{UNVERIFIED} for your own IDX files (no check; the run records it)", choices=DATASETS,
                 none="whichever the folder holds, MNIST if downloading", detected=True)

EVAL_EVERY = Option("evaluate after every N-th epoch and after the last; may change on --resume", min=1)
TRAIN_SUBSET = Option("train on the first N training images", min=1, none="all")
EVAL_SUBSET = Option("evaluate on the first N images of every evaluation set", min=1, none="all")
VALIDATION = Option("evaluate on training images held out from the end instead of the test set")

MOMENTUM = Option("SGD momentum", min=0, below=1)
LR_SCHEDULE = Option(SCHEDULE_HELP, choices=LR_SCHEDULES)
HEAD_LR = Option("learning rate of the softmax", above=0)
HEAD_WEIGHT_DECAY = Option("softmax weight decay", min=0)
GOODNESS = Option("goodness function: ssq (positives high), neg_ssq (the paper's min ssq), sum",
                  choices=functional.GOODNESS)
TEMPERATURE = Option("T in sigmoid((G - threshold) / T), the threshold being the layer's number of units",
                     above=0, none="the number of units")

OPTIMIZER = Option("optimizer of the FF layers: sgd (momentum, fused into the layer ops) or adam",
                   choices=("sgd", "adam"))
WIDTH = Option("ReLUs per hidden layer", min=1)
DEPTH = Option("number of hidden layers", min=1)
LINEAR_BACKEND = Option("FF layer kernels", choices=("auto", "reference", "cpu", "triton"))
LOCAL_BACKEND = Option("local layer kernels", choices=("auto", "reference", "cpu", "cuda"))
COMPUTE_DTYPE = Option("bf16 GEMMs (CPU backend); parameters stay float32", flag="--bf16", const="bfloat16",
                       choices=(None, "float32", "bfloat16"))
PEER_NORM = Option("peer-normalization strength, 0 = off", min=0)
GOODNESS_BLOCKS = Option("block-wise goodness (section 5.3): split each hidden layer into K blocks of width/K units, "
                         "each with its own goodness, FF loss, threshold width/K (and temperature, if none is "
                         "given) and normalization; a label's score sums the goodness of every block",
                         min=1, none="off: one goodness per layer", metavar="K")
RMS_NORM = Option("pass on activities scaled to unit length (default: unit mean square)", flag="--length-norm")
INPUT_NORM = Option("feed the raw input (default: input rows scaled to unit mean square)")
INIT = Option("weight initialization: normal = N(0, 1 / fan_in) with zero biases (ffnew.m), uniform = torch's",
              choices=("normal", "uniform"))
NEGATIVES = Option("wrong-label choice: hard (drawn from the softmax's predictions) or random",
                   choices=("hard", "random"))
HEAD_LAYERS = Option("the softmax reads the last N hidden layers", min=1)
DAMPING = Option("share of the previous state in each update", min=0, below=1)
SCORE_FROM = Option("first iteration of the test goodness sum", min=1)
SCORE_TO = Option("last iteration of the test goodness sum", min=1)
LR_DECAY = Option("learning-rate factor per epoch; 1 = constant", above=0, max=1)


@dataclass
class RecipeConfig:
    """What every recipe has. Subclasses redeclare a field to change its default."""

    epochs: int = EPOCHS(20)
    batch_size: int = BATCH_SIZE(100)  # ffnew.m's 100 cases per mini-batch
    lr: float = LR(5e-4)
    weight_decay: float = WEIGHT_DECAY(2e-3)
    seed: int = SEED(0)
    device: str = DEVICE("cpu")
    data_dir: str | None = DATA_DIR(None)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class EvaluatedConfig(RecipeConfig):
    """A recipe evaluated on a held-out set after some epochs, on subsets if asked."""

    eval_every: int = EVAL_EVERY(1)  # ff_kernels.paper.train.evaluation_due
    train_subset: int | None = TRAIN_SUBSET(None)
    eval_subset: int | None = EVAL_SUBSET(None)
    validation: bool = VALIDATION(False)


@dataclass
class MnistConfig(EvaluatedConfig):
    """A recipe on an MNIST-style IDX data set (MNIST, Fashion-MNIST, KMNIST or your own)."""

    data_dir: str | None = MNIST_DIR(None)
    # Resolved when the data are read (the set the files are), so config.json names it.
    dataset: str | None = DATASET(None)


@dataclass
class FFConfig:
    """What every FF recipe's optimizer and loss share (a mixin placed before its other bases).

    The defaults are ffnew.m's, rewritten for ``torch.optim.SGD`` (lr 5e-4, weight decay 2e-3,
    head lr 1e-2 and weight decay 3e-3, see RESULTS.md): momentum 0.9, a learning rate constant
    for the first half of training and then falling linearly (ffnew.m's epsgain), and
    p(positive) = sigmoid(G - N) with N the layer's number of units (section 2).
    """

    momentum: float = MOMENTUM(0.9)
    lr_schedule: str = LR_SCHEDULE("half_linear")
    head_lr: float = HEAD_LR(1e-2)
    head_weight_decay: float = HEAD_WEIGHT_DECAY(3e-3)
    goodness: str = GOODNESS("ssq")
    temperature: float | None = TEMPERATURE(1.0)
