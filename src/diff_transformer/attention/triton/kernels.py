"""Triton kernels of fused differential attention: forward, and the three backward passes.

Notation (per query head h of batch b, kv head g = h // GROUP):

    S1 = s·Q1 K1ᵀ, S2 = s·Q2 K2ᵀ    P1 = softmax(S1), P2 = softmax(S2)    (masked, fp32)
    O  = P1 V − λ P2 V                  λ a scalar (V1) or one per query row (V2)

Scores are kept in the log2 domain (``qk_scale = s·log2 e``), so the saved log-sum-exps ``LSE1``,
``LSE2`` are base-2 and ``P = exp2(S·log2e − LSE)``.

Backward, with G = dO Vᵀ (shared by both branches, since dP1 = G and dP2 = −λ G):

    E2 = rowsum(P2 ∘ G) = dO·O2          E1 = dO·O1 = dO·O + λ E2
    dS1 = P1 ∘ (G − E1)                  dS2 = −λ P2 ∘ (G − E2)
    dV  = (P1 − λ P2)ᵀ dO                dK1 = s dS1ᵀ Q1 ...      dλ = −E2 (summed for V1)

The forward also stores O2 = P2 V when a backward will follow, so ``_bwd_pre_kernel`` gets E1, E2
from rows of dO, O and O2 (no second pass over the keys). ``_bwd_dkdv_kernel`` walks query blocks
for one key block (all query heads of its GQA group, so dK and dV need no atomics), in one launch or
two (dK, then dV), and with ``ATOMIC_DQ`` adds dQ into fp32 buffers; otherwise ``_bwd_dq_kernel``
walks key blocks for one query block.

Limits: head dims are powers of two (the host wrapper checks); causal attention needs N ≤ M (the N
queries are the last N of the M positions). ``DOT_DTYPE`` is the operand type of the matrix products:
the input dtype on GPUs, fp32 for bf16 under Triton's CPU interpreter (it has no bf16 arithmetic).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _visible(offs_m, offs_n, M, SHIFT, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: query row i may see key j (j < M, and j ≤ i + M − N when causal).

    Rows past N are not masked: they see every key, so their (unstored) statistics stay finite.
    """
    ok = (offs_m[:, None] >= 0) & (offs_n[None, :] < M)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + SHIFT)
    return ok


