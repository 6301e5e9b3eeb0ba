"""The inspection notebook runs top to bottom against a real (tiny) training run."""

import os

import nbformat
from nbclient import NotebookClient

from roclip_jax import train
from tests.helpers import REPO, tiny_config


def test_inspect_notebook_executes(demo_root, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(demo_root, "roclip", max_steps=6), str(workdir))
  monkeypatch.setenv("ROCLIP_WORKDIR", str(workdir))
  monkeypatch.setenv("PYTHONPATH", REPO)
  nb = nbformat.read(os.path.join(REPO, "notebooks", "inspect_checkpoint.ipynb"), as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "step 6" in outputs
  assert "zero-shot top-1 on 16 test images" in outputs
  assert "pool: 32 rows, pointer 16, filled 100%" in outputs
