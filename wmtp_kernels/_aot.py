"""Ahead-of-time compilation of every Triton kernel of the package for NVIDIA targets, without a GPU.

``python -m wmtp_kernels._aot`` compiles each specialisation the host code launches for sm_80 and sm_90
(``triton.compile`` on an ``ASTSource``, PTX and cubin) and prints one JSON record per compile, with the
registers and local-memory (spill) bytes read from the cubin by ``cuobjdump``. The interpreter cannot see
compile errors; this can. Run it with ``TRITON_INTERPRET`` unset: kernels decorated under the
interpreter are not compilable.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget

from wmtp_kernels import _triton_ce, _triton_rows, _triton_scale

ARCHS = (80, 90)


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation of one kernel, as the host launches it.

    Attributes:
        kernel: The ``@triton.jit`` function.
        label: Human-readable specialisation (dtype, constexprs, warps).
        signature: ``{argument name: Triton type}``.
        constexprs: Values of the constexpr arguments.
        num_warps: Warps per program.
    """

    kernel: object
    label: str
    signature: dict
    constexprs: dict
    num_warps: int


@dataclass(frozen=True)
class CompileReport:
    """What one compile produced.

    Attributes:
        kernel: Kernel name.
        specialisation: The spec's label.
        arch: SM version (80, 90).
        ptx_chars: Length of the PTX text.
        cubin_bytes: Size of the cubin.
        registers: Registers per thread.
        local_bytes: Local memory per thread (register spills and stack); 0 means no spills.
    """

    kernel: str
    specialisation: str
    arch: int
    ptx_chars: int
    cubin_bytes: int
    registers: int
    local_bytes: int


def kernel_specs() -> list[KernelSpec]:
    """Every specialisation the host functions launch, at representative vocabulary sizes.

    Returns:
        The weights / TD (both terminal modes) variants of the chunk kernel for float32, bfloat16 (and
        one float16), each at the tile of V = 32000 (and up) and of V = 123, plus an int64-stride variant.
    """
    specs = []
    modes = [("weights", False, False), ("td last_state", True, False), ("td last_transition", True, True)]
    for dtype in (torch.float32, torch.bfloat16):
        for mode, has_td, last_transition in modes:
            for vocab in (32000, 123):
                block_v, num_warps = _triton_ce.launch_config(vocab)
                specs.append(_ce_spec(dtype, mode, has_td, last_transition, block_v, num_warps))
    block_v, num_warps = _triton_ce.launch_config(128256)
    specs.append(_ce_spec(torch.float16, "weights", False, False, block_v, num_warps))
    specs.append(_ce_spec(torch.bfloat16, "td last_state", True, False, block_v, num_warps, wide=True))
    return specs + _row_plan_specs() + _scale_specs()


def _spec(kernel, label: str, types: list[str], constexprs: dict, num_warps: int = 4) -> KernelSpec:
    """A spec whose non-constexpr arguments come first, typed by ``types``, then ``constexprs``."""
    names = kernel.arg_names
    signature = dict(zip(names[: len(types)], types, strict=False))
    signature.update({name: "constexpr" for name in names[len(types) :]})
    if list(signature) != list(names) or set(constexprs) != set(names[len(types) :]):
        raise ValueError(f"{kernel.__name__}: the types and constexprs do not cover {names}")
    return KernelSpec(kernel, label, signature, constexprs, num_warps)


