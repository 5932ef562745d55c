"""The MTP Llama with a value head: arguments (:mod:`.args`), blocks (:mod:`.layers`), the critic
(:mod:`.value_head`), the model and its loss (:mod:`.mtp`), and Meta checkpoint I/O (:mod:`.meta_checkpoint`).
"""

from wmtp_train.model.args import PRESETS, ModelArgs, resolve_args
from wmtp_train.model.meta_checkpoint import checkpoint_args, export_meta_checkpoint, load_meta_checkpoint
from wmtp_train.model.mtp import LossOptions, ModelOutput, MTPTransformer, TrunkOutput, build_model
from wmtp_train.model.value_head import ValueHead

__all__ = [
    "PRESETS",
    "LossOptions",
    "MTPTransformer",
    "ModelArgs",
    "ModelOutput",
    "TrunkOutput",
    "ValueHead",
    "build_model",
    "checkpoint_args",
    "export_meta_checkpoint",
    "load_meta_checkpoint",
    "resolve_args",
]
