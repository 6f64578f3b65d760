"""Flash attention for Hopper in Gluon, warp-specialized: the softmax runs under the MMAs.

Two kernels: bf16 (`flash_attention_ws`, below) and int8-int8 (`flash_attention_ws_int8`, further
down, with its own notes).

Same contract and math as `attention.flash_attention(mode="bf16")` (q [B, Lq, H, D], k, v
[B, Lk, H, D], bf16, the [B, L, H*D] projection layout read directly by TMA, any lengths,
non-causal, fp32 online softmax); `flash_attention` routes bf16 calls here on Hopper. What differs
from the `tl` kernel in attention.py is the schedule. Triton's `tl.dot` waits for each Q.K product
right after issuing it and puts CTA-wide barriers around its TMA loads, so there the tensor cores
and the softmax take turns (kernels/NOTES.md). Here each program of 64 NC query rows runs NC + 1
partitions (FlashAttention-3's design):

- a loader warp: the consumers' Q tiles, then K/V blocks by TMA into a ring of `STAGES` buffers,
  each freed by an mbarrier that every consumer arrives on once its MMAs on it are done;
- NC consumer warpgroups (2 or 3) of 64 rows each: for key block j, issue S_j = Q K_j^T and
  O += P_{j-1} V_{j-1} (async wgmma), wait for S_j only, softmax, wait for the P.V. Without a
  CTA-wide barrier the consumers drift apart, so one's softmax runs under the others' MMAs.

Two things keep the softmax short (session 6, kernels/NOTES.md; 562 -> 682 TFLOP/s on the H100):

- the key mask (a compare and a select per score) only on the last key block, which alone can
  reach past Lk (peeled);
- the bounded lazy rescale: P_j = exp2(S_j - m_ref) against a reference max that moves to the
  running max only at the end of windows of LAZY key blocks, so O is not rescaled per block (one
  FMUL per output element and block saved). bf16 P keeps its relative precision at any magnitude;
  what must not happen is overflow, so each window first checks, for every row of the warpgroup,
  the Cauchy-Schwarz bound |q| max_k |k| (Q's row norm from the tile in shared memory, the head's
  largest key norm from a pre-pass) against m_ref: within 2^64, no P of the window can exceed
  2^64 and the window runs lazily; otherwise it rescales per block as FlashAttention does. The
  result is the same softmax to rounding; only the rounding of P's leading digits differs.

A single-warpgroup version with the same async issue order but no second warpgroup was no faster
than the `tl` kernel (ptxas hoists the P.V wait above the exponentials; NOTES.md, session 3).

Gluon kernels cannot run in Triton's CPU interpreter. CI compiles these kernels for sm_90a with the
installed Triton and its bundled ptxas (tests/test_kernels_gluon.py) and checks their structure;
their numbers are checked against float64 on the GPU by bench/gluon_attn.py and bench/kernels.py
(odd lengths, two samples per batch, sharp and climbing logits, and the real shape).
"""
from __future__ import annotations

import hashlib
import re

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    HAVE_GLUON = True
except ImportError:  # Triton without Gluon (< 3.5)
    HAVE_GLUON = False

LOG2E = 1.4426950408889634


