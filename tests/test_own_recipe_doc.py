"""docs/own_recipe.md's example runs, trains through ff_kernels.paper.train and learns."""

import json
import re
import runpy

from _paths import REPO_ROOT


def test_readme_recipe_example_learns(tmp_path, monkeypatch):
    text = (REPO_ROOT / "docs" / "own_recipe.md").read_text()
    block = re.search(r"<!-- recipe-example -->\n```python\n(.*?)```\n<!-- /recipe-example -->", text, re.DOTALL)
    script = tmp_path / "recipe_example.py"
    script.write_text(block.group(1))
    monkeypatch.chdir(tmp_path)  # the example writes runs/shuffled
    summary = runpy.run_path(str(script), run_name="__main__")["summary"]
    lines = [json.loads(line) for line in (tmp_path / "runs" / "shuffled" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    # Shuffled rising sequences keep their values (and sum of squares) but lose their order,
    # which the layers learn to see: after 3 epochs they order nearly all held-out pairs correctly.
    assert summary["held_out_error"] < 0.05 and lines[0]["train_error"] > lines[-1]["train_error"]
