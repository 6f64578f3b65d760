"""bf16 flash attention for Hopper in Gluon, warp-specialized: the softmax runs under the MMAs.

Same contract and math as `attention.flash_attention(mode="bf16")` (q [B, Lq, H, D], k, v
[B, Lk, H, D], bf16, the [B, L, H*D] projection layout read directly by TMA, any lengths,
non-causal, fp32 online softmax); `flash_attention` routes bf16 calls here on Hopper. What differs
from the `tl` kernel in attention.py is the schedule. Triton's `tl.dot` waits for each Q.K product
right after issuing it and puts CTA-wide barriers around its TMA loads, so there the tensor cores
and the softmax take turns (kernels/NOTES.md). Here each program of 128 query rows runs three
partitions (FlashAttention-3's design):

- a loader warp: both Q tiles, then K/V blocks by TMA into a ring of `STAGES` buffers, each freed
  by an mbarrier that both consumers arrive on once their MMAs on it are done;
- two consumer warpgroups of 64 rows each: for key block j, issue S_j = Q K_j^T and
  O += P_{j-1} V_{j-1} (async wgmma), wait for S_j only, softmax, wait for the P.V, rescale O.
  With `PINGPONG` they take turns issuing those MMAs (two mbarriers), so one's softmax runs while
  the other's MMAs keep the tensor cores busy.

A single-warpgroup version with the same async issue order but no second warpgroup was no faster
than the `tl` kernel (ptxas hoists the P.V wait above the exponentials; NOTES.md, session 3).

Gluon kernels cannot run in Triton's CPU interpreter. CI compiles this kernel for sm_90a with the
installed Triton and its bundled ptxas (tests/test_kernels.py) and checks its structure; its numbers
are checked against float64 on the GPU by bench/kernels.py (odd lengths, two samples per batch,
and the real shape).
"""
from __future__ import annotations

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
    def _softmax_block(s, m_i, l_i, qk_scale, n0, Lk, BLOCK_N: gl.constexpr, MASK: gl.constexpr,
                       FIRST: gl.constexpr, s_layout: gl.constexpr):
        if MASK:
            cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(cols < Lk, 0), s, float("-inf"))
        m_blk = gl.max(s, 1) * qk_scale
        if FIRST:
            m_new = m_blk
            alpha = gl.zeros_like(m_blk)
        else:
            m_new = gl.maximum(m_i, m_blk)
            alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _ws_loader(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, q_row, n_blk,
                   kv_row, col):
        """One warp: both consumers' Q tiles, then K/V blocks into the ring as stages free up."""
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        for c in gl.static_range(2):
            mbarrier.expect(q_bar.index(c), desc_q.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_q, [q_row + c * desc_q.block_type.shape[0], col], q_bar.index(c),
                                            q_smem.index(c))
        for blk in range(n_blk):
            slot = blk % STAGES
            mbarrier.wait(kv_empty.index(slot), ((blk // STAGES) & 1) ^ 1)
            mbarrier.expect(k_full.index(slot), desc_k.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_k, [kv_row + blk * BLOCK_N, col], k_full.index(slot),
                                            k_smem.index(slot))
            mbarrier.expect(v_full.index(slot), desc_v.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_v, [kv_row + blk * BLOCK_N, col], v_full.index(slot),
                                            v_smem.index(slot))

    @gluon.jit
    def _ws_consumer(q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, turn, O, q_row0, Lq, Lk, n_blk, b,
                     h, stride_ob, stride_ol, qk_scale, C: gl.constexpr, PINGPONG: gl.constexpr):
        """One warpgroup, 64 query rows. With PINGPONG the two consumers take turns issuing their MMAs
        (FlashAttention-3's inter-warpgroup schedule): one's softmax runs under the other's MMAs."""
        BM: gl.constexpr = 64
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        D: gl.constexpr = k_smem.shape[2]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        q_op = q_smem.index(C)
        mbarrier.wait(q_bar.index(C), 0)
        tphase = 0
        # block 0
        mbarrier.wait(k_full.index(0), 0)
        if PINGPONG:
            mbarrier.wait(turn.index(C), tphase)
            tphase ^= 1
        s = gl.zeros([BM, BLOCK_N], gl.float32, s_layout)
        s = warpgroup_mma(q_op, k_smem.index(0).permute((1, 0)), s, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - C))
        s = warpgroup_mma_wait(0, deps=[s])
        l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))
        p, m_i, l_i, alpha = _softmax_block(s, l_i, l_i, qk_scale, 0, Lk, BLOCK_N, True, True, s_layout)
        acc = gl.zeros([BM, D], gl.float32, o_layout)
        for j in range(1, n_blk):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_full.index(slot), (j // STAGES) & 1)
            mbarrier.wait(v_full.index(prev), ((j - 1) // STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(turn.index(C), tphase)
                tphase ^= 1
            s = warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), s, use_acc=False, is_async=True)
            pb = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            acc = warpgroup_mma(pb, v_smem.index(prev), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - C))
            s = warpgroup_mma_wait(1, deps=[s])
            # every block goes through the key mask (a compare and a select per score): simpler than
            # peeling the last block, which could win back a little
            p, m_new, l_i, alpha = _softmax_block(s, m_i, l_i, qk_scale, j * BLOCK_N, Lk, BLOCK_N, True, False,
                                                  s_layout)
            acc, pb = warpgroup_mma_wait(0, deps=[acc, pb])
            mbarrier.arrive(kv_empty.index(prev))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            m_i = m_new
        last = (n_blk - 1) % STAGES
        mbarrier.wait(v_full.index(last), ((n_blk - 1) // STAGES) & 1)
        if PINGPONG:
            mbarrier.wait(turn.index(C), tphase)
        pb = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(pb, v_smem.index(last), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - C))
        acc, pb = warpgroup_mma_wait(0, deps=[acc, pb])
        mbarrier.arrive(kv_empty.index(last))
        acc = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        offs_m = q_row0 + C * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        o_ptr = (O + b.to(gl.int64) * stride_ob + gl.expand_dims(offs_m.to(gl.int64) * stride_ol, 1)
                 + h * D + gl.expand_dims(offs_d, 0))
        gl.store(o_ptr, acc.to(gl.bfloat16), mask=gl.expand_dims(offs_m < Lq, 1))

    @gluon.jit
    def _ws_consumer0(q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, turn, O, q_row0, Lq, Lk, n_blk, b,
                      h, stride_ob, stride_ol, qk_scale):
        _ws_consumer(q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, turn, O, q_row0, Lq, Lk, n_blk, b,
                     h, stride_ob, stride_ol, qk_scale, 0, False)

    @gluon.jit
    def _ws_consumer1(q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, turn, O, q_row0, Lq, Lk, n_blk, b,
                      h, stride_ob, stride_ol, qk_scale):
        _ws_consumer(q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, turn, O, q_row0, Lq, Lk, n_blk, b,
                     h, stride_ob, stride_ol, qk_scale, 1, False)

    @gluon.jit
    def _ws_consumer0_pp(q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, turn, O, q_row0, Lq, Lk, n_blk,
                         b, h, stride_ob, stride_ol, qk_scale):
        _ws_consumer(q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, turn, O, q_row0, Lq, Lk, n_blk, b,
                     h, stride_ob, stride_ol, qk_scale, 0, True)

    @gluon.jit
    def _ws_consumer1_pp(q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, turn, O, q_row0, Lq, Lk, n_blk,
                         b, h, stride_ob, stride_ol, qk_scale):
        _ws_consumer(q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, turn, O, q_row0, Lq, Lk, n_blk, b,
                     h, stride_ob, stride_ol, qk_scale, 1, True)

    @gluon.jit
    def _attn_fwd_ws(desc_q, desc_k, desc_v, O, Lq, Lk, H, stride_ob, stride_ol, qk_scale,
                     D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                     CONSUMER_REGS: gl.constexpr):
        """128 query rows per program: two consumer warpgroups (64 rows each) and a loader warp."""
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh - b * H
        q_smem = gl.allocate_shared_memory(desc_q.dtype, [2, 64, D], desc_q.layout)
        k_smem = gl.allocate_shared_memory(desc_k.dtype, [STAGES, BLOCK_N, D], desc_k.layout)
        v_smem = gl.allocate_shared_memory(desc_v.dtype, [STAGES, BLOCK_N, D], desc_v.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bar.index(i), count=1)
            mbarrier.init(turn.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_full.index(i), count=1)
            mbarrier.init(v_full.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)
        fence_async_shared()
        if PINGPONG:
            mbarrier.arrive(turn.index(0))  # consumer 0 issues first
        n_blk = gl.cdiv(Lk, BLOCK_N)
        kv_row = b * Lk
        col = h * D
        q_row0 = pid_m * 128
        cargs = (q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, turn, O, q_row0, Lq, Lk, n_blk, b, h,
                 stride_ob, stride_ol, qk_scale)
        largs = (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_full, v_full, kv_empty, b * Lq + q_row0,
                 n_blk, kv_row, col)
        if PINGPONG:
            gl.warp_specialize([(_ws_consumer0_pp, cargs), (_ws_consumer1_pp, cargs), (_ws_loader, largs)],
                               [4, 1], [CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([(_ws_consumer0, cargs), (_ws_consumer1, cargs), (_ws_loader, largs)],
                               [4, 1], [CONSUMER_REGS, 24])


def flash_attention_ws(q, k, v, scale: float | None = None, block_n: int = 128, stages: int = 3,
                       pingpong: bool = True, consumer_regs: int = 240) -> torch.Tensor:
    """bf16 attention by the warp-specialized Gluon kernel (Hopper only). q [B, Lq, H, D], k, v
    [B, Lk, H, D] whose rows are [B*L, H*D] with 16-byte aligned strides (what `attention._rows2d`
    returns). Defaults: the fastest of the H100 sweep (kernels/NOTES.md, session 3)."""
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
    dq = _gdesc(q, [64, D])
    dk = _gdesc(k, [block_n, D])
    dv = _gdesc(v, [block_n, D])
    grid = ((Lq + 127) // 128, B * H)
    _attn_fwd_ws[grid](dq, dk, dv, out, Lq, Lk, H, out.stride(0), out.stride(1), scale * LOG2E,
                       D=D, BLOCK_N=block_n, STAGES=stages, PINGPONG=pingpong, CONSUMER_REGS=consumer_regs,
                       num_warps=4)
    return out


def _gdesc(t: torch.Tensor, block: list[int]):
    B, L, H, D = t.shape
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
    return GluonDescriptor(t, [B * L, H * D], [t.stride(1), 1], block, layout)


def compile_ws_sm90(block_n: int = 128, stages: int = 3, pingpong: bool = True, consumer_regs: int = 240,
                    D: int = 128):
    """Compile `_attn_fwd_ws` for sm_90a without a GPU (Triton's bundled ptxas); returns Triton's
    compiled kernel (`.asm["ptx"]`, `.asm["cubin"]`, `.metadata.shared`). Used by CI and bench/sass.py."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(block):
        lay = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
        return f"tensordesc<bf16{list(block)},{lay!r}>".replace("'", "")

    sig = {"desc_q": desc([64, D]), "desc_k": desc([block_n, D]), "desc_v": desc([block_n, D]), "O": "*bf16",
           "Lq": "i32", "Lk": "i32", "H": "i32", "stride_ob": "i32", "stride_ol": "i32", "qk_scale": "fp32",
           "D": "constexpr", "BLOCK_N": "constexpr", "STAGES": "constexpr", "PINGPONG": "constexpr",
           "CONSUMER_REGS": "constexpr"}
    consts = {"D": D, "BLOCK_N": block_n, "STAGES": stages, "PINGPONG": pingpong, "CONSUMER_REGS": consumer_regs}
    src = GluonASTSource(fn=_attn_fwd_ws, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
