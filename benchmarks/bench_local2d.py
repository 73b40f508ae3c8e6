"""The paper's CIFAR-10 local layer (32x32x3 -> 32x32x3, 11x11 windows, padding 5): three ways.

    compiled   the local2d kernels (csrc/), weight (1024, 3, 363)
    dense      FFLinear(3072, 3072, mask=local_dense_mask(spec)): the same connectivity as a
               masked dense layer (paper footnote 13), weight 3072 x 3072 + the mask
    reference  functional_local.py + autograd (gather of every window, einsum)

Times one forward (normalized output + goodness) and one FF update (forward + loss + fused SGD
step with momentum and weight decay; half the batch positive, half negative), median ms, and
prints the ratios measured in this one run and each provider's parameter memory.

    python benchmarks/bench_local2d.py                 # CPU
    python benchmarks/bench_local2d.py --device cuda

Appends rows to ``--csv`` (default benchmarks/results.csv).
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

import ff_kernels
from ff_kernels.functional import local as FFL
from ff_kernels.ops.local2d import ff_local2d_forward, ff_local2d_step

from common import append_csv, interleaved_medians, machine_name, today

SPEC = FFL.LocalSpec(3, 32, 32, 3, kernel=11, stride=1, padding=5)
SGD = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}


def mib(*tensors: torch.Tensor) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def local_params(device):
    torch.manual_seed(0)
    bound = 1.0 / SPEC.block_size**0.5
    w = (torch.rand(*SPEC.weight_shape, device=device) * 2 - 1) * bound * FFL.local_valid_mask(SPEC, device)[:, None, :]
    b = (torch.rand(*SPEC.bias_shape, device=device) * 2 - 1) * bound
    return w, b, torch.zeros_like(w), torch.zeros_like(b)


def local_provider(backend, device, x, half):
    """(forward, update, parameter MiB) of the local op on ``backend``."""
    w, b, w_buf, b_buf = local_params(device)

    def forward():
        ff_local2d_forward(x, w, b, SPEC, backend=backend)

    def update():
        ff_local2d_step(x[:half], x[half:], w, b, SPEC, threshold=SPEC.out_features, mode="sgd",
                        weight_buf=w_buf, bias_buf=b_buf, backend=backend, **SGD)

    return forward, update, mib(w, b)


def dense_backend(device) -> str:
    """FFLinear's fast backend for ``device``: "cpu", or "triton" when its kernels exist, else "reference"."""
    if device == "cpu":
        return "cpu"
    have_triton = importlib.util.find_spec("triton") and importlib.util.find_spec("ff_kernels.ops.triton_linear")
    return "triton" if have_triton else "reference"


def dense_provider(backend, device, x, half):
    """(forward, update, parameter MiB incl. the bool mask) of the masked dense FFLinear."""
    torch.manual_seed(0)
    layer = ff_kernels.FFLinear(SPEC.in_features, SPEC.out_features, mask=FFL.local_dense_mask(SPEC), backend=backend,
                                device=device)
    flat = x.flatten(1)

    def forward():
        layer.forward_with_goodness(flat)

    def update():
        layer.ff_step(flat[:half], flat[half:], **SGD)

    return forward, update, mib(layer.weight, layer.bias, layer.mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=256, help="images per forward; the update: half positive")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per provider and op")
    parser.add_argument("--skip-reference", action="store_true", help="leave out the slow torch reference")
    parser.add_argument("--csv", default="benchmarks/results.csv")
    args = parser.parse_args()

    device, machine = args.device, machine_name(args.device)
    torch.manual_seed(1)
    x = torch.rand(args.batch, *SPEC.input_shape, device=device)
    half = args.batch // 2
    providers = {
        f"compiled ({device})": local_provider(device, device, x, half),
        f"dense ({dense_backend(device)})": dense_provider(dense_backend(device), device, x, half),
    }
    if not args.skip_reference:
        providers["reference"] = local_provider("reference", device, x, half)

    print(f"# FF local layer {SPEC.input_shape} -> {SPEC.output_shape}, k={SPEC.kernel}, p={SPEC.padding}, "
          f"batch {args.batch}, {machine}, torch {torch.__version__}, {today()}")
    print(f"{'provider':<22}{'forward ms':>12}{'update ms':>12}{'params MiB':>12}")
    fns = {(name, op): fn for name, (forward, update, _) in providers.items() for op, fn in (("fwd", forward), ("upd", update))}
    medians = interleaved_medians(fns, args.min_run_time)
    times, csv_rows = {}, []
    for name, (_, _, memory) in providers.items():
        times[name] = (medians[(name, "fwd")], medians[(name, "upd")])
        print(f"{name:<22}{times[name][0] * 1e3:>12.2f}{times[name][1] * 1e3:>12.2f}{memory:>12.2f}")
        for op, seconds in zip(("ff_local2d_forward", "ff_local2d_update"), times[name]):
            csv_rows.append({"op": op, "provider": name, "shape": "32x32x3-k11p5", "batch": args.batch,
                                 "ms": round(seconds * 1e3, 4), "machine": machine, "date": today()})
    compiled = times[f"compiled ({device})"]
    for name, (fwd, upd) in times.items():
        if not name.startswith("compiled"):
            ratios = f"forward {fwd / compiled[0]:>6.2f}x   update {upd / compiled[1]:>6.2f}x"
            print(f"compiled speedup vs {name:<18} {ratios}")
    append_csv(args.csv, csv_rows)


if __name__ == "__main__":
    main()