def _row_plan_specs() -> list[KernelSpec]:
    """The row kernels (:mod:`wmtp_kernels._triton_rows`): with and without mask / rewards, each weight
    source, mean (batch or given counts) and sum."""
    block, specs = _triton_rows.BLOCK_ROWS, []
    scalars = ["i32"] * 5  # n_rows, seq, batch, vocab, ignore_index
    for mask, rewards in (("*i64", "*fp32"), ("*i1", None)):
        label = f"mask {mask}, " + ("rewards" if rewards else "no rewards")
        types = ["*i64", mask, rewards or "*i64", "*i64", "*i64", *scalars]
        constexprs = {"HEADS": 4, "HAS_MASK": True, "HAS_REWARDS": rewards is not None, "BLOCK": block}
        specs.append(_spec(_triton_rows._count_rows_kernel, label, types, constexprs))
    variants = [
        (0, True, False, "*fp32"),
        (1, True, True, "*bf16"),
        (1, False, False, "*fp32"),
        (2, True, False, "*fp32"),
    ]
    for source, mean, target_counts, weights in variants:
        label = f"source {source}, weights {weights}, mean {mean}, target counts {target_counts}"
        types = [
            "*i64",
            "*i64",
            weights,
            "*i64",
            "*i64",
            "*i64",
            "*i64",
            "*i64",
            "*fp32",
            "*fp32",
            "*i64",
            "*i64",
        ]
        constexprs = {
            "HEADS": 4, "HAS_MASK": True, "WEIGHT_SOURCE": source, "MEAN": mean,
            "HAS_TARGET_COUNTS": target_counts, "BLOCK": block,
        }  # fmt: skip
        specs.append(_spec(_triton_rows._compact_rows_kernel, label, types + ["i32"] * 3, constexprs))
    return specs


def _scale_specs() -> list[KernelSpec]:
    """The gradient scaling of :mod:`wmtp_kernels._triton_scale`, per gradient dtype."""
    return [
        _spec(_triton_scale._scale_unless_one_kernel, f"{ptr[1:]}", [ptr, "*fp32", "i64"],
              {"BLOCK": _triton_scale.BLOCK}, num_warps=8)
        for ptr in ("*fp32", "*bf16", "*fp16")
    ]  # fmt: skip


def _ce_spec(dtype, mode, has_td, last_transition, block_v, num_warps, wide=False) -> KernelSpec:
    label = f"{str(dtype).removeprefix('torch.')}, {mode}, BLOCK_V={block_v}, warps={num_warps}"
    return KernelSpec(
        kernel=_triton_ce._weighted_ce_rows_kernel,
        label=label + (", i64 row stride" if wide else ""),
        signature=_triton_ce.aot_signature(dtype, has_td, wide_strides=wide),
        constexprs={"HAS_TD": has_td, "LAST_TRANSITION": last_transition, "BLOCK_V": block_v},
        num_warps=num_warps,
    )


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """Registers and local-memory bytes per thread of the (single) kernel in a cubin.

    Args:
        cubin: The compiled binary.

    Returns:
        ``(registers, local_bytes)`` as reported by ``cuobjdump --dump-resource-usage``.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump output:\n{out}")
    return int(found.group(1)), int(found.group(2)) + int(found.group(3))


def compile_spec(spec: KernelSpec, arch: int) -> CompileReport:
    """Compile one specialisation for ``sm_<arch>``.

    Args:
        spec: What to compile.
        arch: SM version, e.g. 80 or 90.

    Returns:
        The sizes of the PTX and cubin and the register / spill figures.
    """
    source = triton.compiler.ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps}
    )
    registers, local_bytes = resource_usage(compiled.asm["cubin"])
    return CompileReport(
        kernel=spec.kernel.__name__,
        specialisation=spec.label,
        arch=arch,
        ptx_chars=len(compiled.asm["ptx"]),
        cubin_bytes=len(compiled.asm["cubin"]),
        registers=registers,
        local_bytes=local_bytes,
    )


def compile_all(archs: tuple[int, ...] = ARCHS) -> list[CompileReport]:
    """Compile every spec of :func:`kernel_specs` for every arch.

    Args:
        archs: SM versions.

    Returns:
        One report per (spec, arch).

    Raises:
        RuntimeError: the kernels were decorated under ``TRITON_INTERPRET=1``.
    """
    if not isinstance(_triton_ce._weighted_ce_rows_kernel, triton.runtime.JITFunction):
        raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1; unset it to compile them")
    return [compile_spec(spec, arch) for spec in kernel_specs() for arch in archs]


if __name__ == "__main__":
    print(json.dumps([asdict(r) for r in compile_all()]))
