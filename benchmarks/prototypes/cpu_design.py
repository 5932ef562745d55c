"""CPU design exploration of the linear-fused loss at large vocabularies: plain-torch prototypes.

Not the library: these are the candidate loop structures of ``wmtp_kernels``' CPU path, written out in
plain PyTorch on all-valid rows with per-row factors, so that each can be timed against the 3-GEMM floor
in the same process and checked against a float64 loss and gradients. Findings go to
``benchmarks/KERNEL_NOTES.md``.

    python benchmarks/prototypes/cpu_design.py curve    [--shape 1,256,4,512,128256] [--rounds 3]
    python benchmarks/prototypes/cpu_design.py designs  [--shape ...] [--rounds 5] [--designs NAME,...]
    python benchmarks/prototypes/cpu_design.py accuracy [--shape ...]
    python benchmarks/prototypes/cpu_design.py layouts  [--shape ...] [--chunks 73,147,256,512] [--rounds 5]

``curve``: each piece of the chunk loop (logits GEMM, softmax pass, the two gradient GEMMs in both
layouts) summed over all chunks, per chunk size, as a ratio to the same GEMM over all rows at once: the
measured GEMM efficiency curve. ``designs``: whole forward + backward passes, interleaved rounds with the
floor, median ratio and min-max, the working memory each allocates (MiB, computed from its buffers), and
the max error against float64. ``accuracy``: the bfloat16-logits variant's errors against float64.
``layouts``: other call forms of the two GEMMs that read W (transposed, blocked, split), per chunk size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from functools import partial

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from benchmarks.measure import parse_shape  # noqa: E402
from benchmarks.timing import interleaved_rounds, ratio_summary  # noqa: E402

MIB = 2**20


def make_rows(shape, seed=0):
    """All-valid rows: x [N, d], W [V, d], targets [N], per-row factors coef [N] (sum to about 1)."""
    batch, seq, heads, dim, vocab = shape
    n = batch * seq * heads
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(vocab, dim, generator=g) * dim**-0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    coef = (torch.rand(n, generator=g) * 2 + 0.1) / n
    return x, w, targets, coef


def floor(x, w):
    g = x @ w.t()
    _ = g @ w
    _ = g.t() @ x


def _softmax_grad_(logits, targets):
    """In place: logits <- softmax(logits) - onehot; returns the cross-entropy of each row."""
    torch.ops.aten._softmax.out(logits, 1, False, out=logits)
    rows = torch.arange(logits.shape[0])
    ce = -torch.log(logits[rows, targets])
    logits[rows, targets] -= 1
    return ce


def chunked(x, w, targets, coef, chunk, layout="row"):
    """The library's loop: per row chunk, logits, softmax - onehot, dW += G^T (coef h), dh = coef (G W).

    ``layout="col"`` accumulates dW^T [d, V] += (coef h)^T G instead and transposes once at the end.
    """
    n, dim = x.shape
    vocab = w.shape[0]
    buf = torch.empty(chunk, vocab)
    dx = torch.empty_like(x)
    dw = torch.empty(vocab, dim) if layout == "row" else torch.empty(dim, vocab)
    loss = x.new_zeros(())
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h, g = x[start:end], buf[: end - start]
        torch.mm(h, w.t(), out=g)
        ce = _softmax_grad_(g, targets[start:end])
        c = coef[start:end]
        loss += (ce * c).sum()
        hs = h * c[:, None]
        if layout == "row":
            (torch.mm(g.t(), hs, out=dw) if start == 0 else dw.addmm_(g.t(), hs))
        else:
            (torch.mm(hs.t(), g, out=dw) if start == 0 else dw.addmm_(hs.t(), g))
        torch.mm(g, w, out=dx[start:end]).mul_(c[:, None])
    if layout == "col":
        dw = dw.t().contiguous()
    return loss, dx, dw, chunk * vocab * 4


def blocked(x, w, targets, coef, chunk, vblock):
    """Per row chunk: logits GEMM and the row log-sum-exp, then per vocabulary block (in cache): G_b =
    exp(L_b - lse) - onehot, dW_b += G_b^T (coef h), dh += G_b W_b. One DRAM pass over the chunk instead
    of the softmax's read + write and the two GEMMs' reads."""
    n, dim = x.shape
    vocab = w.shape[0]
    buf = torch.empty(chunk, vocab)
    dx = torch.zeros_like(x)
    dw = torch.empty(vocab, dim)
    loss = x.new_zeros(())
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h, g, t = x[start:end], buf[: end - start], targets[start:end]
        torch.mm(h, w.t(), out=g)
        lse = torch.logsumexp(g, dim=1)
        rows = torch.arange(end - start)
        c = coef[start:end]
        loss += ((lse - g[rows, t]) * c).sum()
        hs = h * c[:, None]
        dh = dx[start:end]
        for v0 in range(0, vocab, vblock):
            v1 = min(v0 + vblock, vocab)
            gb = g[:, v0:v1]
            gb.sub_(lse[:, None]).exp_()
            hit = (t >= v0) & (t < v1)
            gb[rows[hit], t[hit] - v0] -= 1
            (torch.mm(gb.t(), hs, out=dw[v0:v1]) if start == 0 else dw[v0:v1].addmm_(gb.t(), hs))
            dh.addmm_(gb, w[v0:v1])
        dh.mul_(c[:, None])
    return loss, dx, dw, chunk * vocab * 4


def pipelined(x, w, targets, coef, chunk, vblock):
    """The library's loop with one pass over W per chunk instead of two: per vocabulary block (W_b and
    dW_b in cache), chunk k's gradient GEMMs ``dh_k += G_b W_b``, ``dW_b += G_b^T (coef h_k)``, then the
    next chunk's logits ``L_b = h_{k+1} W_b^T`` written over the block of G just consumed (one buffer)."""
    n, dim = x.shape
    vocab = w.shape[0]
    buf = torch.empty(chunk, vocab)
    dx = torch.empty_like(x)
    dw = torch.empty(vocab, dim)
    loss = x.new_zeros(())
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    torch.mm(x[: spans[0][1]], w.t(), out=buf[: spans[0][1]])
    for k, (start, end) in enumerate(spans):
        g = buf[: end - start]
        ce = _softmax_grad_(g, targets[start:end])
        c = coef[start:end]
        loss += (ce * c).sum()
        hs = x[start:end] * c[:, None]
        dh = dx[start:end]
        nxt = spans[k + 1] if k + 1 < len(spans) else None
        for v0 in range(0, vocab, vblock):
            v1 = min(v0 + vblock, vocab)
            gb, wb = g[:, v0:v1], w[v0:v1]
            (torch.mm(gb, wb, out=dh) if v0 == 0 else dh.addmm_(gb, wb))
            (torch.mm(gb.t(), hs, out=dw[v0:v1]) if k == 0 else dw[v0:v1].addmm_(gb.t(), hs))
            if nxt is not None:
                torch.mm(x[nxt[0] : nxt[1]], wb.t(), out=buf[: nxt[1] - nxt[0], v0:v1])
        dh.mul_(c[:, None])
    return loss, dx, dw, chunk * vocab * 4


