"""A naive, per-image and per-time-step reference of the recurrent FF net (Hinton 2022, section 3.4).

Written from the paper's description, independently of ff_kernels' code: loops over images,
time steps and layers, matrix-vector products with the bottom-up and the top-down block of each
weight, the normalization written out. Only the weights are read from the module.
"""

import torch

EPS = 1e-6  # the library's normalization epsilon (added to the divisor)


def rms_normalize(v: torch.Tensor) -> torch.Tensor:
    """v (D,) scaled to unit mean square."""
    return v / (v.square().mean().sqrt() + EPS)


def naive_run(net, bottom: torch.Tensor, top: torch.Tensor, iterations: int, synchronous: bool = True):
    """States and goodness of an FFRecurrent (rms_norm, "ssq") for every image, one at a time.

    bottom: (B, D_0), top: (B, D_top), already normalized. Returns (states, goodness): states[t][l]
    (B, D_l) for t = 0..iterations (t = 0: the bottom-up pass), goodness (iterations, B, K).
    ``synchronous=False`` updates the layers in place, bottom to top (a deliberately wrong variant
    that tests use to show they can tell the two apart).
    """
    d = net.damping
    weights = [layer.weight.detach() for layer in net.layers]
    biases = [layer.bias.detach() for layer in net.layers]
    widths = net.sizes
    k = len(weights)
    all_states, all_goodness = [], []
    for b in range(bottom.shape[0]):
        h = []
        below = bottom[b]
        for l in range(k):  # t = 0: bottom-up only
            up = weights[l][:, : widths[l]]
            h.append(torch.relu(up @ below + biases[l]))
            below = rms_normalize(h[-1])
        trajectory, goodness = [list(h)], []
        for _ in range(iterations):
            old = list(h)
            source = old if synchronous else h
            for l in range(k):
                below = bottom[b] if l == 0 else rms_normalize(source[l - 1])
                above = top[b] if l == k - 1 else rms_normalize(source[l + 1])
                up, down = weights[l][:, : widths[l]], weights[l][:, widths[l]:]
                computed = torch.relu(up @ below + down @ above + biases[l])
                h[l] = d * old[l] + (1 - d) * computed
            trajectory.append(list(h))
            goodness.append(torch.stack([s.square().sum() for s in h]))
        all_states.append(trajectory)
        all_goodness.append(torch.stack(goodness))
    states = [[torch.stack([all_states[b][t][l] for b in range(bottom.shape[0])]) for l in range(k)]
              for t in range(iterations + 1)]
    return states, torch.stack(all_goodness, dim=1)
