"""Ahead-of-time compile every Triton kernel of ``kernels/{mufa,qlinear,mga}.py`` for the H100 (sm_90), no GPU needed.

Triton's interpreter (``TRITON_INTERPRET=1``, what CI runs the kernels' numerics on) never runs the Triton
compiler, so it hides errors only a GPU compile shows (plain Python float globals in ``@triton.jit`` code,
``tl.dot`` shape/dtype rules, ptxas limits...). ``triton.compile`` with a ``GPUTarget`` runs the whole
pipeline (TTIR → TTGIR → LLIR → PTX → cubin through the bundled ``ptxas``) on a CPU-only machine.

Every job mirrors one launch of a launcher in ``kernels/*.py`` at a SPEC §2 shape: the same argument
values (pointer dtypes per argument, integer sizes and strides, float scalars, constexprs, num_warps /
num_stages), specialised the way ``JITFunction.run`` specialises a real launch (16-byte aligned pointers,
integers divisible by 16, integers equal to 1 become constants), so the compiled code is the code a GPU
run would compile. Autotuned kernels are compiled for EVERY config of their ``configs`` list.

For each compile it reports registers / spills / stack (``cuobjdump -res-usage`` on the cubin; spilled
registers live in the stack frame), shared memory (``metadata.shared``, checked against sm_90's 227 KB: a
launch above it fails with OutOfResources; the AOT compile itself does not check it) and which tensor-core
instructions the PTX uses (``wgmma`` / ``mma`` and their operand type, ``-`` = no tensor cores).

Usage::

    python benchmarks/aot_compile.py --jobs 2            # the quick profile (the CI test's), table on stdout
    python benchmarks/aot_compile.py --profile full      # every config / dtype / edge shape (~20 CPU minutes)
    python benchmarks/aot_compile.py --groups mufa_fwd,mga --dtypes bf16 --json out.json
    python benchmarks/aot_compile.py --list              # the jobs, nothing compiled
    python benchmarks/aot_compile.py --coverage          # @triton.jit kernels found vs covered (JSON)

``TRITON_INTERPRET`` is removed from the environment before triton is imported (run it as a script or
in a subprocess, never import it into a process that already imported triton under the interpreter).
Used by ``tests/test_aot_sm90.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported (lazily, below)

SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
GROUPS = ("mufa_fwd", "mufa_bwd", "mufa_atb", "qlinear", "mga")
KERNEL_MODULES = ("mufa", "qlinear", "mga")

# SPEC §2 shapes (rows = the batch × tokens of the benchmark case)
MUFA_CASES = [  # (label, D, R, rows, has_base)
    ("MuFA ViT-B/16 D768 R168", 768, 168, 64 * 197, True),
    ("MuFA Swin-T D96 R21", 96, 21, 64 * 3136, True),
    ("EQAM s1 D128 R32", 128, 32, 64 * 56 * 56, False),   # EQAM's fused path runs the same bottleneck kernels
    ("EQAM s4 D1024 R256", 1024, 256, 64 * 7 * 7, False),
]
QLINEAR_LAYERS = [  # (label, in, out, rows, gelu): the two Q-Linear layers of EQAM at both ConvNeXt stages
    ("s1 down 128->32", 128, 32, 64 * 56 * 56, True),
    ("s1 up 32->128", 32, 128, 64 * 56 * 56, False),
    ("s4 down 1024->256", 1024, 256, 64 * 7 * 7, True),
    ("s4 up 256->1024", 256, 1024, 64 * 7 * 7, False),
]
MGA_CASES = [  # (label, B, L, D, hidden, heads, share (hidden, heads) or None, mask)
    ("image L50 D768 h128/8", 214, 50, 768, 128, 8, None, False),
    ("text L77 D512 h128/8 +BiShare h64/8", 214, 77, 512, 128, 8, (64, 8), True),
]
MGA_EDGE_CASES = [  # the largest sequence the kernels accept (MAX_L = 256, LP = 256): not a SPEC shape
    ("edge L256 D512 h128/8 +BiShare h64/8", 8, 256, 512, 128, 8, (64, 8), True),
]
MGA_LONG_CASES = [  # (label, B, L, hidden, heads, mask): the blocked attention backward of padded L > LONG_LP
    ("long L197 h128/8", 64, 197, 128, 8, False),  # ViT-B/16 tokens
    ("long L256 h64/8 +mask", 8, 256, 64, 8, True),  # BiShare head dim 8 at MAX_L
]

# dtype variants: (name, torch dtype name of the compute dtype, fp32 "IEEE" flag)
DTYPES = (("bf16", "bfloat16", False), ("fp32", "float32", True), ("tf32", "float32", False))


@dataclass
class Job:
    group: str
    kernel: str  # "module.name"
    case: str
    config: str
    args: dict  # parameter name -> value (Mock pointer, int, float, bool, constexpr value)
    options: dict = field(default_factory=dict)  # num_warps / num_stages (launcher's or the config's)
    spill_strict: bool = False  # spills fail (configs the kernel owner tuned spill-free at this shape); else a warning
    autotuned: bool = False  # one config of an autotune list: over sm_90's shared memory it is pruned at run time
    edge: bool = False  # not a SPEC shape (a limit the launchers accept): over-limit shared memory is a warning

    @property
    def name(self) -> str:
        return f"{self.kernel} [{self.case}] {self.config}"


# ------------------------------------------------------------------------------------------------------
# job lists (argument lists copied from the launchers of kernels/*.py, in the same order)
# ------------------------------------------------------------------------------------------------------
def _torch_dtype(name):
    import torch

    return getattr(torch, name)


def _ptr(dtype_name):
    from triton.runtime.jit import MockTensor

    return MockTensor(_torch_dtype(dtype_name))


def _cfg_label(cfg) -> str:
    kw = " ".join(f"{k.replace('BLOCK_', 'B')}{v}" for k, v in cfg.kwargs.items())
    return f"{kw} w{cfg.num_warps} s{cfg.num_stages}"


def _cfg_size(cfg):
    """Order of "largest" among autotune configs: tile volume, then warps, then stages."""
    return (math.prod(cfg.kwargs.values()), cfg.num_warps, cfg.num_stages)


def _configs(kernel, coverage):
    """The autotune configs to compile: ``all``, ``ends`` (the first and the largest) or ``first``."""
    cfgs = list(kernel.configs)
    if coverage == "all":
        return cfgs
    if coverage == "first":
        return cfgs[:1]
    largest = max(cfgs, key=_cfg_size)
    return [cfgs[0]] + ([largest] if largest is not cfgs[0] else [])


def _autotuned(group, kernel, qualname, case, args, coverage, spill_strict=lambda cfg: False):
    jobs = []
    for cfg in _configs(kernel, coverage):
        a = dict(args)
        a.update(cfg.kwargs)
        jobs.append(Job(group, qualname, case, _cfg_label(cfg), a,
                        dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                        spill_strict=spill_strict(cfg), autotuned=True))
    return jobs


def _mufa_fwd_spill_free(dname, r):
    """Configs of ``_FWD_CONFIGS`` the owner picked spill-free (kernels/mufa.py, bf16 sm_90 AOT compiles):
    at R = 168 "only 8-warp BLOCK_M = 64 tiles ... stay spill-free; the BLOCK_M = 128 and 4-warp ones are for
    small bottlenecks (Swin-T R = 21)", i.e. every config at R = 21."""
    if dname != "bf16":
        return lambda cfg: False
    if r == 168:
        return lambda cfg: cfg.kwargs["BLOCK_M"] == 64 and cfg.num_warps == 8
    if r == 21:
        return lambda cfg: True
    return lambda cfg: False


