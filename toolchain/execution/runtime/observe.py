"""What actually ran: the attention operators and GPU kernels seen by the PyTorch profiler during
one small forward pass. Recorded next to what the recipe asked for."""
from __future__ import annotations

import re

import torch

from toolchain.execution.runtime import models

_ATTN = re.compile(r"attention|flash|fmha|sdpa|softmax|cudnn.*(mha|attn)|_efficient|bmm", re.I)


def attention_ops(model, meta: dict, device: str, seq: int = 16) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    ids = torch.randint(5, 1000, (2, seq), device=device)
    mask = torch.ones_like(ids)
    # no padding: kernels such as SDPA flash take no explicit mask, and padded batches are what
    # validate exercises
    with torch.no_grad(), models.sdpa_context(meta), profile(activities=activities) as prof:
        model(input_ids=ids, attention_mask=mask)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    names = {e.key for e in prof.key_averages() if _ATTN.search(e.key)}
    return sorted(names)[:40]
