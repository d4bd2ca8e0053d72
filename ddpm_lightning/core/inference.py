"""The network prepared for sampling: channels-last, optional bf16 autocast and torch.compile.

Samplers only call ``net(x, t)``; this wrapper changes how that call runs, never what the
sampler does with its output, which is returned in float32 so that every update of the chain
stays in full precision.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


class InferenceNet(torch.nn.Module):
    """``net`` for sampling.

    channels_last  the weights and inputs in NHWC (faster convolutions on CPU and GPU; the
                   output changes by round-off only).
    bf16           the network's forward under bf16 autocast (on CPUs with AMX and on GPUs);
                   the output is cast back to float32.
    compile        ``torch.compile`` of the network's forward (one compilation per batch shape).
    """

    def __init__(self, net: torch.nn.Module, channels_last: bool = True, bf16: bool = False,
                 compile: bool = False):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.channels_last, self.bf16, self.compiled = channels_last, bf16, compile
        self._forward = torch.compile(self.net, dynamic=False) if compile else self.net
        for name in ("in_channels", "image_size", "out_channels"):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # bf16=False leaves the caller's autocast state as it is (an autocast(enabled=False)
        # here would switch off any autocast around the call)
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with ctx:
            out = self._forward(x, t)
        return out.float().contiguous()


@contextmanager
def eval_mode(net: torch.nn.Module):
    """``net`` in eval mode inside the block, in its earlier mode after it."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def prepare(net: torch.nn.Module, channels_last: bool = True, bf16: bool = False,
            compile: bool = False) -> torch.nn.Module:
    """``net`` in eval mode, wrapped for sampling (see ``InferenceNet``)."""
    for key, value in (("channels_last", channels_last), ("bf16", bf16), ("compile", compile)):
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r} is invalid; it must be true or false")
    net = net.eval()
    if not (channels_last or bf16 or compile):
        return net
    return InferenceNet(net, channels_last, bf16, compile).eval()