def mufa_jobs(groups, dtypes, coverage, lean=False):
    """MuFA/EQAM bottleneck kernels. ``lean`` (quick profile): the inference forward (no pre, no base) with the
    first config only, the recompute backward with the first and the largest; in fp32 neither of them."""
    from rspeft_fast.kernels import mufa as K

    jobs = []
    for dname, tname, ieee in DTYPES:
        if dname not in dtypes:
            continue
        cov = coverage[dname]
        p = lambda: _ptr(tname)  # noqa: E731  compute-dtype tensor
        f32 = lambda: _ptr("float32")  # noqa: E731
        # under autocast the up bias stays fp32 (bottleneck_fwd reads it in any float dtype); dy is y's dtype
        for label, d, r, n, has_base in MUFA_CASES:
            ra, rb = K.column_groups(r)
            case = f"{dname} {label}"
            strict = _mufa_fwd_spill_free(dname, r) if label.startswith("MuFA") else (lambda cfg: False)
            if "mufa_fwd" in groups:
                for save_pre, base in ((True, has_base), (False, False)):
                    if lean and not save_pre and dname != "bf16":
                        continue
                    args = dict(
                        x_ptr=p(), wd_ptr=p(), bd_ptr=p(), wu_ptr=p(), bu_ptr=f32(), cs_ptr=f32(),
                        base_ptr=p(), y_ptr=p(), pre_ptr=p(),
                        N=n, D=d, R=r,
                        stride_xm=d, stride_wd_r=d, stride_wd_k=1, stride_wu_n=r, stride_wu_r=1,
                        stride_bm=d if base else 0, stride_ym=d, stride_pm=r if save_pre else 0,
                        scale=1.0 if label.startswith("EQAM") else 0.5,
                        HAS_BASE=base, SAVE_PRE=save_pre, IEEE=ieee, R_A=ra, R_B=rb,
                    )
                    mode = "train" if save_pre else "infer"
                    # inference variant (no pre, no base): the first and the largest config only
                    jobs += _autotuned("mufa_fwd", K._bottleneck_fwd_kernel, "mufa._bottleneck_fwd_kernel",
                                       f"{case} {mode}", args,
                                       cov if save_pre or cov != "all" else ("first" if lean else "ends"),
                                       spill_strict=strict)
            if "mufa_bwd" in groups:
                for recompute in (False, True):
                    if lean and recompute and dname != "bf16":
                        continue
                    args = dict(
                        dy_ptr=p(), x_ptr=p(), pre_ptr=p(), wd_ptr=p(), bd_ptr=p(), wu_ptr=p(), cs_ptr=f32(),
                        dx_ptr=p(), dpre_ptr=p(), g_ptr=p(),
                        N=n, D=d, R=r,
                        stride_dym=d, stride_xm=d, stride_pm=0 if recompute else r, stride_wd_r=d, stride_wd_k=1,
                        stride_wu_n=r, stride_wu_r=1, stride_dxm=d, stride_dpm=r, stride_gm=r,
                        scale=1.0 if label.startswith("EQAM") else 0.5,
                        RECOMPUTE=recompute, IEEE=ieee, R_A=ra, R_B=rb,
                    )
                    jobs += _autotuned("mufa_bwd", K._bottleneck_bwd_rows_kernel, "mufa._bottleneck_bwd_rows_kernel",
                                       f"{case} {'recompute' if recompute else 'saved pre'}", args,
                                       "ends" if lean and recompute and cov == "all" else cov)
            if "mufa_atb" in groups:
                # _atb(dpre, x): dWd (R, d) + Σ dpre;  _atb(g, dy, out_layout_qp): G (d, R) + Σ dy
                rows_per_split, s = _atb_split(n, r, d)
                for what, q_layout, sum_a, sum_b in (("dWd", False, True, False), ("dWu", True, False, True)):
                    args = dict(
                        a_ptr=p(), b_ptr=p(), c_ptr=f32(), sa_ptr=f32(), sb_ptr=f32(),
                        N=n, P=r, Q=d, rows_per_split=rows_per_split,
                        stride_am=r, stride_bm=d, stride_cs=r * d,
                        stride_cp=1 if q_layout else d, stride_cq=r if q_layout else 1,
                        stride_sas=r if sum_a else 0, stride_sbs=d if sum_b else 0,
                        SUM_A=sum_a, SUM_B=sum_b, IEEE=ieee,
                    )
                    jobs += _autotuned("mufa_atb", K._atb_splitk_kernel, "mufa._atb_splitk_kernel",
                                       f"{case} {what} splits={s}", args, cov)
    return jobs


