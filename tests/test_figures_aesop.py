"""figures_aesop: the Figure 5 PNG and the sampled text of finished (tiny) aesop runs."""

import torch

from ff_kernels.paper.figures_aesop import SAMPLES, main
from ff_kernels.paper.recipes.aesop import AesopConfig, AesopFF
from ff_kernels.paper.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_run(folder, regime):
    """Train 2 epochs of 2 x 8 ReLUs on 4 strings of 16 characters of a random text in ``folder``."""
    letters = torch.randint(0, 26, (200,), generator=torch.Generator().manual_seed(0))
    (folder / "aesop.txt").write_text("".join(chr(97 + int(c)) for c in letters), encoding="utf-8")
    config = AesopConfig(regime=regime, width=8, depth=2, window=3, context=4, string_length=16, num_strings=4,
                         test_strings=2, batch_size=8, epochs=2, data_dir=str(folder))
    run_dir = folder / regime
    train(AesopFF(config), run_dir, progress=False)
    return run_dir


def test_figure_and_samples(tmp_path, capsys):
    runs = [tiny_run(tmp_path, regime) for regime in ("teacher", "random")]
    png = tmp_path / "figures" / "aesop.png"
    assert main([str(r) for r in runs] + ["--out", str(png), "--samples", "2"]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    text = (runs[0] / SAMPLES).read_text()
    real = [line for line in text.splitlines() if line.startswith("real:  ")]
    model = [line for line in text.splitlines() if line.startswith("model: ")]
    assert len(real) == len(model) == 2
    for r, m in zip(real, model):
        assert len(r) == len(m) == 7 + 16 + 1 and r[7:12] == m[7:12]  # the same context and "|"
    assert "teacher after 2 epochs" in capsys.readouterr().out


def test_not_a_run_directory(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1
    assert "config.json is missing" in capsys.readouterr().err
