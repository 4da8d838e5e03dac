"""Device, execution mode and dtype selection for the MindSpore backend."""

from __future__ import annotations

import contextlib
import io

import mindspore as ms
import numpy as np

from llama2.core.backend import RuntimeOptions

__all__ = ["DEVICE_TARGETS", "COMPUTE_DTYPES", "configure", "device_available"]

DEVICE_TARGETS = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "ascend": "Ascend"}
COMPUTE_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
_warmed = False


def device_available(device: str) -> bool:
    """Whether this MindSpore build can run on `device` ("cpu", "gpu"/"cuda", "ascend") here."""
    target = DEVICE_TARGETS[device]
    if target == "CPU":
        return True
    from mindspore import device_context

    module = device_context.gpu if target == "GPU" else device_context.ascend
    try:
        return bool(module.is_available())
    except Exception:
        return False


def _warm_up() -> None:
    # MindSpore wheels built against NumPy 1.x fail once, on the first op with a Python scalar, when NumPy 2 is
    # installed (a lazy numpy.core import raises and leaves an error set); every later call works. Absorb it here,
    # together with the long message NumPy writes to sys.stderr about it (harmless here, alarming to users).
    global _warmed
    if _warmed:
        return
    _warmed = True
    x = ms.Tensor(np.ones(1, np.float32))
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ms.ops.add(x, 1)
    except (SystemError, ImportError):
        pass


def configure(options: RuntimeOptions) -> ms.Type:
    """Select the device and PyNative mode for `options`; return the compute dtype. Clear errors when impossible."""
    target = DEVICE_TARGETS[options.device]
    if not device_available(options.device):
        raise RuntimeError(
            f"device {options.device!r} requested but this MindSpore build ({ms.__version__}) has no {target} "
            f"support on this machine; use device='cpu' or install a MindSpore {target} build"
        )
    if target == "CPU" and options.dtype != "float32":
        raise ValueError(
            f"dtype {options.dtype!r} requested on device 'cpu': MindSpore's CPU matmul lacks {options.dtype} "
            "kernels; use dtype='float32' on CPU (float16/bfloat16 need device='gpu' or 'ascend')"
        )
    current = ms.get_context("device_target")
    if current != target or ms.get_context("device_id") != options.device_id:
        try:
            ms.set_device(target, options.device_id)
        except RuntimeError as exc:
            raise RuntimeError(
                f"device {options.device!r} (id {options.device_id}) requested but MindSpore already runs on "
                f"{current} (id {ms.get_context('device_id')}) in this process and cannot switch: {exc}"
            ) from exc
    # Eager (PyNative) execution; "graph" mode compiles the hot functions with mindspore.jit instead of switching
    # the whole process to GRAPH_MODE.
    if ms.get_context("mode") != ms.PYNATIVE_MODE:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    _warm_up()
    return COMPUTE_DTYPES[options.dtype]