H100_SMS = 132  # H100 SXM; the launchers size their split-K reductions from the SM count


def _cdiv(a, b):
    return -(-a // b)


def _atb_split(n, p, q):
    """(rows_per_split, splits) as kernels.mufa._atb picks them on an H100."""
    tiles = _cdiv(p, 64) * _cdiv(q, 64)
    s = max(1, min(max(1, (2 * H100_SMS) // tiles), _cdiv(n, 128)))
    rows = _cdiv(_cdiv(n, s), 128) * 128
    return rows, _cdiv(n, rows)


def qlinear_jobs(dtypes, lean=False):
    """Q-Linear kernels at the launchers' blocks. ``lean`` (quick profile): in fp32 no ``_weight_kernel``
    (dequantisation for the bf16 bottleneck path) and no packed int4 forward."""
    from rspeft_fast.kernels import qlinear as K

    pow2 = K._pow2
    jobs = []
    G = "qlinear"
    for dname, tname, ieee in DTYPES:
        if dname not in dtypes:
            continue
        prec = "ieee" if ieee else "tf32"  # kernels.qlinear._precision on a GPU
        x = lambda: _ptr(tname)  # noqa: E731
        f32 = lambda: _ptr("float32")  # noqa: E731
        for label, k, n, m, gelu in QLINEAR_LAYERS:
            case = f"{dname} {label}"
            # the float master weight: fp32 (autocast training) for the 16-bit compute dtype, else the dtype itself
            wt = "float32"
            bits_list = (8, 4) if dname == "bf16" else (8,)
            # --- scales / quantised weights (QLinear scales; EQAM fake_quant; packed eqam weight_values)
            for bits in bits_list:
                qmax = 2 ** (bits - 1) - 1
                jobs.append(Job(G, "qlinear._row_scale_kernel", f"{case} bits{bits}", "launcher",
                                dict(W=_ptr(wt), S=f32(), N=n, K=k, stride_wn=k, stride_wk=1, QMAX=qmax,
                                     BLOCK_N=pow2(n, 1, 16), BLOCK_K=pow2(k, 16, 256))))
                jobs.append(Job(G, "qlinear._quantize_rows_kernel", f"{case} bits{bits}", "launcher",
                                dict(W=_ptr(wt), Q=x(), S=f32(), N=n, K=k, stride_wn=k, stride_wk=1, stride_qn=k,
                                     QMAX=qmax, BLOCK_N=pow2(n, 1, 16), BLOCK_K=pow2(k, 16, 256))))
            for mode, mname in ((K.FLOAT, "float"), (K.INT8, "int8"), (K.INT4, "int4")):
                if lean and dname != "bf16":
                    break
                wdt = {K.FLOAT: wt, K.INT8: "int8", K.INT4: "uint8"}[mode]
                kb = (k + 1) // 2 if mode == K.INT4 else k
                jobs.append(Job(G, "qlinear._weight_kernel", f"{case} {mname}", "launcher",
                                dict(W=_ptr(wdt), S=f32(), Q=x(), N=n, K=k, stride_wn=kb, stride_wk=1, stride_qn=k,
                                     W_MODE=mode, QMAX=127 if mode != K.FLOAT else 7,
                                     BLOCK_N=pow2(n, 16, 64), BLOCK_K=pow2(k, 16, 128))))
            # --- forward: training (float weight, both bit widths) and packed inference (int8 / int4 codes)
            bm, bn, bk, nw = K._fwd_blocks(m, n, k)
            fwd_variants = [(K.FLOAT, b, gelu, gelu) for b in bits_list] + [(K.INT8, 8, gelu, False)]
            if not (lean and dname != "bf16"):
                fwd_variants.append((K.INT4, 4, gelu, False))
            for mode, bits, use_gelu, save_pre in fwd_variants:
                wdt = {K.FLOAT: wt, K.INT8: "int8", K.INT4: "uint8"}[mode]
                kb = (k + 1) // 2 if mode == K.INT4 else k
                mname = {K.FLOAT: f"float bits{bits}", K.INT8: "packed int8", K.INT4: "packed int4"}[mode]
                jobs.append(Job(G, "qlinear._fwd_kernel", f"{case} {mname}{' gelu' if use_gelu else ''}",
                                f"BM{bm} BN{bn} BK{bk} w{nw} s3",
                                dict(X=x(), W=_ptr(wdt), S=f32(), B=f32(), Y=x(), PRE=x(),
                                     M=m, N=n, K=k, stride_xm=k, stride_xk=1, stride_wn=kb, stride_wk=1, stride_ym=n,
                                     W_MODE=mode, QMAX=127 if mode != K.FLOAT else 2 ** (bits - 1) - 1,
                                     HAS_BIAS=True, GELU=use_gelu, SAVE_PRE=save_pre, PRECISION=prec,
                                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                                dict(num_warps=nw, num_stages=3)))
            # --- backward (float weight): dX = dPre Wq, dW = dPreᵀ X (+ Σ dPre)
            bm, bk, bn = (128 if m >= 128 else pow2(m, 16, 128)), pow2(k, 16, 128), pow2(n, 16, 64)
            nw = 8 if bm * bk >= 128 * 128 else 4
            jobs.append(Job(G, "qlinear._bwd_dx_kernel", f"{case}{' gelu' if gelu else ''}",
                            f"BM{bm} BN{bn} BK{bk} w{nw} s{2 if tname == 'float32' else 3}",
                            dict(DY=x(), PRE=x(), W=_ptr(wt), S=f32(), DX=x(), DPRE=x(),
                                 M=m, N=n, K=k, stride_dym=n, stride_wn=k, stride_wk=1, stride_dxm=k,
                                 QMAX=127, GELU=gelu, WRITE_DPRE=gelu, PRECISION=prec,
                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                            dict(num_warps=nw, num_stages=2 if tname == "float32" else 3)))
            bn, bk, bm = pow2(n, 16, 128), pow2(k, 16, 128), 64
            nw = 8 if bn * bk >= 128 * 128 else 4
            tiles = _cdiv(n, bn) * _cdiv(k, bk)  # kernels.qlinear._dw_split on an H100
            nsplit = max(1, min(_cdiv(2 * H100_SMS, tiles), _cdiv(m, 4 * bm)))
            rows = _cdiv(_cdiv(m, nsplit), bm) * bm
            nsplit = _cdiv(m, rows)
            jobs.append(Job(G, "qlinear._bwd_dw_kernel", f"{case} splits={nsplit}", f"BM{bm} BN{bn} BK{bk} w{nw} s3",
                            dict(G=x(), X=x(), DW=f32(), DB=f32(),
                                 M=m, N=n, K=k, ROWS_PER_SPLIT=rows,
                                 stride_gm=n, stride_xm=k, stride_xk=1, stride_dws=n * k, stride_dwn=k, stride_dbs=n,
                                 HAS_BIAS=True, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                            dict(num_warps=nw, num_stages=3)))
    return jobs


def mga_jobs(dtypes, edge=False, lean=False):  # noqa: C901 - one launcher mirrored per block
    """MGA kernels. Per-sequence kernels at the SPEC cases (and, with ``edge``, the forward at MAX_L);
    the blocked attention-backward kernels (padded L > LONG_LP) at L = 197 / 256 (cheap: always).
    ``lean`` (quick profile) leaves out the fp32-IEEE per-sequence kernels of the text + BiShare case (their
    FMA attention costs ~260 CPU seconds to compile) and the fp32 inference forward."""
    from rspeft_fast.kernels import mga as K

    long_lp = getattr(K, "LONG_LP", None)  # None: every L through the per-sequence kernels
    jobs = []
    G = "mga"
    cases = [(c, False) for c in MGA_CASES] + ([(c, True) for c in MGA_EDGE_CASES] if edge else [])
    for dname, tname, ieee in DTYPES:
        if dname not in dtypes:
            continue
        prec = "ieee" if ieee else "tf32"  # kernels.mga._prec on a GPU (fp32: ieee unless TF32 is allowed)
        c = lambda: _ptr(tname)  # noqa: E731  compute dtype (weights, saved activations, x and y here)
        f32 = lambda: _ptr("float32")  # noqa: E731
        gate = f32  # the gate parameter stays fp32 (bf16 compute under autocast)
        for (label, B, L, D, H, NH, share, has_mask), is_edge in cases:
            if dname == "fp32" and share is not None and lean and not is_edge:
                continue
            case = f"{dname} {label}"
            DH = H // NH
            if share is not None:
                H2, NH2 = share
            else:
                H2, NH2 = 16, 1
            DH2 = H2 // NH2
            p2 = K._p2
            LP, HP, DHP, H2P, DH2P = p2(L), p2(H), p2(DH), p2(H2), p2(DH2)
            BD = 32 if HP > 128 or LP > 64 else 64
            nw = K._warps(LP, HP)
            mask = _ptr("uint8") if has_mask else c()
            for save in ((True,) if lean and dname != "bf16" else (True, False)):
                args = dict(
                    X=c(), sxb=L * D, sxl=D, sxd=1, Y=c(), MASK=mask,
                    Wd=c(), bd=c(), Wu=c(), bu=c(), Win=c(), bin=c(), Wo=c(), bo=c(), GATE=gate(),
                    SWd=c(), Sbd=c(), SWu=c(), Sbu=c(), SWin=c(), Sbin=c(), SWo=c(), Sbo=c(),
                    SGATE=gate() if share else c(),
                    HPRE=c(), Z1=c(), Z2=c(), WS=c(),
                    L=L, D=D, H=H, NH=NH, DH=DH, H2=H2, NH2=NH2, DH2=DH2, scale=1.0 / math.sqrt(DH),
                    scale2=1.0 / math.sqrt(DH2),
                    LP=LP, HP=HP, DHP=DHP, H2P=H2P, DH2P=DH2P, BD=BD, HAS_MASK=has_mask, SHARE=share is not None,
                    SAVE=save, PREC=prec,
                )
                jobs.append(Job(G, "mga._mga_fwd_kernel", f"{case} {'train' if save else 'infer'}", f"BD{BD} w{nw}",
                                args, dict(num_warps=nw), edge=is_edge))
            if long_lp is not None and LP > long_lp:
                continue  # the backward of this L is the blocked path (below)
            scale = 1.0 / math.sqrt(DH)
            jobs.append(Job(G, "mga._bwd_msa2_kernel", case, f"BD{BD} w{nw}", dict(
                DY=c(), sdb=L * D, sdl=D, sdd=1, MASK=mask, Wu=c(), Win=c(), bin=c(), Wo=c(), bo=c(), GATE=gate(),
                HPRE=c(), Z2=c(), DQKV=c(), O=c(), G=c(), U=c(), DU=c(), DZ2=c(), GP=f32(),
                L=L, D=D, H=H, NH=NH, DH=DH, scale=scale,
                LP=LP, HP=HP, DHP=DHP, BD=BD, HAS_MASK=has_mask, PREC=prec,
            ), dict(num_warps=nw), edge=is_edge))
            if share is not None:
                jobs.append(Job(G, "mga._bwd_share_kernel", case, f"w{nw}", dict(
                    DZ2=c(), MASK=mask, SWd=c(), SWu=c(), SWin=c(), Sbin=c(), SWo=c(), Sbo=c(), SGATE=gate(),
                    WS=c(), DQKV=c(), O=c(), G=c(), VS=c(), DW=c(), DZ1=c(), GP=f32(),
                    L=L, H=H, H2=H2, NH2=NH2, DH2=DH2, scale2=1.0 / math.sqrt(DH2),
                    LP=LP, HP=HP, H2P=H2P, DH2P=DH2P, HAS_MASK=has_mask, PREC=prec,
                ), dict(num_warps=nw), edge=is_edge))
            fuse_dx = True if long_lp is not None else LP <= 128  # mga_backward: always fused since LONG_LP
            jobs.append(Job(G, "mga._bwd_msa1_kernel", f"{case}{' fused dx' if fuse_dx else ''}", f"BD{BD} w{nw}", dict(
                DY=c(), sdb=L * D, sdl=D, sdd=1, DX=c(), MASK=mask, Wd=c(), Win=c(), bin=c(), Wo=c(), bo=c(),
                GATE=gate(), HPRE=c(), G1=c(), DU=c(), DQKV=c(), O=c(), Z0=c(), DPRE=c(),
                L=L, D=D, H=H, NH=NH, DH=DH, scale=scale,
                LP=LP, HP=HP, DHP=DHP, BD=BD, HAS_MASK=has_mask, FUSE_DX=fuse_dx, PREC=prec,
            ), dict(num_warps=nw), edge=is_edge))
        if long_lp is None:
            continue
        # blocked attention backward (mga.attention_backward_blocked): long sequences, both head dims
        for label, B, L, H, NH, has_mask in MGA_LONG_CASES:
            DH = H // NH
            mask = _ptr("uint8") if has_mask else f32()  # no mask: the stats buffer stands in
            common = dict(L=L, H=H, NH=NH, DH=DH, scale=1.0 / math.sqrt(DH),
                          BQ=K.LONG_BQ, BK=K.LONG_BK, DHP=K._p2(DH), HAS_MASK=has_mask, PREC=prec)
            cfg = f"BQ{K.LONG_BQ} BK{K.LONG_BK} w4"
            jobs.append(Job(G, "mga._attn_bwd_dq_kernel", f"{dname} {label}", cfg, dict(
                QKV=c(), DO=c(), MASK=mask, DQKV=c(), O=c(), STATS=f32(), **common), dict(num_warps=4), edge=True))
            jobs.append(Job(G, "mga._attn_bwd_dkdv_kernel", f"{dname} {label}", cfg, dict(
                QKV=c(), DO=c(), MASK=mask, DQKV=c(), STATS=f32(), **common), dict(num_warps=4), edge=True))
    return jobs


PROFILES = {
    # the CI test: bf16 with every autotune config (inference / recompute variants: fewer); fp32 (IEEE dots)
    # with the first config of each autotune list, training variants, without the fp32 MGA text+BiShare
    # per-sequence kernels; no TF32 variant, no MAX_L forward (see the ``lean`` notes of each *_jobs)
    "quick": dict(dtypes=("bf16", "fp32"), coverage={"bf16": "all", "fp32": "first", "tf32": "first"},
                  edge=False, lean=True),
    # everything (about 20 CPU minutes cold)
    "full": dict(dtypes=("bf16", "fp32", "tf32"), coverage={"bf16": "all", "fp32": "all", "tf32": "all"},
                 edge=True, lean=False),
}


def all_jobs(groups=GROUPS, profile="quick", dtypes=None, coverage=None, edge=None):
    """Jobs of ``groups`` under a profile; ``dtypes`` / ``coverage`` (one mode for every dtype) / ``edge``
    override the profile's."""
    groups = set(groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise SystemExit(f"unknown groups {sorted(unknown)}; known: {GROUPS}")
    prof = PROFILES[profile]
    dtypes = tuple(dtypes or prof["dtypes"])
    cov = {d: coverage for d in ("bf16", "fp32", "tf32")} if coverage else prof["coverage"]
    lean = prof["lean"] and not coverage
    edge = prof["edge"] if edge is None else edge
    jobs = []
    if groups & {"mufa_fwd", "mufa_bwd", "mufa_atb"}:
        jobs += mufa_jobs(groups, dtypes, cov, lean)
    if "qlinear" in groups:
        jobs += qlinear_jobs(dtypes, lean)
    if "mga" in groups:
        jobs += mga_jobs(dtypes, edge, lean)
    return jobs


# ------------------------------------------------------------------------------------------------------
# compiling one job
# ------------------------------------------------------------------------------------------------------
def _kernel_object(qualname):
    import importlib

    mod, name = qualname.split(".")
    return getattr(importlib.import_module(f"rspeft_fast.kernels.{mod}"), name)


def _jit_fn(obj):
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def _specialize(value):
    """(type, attr) as JITFunction.run specialises a launch argument (native helper when available)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        return native_specialize_impl(BaseBackend, value, False, True, True)
    except ImportError:  # pragma: no cover - other triton versions: the same rules, written out
        from triton.runtime.jit import MockTensor

        if isinstance(value, MockTensor):
            return "*" + _TYPES[str(value.dtype).split(".")[-1]], "D"
        if isinstance(value, bool):
            return "u1", None
        if isinstance(value, int):
            if value == 1:
                return "constexpr", 1
            return ("i32" if -2**31 <= value < 2**31 else "i64"), ("D" if value % 16 == 0 else "")
        if isinstance(value, float):
            return "fp32", None
        raise TypeError(f"cannot specialise {value!r}")


_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int8": "i8", "uint8": "u8", "int32": "i32"}


def source_of(job):
    """ASTSource for a job: signature, constexprs and divisibility attributes as a real launch has them."""
    from triton.compiler import ASTSource

    fn = _jit_fn(_kernel_object(job.kernel))
    missing = [a for a in fn.arg_names if a not in job.args]
    extra = [a for a in job.args if a not in fn.arg_names]
    if missing or extra:
        raise TypeError(f"{job.kernel}: job arguments do not match the kernel's (missing {missing}, unknown {extra})")
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = job.args[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        ty, spec = _specialize(value)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = spec
        elif isinstance(spec, str) and "D" in spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def check_tools():
    """The bundled ptxas / cuobjdump (the AOT compile needs ptxas; the report cuobjdump)."""
    missing = [t for t in ("ptxas", "cuobjdump") if not os.access(_tool(t), os.X_OK)]
    if missing:
        raise RuntimeError(f"Triton's bundled {', '.join(missing)} missing or not executable under "
                           f"{os.path.dirname(_tool('ptxas'))}: the sm_90 AOT compile cannot run")


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    m = _RES.search(out)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{out}")
    reg, stack, _static_shared, local = map(int, m.groups())
    return reg, stack, local


def mma_kind(ptx: str) -> str:
    kinds = []
    for m in re.finditer(r"\b(wgmma\.mma_async|mma\.sync)\.[\w.]*?\.(f32|f16)\.(bf16|f16|tf32|e4m3|e5m2|s8)\.", ptx):
        k = f"{m.group(1).split('.')[0]}.{m.group(3)}"
        if k not in kinds:
            kinds.append(k)
    return ",".join(kinds) or "-"


def compile_job(job, target=None):
    """Compile one job for sm_90; a dict of results (never raises for a compile error: ok=False, error=...)."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = target or GPUTarget("cuda", 90, 32)
    t0 = time.time()
    res = dict(group=job.group, kernel=job.kernel, case=job.case, config=job.config, spill_strict=job.spill_strict,
               autotuned=job.autotuned, edge=job.edge)
    c0 = _cpu_seconds()
    try:
        src = source_of(job)
        k = triton.compile(src, target=target, options=dict(job.options))
        regs, stack, local = resource_usage(k.asm["cubin"])
        res.update(ok=True, regs=regs, stack=stack, local=local, spill_bytes=stack + local,
                   shared=int(k.metadata.shared), mma=mma_kind(k.asm["ptx"]), num_warps=k.metadata.num_warps,
                   num_stages=k.metadata.num_stages)
    except Exception as e:  # noqa: BLE001 - reported, not swallowed: the caller fails on ok=False
        res.update(ok=False, error=f"{type(e).__name__}: {e}")
    res["seconds"] = round(time.time() - t0, 2)
    res["cpu_s"] = round(_cpu_seconds() - c0, 2)
    return res


def _cpu_seconds():
    """CPU seconds of this process and its finished children (ptxas, cuobjdump)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


_WORKER_JOBS = None


def _worker(i):
    return compile_job(_WORKER_JOBS[i])


def run_jobs(jobs, n_procs=1, progress=None):
    global _WORKER_JOBS
    if n_procs <= 1:
        out = []
        for j in jobs:
            out.append(compile_job(j))
            if progress:
                progress(out[-1])
        return out
    import multiprocessing as mp

    _WORKER_JOBS = jobs
    with mp.get_context("fork").Pool(n_procs) as pool:
        out = []
        for r in pool.imap(_worker, range(len(jobs))):
            out.append(r)
            if progress:
                progress(r)
    return out


# ------------------------------------------------------------------------------------------------------
# coverage: every @triton.jit kernel of the three modules has at least one job
# ------------------------------------------------------------------------------------------------------
def kernels_found():
    """``module.name`` of every kernel (autotuned/heuristics-wrapped, or a JITFunction named ``*_kernel``)
    defined in kernels/{mufa,qlinear,mga}.py; device helpers (``_dot``, ``gelu``...) are compiled inline."""
    import importlib

    from triton.runtime.jit import JITFunction

    found = []
    for mod in KERNEL_MODULES:
        m = importlib.import_module(f"rspeft_fast.kernels.{mod}")
        for name, obj in vars(m).items():
            fn = _jit_fn(obj)
            if not isinstance(fn, JITFunction) or getattr(fn.fn, "__module__", None) != m.__name__:
                continue
            if obj is not fn or name.endswith("_kernel"):
                found.append(f"{mod}.{name}")
    return sorted(found)


# ------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------
def problems(results):
    """(failures, warnings): lists of strings."""
    fails, warns = [], []
    for r in results:
        where = f"{r['kernel']} [{r['case']}] {r['config']}"
        if not r["ok"]:
            fails.append(f"COMPILE ERROR {where}: {r['error']}")
            continue
        if r["spill_bytes"]:
            msg = f"spills {where}: {r['spill_bytes']} bytes of stack (regs {r['regs']})"
            (fails if r["spill_strict"] else warns).append(msg)
        if r["shared"] > SM90_MAX_SHARED:
            msg = f"shared memory {where}: {r['shared']} B > sm_90's {SM90_MAX_SHARED} B"
            if r["autotuned"]:
                warns.append(msg + " (this autotune config is pruned at run time: OutOfResources)")
            elif r["edge"]:
                warns.append(msg + " (a launch at this non-SPEC shape fails with OutOfResources)")
            else:
                fails.append(msg + " (a launch fails with OutOfResources)")
    # an autotuned kernel needs at least one config that can launch, per case
    by_case = {}
    for r in results:
        if r["ok"] and r["autotuned"]:
            by_case.setdefault((r["kernel"], r["case"]), []).append(r["shared"] <= SM90_MAX_SHARED)
    for (kern, case), fits in by_case.items():
        if not any(fits):
            fails.append(f"shared memory {kern} [{case}]: no autotune config fits sm_90's {SM90_MAX_SHARED} B")
    return fails, warns


def table(results):
    head = ("kernel", "case", "config", "status", "regs", "spill B", "shared B", "tensor cores", "cpu s")
    rows = []
    for r in results:
        if r["ok"]:
            rows.append((r["kernel"], r["case"], r["config"], "ok", r["regs"], r["spill_bytes"], r["shared"], r["mma"],
                         r["cpu_s"]))
        else:
            rows.append((r["kernel"], r["case"], r["config"], "ERROR", "", "", "", r["error"].splitlines()[0][:60],
                         r["cpu_s"]))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: " | ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    lines = [fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {GROUPS}")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                    help="quick (the CI test's; default) or full (every config, dtype and edge shape)")
    ap.add_argument("--dtypes", help="override: comma-separated, of bf16,fp32,tf32 (tf32 = fp32 with TF32 allowed)")
    ap.add_argument("--coverage-mode", choices=("all", "ends", "first"),
                    help="override, every dtype: all autotune configs, the first and the largest, or the first")
    ap.add_argument("--edge", action="store_true", help="also the MGA forward at MAX_L = 256 (slow)")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes")
    ap.add_argument("--json", help="write the results (and problems) here")
    ap.add_argument("--list", action="store_true", help="list the jobs and exit")
    ap.add_argument("--coverage", action="store_true", help="print kernels found / covered as JSON and exit")
    ap.add_argument("--progress", action="store_true", help="one line per finished compile on stderr")
    ap.add_argument("--quiet", action="store_true", help="no table (summary only)")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and "triton" in sys.modules:
        raise SystemExit("aot_compile: triton was imported under TRITON_INTERPRET=1; run this in a fresh process")
    os.environ.pop("TRITON_INTERPRET", None)
    check_tools()
    if a.coverage:
        jobs = all_jobs(GROUPS, "full", coverage="first", edge=False)
        found = kernels_found()
        covered = sorted({j.kernel for j in jobs})
        print(json.dumps(dict(found=found, covered=covered, missing=sorted(set(found) - set(covered)))))
        return 0
    groups = [g for g in a.groups.split(",") if g]
    dtypes = [d for d in a.dtypes.split(",") if d] if a.dtypes else None
    jobs = all_jobs(groups, a.profile, dtypes=dtypes, coverage=a.coverage_mode, edge=True if a.edge else None)
    if a.list:
        for j in jobs:
            print(j.name, j.options)
        print(f"{len(jobs)} jobs")
        return 0

    def progress(r):
        status = f"ok regs={r['regs']} spill={r['spill_bytes']} shared={r['shared']}" if r["ok"] else "ERROR"
        print(f"[{r['seconds']:6.1f}s wall {r['cpu_s']:5.1f}s cpu] {r['kernel']} [{r['case']}] {r['config']}: {status}",
              file=sys.stderr, flush=True)

    t0 = time.time()
    results = run_jobs(jobs, a.jobs, progress if a.progress else None)
    wall = time.time() - t0
    fails, warns = problems(results)
    if not a.quiet:
        print(table(results))
    n_ok = sum(r["ok"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    print(f"\n{n_ok}/{len(results)} compiled for sm_90 in {wall:.1f} s ({a.jobs} process(es), {cpu:.0f} CPU s); "
          f"{len(fails)} failure(s), {len(warns)} warning(s)")
    for w in warns:
        print("WARNING", w)
    for f in fails:
        print("FAIL", f)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(results=results, failures=fails, warnings=warns, wall_s=wall, cpu_s=cpu, groups=groups,
                           profile=a.profile, dtypes=sorted({r["case"].split()[0] for r in results})), f, indent=1)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
