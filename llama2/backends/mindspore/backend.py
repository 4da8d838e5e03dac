"""`MindSporeBackend`: the lowering table and `build`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llama2.core.backend import Backend, RuntimeOptions
from llama2.core.graph import Llama

__all__ = ["MindSporeBackend"]


class MindSporeBackend(Backend):
    """MindSpore (primary backend): PyNative for debugging, `mindspore.jit` for speed ("graph" mode)."""

    name = "mindspore"

    def __init__(self) -> None:
        super().__init__()
        from llama2.backends.mindspore.lowering import register_default_lowerings

        register_default_lowerings(self)

    @property
    def lowerings(self) -> dict[type, Callable[..., Any]]:
        """The lowering table: node type -> fn(node, backend) returning an `nn.Cell` (add with `lowering`)."""
        return self._lowerings

    def available(self) -> tuple[bool, str]:
        try:
            import mindspore  # noqa: F401
        except ImportError as exc:
            return False, f"mindspore is not installed ({exc})"
        return True, ""

    def build(self, graph: Llama, options: RuntimeOptions | None = None):
        """Lower `graph` into cells on the device of `options` (weights zero until set or initialized)."""
        import attrs

        from llama2.backends.mindspore.device import configure
        from llama2.backends.mindspore.parallel import init_from_env, msrun_device_id
        from llama2.backends.mindspore.runtime import MindSporeRuntime

        options = options or RuntimeOptions()
        # under msrun on GPU/Ascend: worker i takes device DEVICE_ID=i (its local rank) unless one is given
        options = attrs.evolve(options, device_id=msrun_device_id(options.device, options.device_id))
        compute_dtype = configure(options)
        init_from_env()  # under msrun: join the process group (data parallel); a no-op otherwise
        net = self.lower(graph)
        net.set_train(False)
        return MindSporeRuntime(graph, options, net, compute_dtype)
