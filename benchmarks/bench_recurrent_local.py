"""One training batch of the paper's CIFAR-10 FF net (section 4): compiled local ops vs the torch reference.

The net is :class:`ff_kernels.nn.FFRecurrentLocal` at the recipe's size (``ff-train cifar``):
2 or 3 hidden 32x32x3 maps, 11x11 bottom-up and top-down windows, the label into the last
layer. One batch is ``FFRecurrentLocal.ff_backward`` on B positive and B negative images over
``--iterations`` damped iterations (the recipe's 6): the bottom-up pass, the iterations, and
every layer's local weight gradient. Also timed: the recipe's evaluation of B images, 10
labels each over the same iterations (``FFRecurrentLocal.goodness``). B defaults to 20 (the
recipe's is 100) to keep the reference's memory and time small. On the CPU the compiled ops
run twice, once per algorithm of the CPU kernels (``FF_KERNELS_LOCAL2D_CPU``, see
csrc/local2d_cpu_rows.h): "cpu-rows" (vectorized over output columns) and "cpu-tiles"
(vectorized over images). Prints median ms per provider and the ratios measured in this run,
and appends rows to ``--csv``.

    python benchmarks/bench_recurrent_local.py                # CPU, depth 2
    python benchmarks/bench_recurrent_local.py --depth 3 --device cuda

To compare two versions of the kernels, run the same command from each checkout.
"""

from __future__ import annotations

import argparse
import os

import torch

from ff_kernels.paper.recipes.cifar_ff_net import FFRecurrentLocal

from common import append_csv, interleaved_medians, machine_name, today

NUM_LABELS = 10


CPU_ALGORITHMS = ("rows", "tiles")


def provider(name: str, depth: int, device: str, images: torch.Tensor, codes: torch.Tensor, iterations: int):
    """(train batch, evaluation) closures of one provider ("cpu-rows", "cpu-tiles", "cuda" or
    "reference"); the same seeded weights for every provider."""
    backend, _, algorithm = name.partition("-")
    torch.manual_seed(0)
    net = FFRecurrentLocal(depth=depth, backend=backend, device=device)
    batch = images.shape[0] // 2
    eval_images = images[:batch].repeat(NUM_LABELS, 1, 1, 1)  # every image with each label
    eval_codes = torch.eye(NUM_LABELS, device=device).repeat_interleave(batch, 0)

    def use_algorithm():
        if algorithm:
            os.environ["FF_KERNELS_LOCAL2D_CPU"] = algorithm

    def train():
        use_algorithm()
        for param in net.parameters():
            param.grad = None
        net.ff_backward(images, codes, batch, iterations)

    def evaluate():
        use_algorithm()
        net.goodness(eval_images, eval_codes, iterations)

    return train, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--depth", type=int, default=2, help="hidden layers (Table 1: 2 or 3)")
    parser.add_argument("--batch", type=int, default=20,
                        help="positive images per batch, as many negatives (the recipe's: 100; the reference's "
                             "patches take about 3 MB per image and iteration)")
    parser.add_argument("--iterations", type=int, default=6, help="damped iterations after the bottom-up pass")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per provider and op")
    parser.add_argument("--skip-reference", action="store_true", help="leave out the slow torch reference")
    parser.add_argument("--csv", default="benchmarks/results.csv")
    args = parser.parse_args()

    device, machine = args.device, machine_name(args.device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2 * args.batch, 3, 32, 32, generator=gen).to(device)
    labels = torch.randint(0, NUM_LABELS, (2 * args.batch,), generator=gen)
    codes = torch.nn.functional.one_hot(labels, NUM_LABELS).float().to(device)
    compiled = [f"cpu-{a}" for a in CPU_ALGORITHMS] if device == "cpu" else [device]
    names = compiled + ([] if args.skip_reference else ["reference"])
    providers = {name: provider(name, args.depth, device, images, codes, args.iterations) for name in names}

    print(f"# FFRecurrentLocal depth {args.depth}, 32x32x3 maps, k=11, batch {args.batch} + {args.batch}, "
          f"{args.iterations} iterations, {machine}, torch {torch.__version__}, {today()}")
    print(f"{'provider':<12}{'train batch ms':>16}{'evaluate ms':>14}")
    fns = {(name, op): fn for name, pair in providers.items() for op, fn in zip(("train", "eval"), pair)}
    medians = interleaved_medians(fns, args.min_run_time)
    csv_rows = []
    for name in providers:
        train_s, eval_s = medians[(name, "train")], medians[(name, "eval")]
        print(f"{name:<12}{train_s * 1e3:>16.1f}{eval_s * 1e3:>14.1f}")
        for op, seconds in (("recurrent_local_train_batch", train_s), ("recurrent_local_evaluate", eval_s)):
            csv_rows.append({"op": op, "provider": name, "shape": f"depth{args.depth}-32x32x3-k11-it{args.iterations}",
                                 "batch": args.batch, "ms": round(seconds * 1e3, 4), "machine": machine, "date": today()})
    pairs = [("cpu-rows", "cpu-tiles")] if device == "cpu" else []
    pairs += [(fast, "reference") for fast in compiled if "reference" in providers]
    for fast, slow in pairs:
        print(f"{fast} vs {slow}: train batch {medians[(slow, 'train')] / medians[(fast, 'train')]:.2f}x, "
              f"evaluate {medians[(slow, 'eval')] / medians[(fast, 'eval')]:.2f}x")
    append_csv(args.csv, csv_rows)


if __name__ == "__main__":
    main()
