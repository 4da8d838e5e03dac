"""A third-party metric installed as a package (examples/metric_plugin) is found through the `llama2.metrics`
entry point group and used by name, from the API and the CLI; uninstalled, the name is unknown again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "metric_plugin"
DIST = "llama2-metric-example"

USE_IT = r"""
import json, sys
import numpy as np
import llama2
from llama2.cli import main
from llama2.core.config import ModelConfig
from llama2.core.model import create
from llama2.core.registry import METRICS

assert "token_accuracy" in METRICS.names(), METRICS.names()
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=128, max_seq_len=64)
model = create(cfg, backend="torch", seed=0)
rng = np.random.default_rng(0)
prompts = rng.integers(3, 128, size=(5, 4)).tolist()
# rows = random prompt + the model's own greedy continuation: the accuracy is neither 0 nor 1
cont = model.generate_ids(prompts, max_new_tokens=12, temperature=0.0, eos_id=None)
rows = np.array([p + c for p, c in zip(prompts, cont)])
res = llama2.evaluate(model, "token_accuracy", data=rows, batch_size=2, progress=False)
logits = model.forward(rows[:, :-1])
expected = float((logits.argmax(-1) == rows[:, 1:]).mean())
out = sys.argv[1]
model.save(out + "/model")
np.save(out + "/rows.npy", rows)
rc = main(["evaluate", "--model", out + "/model", "--metric", "token_accuracy", "--data", out + "/rows.npy",
           "--backend", "torch", "--json", "--no-progress"])
print(json.dumps({"api": res, "expected": expected, "rc": rc}))
"""

GONE = r"""
from llama2.core.registry import METRICS
try:
    METRICS.get("token_accuracy")
except KeyError as exc:
    print("unknown:", exc)
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO)


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def test_installed_metric_plugin_works_by_name(tmp_path):
    if _pip("--version").returncode != 0:
        pytest.skip("pip is not available in this environment")
    pkg = tmp_path / "metric_plugin"
    shutil.copytree(EXAMPLE, pkg)
    installed = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(pkg))
    assert installed.returncode == 0, installed.stderr
    try:
        run = _python(USE_IT, str(tmp_path))
        assert run.returncode == 0, run.stderr[-3000:]
        lines = run.stdout.strip().splitlines()
        result = json.loads(lines[-1])
        cli = json.loads(lines[-2])
    finally:
        removed = _pip("uninstall", "-y", "-q", DIST)
    assert removed.returncode == 0, removed.stderr
    assert result["rc"] == 0
    assert result["api"]["tokens"] == 5 * 15
    assert result["api"]["token_accuracy"] == pytest.approx(result["expected"])
    assert 0.5 < result["expected"] < 1.0  # the greedy part is predicted, the random prompt mostly not
    assert cli["metric"] == "token_accuracy"
    assert cli["token_accuracy"] == pytest.approx(result["expected"], abs=1e-6)
    gone = _python(GONE)
    assert "unknown: " in gone.stdout and "token_accuracy" in gone.stdout
