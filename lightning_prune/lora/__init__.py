"""LoRA recovery that keeps the sparsity pattern: peft wrapping, convolutions, fused experts, FSDP2 row blocks.

`wrap` attaches and merges adapters (`W + M ⊙ s·B·A`), `conv` runs the masked delta of a convolution
(and refuses grouped ones), `experts` handles fused 3-D expert
parameters through peft's `target_parameters`, `sharded` merges on FSDP2 row blocks.
"""

from lightning_prune.lora.wrap import (
    adapter_parameters,
    attach_lora,
    base_name,
    check_lora_arguments,
    load_lora,
    lora_layers,
    lora_target_names,
    merge_lora,
    pruned_module_names,
    unwrapped_state_dict,
)

__all__ = [
    "adapter_parameters",
    "attach_lora",
    "base_name",
    "check_lora_arguments",
    "load_lora",
    "lora_layers",
    "lora_target_names",
    "merge_lora",
    "pruned_module_names",
    "unwrapped_state_dict",
]