if HAVE_GLUON:

    @gluon.jit
    def _load_q_tiles(desc_q, q_smem, q_bar, q_row, col):
        """Every consumer's Q tile (64 rows each, consecutive) by TMA, one barrier each."""
        NQ: gl.constexpr = q_smem.shape[0]
        for c in gl.static_range(NQ):
            mbarrier.expect(q_bar.index(c), desc_q.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_q, [q_row + c * desc_q.block_type.shape[0], col], q_bar.index(c),
                                            q_smem.index(c))

    @gluon.jit
    def _load_k_block(desc_k, k_smem, k_full, kv_empty, blk, kv_row, col):
        """Wait until the consumers have freed key block blk's stage of the ring, then load its K there.
        Returns the stage."""
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        slot = blk % STAGES
        mbarrier.wait(kv_empty.index(slot), ((blk // STAGES) & 1) ^ 1)
        mbarrier.expect(k_full.index(slot), desc_k.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [kv_row + blk * BLOCK_N, col], k_full.index(slot), k_smem.index(slot))
        return slot

    @gluon.jit
    def _store_rows(O, o, b, h, row0, Lq, stride_ob, stride_ol):
        """o [BM, D] (fp32, an MMA layout) -> bf16 rows row0 + [0, BM) of head h of sample b of O
        [B, Lq, H, D] (rows past Lq not written)."""
        BM: gl.constexpr = o.shape[0]
        D: gl.constexpr = o.shape[1]
        offs_m = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, o.type.layout))
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o.type.layout))
        o_ptr = (O + b.to(gl.int64) * stride_ob + gl.expand_dims(offs_m.to(gl.int64) * stride_ol, 1)
                 + h * D + gl.expand_dims(offs_d, 0))
        gl.store(o_ptr, o.to(gl.bfloat16), mask=gl.expand_dims(offs_m < Lq, 1))

    @gluon.jit
    def _ring_barriers(NC: gl.constexpr, STAGES: gl.constexpr):
        """The mbarriers of a loader / NC-consumer program: one per consumer's Q tile, and per ring
        stage K full, V full and free (every consumer arrives on it)."""
        q_bar = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NC):
            mbarrier.init(q_bar.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_full.index(i), count=1)
            mbarrier.init(v_full.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=NC)
        fence_async_shared()
        return q_bar, k_full, v_full, kv_empty

    @gluon.jit
    def _ws_loader(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, q_row, n_blk,
                   kv_row, col):
        """One warp: both consumers' Q tiles, then K/V blocks into the ring as stages free up."""
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        _load_q_tiles(desc_q, q_smem, q_bar, q_row, col)
        for blk in range(n_blk):
            slot = _load_k_block(desc_k, k_smem, k_full, kv_empty, blk, kv_row, col)
            mbarrier.expect(v_full.index(slot), desc_v.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_v, [kv_row + blk * BLOCK_N, col], v_full.index(slot),
                                            v_smem.index(slot))



    @gluon.jit
    def _bf_step(j, q_op, k_smem, v_smem, k_full, v_full, kv_empty, p, acc, m_ref, m_run, l_i, qk_scale, Lk,
                 MASK: gl.constexpr, LAZY: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr):
        """Key block j >= 1 in one consumer: issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}, wait for S_j
        only, softmax (key mask if MASK), wait for the P.V. LAZY: P_j against the reference max m_ref,
        m_run tracks the running max; otherwise m_ref is the running max and O is rescaled here."""
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        BM: gl.constexpr = acc.shape[0]
        slot = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_full.index(slot), (j // STAGES) & 1)
        mbarrier.wait(v_full.index(prev), ((j - 1) // STAGES) & 1)
        s = gl.zeros([BM, BLOCK_N], gl.float32, s_layout)
        s = warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), s, use_acc=False, is_async=True)
        pb = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(pb, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s])
        if MASK:
            cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(cols < Lk, 0), s, float("-inf"))
        m_blk = gl.max(s, 1) * qk_scale
        if LAZY > 0:
            m_run = gl.maximum(m_run, m_blk)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_ref, 1))
            l_i = l_i + gl.sum(p, 1)
        else:
            m_new = gl.maximum(m_ref, m_blk)
            alpha = gl.exp2(m_ref - m_new)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            l_i = l_i * alpha + gl.sum(p, 1)
            m_ref = m_new
        acc, pb = warpgroup_mma_wait(0, deps=[acc, pb])
        mbarrier.arrive(kv_empty.index(prev))
        if LAZY == 0:
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout)), 1)
        return p, acc, m_ref, m_run, l_i

    @gluon.jit
    def _bf_consumer(q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, KN, q_row0, Lq, Lk, n_blk, b, h,
                     H, stride_ob, stride_ol, qk_scale, LAZY: gl.constexpr, C: gl.constexpr):
        """Consumer warpgroup C: query rows q_row0 + 64 C + [0, 64)."""
        BM: gl.constexpr = 64
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        D: gl.constexpr = k_smem.shape[2]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
        q_op = q_smem.index(C)
        mbarrier.wait(q_bar.index(C), 0)
        if LAZY > 0:
            # |s| <= |q| max|k| (Cauchy-Schwarz): a per-row bound on every logit, from the Q tile in
            # shared memory and the head's largest key norm (KN, a pre-pass)
            q_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
            qf = q_op.load(q_l).to(gl.float32)
            qn = gl.convert_layout(gl.sqrt(gl.sum(qf * qf, 1)), row_l)
            bound = qn * (gl.load(KN + b * H + h) * qk_scale) * 1.001 + 1.0
        mbarrier.wait(k_full.index(0), 0)
        s = gl.zeros([BM, BLOCK_N], gl.float32, s_layout)
        s = warpgroup_mma(q_op, k_smem.index(0).permute((1, 0)), s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s])
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < Lk, 0), s, float("-inf"))
        m_ref = gl.max(s, 1) * qk_scale
        m_run = m_ref
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_ref, 1))
        l_i = gl.sum(p, 1)
        acc = gl.zeros([BM, D], gl.float32, o_layout)
        if LAZY > 0:
            for j0 in range(1, n_blk - 1, LAZY):
                j1 = gl.minimum(j0 + LAZY, n_blk - 1)
                # P against m_ref stays below 2^64 through the window if every row's bound is within
                # 64 of its running max; otherwise this window rescales per block
                if gl.max(bound - m_ref, 0) <= 64.0:
                    for j in range(j0, j1):
                        p, acc, m_ref, m_run, l_i = _bf_step(j, q_op, k_smem, v_smem, k_full, v_full, kv_empty, p,
                                                             acc, m_ref, m_run, l_i, qk_scale, Lk, False, LAZY,
                                                             s_layout, p_layout)
                    alpha = gl.exp2(m_ref - m_run)
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_l), 1)
                    p = p * gl.expand_dims(alpha, 1)  # block j1 - 1's P.V is not issued yet
                    l_i = l_i * alpha
                    m_ref = m_run
                else:
                    for j in range(j0, j1):
                        p, acc, m_ref, m_run, l_i = _bf_step(j, q_op, k_smem, v_smem, k_full, v_full, kv_empty, p,
                                                             acc, m_ref, m_run, l_i, qk_scale, Lk, False, 0,
                                                             s_layout, p_layout)
                    m_run = m_ref
        else:
            for j in range(1, n_blk - 1):
                p, acc, m_ref, m_run, l_i = _bf_step(j, q_op, k_smem, v_smem, k_full, v_full, kv_empty, p, acc,
                                                     m_ref, m_run, l_i, qk_scale, Lk, False, 0, s_layout, p_layout)
        if n_blk > 1:  # only the last block can reach past Lk: the key mask there
            p, acc, m_ref, m_run, l_i = _bf_step(n_blk - 1, q_op, k_smem, v_smem, k_full, v_full, kv_empty, p, acc,
                                                 m_ref, m_run, l_i, qk_scale, Lk, True, 0, s_layout, p_layout)
        last = (n_blk - 1) % STAGES
        mbarrier.wait(v_full.index(last), ((n_blk - 1) // STAGES) & 1)
        pb = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(pb, v_smem.index(last), acc, is_async=True)
        acc, pb = warpgroup_mma_wait(0, deps=[acc, pb])
        mbarrier.arrive(kv_empty.index(last))
        acc = acc / gl.expand_dims(gl.convert_layout(l_i, orow_l), 1)
        _store_rows(O, acc, b, h, q_row0 + C * BM, Lq, stride_ob, stride_ol)

    @gluon.jit
    def _attn_fwd_ws(desc_q, desc_k, desc_v, O, KN, Lq, Lk, H, stride_ob, stride_ol, qk_scale,
                     D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, NC: gl.constexpr,
                     LAZY: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        """64 NC query rows per program: NC (2 or 3) consumer warpgroups of 64 rows and a loader warp."""
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh - b * H
        q_smem = gl.allocate_shared_memory(desc_q.dtype, [NC, 64, D], desc_q.layout)
        k_smem = gl.allocate_shared_memory(desc_k.dtype, [STAGES, BLOCK_N, D], desc_k.layout)
        v_smem = gl.allocate_shared_memory(desc_v.dtype, [STAGES, BLOCK_N, D], desc_v.layout)
        q_bar, k_full, v_full, kv_empty = _ring_barriers(NC, STAGES)
        n_blk = gl.cdiv(Lk, BLOCK_N)
        q_row0 = pid_m * (64 * NC)
        largs = (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, b * Lq + q_row0,
                 n_blk, b * Lk, h * D)
        C0: gl.constexpr = 0
        C1: gl.constexpr = 1
        C2: gl.constexpr = 2
        if NC == 3:
            gl.warp_specialize([
                (_bf_consumer, (q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, KN, q_row0, Lq, Lk,
                                n_blk, b, h, H, stride_ob, stride_ol, qk_scale, LAZY, C0)),
                (_bf_consumer, (q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, KN, q_row0, Lq, Lk,
                                n_blk, b, h, H, stride_ob, stride_ol, qk_scale, LAZY, C1)),
                (_bf_consumer, (q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, KN, q_row0, Lq, Lk,
                                n_blk, b, h, H, stride_ob, stride_ol, qk_scale, LAZY, C2)),
                (_ws_loader, largs)], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([
                (_bf_consumer, (q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, KN, q_row0, Lq, Lk,
                                n_blk, b, h, H, stride_ob, stride_ol, qk_scale, LAZY, C0)),
                (_bf_consumer, (q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, KN, q_row0, Lq, Lk,
                                n_blk, b, h, H, stride_ob, stride_ol, qk_scale, LAZY, C1)),
                (_ws_loader, largs)], [4, 1], [CONSUMER_REGS, 24])


if HAVE_GLUON:
    # ------------------------------------------------------------------ int8-int8, warp-specialized
    # Mode "int8-int8" of attention.py (Q, K and V quantized by `quantize_qkv`, P against each key
    # block's own row max) with the loader / consumer split above, here with three consumer
    # warpgroups (192 query rows per program) at 160 registers each. Each consumer runs a key block
    # start to end (Q.K, softmax and quantization of P, P.V, the fp32 update); the other consumers'
    # MMAs and softmaxes fill its waits.
    #
    # P.V is unsigned: V is stored as uint8 (its int8 value + 128) and P on the grid round(255 p) as
    # uint8. The int32 product is then non-negative and below 2^24, so its bits read as a float are
    # exactly pv * 2^-149 (a denormal or one of the smallest normals; Triton's fp32 FMAs keep
    # denormals), and the update is one FMA per output element, acc += pv * w_j, with
    # w_j = 2^(m_j - m_ref + K0) against a reference max that moves only every RESCALE blocks. The
    # row sums are of the quantized P, exactly (integer sums of the same bits), so the +128 of V comes
    # off as 128 at the end. Triton lowers every 8-bit wgmma as .s8.s8; `_u8_pv_hook` rewrites this
    # kernel's register-A (P.V) ones to .u8.u8 in the PTX. Session 4's kernel used mode 3's signed
    # grid with VADD rows and paid an integer add and two FMAs per output element and block: 728
    # TFLOP/s against this one's 862 in the same H100 run, at the same 1.6e-2 (git history has it).
    #
    # Variants that were slower and are gone (kernels/NOTES.md, session 4): FA3's order inside each
    # warpgroup (Q.K of block j + 1 and P.V of block j in flight during a softmax) needs ~250
    # registers with the separate int32 P.V tile, so ptxas waits for the P.V before the softmax (with
    # P through shared memory instead it keeps the overlap, but two such consumers read 655-661
    # TFLOP/s against 704 for three of these); the row sums as a P x ones MMA (n = 8) cost more than
    # the FADD per score they save; consumers taking turns to issue their MMAs; the row reductions as
    # trees (no change).
    #
    # P reaches the tensor cores from registers, as wgmma's A operand, whose 8-bit fragment (thread t
    # of a quad holds columns 4t..4t+3 and 16+4t..16+4t+3 of each 32) differs from the accumulator
    # fragment S arrives in (columns 2t, 2t+1 of each 8). Rather than shuffle, the kernel relabels P's
    # columns within each 32 so that the two fragments coincide (a reshape and a permute, no data
    # movement: `assert_trivial`), and the quantizer stores V's keys in the same order (`PERM32` in
    # attention._quant_v_kernel).

    @gluon.jit
    def _relabel_p(pn, BM: gl.constexpr, BLOCK_N: gl.constexpr, p_layout: gl.constexpr):
        """Column c = 8i + 2t + e of each 32 (i < 4, t < 4, e < 2: accumulator order) becomes
        16 (i >> 1) + 4t + 2 (i & 1) + e (A-operand order): bits (i1 i0 t1 t0 e) -> (i1 t1 t0 i0 e)."""
        x = gl.reshape(pn, [BM, BLOCK_N // 32, 2, 2, 2, 2, 2])
        x = gl.permute(x, (0, 1, 2, 4, 5, 3, 6))
        x = gl.reshape(x, [BM, BLOCK_N])
        return gl.convert_layout(x, p_layout, assert_trivial=True)

    # 2^K0 lifts pv * 2^-149 toward the normal range. Headroom for a row max rising by d log2 units within
    # RESCALE blocks: l gains up to n_blk * 2^15 * 2^(d + K0), finite for d < 113 - K0 - log2(n_blk),
    # i.e. ~88 at n_blk = 378 (61 natural units of logit); not guarded at run time (kernels/NOTES.md,
    # session 6: a guard like the bf16 kernel's cost 4-6%)
    K0 = gl.constexpr(16.0)
    RESCALE = gl.constexpr(16)  # blocks between moves of the reference max

    @gluon.jit
    def _i8u_loader(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, q_row, n_blk,
                    kv_row, col, vt_row):
        """One warp: the consumers' Q tiles, then per key block K [BLOCK_N, D] and V^T [D, BLOCK_N] at
        [vt_row, blk * BLOCK_N] into the ring."""
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        _load_q_tiles(desc_q, q_smem, q_bar, q_row, col)
        for blk in range(n_blk):
            slot = _load_k_block(desc_k, k_smem, k_full, kv_empty, blk, kv_row, col)
            mbarrier.expect(v_full.index(slot), desc_v.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_v, [vt_row, blk * BLOCK_N], v_full.index(slot), v_smem.index(slot))

    @gluon.jit
    def _i8u_block(j, q_op, k_smem, v_smem, k_full, v_full, kv_empty, acc, l_i, m_ref, m_run, rfac, ks_ptr, kb_per,
                   Lk, MASK: gl.constexpr, FIRST: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr):
        """Key block j, start to end, in one consumer warpgroup; FIRST: block 0, whose row max becomes
        the reference max."""
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        BM: gl.constexpr = acc.shape[0]
        orow_l: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
        # sum of BLOCK_N magic words 0x4B400000, wrapped to int32
        MSUM: gl.constexpr = (BLOCK_N * 0x4B400000 + 2**31) % 2**32 - 2**31
        slot = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(k_full.index(slot), phase)
        # fresh accumulators (use_acc=False: never read); carried through the loop they would hold
        # registers for nothing
        s = gl.zeros([BM, BLOCK_N], gl.int32, s_layout)
        s = warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), s, use_acc=False, is_async=True)
        fac = rfac * gl.load(ks_ptr + j // kb_per)
        s = warpgroup_mma_wait(0, deps=[s])
        # |q.k| < 2^22: the float with bits q.k + 0x4B400000 is exactly q.k + 1.5 * 2^23 (no conversion
        # on the slow unit exp2 also needs); the offset folds into the FMAs below
        sf = (s + 0x4B400000).to(gl.float32, bitcast=True)
        if MASK:
            cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            sf = gl.where(gl.expand_dims(cols < Lk, 0), sf, float("-inf"))
        base = 12582912.0 * fac
        m_blk = gl.max(sf, 1) * fac - base  # this block's row max (log2 units)
        if FIRST:
            m_ref = m_blk
            m_run = m_blk
        else:
            m_run = gl.maximum(m_run, m_blk)
        p = gl.exp2(sf * gl.expand_dims(fac, 1) - gl.expand_dims(base + m_blk, 1))
        # the float 255 p + 1.5 * 2^23 holds round(255 p) + 1.5 * 2^23 exactly: its low byte is P
        pb = (p * 255.0 + 12582912.0).to(gl.int32, bitcast=True)
        w = gl.exp2(m_blk - m_ref + K0)
        l_i = l_i + (gl.sum(pb, 1) - MSUM).to(gl.float32) * w
        pn = _relabel_p(pb.to(gl.uint8), BM, BLOCK_N, p_layout)
        mbarrier.wait(v_full.index(slot), phase)
        pv = gl.zeros_like(acc).to(gl.int32)
        pv = warpgroup_mma(pn, v_smem.index(slot).permute((1, 0)), pv, use_acc=False, is_async=True)
        pv = warpgroup_mma_wait(0, deps=[pv])
        mbarrier.arrive(kv_empty.index(slot))
        acc = acc + pv.to(gl.float32, bitcast=True) * gl.expand_dims(gl.convert_layout(w, orow_l), 1)
        return acc, l_i, m_ref, m_run

    @gluon.jit
    def _i8u_consumer(q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, QS, KS, VS, VM, q_row0, Lq,
                      Lk, n_blk, n_kblk, b, h, H, stride_ob, stride_ol, qk_scale, kb_per, C: gl.constexpr):
        """Consumer warpgroup C: query rows q_row0 + 64 C + [0, 64)."""
        BM: gl.constexpr = 64
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        D: gl.constexpr = k_smem.shape[2]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_l: gl.constexpr = gl.SliceLayout(0, o_layout)
        bh = b * H + h
        rows = q_row0 + C * BM + gl.arange(0, BM, layout=row_l)
        qs = gl.load(QS + (b.to(gl.int64) * Lq + rows) * H + h, mask=rows < Lq, other=1.0)
        rfac = qs * qk_scale  # Q's scale per row; K's per block joins it in _i8u_block
        ks_ptr = KS + bh * n_kblk
        q_op = q_smem.index(C)
        mbarrier.wait(q_bar.index(C), 0)
        acc = gl.zeros([BM, D], gl.float32, o_layout)
        l_i = gl.zeros([BM], gl.float32, row_l)
        m_ref = gl.zeros([BM], gl.float32, row_l)
        m_run = m_ref
        # block 0 (masked: it may be the only one) sets the reference max
        acc, l_i, m_ref, m_run = _i8u_block(0, q_op, k_smem, v_smem, k_full, v_full, kv_empty, acc, l_i, m_ref,
                                            m_run, rfac, ks_ptr, kb_per, Lk, True, True, s_layout, p_layout)
        for j0 in range(1, n_blk - 1, RESCALE):
            for j in range(j0, gl.minimum(j0 + RESCALE, n_blk - 1)):
                acc, l_i, m_ref, m_run = _i8u_block(j, q_op, k_smem, v_smem, k_full, v_full, kv_empty, acc, l_i,
                                                    m_ref, m_run, rfac, ks_ptr, kb_per, Lk, False, False, s_layout,
                                                    p_layout)
            alpha = gl.exp2(m_ref - m_run)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_l), 1)
            l_i = l_i * alpha
            m_ref = m_run
        # only the last block can reach past Lk: the key mask (a compare and a select per score) there
        if n_blk > 1:
            acc, l_i, m_ref, m_run = _i8u_block(n_blk - 1, q_op, k_smem, v_smem, k_full, v_full, kv_empty, acc, l_i,
                                                m_ref, m_run, rfac, ks_ptr, kb_per, Lk, True, False, s_layout,
                                                p_layout)
        offs_d = gl.arange(0, D, layout=col_l)
        # acc / l is 2^-149 (the mean of V + 128 under the quantized P): 2^149 = 2^127 * 2^22
        inv = (1.7014118346046923e38 / gl.convert_layout(l_i, orow_l)) * 4194304.0
        o = acc * gl.expand_dims(inv, 1) - 128.0
        o = o * gl.expand_dims(gl.load(VS + bh * D + offs_d), 0) + gl.expand_dims(gl.load(VM + bh * D + offs_d), 0)
        _store_rows(O, o, b, h, q_row0 + C * BM, Lq, stride_ob, stride_ol)

    @gluon.jit
    def _attn_fwd_ws_i8u(desc_q, desc_k, desc_v, O, QS, KS, VS, VM, Lq, Lk, H, n_kblk, stride_ob, stride_ol,
                         qk_scale, kb_per, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         NC: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        """int8-int8: 64 NC query rows per program, NC (2 or 3) consumer warpgroups and a loader warp;
        V comes transposed ([B*H*D, Lp] uint8, keys relabelled within each 32)."""
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh - b * H
        q_smem = gl.allocate_shared_memory(desc_q.dtype, [NC, 64, D], desc_q.layout)
        k_smem = gl.allocate_shared_memory(desc_k.dtype, [STAGES, BLOCK_N, D], desc_k.layout)
        v_smem = gl.allocate_shared_memory(desc_v.dtype, [STAGES, D, BLOCK_N], desc_v.layout)
        q_bar, k_full, v_full, kv_empty = _ring_barriers(NC, STAGES)
        n_blk = gl.cdiv(Lk, BLOCK_N)
        q_row0 = pid_m * (64 * NC)
        largs = (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty,
                 b * Lq + q_row0, n_blk, b * Lk, h * D, bh * D)
        # the consumer index reaches each partition as a constexpr only when the argument tuple is
        # written in the call (a tuple held in a variable, or an int literal, arrives as a tensor)
        C0: gl.constexpr = 0
        C1: gl.constexpr = 1
        C2: gl.constexpr = 2
        if NC == 3:
            gl.warp_specialize([
                (_i8u_consumer, (q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, QS, KS, VS, VM,
                                 q_row0, Lq, Lk, n_blk, n_kblk, b, h, H, stride_ob, stride_ol, qk_scale, kb_per, C0)),
                (_i8u_consumer, (q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, QS, KS, VS, VM,
                                 q_row0, Lq, Lk, n_blk, n_kblk, b, h, H, stride_ob, stride_ol, qk_scale, kb_per, C1)),
                (_i8u_consumer, (q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, QS, KS, VS, VM,
                                 q_row0, Lq, Lk, n_blk, n_kblk, b, h, H, stride_ob, stride_ol, qk_scale, kb_per, C2)),
                (_i8u_loader, largs)], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([
                (_i8u_consumer, (q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, QS, KS, VS, VM,
                                 q_row0, Lq, Lk, n_blk, n_kblk, b, h, H, stride_ob, stride_ol, qk_scale, kb_per, C0)),
                (_i8u_consumer, (q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, O, QS, KS, VS, VM,
                                 q_row0, Lq, Lk, n_blk, n_kblk, b, h, H, stride_ob, stride_ol, qk_scale, kb_per, C1)),
                (_i8u_loader, largs)], [4, 1], [CONSUMER_REGS, 24])

    _U8_PV = re.compile(r"(wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32)\.s8\.s8(\s*\{[^}]*\},\s*\{)")

    def _u8_pv_patch(ptx: str) -> str:
        """In `_attn_fwd_ws_i8u`'s PTX only: the wgmmas with A in registers (P.V) read both operands as uint8."""
        if ".entry _attn_fwd_ws_i8u(" not in ptx:
            return ptx
        return _U8_PV.sub(r"\1.u8.u8\2", ptx)

    def _u8_pv_hook(*args):
        """Triton's pipeline-stages hook (knobs.runtime.add_stages_inspection_hook): wraps the PTX stage
        with `_u8_pv_patch`. Called with no arguments (Triton >= 3.7) it returns the cache key part."""
        if not args:  # the rewrite's own code and pattern are part of the cache key
            key = "storymem-u8pv-" + hashlib.sha256(_u8_pv_patch.__code__.co_code
                                                    + _U8_PV.pattern.encode()).hexdigest()[:16]
            prev = _u8_pv_hook.prev() if _u8_pv_hook.prev is not None else ("", "")
            return key + prev[0], prev[1]
        if _u8_pv_hook.prev is not None:
            _u8_pv_hook.prev(*args)
        stages = args[1]
        make_ptx = stages["ptx"]
        stages["ptx"] = lambda src, metadata: _u8_pv_patch(make_ptx(src, metadata))

    def _install_u8_pv_hook() -> bool:
        from triton import knobs
        rt = knobs.runtime
        if not hasattr(rt, "add_stages_inspection_hook"):
            return False
        if rt.add_stages_inspection_hook is not _u8_pv_hook:
            _u8_pv_hook.prev = rt.add_stages_inspection_hook
            rt.add_stages_inspection_hook = _u8_pv_hook
        return True

    _u8_pv_hook.prev = None


def flash_attention_ws(q, k, v, scale: float | None = None, block_n: int = 64, stages: int = 4,
                       consumers: int = 3, lazy: int = 64, consumer_regs: int | None = None) -> torch.Tensor:
    """bf16 attention by the warp-specialized Gluon kernel (Hopper only). q [B, Lq, H, D], k, v
    [B, Lk, H, D] whose rows are [B*L, H*D] with 16-byte aligned strides (what `attention._rows2d`
    returns). `consumers` warpgroups of 64 query rows per program; `lazy` > 0: windows of that many
    key blocks with the bounded lazy rescale, 0: rescale O at every block. Defaults: the fastest of
    the H100 sweep (kernels/NOTES.md, session 6)."""
    if not HAVE_GLUON:
        raise RuntimeError("the Gluon attention kernel needs triton >= 3.5 (triton.experimental.gluon)")
    B, Lq, H, D = q.shape
    if D not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128, got {D}")
    Lk = k.shape[1]
    if Lk == 0:  # the consumers would wait forever for a first key block
        raise ValueError("attention over zero keys")
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.empty((B, Lq, H, D), dtype=torch.bfloat16, device=q.device)
    if Lq == 0 or B * H == 0:
        return out
    # the largest key norm per (sample, head), for the lazy rescale's bound on the logits (its guard
    # has 2^63 of slack, so the norms' bf16 rounding does not matter)
    kn = torch.linalg.vector_norm(k, dim=-1).amax(dim=1).float().contiguous() if lazy else out
    rows = 64 * consumers
    _attn_fwd_ws[((Lq + rows - 1) // rows, B * H)](
        _gdesc(q, [64, D]), _gdesc(k, [block_n, D]), _gdesc(v, [block_n, D]), out, kn, Lq, Lk, H, out.stride(0),
        out.stride(1), scale * LOG2E, D=D, BLOCK_N=block_n, STAGES=stages, NC=consumers, LAZY=lazy,
        CONSUMER_REGS=consumer_regs or _consumer_regs(consumers), num_warps=4)
    return out


def flash_attention_ws_int8(q, k, v, scale: float | None = None, block_n: int = 128, stages: int = 4,
                            consumers: int = 3, consumer_regs: int | None = None,
                            k_block: int = 128) -> torch.Tensor:
    """Mode "int8-int8" by the warp-specialized Gluon kernel (Hopper only): q [B, Lq, H, D], k, v
    [B, Lk, H, D] bf16 (as `attention._rows2d` returns them) are quantized by `attention.quantize_qkv`
    (V's keys in this kernel's order, as uint8) and attended with INT8 Q.K and unsigned 8-bit P.V.
    Needs Triton's pipeline-stages hook (`have_u8_pv`). Defaults: the fastest of the H100 sweeps
    (kernels/NOTES.md, sessions 4-5)."""
    from .attention import quantize_qkv

    if not HAVE_GLUON:
        raise RuntimeError("the Gluon attention kernel needs triton >= 3.5 (triton.experimental.gluon)")
    if not _install_u8_pv_hook():
        raise RuntimeError("the int8-int8 Gluon kernel needs triton.knobs.runtime.add_stages_inspection_hook")
    B, Lq, H, D = q.shape
    if D not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128, got {D}")
    if block_n % 32 or block_n > 128 or k_block % block_n:
        raise ValueError(f"block_n {block_n} must be a multiple of 32, at most 128, and divide k_block {k_block}")
    if consumers not in (2, 3):
        raise ValueError(f"consumers must be 2 or 3, got {consumers}")
    Lk = k.shape[1]
    if Lk == 0:
        raise ValueError("attention over zero keys")
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.empty((B, Lq, H, D), dtype=torch.bfloat16, device=q.device)
    if Lq == 0 or B * H == 0:
        return out
    consumer_regs = consumer_regs or _consumer_regs(consumers)
    q8, qs, k8, ks, vt, vs, vm, _ = quantize_qkv(q, k, v, "int8-int8", k_block, v_block=block_n, perm32=True,
                                                 unsigned_v=True)
    dq = _gdesc(q8, [64, D])
    dk = _gdesc(k8, [block_n, D])
    Lp = vt.shape[-1]
    dv = GluonDescriptor(vt, [B * H * D, Lp], [Lp, 1], [D, block_n],
                         gl.NVMMASharedLayout.get_default_for([D, block_n], gl.uint8))
    rows = 64 * consumers
    grid = ((Lq + rows - 1) // rows, B * H)
    kern = _attn_fwd_ws_i8u[grid](dq, dk, dv, out, qs, ks, vs, vm, Lq, Lk, H, ks.shape[-1], out.stride(0),
                                  out.stride(1), scale * LOG2E, k_block // block_n, D=D, BLOCK_N=block_n,
                                  STAGES=stages, NC=consumers, CONSUMER_REGS=consumer_regs, num_warps=4)
    if id(kern) not in _U8_CHECKED:  # once per compiled kernel: the hook did rewrite it
        if "s32.u8.u8" not in kern.asm["ptx"]:
            raise RuntimeError("the int8-int8 kernel was compiled without its .u8 wgmma (Triton stages hook)")
        _U8_CHECKED.add(id(kern))
    return out


def have_u8_pv() -> bool:
    """Whether this Triton can build the int8-int8 Gluon kernel (Gluon and the pipeline-stages hook,
    which this installs)."""
    return HAVE_GLUON and _install_u8_pv_hook()


_U8_CHECKED: set[int] = set()


def _consumer_regs(consumers: int) -> int:
    """Registers per consumer thread: what the register file (64K) holds beside the loader's warpgroup at 24."""
    return 240 if consumers == 2 else 160


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.int8: "int8"}


def _gdesc(t: torch.Tensor, block: list[int]):
    B, L, H, D = t.shape
    layout = gl.NVMMASharedLayout.get_default_for(block, getattr(gl, _GL_DTYPES[t.dtype]))
    return GluonDescriptor(t, [B * L, H * D], [t.stride(1), 1], block, layout)


def compile_ws_sm90(block_n: int = 64, stages: int = 4, consumers: int = 3, lazy: int = 64,
                    consumer_regs: int | None = None, D: int = 128):
    """Compile the bf16 kernel `_attn_fwd_ws` for sm_90a without a GPU (Triton's bundled ptxas);
    returns Triton's compiled kernel (`.asm["ptx"]`, `.asm["cubin"]`, `.metadata.shared`). Used by CI
    and bench/sass.py."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(block):
        lay = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
        return f"tensordesc<bf16{list(block)},{lay!r}>".replace("'", "")

    sig = {"desc_q": desc([64, D]), "desc_k": desc([block_n, D]), "desc_v": desc([block_n, D]), "O": "*bf16",
           "KN": "*fp32", "Lq": "i32", "Lk": "i32", "H": "i32", "stride_ob": "i32", "stride_ol": "i32",
           "qk_scale": "fp32", "D": "constexpr", "BLOCK_N": "constexpr", "STAGES": "constexpr", "NC": "constexpr",
           "LAZY": "constexpr", "CONSUMER_REGS": "constexpr"}
    consts = {"D": D, "BLOCK_N": block_n, "STAGES": stages, "NC": consumers, "LAZY": lazy,
              "CONSUMER_REGS": consumer_regs or _consumer_regs(consumers)}
    src = GluonASTSource(fn=_attn_fwd_ws, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def compile_ws_int8_sm90(block_n: int = 128, stages: int = 4, consumers: int = 3, consumer_regs: int | None = None,
                         D: int = 128):
    """`compile_ws_sm90` for the int8-int8 kernel `_attn_fwd_ws_i8u` (its P.V rewritten to .u8.u8)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    if not _install_u8_pv_hook():
        raise RuntimeError("this Triton has no pipeline-stages hook for the int8-int8 kernel")

    def desc(block, ty):
        lay = gl.NVMMASharedLayout.get_default_for(block, gl.int8)
        return f"tensordesc<{ty}{list(block)},{lay!r}>".replace("'", "")

    sig = {"desc_q": desc([64, D], "i8"), "desc_k": desc([block_n, D], "i8"), "desc_v": desc([D, block_n], "u8"),
           "O": "*bf16", "QS": "*fp32", "KS": "*fp32", "VS": "*fp32", "VM": "*fp32", "Lq": "i32", "Lk": "i32",
           "H": "i32", "n_kblk": "i32", "stride_ob": "i32", "stride_ol": "i32", "qk_scale": "fp32", "kb_per": "i32",
           "D": "constexpr", "BLOCK_N": "constexpr", "STAGES": "constexpr", "NC": "constexpr",
           "CONSUMER_REGS": "constexpr"}
    consts = {"D": D, "BLOCK_N": block_n, "STAGES": stages, "NC": consumers,
              "CONSUMER_REGS": consumer_regs or _consumer_regs(consumers)}
    src = GluonASTSource(fn=_attn_fwd_ws_i8u, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
