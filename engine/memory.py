"""How much memory the KV cache may take: from config, or from free device memory."""

from __future__ import annotations

import torch


def free_device_bytes(device: torch.device) -> int:
    """Free memory of the device now: pynvml on CUDA, psutil (available RAM) on CPU."""
    if device.type == "cuda":
        import pynvml

        pynvml.nvmlInit()
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
        finally:
            pynvml.nvmlShutdown()
    import psutil

    return int(psutil.virtual_memory().available)


def kv_cache_num_blocks(*, budget_bytes: int | None, device: torch.device, fraction: float,
                        headroom_bytes: int, bytes_per_block: int, max_useful_blocks: int) -> int:
    """Blocks for the KV cache. Without an explicit budget: fraction of free memory (measured
    after the weights are loaded, so they are already excluded) minus activation headroom.
    Never more blocks than max_num_seqs full-length requests could use."""
    if budget_bytes is None:
        budget_bytes = int(free_device_bytes(device) * fraction) - headroom_bytes
    num_blocks = min(budget_bytes // bytes_per_block, max_useful_blocks)
    if num_blocks < 1:
        raise MemoryError(
            f"KV cache budget {budget_bytes} bytes is below one block ({bytes_per_block} bytes)")
    return int(num_blocks)
