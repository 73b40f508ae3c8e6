"""How many hidden ReLUs are off in a trained net, and whether sparse GEMMs would pay.

For an ``ff-train`` run directory (supervised, jitter, unsupervised, local, recurrent) this loads
the checkpoint and runs the first ``--images`` evaluation images through the net the way
training and the test do, then prints per hidden layer the share of ReLUs that are exactly 0:

- supervised / jitter: rows with the true label (positive), a random wrong label (negative),
  the neutral label (the softmax's pass) and all 10 labels (the test);
- unsupervised / local: real images and hybrids of them;
- recurrent: the states (what the layers above and below receive) and the ReLUs of the
  iterations (where the weight gradient's delta is 0), over the 8 iterations with the true
  and a wrong label.

The zeros of layer l's output are the zeros of layer l+1's input, and a unit that is off has a
zero delta, so both GEMMs of a step could skip them. For every dense layer above the first it
then times, on those real activities (``--rows`` rows), the forward GEMM ``x @ W.T`` dense
against ``torch.sparse.mm`` with x in CSR form (with and without the conversion), and the
weight gradient ``delta.T @ x`` likewise, interleaved.

    python benchmarks/relu_sparsity.py supervised runs/supervised --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

from ff_kernels.paper.recipes import RECIPES
from ff_kernels.paper.train import load_trained

from common import interleaved_step_times, load_average, machine_name, today


def zero_share(t: torch.Tensor) -> float:
    return float((t == 0).float().mean())


def idle_units(t: torch.Tensor, rows: int) -> float:
    """Share of the units that are 0 in every row of a batch of ``rows`` rows (mean over batches):
    the columns a dense GEMM on the active units only would skip."""
    batches = [b for b in t.split(rows) if b.shape[0] == rows] or [t]
    return sum(float((b == 0).all(0).float().mean()) for b in batches) / len(batches)


def supervised_activities(recipe, images, labels):
    """{row kind: per-layer raw ReLU activities (rows, width)} and the layers' inputs of the positive rows."""
    model = recipe.model
    g = torch.Generator().manual_seed(0)
    wrong = (labels + torch.randint(1, 10, labels.shape, generator=g)) % 10
    kinds = {
        "positive": model.inputs(images, labels),
        "negative": model.inputs(images, wrong),
        "neutral": model.inputs(images, torch.full((images.shape[0], 10), 0.1)),
        "10 labels": model.inputs(images.repeat(10, 1), torch.arange(10).repeat_interleave(images.shape[0])),
    }
    return {kind: raw_activities(model.net, x) for kind, x in kinds.items()}


def raw_activities(net, x):
    """Per layer: (input rows, raw ReLU activities) of an FFSequential of FFLinear layers."""
    out = []
    with torch.no_grad():
        for layer in net:
            h = F.relu(F.linear(x, layer.weight, layer.bias))
            out.append((x, h))
            x = layer(x)
    return out


def hybrid_activities(recipe, images):
    from ff_kernels.paper.data import hybrid_negatives

    model = recipe.model
    hybrids = hybrid_negatives(images, torch.Generator().manual_seed(0), recipe.config.blur_steps)
    result = {}
    for kind, batch in (("images", images), ("hybrids", hybrids)):
        x, layers = model.inputs(batch), []
        with torch.no_grad():
            for layer in model.net:
                out = layer(x)
                layers.append((x.flatten(1), out.flatten(1)))  # zeros of the output = zeros of the ReLUs
                x = out
        result[kind] = layers
    return result


def recurrent_activities(recipe, images, labels):
    """{kind: per layer (states over iterations, ReLUs over iterations)} with the true and a wrong label."""
    from ff_kernels.functional import recurrent as FFR

    model = recipe.model
    net = model.net
    g = torch.Generator().manual_seed(0)
    wrong = (labels + torch.randint(1, 10, labels.shape, generator=g)) % 10
    result = {}
    for kind, lab in (("true label", labels), ("wrong label", wrong)):
        bottom, top = model.bottom(images), model.top(lab)
        states = net.initial_states(bottom)
        per_layer = [([], []) for _ in net.layers]
        with torch.no_grad():
            for _ in range(recipe.config.iterations):
                inputs = net.layer_inputs(states, bottom, top)
                new = []
                for l, (layer, x, h) in enumerate(zip(net.layers, inputs, states)):
                    state, active = FFR.damped_state(x, h, layer.weight, layer.bias, net.damping)
                    per_layer[l][0].append(state)
                    per_layer[l][1].append(active)
                    new.append(state)
                states = new
        result[kind] = [(torch.cat(s), torch.cat(a)) for s, a in per_layer]
    return result


