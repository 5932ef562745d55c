"""Verified code data: records, lazy dataset, samplers, sandbox, mutants and the HumanEval builder."""

from wmtp_train.data.dataset import LazyJsonlDataset, Sample, collate, tokenize_record
from wmtp_train.data.humaneval import BuildParams, DefaultData, build_humaneval, ensure_default_dataset
from wmtp_train.data.index import OffsetIndex, StaleIndexError
from wmtp_train.data.records import CodeRecord, RecordError
from wmtp_train.data.samplers import BalancedSampler, CurriculumSampler
from wmtp_train.data.sandbox import SandboxResult, run_program

__all__ = [
    "BalancedSampler",
    "BuildParams",
    "CodeRecord",
    "CurriculumSampler",
    "DefaultData",
    "LazyJsonlDataset",
    "OffsetIndex",
    "RecordError",
    "Sample",
    "SandboxResult",
    "StaleIndexError",
    "build_humaneval",
    "collate",
    "ensure_default_dataset",
    "run_program",
    "tokenize_record",
]
