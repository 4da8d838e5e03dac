"""A third-party adapter (examples/adapter_plugin, IA3) pip-installed offline and used by name."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama2 import peft
from llama2.core.registry import ADAPTERS
from tests.peft_helpers import BACKENDS, ids, randomize, tiny

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "adapter_plugin"


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-cache-dir", "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"


@pytest.fixture(scope="module")
def ia3_installed(tmp_path_factory):
    src = tmp_path_factory.mktemp("plugin") / "adapter_plugin"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(src))
    importlib.invalidate_caches()
    saved = ADAPTERS._plugins_loaded
    ADAPTERS._plugins_loaded = False  # discover the newly installed entry point
    try:
        yield
    finally:
        _pip("uninstall", "-y", "llama2-ia3")
        ADAPTERS._items.pop("ia3", None)
        ADAPTERS._plugins_loaded = saved
        for name in [m for m in sys.modules if m.startswith("llama2_ia3")]:
            del sys.modules[name]


@pytest.mark.parametrize("backend", BACKENDS)
def test_plugin_by_name(ia3_installed, backend, tmp_path):
    assert "ia3" in ADAPTERS.names()
    adapter = peft.get_adapter("ia3")
    assert type(adapter).__module__ == "llama2_ia3"
    m = tiny(backend)
    x = ids()
    base = m.forward(x)
    peft.attach_adapter(m, "ia3", targets=["k_proj", "v_proj"])
    names = peft.adapter_params(m)
    assert sorted(names) == sorted(
        f"model.layers.{i}.self_attn.{p}.ia3_l" for i in range(2) for p in ("k_proj", "v_proj")
    )
    assert sorted(m.runtime.trainable_names()) == sorted(names)
    np.testing.assert_allclose(m.forward(x), base, atol=1e-6)  # ones-initialized: the base function
    randomize(m, names, std=1.0)
    want = m.forward(x)
    assert np.abs(want - base).max() > 1e-3
    peft.save_adapter(m, tmp_path / "ad")
    fresh = tiny(backend)
    peft.load_adapter(fresh, tmp_path / "ad")
    np.testing.assert_array_equal(fresh.forward(x), want)
    # composes with a built-in adapter
    peft.attach_adapter(fresh, "lora", r=2, targets=["q_proj"])
    assert set(peft.adapter_params(fresh)) > set(names)