def recompute(x, w, targets, coef, chunk, vblock):
    """CCE's structure: pass 1 (row chunks) keeps only the log-sum-exp; pass 2 (vocabulary blocks, all rows)
    recomputes the logits block, and writes dW_b once with a reduction over all N rows: 4 GEMMs."""
    n, dim = x.shape
    vocab = w.shape[0]
    lse = torch.empty(n)
    buf = torch.empty(chunk, vocab)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        g = torch.mm(x[start:end], w.t(), out=buf[: end - start])
        lse[start:end] = torch.logsumexp(g, dim=1)
    rows = torch.arange(n)
    loss = ((lse - (x * w[targets]).sum(1)) * coef).sum()
    xs = x * coef[:, None]
    dx = torch.zeros_like(x)
    dw = torch.empty(vocab, dim)
    block = torch.empty(n, vblock)
    for v0 in range(0, vocab, vblock):
        v1 = min(v0 + vblock, vocab)
        gb = torch.mm(x, w[v0:v1].t(), out=block[:, : v1 - v0])
        gb.sub_(lse[:, None]).exp_()
        hit = (targets >= v0) & (targets < v1)
        gb[rows[hit], targets[hit] - v0] -= 1
        torch.mm(gb.t(), xs, out=dw[v0:v1])
        dx.addmm_(gb, w[v0:v1])
    dx.mul_(coef[:, None])
    return loss, dx, dw, max(chunk, n) * vblock * 4 + chunk * vocab * 4


def bf16_logits(x, w, targets, coef, chunk):
    """The library's loop with the three GEMMs in bfloat16 (AMX; torch's CPU GEMMs round their output to
    bfloat16) and a float32 softmax and dW accumulator; W's bfloat16 copy is made once (counted)."""
    n, dim = x.shape
    vocab = w.shape[0]
    wb = w.bfloat16()
    dx = torch.empty_like(x)
    dw = torch.zeros(vocab, dim)
    loss = x.new_zeros(())
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h = x[start:end]
        g = torch.mm(h.bfloat16(), wb.t()).float()
        ce = _softmax_grad_(g, targets[start:end])
        c = coef[start:end]
        loss += (ce * c).sum()
        gb = g.bfloat16()
        dw.add_(torch.mm(gb.t(), (h * c[:, None]).bfloat16()))  # each chunk's product rounded to bfloat16
        dx[start:end] = torch.mm(gb, wb).float() * c[:, None]
    return loss, dx, dw, vocab * dim * 2 + chunk * vocab * (4 + 2)