def sparse_gemm_times(x: torch.Tensor, weight: torch.Tensor, min_run_time: float) -> dict:
    """Dense vs CSR for the forward ``x @ W.T`` and the weight gradient ``delta.T @ x`` (delta with
    the sparsity of the layer's own ReLUs, here ReLU(x @ W.T) > 0)."""
    x = x.contiguous()
    w_t = weight.t().contiguous()
    delta = F.relu(x @ weight.t())
    delta_t = delta.t().contiguous()
    x_csr = x.to_sparse_csr()
    delta_t_csr = delta_t.to_sparse_csr()
    fns = {
        "forward dense": lambda: x @ w_t,
        "forward CSR": lambda: torch.sparse.mm(x_csr, w_t),
        "forward CSR + conversion": lambda: torch.sparse.mm(x.to_sparse_csr(), w_t),
        "gradient dense": lambda: delta_t @ x,
        "gradient CSR (delta)": lambda: torch.sparse.mm(delta_t_csr, x),
        "gradient CSR + conversion": lambda: torch.sparse.mm(delta_t.to_sparse_csr(), x),
    }
    return interleaved_step_times(fns, min_run_time, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=["supervised", "jitter", "unsupervised", "local", "recurrent"])
    parser.add_argument("run_dir")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--images", type=int, default=1000, help="evaluation images to measure on")
    parser.add_argument("--rows", type=int, default=200, help="rows of the timed GEMMs (a training step's 2 x 100)")
    parser.add_argument("--min-run-time", type=float, default=2.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

    recipe, epoch = load_trained(RECIPES[args.recipe], args.run_dir, data_dir=args.data_dir, device="cpu")
    images, labels = recipe.eval_images[:args.images], recipe.eval_labels[:args.images]
    print(f"# ReLUs at exactly 0, {args.recipe} after {epoch} epochs ({args.run_dir}), {images.shape[0]} "
          f"evaluation images; {machine_name('cpu')}, torch {torch.__version__}, {load_average()}, {today()}")
    timing_inputs = []
    if args.recipe in ("supervised", "jitter"):
        acts = supervised_activities(recipe, images, labels)
        for kind, layers in acts.items():
            print(f"{kind:<12}" + "  ".join(f"layer {l + 1}: {zero_share(h):6.1%}" for l, (_, h) in enumerate(layers)))
        both = [torch.stack([p, n], 1).flatten(0, 1) for (_, p), (_, n) in zip(acts["positive"], acts["negative"])]
        print(f"{'idle units':<12}" + "  ".join(f"layer {l + 1}: {idle_units(h, args.rows):6.1%}"
                                              for l, h in enumerate(both))
              + f"  (0 in all {args.rows} rows of a batch: positive and negative rows of {args.rows // 2} images)")
        timing_inputs = [(f"layer {l + 1} (input: layer {l}'s output)", x, recipe.model.net[l].weight)
                         for l, (x, _) in enumerate(acts["positive"]) if l > 0]
    elif args.recipe in ("unsupervised", "local"):
        acts = hybrid_activities(recipe, images)
        for kind, layers in acts.items():
            print(f"{kind:<12}" + "  ".join(f"layer {l + 1}: {zero_share(h):6.1%}" for l, (_, h) in enumerate(layers)))
        both = [torch.stack([p, n], 1).flatten(0, 1) for (_, p), (_, n) in zip(acts["images"], acts["hybrids"])]
        print(f"{'idle units':<12}" + "  ".join(f"layer {l + 1}: {idle_units(h, args.rows):6.1%}"
                                              for l, h in enumerate(both)) + f"  (0 in all {args.rows} rows of a batch)")
        if args.recipe == "unsupervised":
            timing_inputs = [(f"layer {l + 1} (input: layer {l}'s output)", x, recipe.model.net[l].weight)
                             for l, (x, _) in enumerate(acts["images"]) if l > 0]
    else:
        acts = recurrent_activities(recipe, images, labels)
        for kind, layers in acts.items():
            print(f"{kind:<12}" + "  ".join(f"layer {l + 1}: states {zero_share(s):6.1%}, ReLUs {zero_share(a):6.1%}, "
                                            f"idle units {idle_units(a, args.rows):6.1%}"
                                            for l, (s, a) in enumerate(layers)))
        net = recipe.model.net
        states = acts["true label"]
        if len(net.layers) > 1:  # layer 2's input: [n(layer 1's state), label]
            x = net.normalize(states[0][0])
            top = recipe.model.top(labels).repeat(recipe.config.iterations, 1)
            timing_inputs = [("layer 2 (input: layer 1's state + label)", torch.cat([x, top], 1), net.layers[1].weight)]
    for name, x, weight in timing_inputs:
        rows = x[: args.rows]
        times = sparse_gemm_times(rows, weight.detach(), args.min_run_time)
        density = 1 - zero_share(rows)
        print(f"\n{name}: {rows.shape[0]} x {rows.shape[1]} @ {weight.shape[1]} x {weight.shape[0]}, "
              f"input density {density:.1%}")
        for op, seconds in times.items():
            base = times["forward dense" if op.startswith("forward") else "gradient dense"]
            print(f"  {op:<28}{seconds * 1e3:8.2f} ms   {base / seconds:5.2f}x dense")


if __name__ == "__main__":
    main()
