"""Training FLOPs of one micro-batch with frozen-base LoRA accounted for, and device peaks for MFU.

A matmul Y = X W costs 2mnk forward, 2mnk for the input gradient and 2mnk for the weight
gradient. With LoRA the base weights are frozen, so their weight gradient is never computed:
the familiar "6 x params x tokens" becomes 4 for the base and 6 only for the adapter. The
attention core (QK^T and AV, causal: half the square) has no weights: backward costs 2x its
forward. Gradient checkpointing recomputes the forward once more. The output layer only runs on
the positions whose logits the loss needs (the response), not on the whole prompt.
"""

from __future__ import annotations

import os

# Dense peak TFLOPs per device (bf16/fp16 tensor cores; TF32 for fp32 training on a GPU).
GPU_PEAK_TFLOPS = {  # substring of torch.cuda.get_device_name() -> (bf16, tf32)
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10G": (125.0, 62.5),
    "L4": (121.0, 60.0),
    "V100": (125.0, 15.7),
}
# No vendor number for a CPU: nominal = cores x 2.5 GHz x 32 fp32 FLOPs/cycle (two AVX2 FMA
# units). MFU on the CPU is labelled "cpu_nominal" and only good for comparing runs.
CPU_FLOPS_PER_CORE = 2.5e9 * 32


def device_peak_flops(cuda: bool, dtype: str, override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s per rank, label) for MFU."""
    if override_tflops:
        return override_tflops * 1e12, "configured"
    if cuda:
        import torch

        name = torch.cuda.get_device_name()
        for key, (half, tf32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (half if dtype in ("bf16", "fp16") else tf32) * 1e12, name
        return 0.0, f"{name} (unknown peak; set logging.peak_tflops)"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = max(1, (os.cpu_count() or 1) // local)
    return cores * CPU_FLOPS_PER_CORE, "cpu_nominal"


class FlopCounter:
    def __init__(self, config, lora_r: int | None, lora_targets: list[str], full: bool, checkpointing: bool):
        h = config.hidden_size
        hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
        hq, hkv, inter = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
        shapes = {
            "q_proj": (h, hq),
            "k_proj": (h, hkv),
            "v_proj": (h, hkv),
            "o_proj": (hq, h),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }
        self.layers = config.num_hidden_layers
        self.hq = hq
        self.base = sum(i * o for i, o in shapes.values())  # weights per layer
        self.lora = sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in lora_targets) if lora_r and not full else 0
        self.head = h * config.vocab_size
        self.full = full
        self.checkpointing = checkpointing

    def micro_batch(self, tokens: int, seq_len: int, logit_positions: int) -> float:
        """FLOPs to train on `tokens` real tokens (sequences of `seq_len`), the loss on
        `logit_positions` output positions."""
        linear_fwd = 2 * tokens * (self.base + self.lora) * self.layers
        attn_fwd = 2 * 2 * tokens * (seq_len / 2) * self.hq * self.layers
        head_fwd = 2 * logit_positions * self.head
        fwd = linear_fwd + attn_fwd + head_fwd
        if self.full:
            bwd = 2 * (linear_fwd + head_fwd) + 2 * attn_fwd
        else:
            lora_fwd = 2 * tokens * self.lora * self.layers
            bwd = (linear_fwd - lora_fwd) + 2 * lora_fwd + 2 * attn_fwd + head_fwd
        return fwd + bwd + (fwd if self.checkpointing else 0)
