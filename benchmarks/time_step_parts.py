"""Wall-clock time of the parts of a recipe's training step, measured inside the step.

torch.profiler (``profile_recipe_step.py``) charges small ops after a GEMM with time they do
not take alone, so its per-op split of the overhead can mislead. This script wraps chosen
library functions with ``time.perf_counter`` and runs ``bench_recipes.py``'s step of the
recipe: each part's time per step is the wall time spent inside it (parts nest: a caller's
time includes its callees'). The wrappers cost about a microsecond per call.

    python benchmarks/time_step_parts.py local --steps 40
    python benchmarks/time_step_parts.py supervised-3x1000 --parts ff_kernels.ops.cpu_linear:_normalized
"""

from __future__ import annotations

import argparse
import collections
import importlib
import time

import torch

from bench_recipes import CASES
from common import load_average, machine_name, today

# "module:attribute" or "module:Class.method"; the defaults cover the FF recipes' steps
DEFAULT_PARTS = {
    "local": [
        "ff_kernels.paper.recipes.unsupervised_mnist:UnsupervisedMNIST._ff_update",
        "ff_kernels.paper.recipes.unsupervised_mnist:hybrid_negatives",
        "ff_kernels.paper.recipes.unsupervised_mnist:cross_entropy_grad_",
        "ff_kernels.nn.layer:FFLayer.ff_step",
        "ff_kernels.ops.gemm_local2d:train_step",
        "ff_kernels.ops.gemm_local2d:windows",
        "ff_kernels.ops.gemm_local2d:_preactivations",
        "ff_kernels.ops.step_epilogue:relu_goodness_",
        "ff_kernels.ops.step_epilogue:peer_update_",
        "ff_kernels.ops.step_epilogue:output_and_delta_",
        "ff_kernels.ops.gemm_local2d:sgd_update",
        "ff_kernels.ops.gemm_local2d:sgd_update_with",
    ],
    "supervised": [
        "ff_kernels.paper.recipes.supervised_mnist:LabelInInputNet.image_part",
        "ff_kernels.paper.recipes.supervised_mnist:LabelInInputNet.neutral_features",
        "ff_kernels.paper.recipes.supervised_mnist:cross_entropy_grad_",
        "ff_kernels.paper.recipes.supervised_mnist:LabelInInputNet.training_rows",
        "ff_kernels.paper.recipes.supervised_mnist:SupervisedMNIST.wrong_labels",
        "ff_kernels.nn.layer:FFLayer.ff_step",
        "ff_kernels.ops.cpu_linear:train_step",
        "ff_kernels.ops.cpu_linear:_activities",
        "ff_kernels.ops.cpu_linear:sgd_update",
        "ff_kernels.ops.cpu_linear:sgd_update_with",
        "ff_kernels.ops.cpu_linear:_normalized",
        "ff_kernels.nn.sequential:output_is_checked",
    ],
}


def wrap(target: str, totals: collections.defaultdict, calls: collections.Counter) -> None:
    """Replace ``module:attr`` (or ``module:Class.method``) by a timing wrapper."""
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *outer, name = path.split(".")
    for part in outer:
        owner = getattr(owner, part)
    function = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[path] += time.perf_counter() - start
            calls[path] += 1

    setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=list(CASES))
    parser.add_argument("--steps", type=int, default=40, help="timed steps (after 5 warm-up steps)")
    parser.add_argument("--parts", nargs="+", help="module:function targets (default: the recipe family's list)")
    args = parser.parse_args()
    family = "local" if args.recipe == "local" else "supervised"
    parts = args.parts or DEFAULT_PARTS[family]
    totals, calls = collections.defaultdict(float), collections.Counter()
    for target in parts:
        wrap(target, totals, calls)
    case = CASES[args.recipe]("cpu")
    for _ in range(5):
        case.step()
    totals.clear()
    calls.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        case.step()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    print(f"# {case.name} ({case.shape}), batch {case.batch}, {args.steps} steps; {machine_name('cpu')}, "
          f"torch {torch.__version__}, {load_average()}, {today()}")
    print(f"step {step_ms:.2f} ms (wrappers included)\n\n{'part':<60}{'ms/step':>9}{'calls/step':>12}")
    for path, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"{path[:59]:<60}{seconds / args.steps * 1e3:>9.3f}{calls[path] / args.steps:>12.1f}")


if __name__ == "__main__":
    main()
