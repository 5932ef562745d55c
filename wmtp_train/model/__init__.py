"""The MTP Llama with a value head: arguments (:mod:`.args`), blocks (:mod:`.layers`), the critic
(:mod:`.value_head`), the model and its loss (:mod:`.mtp`), Meta checkpoint I/O (:mod:`.meta_checkpoint`)
and LoRA adapters (:mod:`.lora`).
"""

from wmtp_train.model.args import PRESETS, ModelArgs, resolve_args
from wmtp_train.model.lora import (
    LoRAOptions,
    apply_lora,
    export_lora_adapters,
    load_lora_adapters,
    merge_lora_state,
)
from wmtp_train.model.meta_checkpoint import checkpoint_args, export_meta_checkpoint, load_meta_checkpoint
from wmtp_train.model.mtp import LossOptions, ModelOutput, MTPTransformer, TrunkOutput, build_model
from wmtp_train.model.value_head import ValueHead

__all__ = [
    "PRESETS",
    "LoRAOptions",
    "LossOptions",
    "MTPTransformer",
    "ModelArgs",
    "ModelOutput",
    "TrunkOutput",
    "ValueHead",
    "apply_lora",
    "build_model",
    "checkpoint_args",
    "export_lora_adapters",
    "export_meta_checkpoint",
    "load_lora_adapters",
    "load_meta_checkpoint",
    "merge_lora_state",
    "resolve_args",
]
