"""Every recipe's training step at the paper's size and batch, against its GEMM floor and the reference.

For each recipe of ``ff-train`` this times, interleaved in one run (so that the ratios are fair
on a machine whose speed drifts):

- ``step``: the recipe's ``train_step`` on one batch, as training runs it (default backend);
- ``unshared``: the same step with the label-independent work computed per row again, for the
  recipes that share it (supervised, jitter: layer 1's image GEMM; recurrent: the bottom-up
  input of layer 1), i.e. the algorithm before the sharing;
- ``reference``: the same step on the reference backend (``backend="reference"``: torch ops and
  autograd), where the recipe has one;
- ``floor``: the GEMMs the step cannot avoid, at the same shapes, each written into a
  preallocated output (``FLOORS`` lists them per recipe). ``floor`` holds the GEMMs of the
  algorithm without sharing (the paper's, row by row); ``own floor`` those of the shared
  algorithm, which skips some of them. Locally connected layers count as one dense GEMM with
  the same multiply-adds: as many rows, the layer's outputs as columns and its mean valid
  fan-in as the inner size; the local recipe's ``own floor`` holds the same multiply-adds at
  the layers' own shapes, one GEMM per location (window size by units per location), run as
  one batched GEMM per layer and direction.

and evaluation throughput in images per second: goodness over labels (supervised, jitter,
recurrent, cifar: each image with all 10 labels; the recurrent net over the recipe's
iterations 1..score_to and over 10 labels x 8 iterations), and for the other recipes the work
``evaluate`` does per image.

    python benchmarks/bench_recipes.py                          # every recipe, CPU
    python benchmarks/bench_recipes.py --recipes supervised local --min-run-time 4
    python benchmarks/bench_recipes.py --device cuda

Prints a table (milliseconds per step; the fraction of the floor the step reaches, from the
run's statistics (``of floor``) and as the median of the rounds' fractions (``paired``: each
round's floor and step calls are seconds apart, so a drift of the machine's speed moves it less);
the speedups) with the machine, torch version, threads, load and date, and appends rows to
``--csv`` (default benchmarks/results.csv). The data are random tensors of the real shapes
(timing does not depend on the values of dense GEMMs); no data files are read.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from common import (
    append_csv,
    interleaved_calls,
    interleaved_step_times,
    load_average,
    machine_name,
    overall_times,
    paired_ratio,
    today,
)

NUM_CLASSES = 10
NUM_PIXELS = 784


class Gemm(NamedTuple):
    """One GEMM of a step: ``fwd`` (m, k) @ (n, k).T (a layer's forward, x @ W.T), ``wgrad``
    (m, n).T @ (m, k) (a weight gradient, delta.T @ x) or ``dgrad`` (m, n) @ (n, k) (backprop's
    input gradient), ``count`` times: ``count`` calls, or with ``batched`` one batched GEMM
    (``torch.bmm``) of ``count`` independent ones, as a locally connected layer's locations are."""

    kind: str
    m: int
    k: int
    n: int
    count: int = 1
    batched: bool = False

    @property
    def macs(self) -> int:
        return self.m * self.k * self.n * self.count


def gemm_floor(gemms: list[Gemm], device: str, dtype=torch.float32) -> Callable[[], None]:
    """A closure running ``gemms`` with preallocated operands and outputs (one set per shape)."""
    ops = []
    cache = {}
    for g in gemms:
        key = (g.kind, g.m, g.k, g.n, g.count if g.batched else 0)
        if key not in cache:
            batch = (g.count,) if g.batched else ()
            mm = torch.bmm if g.batched else torch.mm
            a_rows = torch.rand(*batch, g.m, g.k, device=device, dtype=dtype)  # x (m, k)
            w = torch.rand(*batch, g.n, g.k, device=device, dtype=dtype)  # W (n, k)
            d = torch.rand(*batch, g.m, g.n, device=device, dtype=dtype)  # delta (m, n)
            if g.kind == "fwd":
                out = torch.empty(*batch, g.m, g.n, device=device, dtype=dtype)
                cache[key] = (lambda a=a_rows, w=w, out=out, mm=mm: mm(a, w.mT, out=out))
            elif g.kind == "wgrad":
                out = torch.empty(*batch, g.n, g.k, device=device, dtype=dtype)
                cache[key] = (lambda a=a_rows, d=d, out=out, mm=mm: mm(d.mT, a, out=out))
            elif g.kind == "dgrad":
                out = torch.empty(*batch, g.m, g.k, device=device, dtype=dtype)
                cache[key] = (lambda d=d, w=w, out=out, mm=mm: mm(d, w, out=out))
            else:
                raise ValueError(g.kind)
        ops += [cache[key]] * (1 if g.batched else g.count)

    def run():
        for op in ops:
            op()

    return run


@dataclass
class Case:
    """One recipe's timed closures and its floors."""

    name: str
    shape: str
    batch: int
    step: Callable[[], object]
    floor: list[Gemm]
    own_floor: list[Gemm] | None = None  # GEMMs of the shared algorithm (None: the same as floor)
    unshared: Callable[[], object] | None = None
    reference: Callable[[], object] | None = None
    reference_note: str = ""
    evals: list = field(default_factory=list)  # (label, images per call, {provider: fn})


def _generator(device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _mnist(n_train: int, n_eval: int, device: str):
    """Random MNIST-shaped splits: images (N, 784) in [0, 1], about 20% nonzero, like MNIST's."""
    from ff_kernels.paper.data import MnistSplits

    g = torch.Generator().manual_seed(1)

    def images(n):
        return torch.rand(n, NUM_PIXELS, generator=g) * (torch.rand(n, NUM_PIXELS, generator=g) < 0.2)

    labels = lambda n: torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return MnistSplits(images(n_train), labels(n_train), images(n_eval), labels(n_eval), "test")


def _set_sharing(recipe, on: bool) -> None:
    """Switch the recipe's shared computation on or off (where the model has it)."""
    model = recipe.model
    if hasattr(model, "share_first_layer"):
        model.share_first_layer = on
    net = getattr(model, "net", None)
    if hasattr(net, "share_bottom_up"):
        net.share_bottom_up = on


def _has_sharing(recipe) -> bool:
    return hasattr(recipe.model, "share_first_layer") or hasattr(getattr(recipe.model, "net", None), "share_bottom_up")


def _step_fn(recipe, batch, device):
    generator = _generator(device)
    return lambda: recipe.train_step(batch, generator)


def _dense_ff_floor(sizes: list[int], rows: int) -> list[Gemm]:
    """Forward and weight-gradient GEMMs of FF layers ``sizes[0] -> sizes[1] -> ...`` on ``rows`` rows."""
    out = []
    for d_in, d_out in itertools.pairwise(sizes):
        out += [Gemm("fwd", rows, d_in, d_out), Gemm("wgrad", rows, d_in, d_out)]
    return out


def _forward_floor(sizes: list[int], rows: int) -> list[Gemm]:
    return [Gemm("fwd", rows, d_in, d_out) for d_in, d_out in itertools.pairwise(sizes)]


# ---------------------------------------------------------------------------------------- recipes


def case_supervised(device: str, width: int = 2000, depth: int = 4, name: str = "supervised") -> Case:
    """Section 3.3: label in the first 10 pixels, hard negatives from the neutral-label softmax."""
    from ff_kernels.paper.recipes import supervised_mnist
    from ff_kernels.paper.recipes.jitter_mnist import JitterMNIST, JitterMNISTConfig

    cls, config_cls = ((JitterMNIST, JitterMNISTConfig) if name == "jitter"
                       else (supervised_mnist.SupervisedMNIST, supervised_mnist.SupervisedMNISTConfig))
    data = _mnist(2000, 1000, device)
    make = lambda backend: cls(config_cls(width=width, depth=depth, device=device, backend=backend), data)
    fast, unshared, reference = make("auto"), make("auto"), make("reference")
    _set_sharing(unshared, False)
    _set_sharing(reference, False)
    if name == "jitter":
        for recipe in (fast, unshared, reference):
            recipe.epoch_batches(_generator(device))  # this epoch's shifted images
    batch_size = fast.config.batch_size
    batch = torch.arange(batch_size, device=device)
    sizes = [NUM_PIXELS] + [width] * depth
    scored = width * max(depth - 1, 1)
    head = [Gemm("fwd", batch_size, scored, NUM_CLASSES), Gemm("wgrad", batch_size, scored, NUM_CLASSES)]
    floor = _forward_floor(sizes, batch_size) + head + _dense_ff_floor(sizes, 2 * batch_size)
    image = NUM_PIXELS - NUM_CLASSES
    # shared: layer 1's image columns once per image (the neutral, positive and negative rows
    # share them; a row's label adds a column of W); its weight gradient reads the pixels of each
    # positive/negative pair once (label_columns), plus the label columns of the negative rows
    own = ([Gemm("fwd", batch_size, image, width), Gemm("wgrad", batch_size, NUM_PIXELS, width),
            Gemm("wgrad", batch_size, NUM_CLASSES, width)]
           + _forward_floor(sizes[1:], batch_size) + head + _dense_ff_floor(sizes[1:], 2 * batch_size))
    eval_images = data.eval_images.to(device)

    def scores(recipe):
        def run():  # as evaluate() does it: the shared image part once for both procedures
            model = recipe.model
            if getattr(model, "share_first_layer", False):
                part = model.image_part(eval_images)
                model.label_scores(eval_images, part)
                model.head_logits(eval_images, part)
            else:
                model.label_scores(eval_images)
                model.head_logits(eval_images)
        return run

    return Case(
        name, f"{depth}x{width}", batch_size, _step_fn(fast, batch, device), floor, own if _has_sharing(fast) else None,
        unshared=_step_fn(unshared, batch, device) if _has_sharing(fast) else None,
        reference=_step_fn(reference, batch, device),
        evals=[("goodness over 10 labels + neutral softmax", eval_images.shape[0],
                {"step": scores(fast), "unshared": scores(unshared) if _has_sharing(fast) else None,
                 "reference": scores(reference)})],
    )


def case_supervised_small(device: str) -> Case:
    return case_supervised(device, width=1000, depth=3, name="supervised-3x1000")


def case_jitter(device: str) -> Case:
    return case_supervised(device, name="jitter")


def _hybrid_case(name: str, device: str, width: int = 2000, depth: int = 4) -> Case:
    """Section 3.2: images against hybrids, a softmax on the last three layers."""
    from ff_kernels.paper.recipes.local_mnist import LocalMNIST, LocalMNISTConfig
    from ff_kernels.paper.recipes.unsupervised_mnist import UnsupervisedMNIST, UnsupervisedMNISTConfig

    data = _mnist(2000, 1000, device)
    if name == "local":
        make = lambda backend: LocalMNIST(LocalMNISTConfig(device=device, backend=backend), data)
    else:
        make = lambda backend: UnsupervisedMNIST(
            UnsupervisedMNISTConfig(width=width, depth=depth, device=device, backend=backend), data)
    fast, reference = make("auto"), make("reference")
    batch_size = fast.config.batch_size
    batch = torch.arange(batch_size, device=device)
    if name == "local":
        # each layer as a dense GEMM with its multiply-adds: outputs x mean valid fan-in
        floor = []
        for layer in fast.model.net:
            fan_in, outs = _local_dense_equivalent(layer.spec)
            floor += [Gemm("fwd", 2 * batch_size, fan_in, outs), Gemm("wgrad", 2 * batch_size, fan_in, outs)]
        # the same multiply-adds at the layers' own shapes: one GEMM per location, batched
        own_floor = []
        for layer in fast.model.net:
            spec = layer.spec
            own_floor += [Gemm(kind, 2 * batch_size, spec.block_size, spec.out_channels, spec.num_locations, True)
                          for kind in ("fwd", "wgrad")]
        head_in = sum(layer.spec.out_features for layer in list(fast.model.net)[-fast.config.head_layers:])
        shape = "footnote 8: " + " -> ".join(str(layer.spec.out_features) for layer in fast.model.net)
    else:
        own_floor = None
        floor = _dense_ff_floor([NUM_PIXELS] + [width] * depth, 2 * batch_size)
        head_in = width * min(fast.config.head_layers, depth)
        shape = f"{depth}x{width}"
    head = [Gemm("fwd", batch_size, head_in, NUM_CLASSES), Gemm("wgrad", batch_size, head_in, NUM_CLASSES)]
    floor += head
    if own_floor is not None:
        own_floor += head
    eval_images = data.eval_images.to(device)

    def features(recipe):
        generator = torch.Generator(device=device).manual_seed(1)
        from ff_kernels.paper.data import hybrid_negatives

        def run():
            model = recipe.model
            outputs, _ = model.outputs_and_goodness(model.inputs(eval_images))
            model.head(model.head_features(outputs))
            model.outputs_and_goodness(model.inputs(hybrid_negatives(eval_images, generator, recipe.config.blur_steps)))
        return run

    return Case(name, shape, batch_size, _step_fn(fast, batch, device), floor, own_floor=own_floor,
                reference=_step_fn(reference, batch, device),
                evals=[("softmax + images vs hybrids", eval_images.shape[0],
                        {"step": features(fast), "reference": features(reference)})])


def case_unsupervised(device: str) -> Case:
    return _hybrid_case("unsupervised", device)


def case_local(device: str) -> Case:
    return _hybrid_case("local", device)


def case_backprop(device: str) -> Case:
    """Section 3.1: the 4 x 2000 MLP trained by backprop (Adam), batch 500."""
    from ff_kernels.paper.recipes.backprop_mnist import BackpropMNIST, BackpropMNISTConfig

    data = _mnist(2000, 1000, device)
    recipe = BackpropMNIST(BackpropMNISTConfig(device=device), data)
    c = recipe.config
    batch = torch.arange(c.batch_size, device=device)
    sizes = [NUM_PIXELS] + [c.width] * c.depth + [NUM_CLASSES]
    floor = _dense_ff_floor(sizes, c.batch_size)
    floor += [Gemm("dgrad", c.batch_size, d_in, d_out) for d_in, d_out in itertools.pairwise(sizes[1:])]
    eval_images = data.eval_images.to(device)

    def evaluate():
        with torch.no_grad():
            recipe.model.eval()
            recipe.model(eval_images)

    return Case("backprop", f"{c.depth}x{c.width}", c.batch_size, _step_fn(recipe, batch, device), floor,
                reference_note="plain torch: no separate reference",
                evals=[("softmax", eval_images.shape[0], {"step": evaluate})])


def case_recurrent(device: str) -> Case:
    """Section 3.4: 2 x 2000 hidden layers between the image and the label, 8 damped iterations."""
    from ff_kernels.paper.recipes.recurrent_mnist import RecurrentMNIST, RecurrentMNISTConfig

    data = _mnist(2000, 100, device)
    fast = RecurrentMNIST(RecurrentMNISTConfig(device=device), data)
    unshared = RecurrentMNIST(RecurrentMNISTConfig(device=device), data)
    _set_sharing(unshared, False)
    c = fast.config
    b, w, t = c.batch_size, c.width, c.iterations
    batch = torch.arange(b, device=device)
    sizes = [NUM_PIXELS] + [w] * c.depth + [NUM_CLASSES]
    # the bottom-up pass (each layer from the one below only), the head on it, then every
    # iteration's forward and weight gradient over [below, above] for 2B rows
    initial = _forward_floor(sizes[:-1], b)
    head = [Gemm("fwd", b, w * c.depth, NUM_CLASSES), Gemm("wgrad", b, w * c.depth, NUM_CLASSES)]
    per_iteration = []
    for below, width, above in zip(sizes[:-2], sizes[1:-1], sizes[2:]):
        per_iteration += [Gemm("fwd", 2 * b, below + above, width, t), Gemm("wgrad", 2 * b, below + above, width, t)]
    floor = initial + head + per_iteration
    # shared: layer 1's image term is the bottom-up pass's (once per image); its weight gradient
    # from the deltas summed over the iterations and over each image's two rows
    own = initial + head + [Gemm("wgrad", b, NUM_PIXELS, w)]
    for l, (below, width, above) in enumerate(zip(sizes[:-2], sizes[1:-1], sizes[2:])):
        if l == 0:
            own += [Gemm("fwd", 2 * b, above, width, t), Gemm("wgrad", 2 * b, above, width, t)]
        else:
            own += [Gemm("fwd", 2 * b, below + above, width, t), Gemm("wgrad", 2 * b, below + above, width, t)]
    eval_images = data.eval_images.to(device)
    eight = dataclasses.replace(c, score_to=8)

    def scores(recipe, config=None):
        def run():
            model = recipe.model
            saved = model.config
            model.config = config or saved
            try:
                model.label_scores(eval_images)
            finally:
                model.config = saved
        return run

    has = _has_sharing(fast)
    return Case(
        "recurrent", f"{c.depth}x{w}, {t} iterations", b, _step_fn(fast, batch, device), floor, own if has else None,
        unshared=_step_fn(unshared, batch, device) if has else None,
        reference_note="FFRecurrent has one backend; unshared = the algorithm without sharing",
        evals=[(f"10 labels x {c.score_to} iterations (the test)", eval_images.shape[0],
                {"step": scores(fast), "unshared": scores(unshared) if has else None}),
               ("10 labels x 8 iterations", eval_images.shape[0],
                {"step": scores(fast, eight), "unshared": scores(unshared, eight) if has else None})],
    )


def _cifar_data(device: str, n_train: int = 200, n_eval: int = 100):
    from ff_kernels.paper.recipes.cifar_common import CifarData

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n_train, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, NUM_CLASSES, (n_train,), generator=g).to(device)
    return CifarData(images, labels, {"test": (images[:n_eval], labels[:n_eval])})


def _local_dense_equivalent(spec, valid_channels: int | None = None) -> tuple[int, int]:
    """(mean valid fan-in, outputs) of a local layer: the dense GEMM with its multiply-adds."""
    from ff_kernels.functional.local import local_valid_mask

    valid = local_valid_mask(spec)  # (L, K)
    if valid_channels is not None:  # only the first channels' entries (e.g. the bottom-up ones)
        valid = valid[:, : valid_channels * spec.kernel * spec.kernel]
    return round(float(valid.sum()) / spec.num_locations), spec.out_features


def case_cifar(device: str) -> Case:
    """Section 4: recurrent local receptive fields, depth 2, 6 trained iterations, batch 100."""
    from ff_kernels.paper.recipes.cifar_ff import CifarFF, CifarFFConfig

    data = _cifar_data(device)
    fast = CifarFF(CifarFFConfig(device=device), data)
    unshared = CifarFF(CifarFFConfig(device=device), data)
    _set_sharing(unshared, False)
    c = fast.config
    b, t = c.batch_size, c.train_iterations
    batch = torch.arange(b, device=device)
    floor, own = [], []
    net = fast.model.net
    for l, layer in enumerate(net.layers):
        fan_in, outs = _local_dense_equivalent(layer.spec)
        up, _ = _local_dense_equivalent(layer.spec, layer.below_channels)
        floor += [Gemm("fwd", b, up, outs),  # the bottom-up pass with the neutral label (the head's)
                  Gemm("fwd", 2 * b, up, outs),  # the bottom-up pass of ff_backward
                  Gemm("fwd", 2 * b, fan_in, outs, t),  # the iterations
                  Gemm("wgrad", 2 * b * t, fan_in, outs)]  # one weight gradient over all iterations
        # shared: one bottom-up pass per image; layer 0's bottom-up term and its gradient once per image
        own.append(Gemm("fwd", b, up, outs))
        rest = fan_in - up if l == 0 else fan_in
        if l == 0:
            own.append(Gemm("wgrad", b, up, outs))
        if rest:
            own += [Gemm("fwd", 2 * b, rest, outs, t), Gemm("wgrad", 2 * b * t, rest, outs)]
    head_in = net.units * len(fast.model.head_indices)
    rest = [Gemm("fwd", 3 * b, NUM_CLASSES, net.units), Gemm("wgrad", 2 * b * t, NUM_CLASSES, net.units),
            Gemm("fwd", b, head_in, NUM_CLASSES), Gemm("wgrad", b, head_in, NUM_CLASSES)]
    floor, own = floor + rest, own + rest
    eval_images = data.eval_sets["test"][0]

    def scores(recipe):
        from ff_kernels.paper.recipes.cifar_common import standardize

        return lambda: recipe.model.label_scores(standardize(eval_images))

    has = _has_sharing(fast)
    return Case("cifar", f"depth {c.depth}, {c.channels}x32x32 maps, k={c.receptive_field}, {t} iterations", b,
                _step_fn(fast, batch, device), floor, own if has else None,
                unshared=_step_fn(unshared, batch, device) if has else None,
                reference_note="reference: bench_recurrent_local.py (its patches need ~3 MB per image and iteration)",
                evals=[(f"10 labels x {c.score_to} iterations (the test)", eval_images.shape[0],
                        {"step": scores(fast), "unshared": scores(unshared) if has else None})])


def case_cifar_backprop(device: str) -> Case:
    """Section 4's backprop baseline: the same local layers (no top-down), Adam."""
    from ff_kernels.paper.recipes.cifar_backprop import CifarBackprop, CifarBackpropConfig

    data = _cifar_data(device)
    fast = CifarBackprop(CifarBackpropConfig(device=device), data)
    reference = CifarBackprop(CifarBackpropConfig(device=device, backend="reference"), data)
    c = fast.config
    b = c.batch_size
    batch = torch.arange(b, device=device)
    floor = []
    for l, module in enumerate(m for m in fast.model if hasattr(m, "spec")):
        fan_in, outs = _local_dense_equivalent(module.spec)
        floor += [Gemm("fwd", b, fan_in, outs), Gemm("wgrad", b, fan_in, outs)]
        if l > 0:
            floor += [Gemm("dgrad", b, fan_in, outs)]
    units = c.channels * 32 * 32
    floor += [Gemm("fwd", b, units, NUM_CLASSES), Gemm("wgrad", b, units, NUM_CLASSES),
              Gemm("dgrad", b, units, NUM_CLASSES)]
    eval_images = data.eval_sets["test"][0]

    def evaluate(recipe):
        from ff_kernels.paper.recipes.cifar_common import standardize

        def run():
            with torch.no_grad():
                recipe.model(standardize(eval_images))
        return run

    return Case("cifar-backprop", f"depth {c.depth}, {c.channels}x32x32 maps, k={c.receptive_field}", b,
                _step_fn(fast, batch, device), floor, reference=_step_fn(reference, batch, device),
                evals=[("softmax", eval_images.shape[0], {"step": evaluate(fast), "reference": evaluate(reference)})])


def case_aesop(device: str) -> Case:
    """Section 4.1: 3 x 2000 over windows of 10 one-hot characters, teacher forcing."""
    from ff_kernels.paper.recipes.aesop import AesopBatch, AesopConfig, AesopFF

    g = torch.Generator().manual_seed(1)
    strings = (torch.randint(0, 30, (248, 100), generator=g), torch.randint(0, 30, (20, 100), generator=g))
    make = lambda backend: AesopFF(AesopConfig(device=device, backend=backend), strings)
    fast, reference = make("auto"), make("reference")
    c = fast.config
    b = c.batch_size
    batch = AesopBatch("both", torch.arange(b, device=device), None)
    d_in = c.window * 30
    sizes = [d_in] + [c.width] * c.depth
    floor = (_forward_floor(sizes, b) + [Gemm("fwd", b, c.width * c.depth, 30), Gemm("wgrad", b, c.width * c.depth, 30)]
             + _dense_ff_floor(sizes, 2 * b))
    windows = fast.inputs[:2000]

    def evaluate(recipe):
        return lambda: recipe.model.logits(windows)

    return Case("aesop", f"{c.depth}x{c.width}, window {c.window}", b, _step_fn(fast, batch, device), floor,
                reference=_step_fn(reference, batch, device),
                evals=[("next-character softmax", windows.shape[0], {"step": evaluate(fast),
                                                                     "reference": evaluate(reference)})])


CASES = {
    "supervised": case_supervised,
    "supervised-3x1000": case_supervised_small,
    "jitter": case_jitter,
    "unsupervised": case_unsupervised,
    "local": case_local,
    "backprop": case_backprop,
    "recurrent": case_recurrent,
    "cifar": case_cifar,
    "cifar-backprop": case_cifar_backprop,
    "aesop": case_aesop,
}


def gflops(gemms: list[Gemm], seconds: float) -> float:
    return 2 * sum(g.macs for g in gemms) / seconds / 1e9


def run_case(case: Case, device: str, min_run_time: float, rounds: int, max_reference_runs: int,
             statistic: str = "median") -> tuple[dict, dict, float]:
    """Times of the step providers and of the evaluations, each set interleaved, and the
    step's fraction of the floor as the median of the rounds' fractions (``paired_ratio``)."""
    fns = {"step": case.step, "floor": gemm_floor(case.floor, device)}
    if case.own_floor is not None:
        fns["own floor"] = gemm_floor(case.own_floor, device)
    if case.unshared is not None:
        fns["unshared"] = case.unshared
    if case.reference is not None:
        fns["reference"] = case.reference
    calls = interleaved_calls(fns, min_run_time, rounds, device)
    times = overall_times(calls, statistic)
    paired = paired_ratio(calls, "floor", "step", statistic)
    eval_times = {}
    for label, _, providers in case.evals:
        providers = {k: v for k, v in providers.items() if v is not None}
        got = interleaved_step_times(providers, min_run_time / 2, rounds, device, max_runs=max_reference_runs,
                                     statistic=statistic)
        eval_times[label] = got
    return times, eval_times, paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--recipes", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds of timing per provider and recipe")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds")
    parser.add_argument("--max-eval-runs", type=int, default=20, help="most evaluation calls per provider and round")
    parser.add_argument("--statistic", default="median", choices=["median", "min"],
                        help="per provider: the median call, or the fastest (min: an estimate of the machine "
                             "alone when other jobs use it now and then)")
    parser.add_argument("--csv", default="benchmarks/results.csv", help="append rows here ('' for none)")
    args = parser.parse_args()

    device = args.device
    machine = machine_name(device)
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # fp32 GEMMs in TF32 everywhere: steps and floors
        machine += ", fp32 GEMMs in TF32"
    header = (f"# recipes' training steps ({args.statistic} of the calls), {machine}, torch {torch.__version__}, "
              f"{load_average()} at the start, {today()}")
    print(header, flush=True)
    print(f"\n{'recipe':<19}{'size':<42}{'batch':>6}{'step ms':>9}{'floor ms':>10}{'of floor':>9}{'paired':>7}"
          f"{'own floor':>10}{'of own':>8}{'unshared':>10}{'saves':>7}{'reference':>11}{'speedup':>8}")
    csv_rows, eval_lines = [], []
    for name in args.recipes:
        case = CASES[name](device)
        times, eval_times, paired = run_case(case, device, args.min_run_time, args.rounds, args.max_eval_runs,
                                             args.statistic)
        step = times["step"]
        own = times.get("own floor")
        cells = [f"{case.name:<19}{case.shape[:41]:<42}{case.batch:>6}{step * 1e3:>9.1f}",
                 f"{times['floor'] * 1e3:>10.1f}{times['floor'] / step:>9.2f}{paired:>7.2f}"]
        cells.append(f"{own * 1e3:>10.1f}{own / step:>8.2f}" if own is not None else f"{'':>10}{'':>8}")
        if "unshared" in times:
            cells.append(f"{times['unshared'] * 1e3:>10.1f}{1 - step / times['unshared']:>7.0%}")
        else:
            cells.append(f"{'':>10}{'':>7}")
        if "reference" in times:
            cells.append(f"{times['reference'] * 1e3:>11.1f}{times['reference'] / step:>7.2f}x")
        else:
            cells.append(f"{'-':>11}{'':>8}")
        print("".join(cells), flush=True)
        macs = sum(g.macs for g in case.floor)
        for provider, seconds in times.items():
            csv_rows.append({"op": f"recipe_step:{case.name}", "provider": f"{provider} ({args.statistic})",
                             "shape": case.shape,
                             "batch": case.batch, "ms": round(seconds * 1e3, 4), "machine": machine, "date": today()})
        note = f"  floor: {macs / 1e9:.2f} G multiply-adds at {gflops(case.floor, times['floor']):.0f} GFLOP/s"
        if case.own_floor is not None:
            note += f"; own floor {sum(g.macs for g in case.own_floor) / 1e9:.2f} G"
        if case.reference_note:
            note += f"; {case.reference_note}"
        eval_lines.append(f"{case.name}: {note.strip()}")
        for label, n_images, _ in case.evals:
            got = eval_times[label]
            parts = [f"{p} {n_images / s:,.0f}" for p, s in got.items()]
            line = f"{case.name} evaluation, {label}: images/s " + ", ".join(parts)
            if "unshared" in got:
                line += f" (sharing: {got['unshared'] / got['step']:.2f}x)"
            if "reference" in got:
                line += f" (vs reference: {got['reference'] / got['step']:.2f}x)"
            eval_lines.append(line)
            for provider, seconds in got.items():
                csv_rows.append({"op": f"recipe_eval:{case.name}:{label}", "provider": f"{provider} ({args.statistic})",
                                 "shape": case.shape,
                                 "batch": n_images, "ms": round(seconds * 1e3, 4), "machine": machine,
                                 "date": today()})
        del case
    print()
    for line in eval_lines:
        print(line)
    print(f"\n# {load_average()} at the end")
    if args.csv:
        append_csv(args.csv, csv_rows)


if __name__ == "__main__":
    sys.exit(main())