def truth(x, w, targets, coef):
    """float64 loss and gradients."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ce = torch.nn.functional.cross_entropy(x64 @ w64.t(), targets, reduction="none")
    loss = (ce * coef.double()).sum()
    loss.backward()
    return loss.detach(), x64.grad, w64.grad


def errors(result, reference) -> dict[str, float]:
    """Max |error| / max |truth| of loss, dx, dW."""
    out = {}
    for name, got, want in zip(("loss", "dx", "dw"), result[:3], reference):
        out[name] = ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-300)).item()
    return out


def designs_table(name_to_fn, shape, rounds):
    x, w, targets, coef = make_rows(shape)
    reference = truth(x, w, targets, coef) if shape[-1] * shape[0] * shape[1] * shape[2] < 3e8 else None
    fns = {"floor": lambda: floor(x, w)}
    memory, errs = {}, {}
    for name, fn in name_to_fn.items():
        result = fn(x, w, targets, coef)  # warm-up
        memory[name] = result[3]
        errs[name] = errors(result, reference) if reference is not None else {}
        fns[name] = lambda f=fn: f(x, w, targets, coef)
    times = interleaved_rounds(fns, rounds, "cpu", before_each=lambda: None)
    print(f"shape {shape}, {rounds} rounds, floor median {statistics.median(times['floor']) * 1e3:.0f} ms")
    print("| design | × floor (min-max) | working memory | max rel. error loss / dx / dW |")
    print("|---|---|---|---|")
    for name in name_to_fn:
        s = ratio_summary(times[name], times["floor"])
        e = errs[name]
        err = " / ".join(f"{e[k]:.1e}" for k in ("loss", "dx", "dw")) if e else "-"
        print(f"| {name} | {s['ratio']:.3f}× ({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) | "
              f"{memory[name] / MIB:.0f} MiB | {err} |", flush=True)  # fmt: skip


def curve(shape, chunks, rounds):
    """Each piece of the chunk loop, summed over all chunks, against the same GEMM over all rows."""
    x, w, targets, coef = make_rows(shape)
    n, dim = x.shape
    vocab = w.shape[0]
    full = torch.empty(n, vocab)

    def per_chunk(chunk):
        buf = torch.empty(chunk, vocab)
        dw, dwt, dx = torch.empty(vocab, dim), torch.empty(dim, vocab), torch.empty(n, dim)
        spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]

        def run(piece):
            for s, e in spans:
                h, g = x[s:e], buf[: e - s]
                if piece == "logits":
                    torch.mm(h, w.t(), out=g)
                elif piece == "softmax":
                    torch.ops.aten._softmax.out(g, 1, False, out=g)
                elif piece == "dW row-major":
                    dw.addmm_(g.t(), h)
                elif piece == "dW col-major":
                    dwt.addmm_(h.t(), g)
                elif piece == "dh":
                    torch.mm(g, w, out=dx[s:e])

        return run

    buf_full = {"logits": lambda: torch.mm(x, w.t(), out=full), "dh": lambda: full @ w,
                "dW row-major": lambda: full.t() @ x, "dW col-major": lambda: x.t() @ full,
                "softmax": lambda: torch.ops.aten._softmax.out(full, 1, False, out=full)}  # fmt: skip
    full.normal_()
    names = list(buf_full)
    print(f"shape {shape}: each piece summed over the chunks / the same piece over all {n} rows at once "
          f"(median of {rounds} interleaved rounds)")  # fmt: skip
    print("| chunk rows | " + " | ".join(names) + " | logits + softmax + dh + dW / the same at once |")
    print("|---|" + "---|" * (len(names) + 1))
    for chunk in chunks:
        run = per_chunk(chunk)
        run("logits")
        ratio, chunked_s, whole_s = {}, {}, {}
        for k in names:
            pair = {"whole": buf_full[k], "chunks": lambda k=k, run=run: run(k)}
            times = interleaved_rounds(pair, rounds, "cpu", before_each=lambda: None)
            ratio[k] = ratio_summary(times["chunks"], times["whole"])["ratio"]
            chunked_s[k], whole_s[k] = statistics.median(times["chunks"]), statistics.median(times["whole"])
        parts = ("logits", "softmax", "dh", "dW row-major")
        total = sum(chunked_s[k] for k in parts) / sum(whole_s[k] for k in parts)
        cells = " | ".join(f"{ratio[k]:.2f}×" for k in names)
        print(f"| {chunk} | {cells} | {total:.3f}× |", flush=True)


def _layout_forms(x, w, chunk):
    """One call of each form at ``chunk`` rows: logits `h W^T`, `(W h^T)^T`, logits in vocabulary blocks
    of 8192, dh `G W`, `(W^T G^T)^T`, dh split along V in blocks of 16384."""
    vocab, dim = w.shape
    h, g = x[:chunk], torch.randn(chunk, vocab)
    out, out_t = torch.empty(chunk, vocab), torch.empty(vocab, chunk)
    dh, dh_t = torch.empty(chunk, dim), torch.empty(dim, chunk)

    def blocks_logits(vb=8192):
        for v0 in range(0, vocab, vb):
            torch.mm(h, w[v0 : v0 + vb].t(), out=out[:, v0 : v0 + vb])

    def split_dh(vb=16384):
        torch.mm(g[:, :vb], w[:vb], out=dh)
        for v0 in range(vb, vocab, vb):
            dh.addmm_(g[:, v0 : v0 + vb], w[v0 : v0 + vb])

    return {
        "logits `h W^T`": lambda: torch.mm(h, w.t(), out=out),
        "logits `(W h^T)^T`": lambda: torch.mm(w, h.t(), out=out_t),
        "logits in V blocks of 8192": blocks_logits,
        "dh `G W`": lambda: torch.mm(g, w, out=dh),
        "dh `(W^T G^T)^T`": lambda: torch.mm(w.t(), g.t(), out=dh_t),
        "dh split along V, blocks of 16384": split_dh,
    }


def layouts(shape, chunks, rounds):
    """Other call forms of the two GEMMs that read W, per chunk size: one call times the number of chunks
    against the plain call over all rows, in interleaved rounds (median ratio of the same rounds)."""
    x, w, _, _ = make_rows(shape)
    n = x.shape[0]
    full_g, full_logits, full_dh = torch.randn(n, w.shape[0]), torch.empty(n, w.shape[0]), torch.empty_like(x)
    whole = {
        "logits": lambda: torch.mm(x, w.t(), out=full_logits),
        "dh": lambda: torch.mm(full_g, w, out=full_dh),
    }
    print(f"shape {shape}: (one call x chunks) / (one call over all {n} rows), median of {rounds} "
          "interleaved rounds (min-max)")  # fmt: skip
    for chunk in chunks:
        forms = _layout_forms(x, w, chunk)
        for f in forms.values():
            f()  # warm-up: touch the buffers
        times = interleaved_rounds({**whole, **forms}, rounds, "cpu", before_each=lambda: None)
        cells = []
        for name in forms:
            scaled = [t * n / chunk for t in times[name]]
            s = ratio_summary(scaled, times["logits" if name.startswith("logits") else "dh"])
            cells.append(f"{name} {s['ratio']:.2f}× ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})")
        print(f"{chunk} rows: " + "; ".join(cells), flush=True)


DESIGNS = {
    "chunked-128": lambda *a: chunked(*a, 128),
    "chunked-147": lambda *a: chunked(*a, 147),
    "chunked-256": lambda *a: chunked(*a, 256),
    "chunked-512": lambda *a: chunked(*a, 512),
    "chunked-col-256": lambda *a: chunked(*a, 256, layout="col"),
    "blocked-256-4096": lambda *a: blocked(*a, 256, 4096),
    "blocked-256-16384": lambda *a: blocked(*a, 256, 16384),
    "recompute-256-8192": lambda *a: recompute(*a, 256, 8192),
    **{f"pipelined-147-{vb}": partial(pipelined, chunk=147, vblock=vb) for vb in (512, 2048, 8192, 32768)},
    "bf16-256": lambda *a: bf16_logits(*a, 256),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["curve", "designs", "accuracy", "layouts"])
    p.add_argument("--shape", type=parse_shape, default=(1, 256, 4, 512, 128256))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--designs", default=",".join(DESIGNS))
    p.add_argument("--chunks", default="64,128,256,512,1024")
    args = p.parse_args(argv)
    if args.what == "curve":
        curve(args.shape, [int(c) for c in args.chunks.split(",")], args.rounds)
    elif args.what == "layouts":
        layouts(args.shape, [int(c) for c in args.chunks.split(",")], args.rounds)
    elif args.what == "designs":
        designs_table({k: DESIGNS[k] for k in args.designs.split(",")}, args.shape, args.rounds)
    else:
        designs_table({k: DESIGNS[k] for k in ("chunked-256", "bf16-256")}, args.shape, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