# Forward ---------------------------------------------------------------------------------------
@triton.jit
def _fwd_step(
    acc1, acc2, m1, m2, l1, l2, q1, q2, k1t_ptrs, k2t_ptrs, v_ptrs, start_n, offs_m, offs_n, N, M, SHIFT,
    qk_scale, stride_k1n, stride_k2n, stride_vn,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, SHARED_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One key block of both online softmaxes; accumulators (BLOCK_M, BLOCK_DV) in fp32."""
    cols = start_n + offs_n
    if MASK:
        kmask = cols[None, :] < M
        k1t = tl.load(k1t_ptrs + start_n * stride_k1n, mask=kmask, other=0.0).to(DOT_DTYPE)  # (D, BLOCK_N)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=cols[:, None] < M, other=0.0).to(DOT_DTYPE)
    else:
        k1t = tl.load(k1t_ptrs + start_n * stride_k1n).to(DOT_DTYPE)
        v = tl.load(v_ptrs + start_n * stride_vn).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_DV)
    if SHARED_K:
        k2t = k1t
    elif MASK:
        k2t = tl.load(k2t_ptrs + start_n * stride_k2n, mask=kmask, other=0.0).to(DOT_DTYPE)
    else:
        k2t = tl.load(k2t_ptrs + start_n * stride_k2n).to(DOT_DTYPE)
    s1 = tl.dot(q1, k1t) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
    s2 = tl.dot(q2, k2t) * qk_scale
    if MASK:
        ok = _visible(offs_m, cols, M, SHIFT, CAUSAL)
        s1 = tl.where(ok, s1, float("-inf"))
        s2 = tl.where(ok, s2, float("-inf"))
    m1_new = tl.maximum(m1, tl.max(s1, 1))
    m2_new = tl.maximum(m2, tl.max(s2, 1))
    p1 = tl.math.exp2(s1 - m1_new[:, None])
    p2 = tl.math.exp2(s2 - m2_new[:, None])
    alpha1 = tl.math.exp2(m1 - m1_new)
    alpha2 = tl.math.exp2(m2 - m2_new)
    l1 = l1 * alpha1 + tl.sum(p1, 1)
    l2 = l2 * alpha2 + tl.sum(p2, 1)
    acc1 = tl.dot(p1.to(DOT_DTYPE), v, acc1 * alpha1[:, None])
    acc2 = tl.dot(p2.to(DOT_DTYPE), v, acc2 * alpha2[:, None])
    return acc1, acc2, m1_new, m2_new, l1, l2


@triton.jit
def _fwd_kernel(
    Q1, Q2, K1, K2, V, LAM, O, O2, LSE1, LSE2,
    stride_q1b, stride_q1h, stride_q1n, stride_q2b, stride_q2h, stride_q2n,
    stride_k1b, stride_k1h, stride_k1n, stride_k2b, stride_k2h, stride_k2n,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh, stride_ln,
    H, GROUP, N, M, qk_scale,
    D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, LAM_ROWS: tl.constexpr, SHARED_K: tl.constexpr, STORE_O2: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Grid (B·H, cdiv(N, BLOCK_M), dv / BLOCK_DV): one query block, one slice of the value width.

    Heads vary fastest and query blocks run last-first, so the longest causal rows start first.
    """
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g = h // GROUP
    dv0 = tl.program_id(2) * BLOCK_DV
    SHIFT = M - N  # query i sits at position i + M − N
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_v = dv0 + tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N

    q1 = tl.load(Q1 + b * stride_q1b + h * stride_q1h + offs_m[:, None] * stride_q1n + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)  # (BLOCK_M, D)
    q2 = tl.load(Q2 + b * stride_q2b + h * stride_q2h + offs_m[:, None] * stride_q2n + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
    k1t_ptrs = K1 + b * stride_k1b + g * stride_k1h + offs_n[None, :] * stride_k1n + offs_d[:, None]  # (D, BLOCK_N)
    k2t_ptrs = K2 + b * stride_k2b + g * stride_k2h + offs_n[None, :] * stride_k2n + offs_d[:, None]
    v_ptrs = V + b * stride_vb + g * stride_vh + offs_n[:, None] * stride_vn + offs_v[None, :]  # (BLOCK_N, BLOCK_DV)

    m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    # Key blocks every row of this query block sees in full need no mask; the rest (the causal
    # diagonal, the ragged tail) are masked.
    if CAUSAL:
        n_full = ((start_m + SHIFT + 1) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(M, start_m + BLOCK_M + SHIFT)
    else:
        n_full = (M // BLOCK_N) * BLOCK_N
        hi = M
    for start_n in range(0, n_full, BLOCK_N):
        acc1, acc2, m1, m2, l1, l2 = _fwd_step(
            acc1, acc2, m1, m2, l1, l2, q1, q2, k1t_ptrs, k2t_ptrs, v_ptrs, start_n, offs_m, offs_n, N, M, SHIFT,
            qk_scale, stride_k1n, stride_k2n, stride_vn, False, CAUSAL, SHARED_K, DOT_DTYPE)
    for start_n in range(n_full, hi, BLOCK_N):
        acc1, acc2, m1, m2, l1, l2 = _fwd_step(
            acc1, acc2, m1, m2, l1, l2, q1, q2, k1t_ptrs, k2t_ptrs, v_ptrs, start_n, offs_m, offs_n, N, M, SHIFT,
            qk_scale, stride_k1n, stride_k2n, stride_vn, True, CAUSAL, SHARED_K, DOT_DTYPE)

    if LAM_ROWS:
        lam = tl.load(LAM + b * stride_lb + h * stride_lh + offs_m * stride_ln, mask=row_ok, other=0.0).to(tl.float32)
    else:
        lam = tl.load(LAM).to(tl.float32)
    out = acc1 / l1[:, None] - (lam / l2)[:, None] * acc2  # the λ combination, in registers
    o_off = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_v[None, :]
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if STORE_O2:  # O2 has O's shape and strides
        tl.store(O2 + o_off, (acc2 / l2[:, None]).to(O2.dtype.element_ty), mask=row_ok[:, None])
    if tl.program_id(2) == 0:  # one value slice writes the statistics
        lse_off = bh.to(tl.int64) * N + offs_m  # LSE and E buffers are contiguous (B, H, N)
        tl.store(LSE1 + lse_off, m1 + tl.math.log2(l1), mask=row_ok)
        tl.store(LSE2 + lse_off, m2 + tl.math.log2(l2), mask=row_ok)


# Backward: E1, E2 ------------------------------------------------------------------------------
@triton.jit
def _bwd_pre_kernel(
    O, O2, DO, LAM, E1, E2,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, stride_lb, stride_lh, stride_ln,
    H, N,
    DV: tl.constexpr, BLOCK_M: tl.constexpr, LAM_ROWS: tl.constexpr,
):
    """Grid (B·H, cdiv(N, BLOCK_M)): E2 = dO·O2, E1 = dO·O + λ E2, both (B, H, N) fp32 (O2 has O's strides)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.arange(0, DV)
    row_ok = offs_m < N
    o_off = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_v[None, :]
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_v[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK_M, DV)
    o = tl.load(O + o_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    o2 = tl.load(O2 + o_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    e2 = tl.sum(do * o2, 1)
    if LAM_ROWS:
        lam = tl.load(LAM + b * stride_lb + h * stride_lh + offs_m * stride_ln, mask=row_ok, other=0.0).to(tl.float32)
    else:
        lam = tl.load(LAM).to(tl.float32)
    lse_off = bh.to(tl.int64) * N + offs_m
    tl.store(E1 + lse_off, tl.sum(do * o, 1) + lam * e2, mask=row_ok)
    tl.store(E2 + lse_off, e2, mask=row_ok)


# Backward: dK, dV (and dQ by atomics) ----------------------------------------------------------
@triton.jit
def _bwd_dkdv_step(
    dk1, dk2, dv, k1, k2, v, q1_ptrs, q2_ptrs, do_ptrs, dq1_ptrs, dq2_ptrs, lam_ptrs, lse_off,
    LSE1, LSE2, E1, E2, lam_scalar, start_m, offs_m, offs_n, N, M, SHIFT, qk_scale, sm_scale,
    stride_q1n, stride_q2n, stride_don, stride_ln, stride_dqn,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, SHARED_K: tl.constexpr, LAM_ROWS: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One query block against this program's key block, in the transposed (keys × queries) frame."""
    rows = start_m + offs_m
    if MASK:
        rmask = rows[:, None] < N
        q1 = tl.load(q1_ptrs + start_m * stride_q1n, mask=rmask, other=0.0).to(DOT_DTYPE)  # (BLOCK_M, D)
        q2 = tl.load(q2_ptrs + start_m * stride_q2n, mask=rmask, other=0.0).to(DOT_DTYPE)
        do = tl.load(do_ptrs + start_m * stride_don, mask=rmask, other=0.0).to(DOT_DTYPE)  # (BLOCK_M, DV)
        lse1 = tl.load(LSE1 + lse_off + start_m, mask=rows < N, other=0.0)
        lse2 = tl.load(LSE2 + lse_off + start_m, mask=rows < N, other=0.0)
        e1 = tl.load(E1 + lse_off + start_m, mask=rows < N, other=0.0)
        e2 = tl.load(E2 + lse_off + start_m, mask=rows < N, other=0.0)
    else:
        q1 = tl.load(q1_ptrs + start_m * stride_q1n).to(DOT_DTYPE)
        q2 = tl.load(q2_ptrs + start_m * stride_q2n).to(DOT_DTYPE)
        do = tl.load(do_ptrs + start_m * stride_don).to(DOT_DTYPE)
        lse1 = tl.load(LSE1 + lse_off + start_m)
        lse2 = tl.load(LSE2 + lse_off + start_m)
        e1 = tl.load(E1 + lse_off + start_m)
        e2 = tl.load(E2 + lse_off + start_m)
    if LAM_ROWS:
        lam = tl.load(lam_ptrs + start_m * stride_ln, mask=rows < N, other=0.0).to(tl.float32)[None, :]
    else:
        lam = lam_scalar
    s1t = tl.dot(k1, tl.trans(q1)) * qk_scale  # (BLOCK_N, BLOCK_M)
    s2t = tl.dot(k2, tl.trans(q2)) * qk_scale
    if MASK:
        ok = (rows[None, :] < N) & (offs_n[:, None] < M)  # (BLOCK_N, BLOCK_M)
        if CAUSAL:
            ok = ok & (offs_n[:, None] <= rows[None, :] + SHIFT)
        s1t = tl.where(ok, s1t, float("-inf"))
        s2t = tl.where(ok, s2t, float("-inf"))
    p1t = tl.math.exp2(s1t - lse1[None, :])
    p2t = tl.math.exp2(s2t - lse2[None, :])
    if DO_DV:
        dv = tl.dot((p1t - lam * p2t).to(DOT_DTYPE), do, dv)
    if DO_DK:
        gt = tl.dot(v, tl.trans(do))  # (dO Vᵀ)ᵀ (BLOCK_N, BLOCK_M)
        ds1t = p1t * (gt - e1[None, :])
        ds2t = -lam * p2t * (gt - e2[None, :])
        dk1 = tl.dot(ds1t.to(DOT_DTYPE), q1, dk1)
        if SHARED_K:
            dk1 = tl.dot(ds2t.to(DOT_DTYPE), q2, dk1)
        else:
            dk2 = tl.dot(ds2t.to(DOT_DTYPE), q2, dk2)
    if ATOMIC_DQ:
        dq1 = tl.dot(tl.trans(ds1t).to(DOT_DTYPE), k1) * sm_scale  # (BLOCK_M, D)
        dq2 = tl.dot(tl.trans(ds2t).to(DOT_DTYPE), k2) * sm_scale
        tl.atomic_add(dq1_ptrs + start_m * stride_dqn, dq1, mask=rows[:, None] < N, sem="relaxed")
        tl.atomic_add(dq2_ptrs + start_m * stride_dqn, dq2, mask=rows[:, None] < N, sem="relaxed")
    return dk1, dk2, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q1, Q2, K1, K2, V, LAM, DO, LSE1, LSE2, E1, E2, DQ1, DQ2, DK1, DK2, DV,
    stride_q1b, stride_q1h, stride_q1n, stride_q2b, stride_q2h, stride_q2n,
    stride_k1b, stride_k1h, stride_k1n, stride_k2b, stride_k2h, stride_k2n,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_lb, stride_lh, stride_ln,
    H, GROUP, N, M, qk_scale, sm_scale,
    D: tl.constexpr, DV_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, LAM_ROWS: tl.constexpr, SHARED_K: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DO_DK: tl.constexpr, DO_DV: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Grid (B·H_kv, cdiv(M, BLOCK_N)): dK1, dK2 (or their sum when SHARED_K) and dV of one key block.

    ``DO_DK``/``DO_DV`` pick what this launch accumulates: both in one pass, or dK and dV in two
    launches with half the fp32 accumulators each (V1's 2d-wide dV leaves few registers otherwise).
    DQ1/DQ2 are contiguous fp32 (B, H, N, D) buffers (zeroed) when ATOMIC_DQ (which needs DO_DK);
    DK1/DK2/DV are contiguous (B, H_kv, M, ·) in the input dtype.
    """
    start_n = tl.program_id(1) * BLOCK_N  # the first key blocks have the most causal queries: first
    bg = tl.program_id(0)
    H_KV = H // GROUP
    b = (bg // H_KV).to(tl.int64)
    g = (bg % H_KV).to(tl.int64)
    SHIFT = M - N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, DV_)
    col_ok = offs_n < M

    k1 = tl.load(K1 + b * stride_k1b + g * stride_k1h + offs_n[:, None] * stride_k1n + offs_d[None, :],
                 mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)  # (BLOCK_N, D)
    if SHARED_K:
        k2 = k1
    else:
        k2 = tl.load(K2 + b * stride_k2b + g * stride_k2h + offs_n[:, None] * stride_k2n + offs_d[None, :],
                     mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)
    v = tl.load(V + b * stride_vb + g * stride_vh + offs_n[:, None] * stride_vn + offs_v[None, :],
                mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)  # (BLOCK_N, DV)
    dk1 = tl.zeros([BLOCK_N, D], tl.float32)
    dk2 = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_], tl.float32)
    lam_scalar = 0.0
    if not LAM_ROWS:
        lam_scalar = tl.load(LAM).to(tl.float32)

    # Query blocks that see part of this key block (the causal diagonal) or run past N are masked.
    if CAUSAL:
        lo = (tl.maximum(start_n - SHIFT, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.maximum(((start_n + BLOCK_N - 1 - SHIFT + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    else:
        lo = 0
        full_lo = 0
    n_even = (N // BLOCK_M) * BLOCK_M
    full_lo = tl.where(start_n + BLOCK_N > M, N, tl.minimum(full_lo, N))  # a ragged key block: mask all
    tail_lo = tl.maximum(full_lo, n_even)

    for hh in range(0, GROUP):
        h = g * GROUP + hh
        q1_ptrs = Q1 + b * stride_q1b + h * stride_q1h + offs_m[:, None] * stride_q1n + offs_d[None, :]
        q2_ptrs = Q2 + b * stride_q2b + h * stride_q2h + offs_m[:, None] * stride_q2n + offs_d[None, :]
        do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_v[None, :]
        dq_off = ((b * H + h) * N + offs_m[:, None]) * D + offs_d[None, :]
        lam_ptrs = LAM + b * stride_lb + h * stride_lh + offs_m * stride_ln
        lse_off = (b * H + h) * N + offs_m
        for start_m in range(lo, full_lo, BLOCK_M):
            dk1, dk2, dv = _bwd_dkdv_step(
                dk1, dk2, dv, k1, k2, v, q1_ptrs, q2_ptrs, do_ptrs, DQ1 + dq_off, DQ2 + dq_off, lam_ptrs, lse_off,
                LSE1, LSE2, E1, E2, lam_scalar, start_m, offs_m, offs_n, N, M, SHIFT, qk_scale, sm_scale,
                stride_q1n, stride_q2n, stride_don, stride_ln, D,
                True, CAUSAL, SHARED_K, LAM_ROWS, ATOMIC_DQ, DO_DK, DO_DV, DOT_DTYPE)
        for start_m in range(full_lo, n_even, BLOCK_M):
            dk1, dk2, dv = _bwd_dkdv_step(
                dk1, dk2, dv, k1, k2, v, q1_ptrs, q2_ptrs, do_ptrs, DQ1 + dq_off, DQ2 + dq_off, lam_ptrs, lse_off,
                LSE1, LSE2, E1, E2, lam_scalar, start_m, offs_m, offs_n, N, M, SHIFT, qk_scale, sm_scale,
                stride_q1n, stride_q2n, stride_don, stride_ln, D,
                False, CAUSAL, SHARED_K, LAM_ROWS, ATOMIC_DQ, DO_DK, DO_DV, DOT_DTYPE)
        for start_m in range(tail_lo, N, BLOCK_M):
            dk1, dk2, dv = _bwd_dkdv_step(
                dk1, dk2, dv, k1, k2, v, q1_ptrs, q2_ptrs, do_ptrs, DQ1 + dq_off, DQ2 + dq_off, lam_ptrs, lse_off,
                LSE1, LSE2, E1, E2, lam_scalar, start_m, offs_m, offs_n, N, M, SHIFT, qk_scale, sm_scale,
                stride_q1n, stride_q2n, stride_don, stride_ln, D,
                True, CAUSAL, SHARED_K, LAM_ROWS, ATOMIC_DQ, DO_DK, DO_DV, DOT_DTYPE)

    kv_row = (b * H_KV + g) * M + offs_n  # dK/dV buffers are contiguous (B, H_kv, M, ·)
    if DO_DK:
        tl.store(DK1 + kv_row[:, None] * D + offs_d[None, :], (dk1 * sm_scale).to(DK1.dtype.element_ty),
                 mask=col_ok[:, None])
        if not SHARED_K:
            tl.store(DK2 + kv_row[:, None] * D + offs_d[None, :], (dk2 * sm_scale).to(DK2.dtype.element_ty),
                     mask=col_ok[:, None])
    if DO_DV:
        tl.store(DV + kv_row[:, None] * DV_ + offs_v[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# Backward: dQ without atomics ------------------------------------------------------------------
@triton.jit
def _bwd_dq_step(
    dq1, dq2, q1, q2, do, lse1, lse2, e1, e2, lam, k1t_ptrs, k2t_ptrs, vt_ptrs, start_n, offs_m, offs_n,
    N, M, SHIFT, qk_scale, stride_k1n, stride_k2n, stride_vn,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, SHARED_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    cols = start_n + offs_n
    if MASK:
        kmask = cols[None, :] < M
        k1t = tl.load(k1t_ptrs + start_n * stride_k1n, mask=kmask, other=0.0).to(DOT_DTYPE)  # (D, BLOCK_N)
        vt = tl.load(vt_ptrs + start_n * stride_vn, mask=kmask, other=0.0).to(DOT_DTYPE)  # (DV, BLOCK_N)
    else:
        k1t = tl.load(k1t_ptrs + start_n * stride_k1n).to(DOT_DTYPE)
        vt = tl.load(vt_ptrs + start_n * stride_vn).to(DOT_DTYPE)
    if SHARED_K:
        k2t = k1t
    elif MASK:
        k2t = tl.load(k2t_ptrs + start_n * stride_k2n, mask=kmask, other=0.0).to(DOT_DTYPE)
    else:
        k2t = tl.load(k2t_ptrs + start_n * stride_k2n).to(DOT_DTYPE)
    s1 = tl.dot(q1, k1t) * qk_scale  # (BLOCK_M, BLOCK_N)
    s2 = tl.dot(q2, k2t) * qk_scale
    if MASK:
        ok = _visible(offs_m, cols, M, SHIFT, CAUSAL)
        s1 = tl.where(ok, s1, float("-inf"))
        s2 = tl.where(ok, s2, float("-inf"))
    p1 = tl.math.exp2(s1 - lse1[:, None])
    p2 = tl.math.exp2(s2 - lse2[:, None])
    gm = tl.dot(do, vt)  # dO Vᵀ (BLOCK_M, BLOCK_N)
    ds1 = p1 * (gm - e1[:, None])
    ds2 = -lam * p2 * (gm - e2[:, None])
    dq1 = tl.dot(ds1.to(DOT_DTYPE), tl.trans(k1t), dq1)
    dq2 = tl.dot(ds2.to(DOT_DTYPE), tl.trans(k2t), dq2)
    return dq1, dq2


@triton.jit
def _bwd_dq_kernel(
    Q1, Q2, K1, K2, V, LAM, DO, LSE1, LSE2, E1, E2, DQ1, DQ2,
    stride_q1b, stride_q1h, stride_q1n, stride_q2b, stride_q2h, stride_q2n,
    stride_k1b, stride_k1h, stride_k1n, stride_k2b, stride_k2h, stride_k2n,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_lb, stride_lh, stride_ln,
    H, GROUP, N, M, qk_scale, sm_scale,
    D: tl.constexpr, DV_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, LAM_ROWS: tl.constexpr, SHARED_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Grid (B·H, cdiv(N, BLOCK_M)): dQ1, dQ2 of one query block into contiguous (B, H, N, D)."""
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g = h // GROUP
    SHIFT = M - N
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, DV_)
    row_ok = offs_m < N
    lse_off = bh.to(tl.int64) * N + offs_m

    q1 = tl.load(Q1 + b * stride_q1b + h * stride_q1h + offs_m[:, None] * stride_q1n + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)  # (BLOCK_M, D)
    q2 = tl.load(Q2 + b * stride_q2b + h * stride_q2h + offs_m[:, None] * stride_q2n + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_v[None, :],
                 mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)  # (BLOCK_M, DV)
    lse1 = tl.load(LSE1 + lse_off, mask=row_ok, other=0.0)
    lse2 = tl.load(LSE2 + lse_off, mask=row_ok, other=0.0)
    e1 = tl.load(E1 + lse_off, mask=row_ok, other=0.0)
    e2 = tl.load(E2 + lse_off, mask=row_ok, other=0.0)
    if LAM_ROWS:
        lam = tl.load(LAM + b * stride_lb + h * stride_lh + offs_m * stride_ln, mask=row_ok, other=0.0)
        lam = lam.to(tl.float32)[:, None]
    else:
        lam = tl.load(LAM).to(tl.float32)
    k1t_ptrs = K1 + b * stride_k1b + g * stride_k1h + offs_n[None, :] * stride_k1n + offs_d[:, None]  # (D, BLOCK_N)
    k2t_ptrs = K2 + b * stride_k2b + g * stride_k2h + offs_n[None, :] * stride_k2n + offs_d[:, None]
    vt_ptrs = V + b * stride_vb + g * stride_vh + offs_n[None, :] * stride_vn + offs_v[:, None]  # (DV, BLOCK_N)
    dq1 = tl.zeros([BLOCK_M, D], tl.float32)
    dq2 = tl.zeros([BLOCK_M, D], tl.float32)

    if CAUSAL:
        n_full = ((start_m + SHIFT + 1) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(M, start_m + BLOCK_M + SHIFT)
    else:
        n_full = (M // BLOCK_N) * BLOCK_N
        hi = M
    for start_n in range(0, n_full, BLOCK_N):
        dq1, dq2 = _bwd_dq_step(
            dq1, dq2, q1, q2, do, lse1, lse2, e1, e2, lam, k1t_ptrs, k2t_ptrs, vt_ptrs, start_n, offs_m, offs_n,
            N, M, SHIFT, qk_scale, stride_k1n, stride_k2n, stride_vn, False, CAUSAL, SHARED_K, DOT_DTYPE)
    for start_n in range(n_full, hi, BLOCK_N):
        dq1, dq2 = _bwd_dq_step(
            dq1, dq2, q1, q2, do, lse1, lse2, e1, e2, lam, k1t_ptrs, k2t_ptrs, vt_ptrs, start_n, offs_m, offs_n,
            N, M, SHIFT, qk_scale, stride_k1n, stride_k2n, stride_vn, True, CAUSAL, SHARED_K, DOT_DTYPE)

    dq_off = (bh.to(tl.int64) * N + offs_m[:, None]) * D + offs_d[None, :]
    tl.store(DQ1 + dq_off, (dq1 * sm_scale).to(DQ1.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DQ2 + dq_off, (dq2 * sm_scale).to(DQ2.dtype.element_ty), mask=row_ok[:, None])
