"""Plant known bugs in a copy of the source and report which tests catch each one.

Usage (from the repository root, with the venv's python):

    .venv/bin/python scripts/mutation_check.py                 # every mutation, its tests
    .venv/bin/python scripts/mutation_check.py -k neutral      # mutations whose name contains "neutral"
    .venv/bin/python scripts/mutation_check.py --each          # every test of a mutation's list that catches it
    .venv/bin/python scripts/mutation_check.py --revision REV  # the library and tests of git revision REV
    .venv/bin/python scripts/mutation_check.py --full          # run the whole default suite per mutation

Each mutation replaces one snippet of the library or a recipe (an exact string that must occur
the stated number of times, so a mutation that no longer applies is reported, not skipped
silently). The repository is copied to a temporary folder beside a link to ``../shared``, the
mutation applied there, and pytest runs on the copy (``PYTHONPATH`` puts the copy's ``python/``
before the editable install) with ``-x``: a mutation is *caught* when a test fails, and the
first failing test is reported. Before the mutations, the unmutated copy must pass the same
tests, so a test that fails anyway is not counted as a catch.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = "python/ff_kernels/"
RECIPES = LIB + "paper/recipes/"
IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "runs", ".pytest_cache",
                                 ".ruff_cache")


@dataclass
class Mutation:
    """Replace ``old`` by ``new`` in ``path`` (both may be tuples: several edits of one file)."""

    name: str
    path: str
    old: str | tuple[str, ...]
    new: str | tuple[str, ...]
    tests: tuple[str, ...]
    count: int = 1  # occurrences of each ``old``, all replaced

    def edits(self) -> list[tuple[str, str]]:
        olds = (self.old,) if isinstance(self.old, str) else self.old
        news = (self.new,) if isinstance(self.new, str) else self.new
        return list(zip(olds, news, strict=True))

    def apply(self, text: str) -> str | None:
        """``text`` with every edit made, or None when a snippet does not occur ``count`` times."""
        for old, new in self.edits():
            if text.count(old) != self.count:
                return None
            text = text.replace(old, new)
        return text


SMOKE = "tests/test_recipes_smoke.py::test_recipe_learns_beyond_its_untrained_control"
FF_MATH_TESTS = ("tests/test_ff_truths.py", "tests/test_functional.py", "tests/test_nn_linear.py",
                 "tests/test_ops_linear.py", "tests/test_ff_properties.py")
SUPERVISED_TESTS = ("tests/test_supervised_procedures.py", "tests/test_recipe_negatives.py",
                    f"{SMOKE}[supervised]", f"{SMOKE}[jitter]", "tests/test_learning.py")
RECURRENT_TESTS = ("tests/test_recurrent.py", "tests/test_recipe_recurrent.py", "tests/test_recipe_negatives.py",
                   f"{SMOKE}[recurrent]")
CIFAR_TESTS = ("tests/test_cifar_recipes.py", "tests/test_recurrent_local.py", "tests/test_recipe_negatives.py",
               "tests/test_cifar_learning.py")
HYBRID_TESTS = ("tests/test_recipes_unsupervised.py", "tests/test_recipe_negatives.py", f"{SMOKE}[unsupervised]",
                f"{SMOKE}[local]")
AESOP_TESTS = ("tests/test_aesop_recipe.py", "tests/test_aesop_data.py", "tests/test_recipe_negatives.py",
               "tests/test_aesop_learning.py", f"{SMOKE}[aesop]")
# End-to-end runs: last, so that pytest -x reaches them only when the quick tests pass.
SLOW = ("tests/test_learning.py", "tests/test_recipes_smoke.py", "tests/test_cifar_learning.py",
        "tests/test_aesop_learning.py")

MUTATIONS = [
    # ---- the FF math
    Mutation("goodness: sum instead of sum of squares (reference)", LIB + "functional/__init__.py",
             "    return h.square().sum(-1)", "    return h.sum(-1)", FF_MATH_TESTS),
    Mutation("goodness: sum instead of sum of squares (CPU backend)", LIB + "ops/cpu_linear.py",
             'g = scale if goodness == "sum" else scale.square()', "g = h.sum(1, dtype=torch.float32)",
             FF_MATH_TESTS + SUPERVISED_TESTS, count=3),
    Mutation("FF loss sign flipped for negatives (loss and its gradient)", LIB + "functional/__init__.py",
             ("loss = loss + F.softplus(s_neg).mean(0).sum()", "torch.sigmoid(s) / max(n_neg, 1)"),
             ("loss = loss + F.softplus(-s_neg).mean(0).sum()", "-torch.sigmoid(-s) / max(n_neg, 1)"), FF_MATH_TESTS),
    Mutation("FF loss gradient sign flipped for negatives (loss as before)", LIB + "functional/__init__.py",
             "torch.sigmoid(s) / max(n_neg, 1)", "-torch.sigmoid(-s) / max(n_neg, 1)", FF_MATH_TESTS),
    Mutation("threshold ignored in the logit", LIB + "functional/__init__.py",
             "goodness_sign(kind) * (g - threshold) / temperature", "goodness_sign(kind) * g / temperature",
             FF_MATH_TESTS),
    Mutation("threshold ignored by the layers (always 0)", LIB + "nn/layer.py",
             "self.threshold = _finite(self._name(), \"threshold\", num_units if threshold is None else threshold)",
             "self.threshold = 0.0",
             FF_MATH_TESTS + SUPERVISED_TESTS),
    Mutation("threshold ignored by the layers (always 0; the layer before its finiteness check)", LIB + "nn/layer.py",
             "self.threshold = float(num_units if threshold is None else threshold)", "self.threshold = 0.0",
             FF_MATH_TESTS + SUPERVISED_TESTS),
    Mutation("normalization dropped between layers (CPU backend)", LIB + "ops/cpu_linear.py",
             "return (units * (1.0 / (scale + FF.NORM_EPS)).to(h.dtype)[..., None]).flatten(1)", "return h.clone()",
             FF_MATH_TESTS + SUPERVISED_TESTS),
    Mutation("normalization dropped (reference normalize)", LIB + "functional/__init__.py",
             "return h / normalization_scale(goodness(h, kind), kind, h.shape[-1], rms, eps).unsqueeze(-1)",
             "return h.clone()", FF_MATH_TESTS + RECURRENT_TESTS),
    Mutation("normalizing by the sum of squares instead of the length (reference)", LIB + "functional/__init__.py",
             'scale = g if check_goodness(kind) == "sum" else g.sqrt()', "scale = g", FF_MATH_TESTS),
    Mutation("normalizing by the sum of squares instead of the length (CPU backend)", LIB + "ops/cpu_linear.py",
             "_normalized(h, scale, goodness, rms, blocks)", "_normalized(h, scale.square(), goodness, rms, blocks)",
             FF_MATH_TESTS + SUPERVISED_TESTS, count=3),
    Mutation("recurrent layers see their neighbours' raw states", LIB + "nn/recurrent.py",
             "neighbours = [bottom, *(self.normalize(s) for s in states), top]", "neighbours = [bottom, *states, top]",
             RECURRENT_TESTS),
    Mutation("peer normalization sign flipped", LIB + "nn/peer_norm.py",
             "return self.strength * (r - r.mean())", "return self.strength * (r.mean() - r)",
             ("tests/test_peer_norm.py", "tests/test_recurrent.py")),
    Mutation("SGD step climbs the loss (CPU backend)", LIB + "ops/cpu_linear.py",
             "param.add_(buf, alpha=-lr)", "param.add_(buf, alpha=lr)", FF_MATH_TESTS),
    # ---- the negatives
    Mutation("supervised: negative labels = the true labels", RECIPES + "supervised_mnist.py",
             ("both = torch.stack([labels, wrong])", "model.inputs(images, labels), model.inputs(images, wrong), None"),
             ("both = torch.stack([labels, labels])", "model.inputs(images, labels), model.inputs(images, labels), None"),
             SUPERVISED_TESTS),
    Mutation("supervised: positives and negatives swapped", RECIPES + "supervised_mnist.py",
             ("both = torch.stack([labels, wrong])", "model.inputs(images, labels), model.inputs(images, wrong), None"),
             ("both = torch.stack([wrong, labels])", "model.inputs(images, wrong), model.inputs(images, labels), None"),
             SUPERVISED_TESTS),
    Mutation("supervised: hard negatives ignore the softmax", RECIPES + "supervised_mnist.py",
             "            return hard_wrong_labels(probs, labels, generator)",
             "            return random_wrong_labels(labels, NUM_CLASSES, generator)", SUPERVISED_TESTS),
    Mutation("hard wrong labels may be the true label", LIB + "paper/data/labels.py",
             "    weights[rows, labels.to(device)] = 0.0\n    degenerate", "    degenerate",
             ("tests/test_data.py",) + SUPERVISED_TESTS),
    Mutation("recurrent: negative labels = the true labels", RECIPES + "recurrent_mnist.py",
             "torch.cat([model.top(labels), model.top(wrong)])", "torch.cat([model.top(labels), model.top(labels)])",
             RECURRENT_TESTS),
    Mutation("cifar: negative labels = the true labels", RECIPES + "cifar_ff.py",
             "torch.cat([self.model.code(labels), self.model.code(wrong)])",
             "torch.cat([self.model.code(labels), self.model.code(labels)])", CIFAR_TESTS),
    Mutation("unsupervised: hybrid negatives = the real images", RECIPES + "unsupervised_mnist.py",
             "        negatives = hybrid_negatives(images, generator, self.config.blur_steps)\n        self.optimizer",
             "        negatives = images.clone()\n        self.optimizer", HYBRID_TESTS),
    Mutation("hybrids mix each image with itself", LIB + "paper/data/hybrid.py",
             "return _mix(images, images[partners], _mask_like(mask, images))", "return _mix(images, images, _mask_like(mask, images))",
             HYBRID_TESTS),
    Mutation("jitter: shifts ignored", RECIPES + "jitter_mnist.py",
             "self.train_images = random_shifts(self.unshifted_train_images, self.config.max_shift, generator)",
             "self.train_images = self.unshifted_train_images", ("tests/test_jitter.py", f"{SMOKE}[jitter]")),
    Mutation("jitter: shifts of 0 pixels", LIB + "paper/data/jitter.py",
             "        out[rows] = shift_images(square[rows], dy, dx)", "        out[rows] = square[rows]",
             ("tests/test_jitter.py", f"{SMOKE}[jitter]")),
    Mutation("aesop: teacher-forcing negatives = the positives", RECIPES + "aesop.py",
             "negatives = teacher_forcing_negatives(positives, torch.softmax(logits.detach(), 1), generator)",
             "negatives = positives.clone()",
             AESOP_TESTS),
    # ---- the evaluation
    Mutation("supervised: (i) picks argmin", RECIPES + "supervised_mnist.py",
             "self.model.label_scores(image_batch, part).argmax(1)", "self.model.label_scores(image_batch, part).argmin(1)",
             SUPERVISED_TESTS),
    Mutation("recurrent: test picks argmin", RECIPES + "recurrent_mnist.py",
             "self.model.label_scores(images, start).argmax(1)", "self.model.label_scores(images, start).argmin(1)",
             RECURRENT_TESTS),
    Mutation("cifar: goodness test picks argmin", RECIPES + "cifar_ff.py",
             "self.model.label_scores(x, start).argmax(1)", "self.model.label_scores(x, start).argmin(1)", CIFAR_TESTS),
    Mutation("supervised: label sign dropped for neg_ssq", RECIPES + "supervised_mnist.py",
             "return functional.goodness_sign(self.goodness_kind) * total", "return total", SUPERVISED_TESTS),
    Mutation("recurrent: label sign dropped for neg_ssq", RECIPES + "recurrent_mnist.py",
             "return functional.goodness_sign(c.goodness) * score", "return score", RECURRENT_TESTS),
    Mutation("cifar: label sign dropped for neg_ssq", RECIPES + "cifar_ff.py",
             "return functional.goodness_sign(self.config.goodness) * g.view(",  "return g.view(", CIFAR_TESTS),
    Mutation("supervised: (i) includes the first layer", RECIPES + "supervised_mnist.py",
             "total = g[:, self._scored_layers()].sum(1)", "total = g.sum(1)", SUPERVISED_TESTS),
    Mutation("supervised: (i) pairs each image's scores with other images' labels", RECIPES + "supervised_mnist.py",
             "total = g[:, self._scored_layers()].sum(1).view(NUM_CLASSES, batch).t()",
             "total = g[:, self._scored_layers()].sum(1).view(batch, NUM_CLASSES)", SUPERVISED_TESTS),
    Mutation("supervised: neutral label of zeros", RECIPES + "supervised_mnist.py",
             "neutral = neutral_label(images.shape[0], NUM_CLASSES, images.device, images.dtype)",
             "neutral = torch.zeros(images.shape[0], NUM_CLASSES, device=images.device, dtype=images.dtype)",
             SUPERVISED_TESTS),
    Mutation("cifar: neutral label of zeros", RECIPES + "cifar_ff.py",
             "neutral = neutral_label(images.shape[0], NUM_CLASSES, images.device, images.dtype)",
             "neutral = torch.zeros(images.shape[0], NUM_CLASSES, device=images.device, dtype=images.dtype)",
             CIFAR_TESTS),
    Mutation("neutral_label() of zeros", LIB + "paper/data/labels.py",
             "(batch, num_classes), 1.0 / num_classes,", "(batch, num_classes), 0.0,",
             ("tests/test_data.py",) + SUPERVISED_TESTS + CIFAR_TESTS),
    Mutation("supervised: softmax reads the layers below the scored ones", RECIPES + "supervised_mnist.py",
             "torch.cat([outputs[i].float() for i in self._scored_layers()], dim=1)",
             "torch.cat([outputs[i - 1].float() for i in self._scored_layers()], dim=1)", SUPERVISED_TESTS),
    Mutation("unsupervised: softmax reads the layers below its own", RECIPES + "unsupervised_mnist.py",
             "outputs[i].detach().flatten(1).float() for i in self.head_indices",
             "outputs[i - 1].detach().flatten(1).float() for i in self.head_indices", HYBRID_TESTS),
    Mutation("recurrent: softmax reads the first hidden layer only", RECIPES + "recurrent_mnist.py",
             "for s in states], dim=1)", "for s in [states[0]] * len(states)], dim=1)", RECURRENT_TESTS),
    Mutation("cifar: softmax reads the first hidden layer only", RECIPES + "cifar_ff.py",
             "self.net.normalize(states[i]).flatten(1) for i in self.head_indices",
             "self.net.normalize(states[0]).flatten(1) for i in self.head_indices", CIFAR_TESTS),
    Mutation("unsupervised: FF error counts the wrong side", RECIPES + "unsupervised_mnist.py",
             "(self.model.positive_probability(g_pos).mean(1) <= 0.5)",
             "(self.model.positive_probability(g_pos).mean(1) > 0.5)", HYBRID_TESTS),
    # ---- the recurrent dynamics
    Mutation("recurrent: damping ignored (functional)", LIB + "functional/recurrent.py",
             "return damping * previous + (1.0 - damping) * active, active", "return active, active",
             RECURRENT_TESTS),
    Mutation("recurrent: damping ignored (FFRecurrent)", LIB + "nn/recurrent.py",
             "self.damping = float(damping)", "self.damping = 0.0", RECURRENT_TESTS),
    Mutation("cifar: damping ignored", RECIPES + "cifar_ff_net.py",
             "self.damping = float(damping)", "self.damping = 0.0", CIFAR_TESTS),
    Mutation("recurrent: test averages iterations 4-5 instead of 3-5", RECIPES + "recurrent_mnist.py",
             "score = g[c.score_from - 1:c.score_to]", "score = g[c.score_from:c.score_to]", RECURRENT_TESTS),
    Mutation("recurrent: test averages iterations 1-5", RECIPES + "recurrent_mnist.py",
             "score = g[c.score_from - 1:c.score_to]", "score = g[:c.score_to]", RECURRENT_TESTS),
    Mutation("cifar: test sums iterations 5-6 instead of 4-6", RECIPES + "cifar_ff.py",
             "self.label_goodness(images, c.score_to, start)[c.score_from - 1:]",
             "self.label_goodness(images, c.score_to, start)[c.score_from:]", CIFAR_TESTS),
    # the work shared between rows (tests/test_shared_computation.py checks it against the plain computation)
    Mutation("supervised, shared layer 1: the label's weight column left out", RECIPES + "supervised_mnist.py",
             "z = label_part + part.preact  # (R, B, width)", "z = part.preact.expand_as(label_part).clone()",
             ("tests/test_shared_computation.py",) + SUPERVISED_TESTS),
    Mutation("supervised, shared layer 1: the input scaling ignores the label's pixels", RECIPES + "supervised_mnist.py",
             "return ((part.square + code_square) / NUM_PIXELS)", "return ((part.square + 0 * code_square) / NUM_PIXELS)",
             ("tests/test_shared_computation.py",) + SUPERVISED_TESTS),
    Mutation("recurrent, shared bottom-up: layer 1 loses its bottom-up term", LIB + "nn/recurrent.py",
             "z.view(-1, *up.shape).add_(up)", "z.view(-1, *up.shape).add_(up, alpha=0.0)",
             ("tests/test_shared_computation.py",) + RECURRENT_TESTS),
    Mutation("cifar, shared bottom-up: the label's drive left out of a one-layer net", RECIPES + "cifar_ff_net.py",
             "return torch.relu(image_term + drive), None", "return torch.relu(image_term), None",
             ("tests/test_shared_computation.py",) + CIFAR_TESTS),
    Mutation("peer normalization inside the step with the sign flipped (CPU linear step)", LIB + "ops/cpu_linear.py",
             "p = peer(h[:n_pos].mean(0, dtype=torch.float32))", "p = -peer(h[:n_pos].mean(0, dtype=torch.float32))",
             ("tests/test_peer_norm.py", "tests/test_nn_linear.py", "tests/test_shared_computation.py")),
    Mutation("peer normalization inside the step with the sign flipped (batched-GEMM local step)",
             LIB + "ops/gemm_local2d.py", "peer_p = peer(h[:, :, :n_pos]", "peer_p = -peer(h[:, :, :n_pos]",
             ("tests/test_peer_norm.py", "tests/test_local2d_gemm.py", f"{SMOKE}[local]")),
]


def ordered(tests) -> list[str]:
    """The tests without repeats, the end-to-end runs last (pytest -x stops at the first failure)."""
    unique = sorted(set(tests))
    slow = [t for t in unique if t.split("::")[0] in SLOW]
    return [t for t in unique if t not in slow] + slow


def copy_repository(revision: str | None) -> Path:
    """A copy of the working tree in a fresh folder beside a link to ../shared (tests/_paths.py's data).

    With ``revision``, the copy is that git revision's tree instead, plus the working tree's compiled
    extension, so that its own tests run on its own code and documents.
    """
    base = Path(tempfile.mkdtemp(prefix="ff-mutation-"))
    (base / "shared").symlink_to(ROOT.parent / "shared")
    repo = base / "repo"
    if revision is None:
        shutil.copytree(ROOT, repo, ignore=IGNORED, symlinks=True)
        return repo
    repo.mkdir()
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(repo)], input=archive.stdout, check=True)
    for compiled in (ROOT / "python").rglob("*.so"):
        shutil.copy2(compiled, repo / compiled.relative_to(ROOT))
    return repo


def run_pytest(repo: Path, tests: list[str], timeout: float) -> tuple[bool, str, float]:
    """(passed, first failing test or '', seconds) of ``pytest -x`` on ``tests`` in ``repo``."""
    env = dict(os.environ, PYTHONPATH=f"{repo / 'python'}{os.pathsep}{repo}")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rf", *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(command, check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "(timed out)", time.monotonic() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.MULTILINE)
    if done.returncode not in (0, 1):  # an interrupted run, a usage error, no tests: not a verdict
        raise RuntimeError(f"pytest exited with {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    if done.returncode == 0:
        return True, "", time.monotonic() - start
    return False, failed[0] if failed else "(a failure pytest did not name)", time.monotonic() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", action="append", default=[],
                        help="only mutations whose name contains this text (repeatable: any of them)")
    parser.add_argument("--revision", help="run on this git revision's library and tests instead of the working tree's")
    parser.add_argument("--full", action="store_true", help="run the whole default suite, not each mutation's tests")
    parser.add_argument("--tests", nargs="+", help="run these tests for every mutation instead of its own")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per pytest run")
    parser.add_argument("--each", action="store_true",
                        help="run each of a mutation's test files (or tests) on its own and list every one that catches it")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--dry-run", action="store_true", help="only check that every snippet is found")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated copy")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.k or any(k.lower() in m.name.lower() for k in args.k)]
    repo = copy_repository(args.revision)
    files = {str(p.relative_to(repo)) for p in (repo / "tests").glob("test_*.py")}

    def select(tests) -> list[str]:
        """``tests`` that exist in the copy; a test function it lacks (older tests) becomes its whole file."""
        chosen = []
        for test in tests:
            path, _, node = test.partition("::")
            if path in files:
                function = node.split("[")[0]
                chosen.append(test if not node or f"def {function}(" in (repo / path).read_text() else path)
        return ordered(chosen)

    missed = skipped = 0
    try:
        if args.dry_run:
            for mutation in chosen:
                applies = mutation.apply((repo / mutation.path).read_text()) is not None
                print(f"{'ok' if applies else 'BAD':4} {mutation.name}")
            return 0
        if not args.no_baseline:
            union = ["tests"] if args.full else select(args.tests or [t for m in chosen for t in m.tests])
            passed, first, seconds = run_pytest(repo, union, args.timeout)
            print(f"unmutated copy: {'passes' if passed else 'FAILS at ' + first} ({seconds:.0f} s)", flush=True)
            if not passed:
                return 2
        for mutation in chosen:
            tests = ["tests"] if args.full else select(args.tests or mutation.tests)
            path = repo / mutation.path
            original = path.read_text()
            mutated = mutation.apply(original)
            if mutated is None:
                print(f"not applied  {mutation.name}: a snippet does not occur {mutation.count} times in {mutation.path}")
                skipped += 1
                continue
            path.write_text(mutated)
            try:
                if args.each:
                    results = [(test, run_pytest(repo, [test], args.timeout)) for test in tests]
                    catchers = [first for _, (ok, first, _) in results if not ok]
                    passed = not catchers
                    first = ", ".join(catchers)
                    seconds = sum(r[2] for _, r in results)
                else:
                    passed, first, seconds = run_pytest(repo, tests, args.timeout)
            finally:
                path.write_text(original)
            missed += passed
            verdict = "missed" if passed else f"caught by {first}"
            print(f"{'MISSED' if passed else 'caught':7}  {mutation.name}: {verdict} ({seconds:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"copy kept in {repo}")
        else:
            shutil.rmtree(repo.parent)
    print(f"{len(chosen) - missed - skipped} of {len(chosen) - skipped} mutations caught"
          + (f" ({skipped} not applicable to this code)" if skipped else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
