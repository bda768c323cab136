"""The @triton.jit kernels of the Triton backend (launched by triton.py): the training forward
and the compact backward.

x is seen in one of two layouts (triton.layout picks it):
- "rows":   channel innermost ((N, C), channels-last): a row-major (M, C) matrix, M = m values
            per channel, so a tile of rows reads whole cache lines across channels;
- "planes": channel-major contiguous ((N, C, L), NCHW): N*C contiguous planes of S values each.
Each direction is three launches. (1) A split reduction: every program takes a block of channels
and one slice of their m values and writes a partial result per (slice, channel). (2) A
finalize: one program per block of channels merges the slices and computes the per-channel
coefficients. (3) One elementwise pass: y, or dx.

Accuracy at a large common offset (x = 1e4 + N(0, 1) in float32): the forward's partials are
Welford-style (count, mean, sum of squared deviations) of x - p, p being the channel's first
value, built tile by tile with Chan et al.'s pairwise update and merged across slices by the
exact k-way formula (the mean, then M2 = sum of M2_i + n_i (mean_i - mean)^2), so nothing
cancels as E[x^2] - E[x]^2 would and the partial means round at the scale of the spread, not of
the offset. The mean is then kept as
two float32 numbers, hi + lo (hi rounded, lo the rounding error), and every x - mean is formed as
(x - hi) - lo, where x - hi is exact (Sterbenz): a float32 mean alone would be off by up to half
an ulp of the offset (5e-4 at 1e4), an error every normalised value would carry.
Everything accumulates in float32 whatever the input dtype; outputs are cast back on store.
"""
import triton
import triton.language as tl


@triton.jit
def _tile_moments(x, mask, n_t):
    """Mean and sum of squared deviations of one tile's valid values (n_t of them) along axis 0.

    The first mean is corrected by the mean of the deviations from it (whose sum rounds far
    less than the sum of values near a large offset), as bnlib's CPU paths do.
    """
    n_div = tl.maximum(n_t, 1.0)  # a tile wholly past the slice's end has no values
    mean0 = tl.sum(x, 0) / n_div
    d = tl.where(mask, x - mean0[None, :], 0.0)
    sum_d = tl.sum(d, 0)
    m2 = tl.sum(d * d, 0) - sum_d * sum_d / n_div
    return mean0 + sum_d / n_div, m2


@triton.jit
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s update: (count, mean, M2) of two disjoint sets from each set's own."""
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@triton.jit
def _slice(ps, per_split, total):
    """Start and end (int64: m may come close to 2^31) of slice ps of range(total)."""
    start = ps.to(tl.int64) * per_split
    return start, tl.minimum(start + per_split, total)


@triton.jit
def _row_tile(r, row_end, cols, cmask, C, BLOCK_M: tl.constexpr):
    """Offsets and mask of rows [r, r + BLOCK_M) by cols of row-major (M, C) memory; rows from
    row_end on are masked."""
    rows = r + tl.arange(0, BLOCK_M)
    mask = (rows < row_end)[:, None] & cmask[None, :]
    return rows[:, None].to(tl.int64) * C + cols[None, :], mask


@triton.jit
def _plane_tile(nb, n_end, sb, c, C, S, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of images [nb, nb + BLOCK_N) by positions [sb, sb + BLOCK_S) of channel
    c in channel-major (N, C, S) memory; images from n_end and positions from S on are masked."""
    ns = nb + tl.arange(0, BLOCK_N)
    ss = sb + tl.arange(0, BLOCK_S)
    mask = (ns < n_end)[:, None] & (ss < S)[None, :]
    return ((ns.to(tl.int64) * C + c) * S)[:, None] + ss[None, :], mask


@triton.jit
def stats_rows(x_ptr, part_ptr, M, C, rows_per_split, splits,
               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial (count, mean, M2) of x - p for channels [pc*BLOCK_C, ...) over one slice of rows."""
    pc, ps = tl.program_id(0), tl.program_id(1)
    cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    pivot = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # row 0
    row0, row_end = _slice(ps, rows_per_split, M)
    n = 0.0
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for r in range(row0, row0 + rows_per_split, BLOCK_M):  # rows past row_end are masked
        offs, mask = _row_tile(r, row_end, cols, cmask, C, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - pivot[None, :], 0.0)
        n_t = tl.maximum(tl.minimum(row_end - r, BLOCK_M), 0).to(tl.float32)
        mean_t, m2_t = _tile_moments(x, mask, n_t)
        n, mean, m2 = _merge(n, mean, m2, n_t, mean_t, m2_t)
    out = ps * C + cols
    tl.store(part_ptr + out, tl.zeros([BLOCK_C], tl.float32) + n, mask=cmask)
    tl.store(part_ptr + splits * C + out, mean, mask=cmask)
    tl.store(part_ptr + 2 * splits * C + out, m2, mask=cmask)


@triton.jit
def stats_planes(x_ptr, part_ptr, N, C, S, n_per_split, splits,
                 BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Partial (count, mean, M2) of x - p for channel c over the planes of one slice of the batch."""
    c, ps = tl.program_id(0), tl.program_id(1)
    pivot = tl.load(x_ptr + c * S + tl.arange(0, 1)).to(tl.float32)  # image 0, position 0
    n0, n_end = _slice(ps, n_per_split, N)
    n = 0.0
    mean = tl.zeros([1], tl.float32)
    m2 = tl.zeros([1], tl.float32)
    for nb in range(n0, n0 + n_per_split, BLOCK_N):  # images past n_end are masked
        for sb in range(0, S, BLOCK_S):
            offs, mask = _plane_tile(nb, n_end, sb, c, C, S, BLOCK_N, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.where(mask, x - pivot[:, None], 0.0)
            # one column of BLOCK_N * BLOCK_S values, so _tile_moments reduces the whole tile
            x = tl.reshape(x, [BLOCK_N * BLOCK_S, 1])
            mask = tl.reshape(mask, [BLOCK_N * BLOCK_S, 1])
            n_t = (tl.maximum(tl.minimum(n_end - nb, BLOCK_N), 0)
                   * tl.minimum(S - sb, BLOCK_S)).to(tl.float32)
            mean_t, m2_t = _tile_moments(x, mask, n_t)
            n, mean, m2 = _merge(n, mean, m2, n_t, mean_t, m2_t)
    one = tl.arange(0, 1)
    out = ps * C + c + one
    tl.store(part_ptr + out, tl.zeros([1], tl.float32) + n)
    tl.store(part_ptr + splits * C + out, mean)
    tl.store(part_ptr + 2 * splits * C + out, m2)


@triton.jit
def _two_sum(a, b):
    """hi + lo == a + b exactly, hi = fl(a + b) (Knuth's TwoSum: no assumption on |a|, |b|)."""
    hi = a + b
    b_part = hi - a
    lo = (a - (hi - b_part)) + (b - b_part)
    return hi, lo


@triton.jit
def finalize_stats(part_ptr, x_ptr, splits, C, DIV, m, eps, momentum, unbias,
                   w_ptr, mean_ptr, lo_ptr, invstd_ptr, scale_ptr, rm_ptr, rv_ptr,
                   HAS_W: tl.constexpr, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
                   BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the slices: mean (as hi + lo), 1/sqrt(var + eps), scale = gamma/sqrt(var + eps);
    the running statistics, if given. Channel c's first value, the pivot p, is at x[c * DIV]."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    total = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, splits, BLOCK_SPLIT):
        sp = s0 + tl.arange(0, BLOCK_SPLIT)
        mask = (sp < splits)[:, None] & cmask[None, :]
        offs = sp[:, None] * C + cols[None, :]
        n_i = tl.load(part_ptr + offs, mask=mask, other=0.0)
        total += tl.sum(n_i * tl.load(part_ptr + splits * C + offs, mask=mask, other=0.0), 0)
    mean_d = total / m                                   # mean of x - p
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, splits, BLOCK_SPLIT):
        sp = s0 + tl.arange(0, BLOCK_SPLIT)
        mask = (sp < splits)[:, None] & cmask[None, :]
        offs = sp[:, None] * C + cols[None, :]
        n_i = tl.load(part_ptr + offs, mask=mask, other=0.0)
        d = tl.load(part_ptr + splits * C + offs, mask=mask, other=0.0) - mean_d[None, :]
        m2 += tl.sum(tl.load(part_ptr + 2 * splits * C + offs, mask=mask, other=0.0)
                     + n_i * d * d, 0)
    pivot = tl.load(x_ptr + cols.to(tl.int64) * DIV, mask=cmask, other=0.0).to(tl.float32)
    hi, lo = _two_sum(pivot, mean_d)
    var = tl.maximum(m2 / m, 0.0)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_W:
        scale = invstd * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    tl.store(mean_ptr + cols, hi, mask=cmask)
    tl.store(lo_ptr + cols, lo, mask=cmask)
    tl.store(invstd_ptr + cols, invstd, mask=cmask)
    tl.store(scale_ptr + cols, scale, mask=cmask)
    # r <- r + momentum (batch value - r), with the unbiased batch variance for the running one
    if HAS_RM:
        rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(rm_ptr + cols, (rm + momentum * ((hi - rm) + lo)).to(rm_ptr.dtype.element_ty),
                 mask=cmask)
    if HAS_RV:
        rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(rv_ptr + cols, (rv + momentum * (var * unbias - rv)).to(rv_ptr.dtype.element_ty),
                 mask=cmask)


@triton.jit
def normalize(x_ptr, y_ptr, mean_ptr, lo_ptr, scale_ptr, b_ptr, numel, C, DIV,
              HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    """y = ((x - hi) - lo) * scale + beta per channel; element i is in channel (i // DIV) % C."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    c = (i.to(tl.int32) // DIV) % C  # int32 is exact for the unmasked i (numel < 2^31)
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(mean_ptr + c, mask=mask, other=0.0)
    lo = tl.load(lo_ptr + c, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=mask, other=0.0)
    y = ((x - hi) - lo) * scale
    if HAS_B:
        y += tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_sums_rows(dy_ptr, x_ptr, mean_ptr, lo_ptr, part_ptr, M, C, rows_per_split, splits,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial sum(dy) and sum(dy (x - mean)) of a block of channels over one slice of rows."""
    pc, ps = tl.program_id(0), tl.program_id(1)
    cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    hi = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0)
    row0, row_end = _slice(ps, rows_per_split, M)
    s_dy = tl.zeros([BLOCK_C], tl.float32)
    s_dyx = tl.zeros([BLOCK_C], tl.float32)
    for r in range(row0, row0 + rows_per_split, BLOCK_M):  # rows past row_end are masked
        offs, mask = _row_tile(r, row_end, cols, cmask, C, BLOCK_M)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s_dy += tl.sum(dy, 0)
        s_dyx += tl.sum(dy * tl.where(mask, (x - hi[None, :]) - lo[None, :], 0.0), 0)
    out = ps * C + cols
    tl.store(part_ptr + out, s_dy, mask=cmask)
    tl.store(part_ptr + splits * C + out, s_dyx, mask=cmask)


@triton.jit
def grad_sums_planes(dy_ptr, x_ptr, mean_ptr, lo_ptr, part_ptr, N, C, S, n_per_split, splits,
                     BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Partial sum(dy) and sum(dy (x - mean)) of channel c over one slice of the batch."""
    c, ps = tl.program_id(0), tl.program_id(1)
    one = tl.arange(0, 1)
    hi = tl.load(mean_ptr + c + one)
    lo = tl.load(lo_ptr + c + one)
    n0, n_end = _slice(ps, n_per_split, N)
    s_dy = tl.zeros([1], tl.float32)
    s_dyx = tl.zeros([1], tl.float32)
    for nb in range(n0, n0 + n_per_split, BLOCK_N):  # images past n_end are masked
        for sb in range(0, S, BLOCK_S):
            offs, mask = _plane_tile(nb, n_end, sb, c, C, S, BLOCK_N, BLOCK_S)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dyx = dy * tl.where(mask, (x - hi[:, None]) - lo[:, None], 0.0)
            # each tile reduced at once: two running sums, not two tiles of registers
            s_dy += tl.sum(tl.reshape(dy, [BLOCK_N * BLOCK_S, 1]), 0)
            s_dyx += tl.sum(tl.reshape(dyx, [BLOCK_N * BLOCK_S, 1]), 0)
    out = ps * C + c + one
    tl.store(part_ptr + out, s_dy)
    tl.store(part_ptr + splits * C + out, s_dyx)


@triton.jit
def finalize_grad(part_ptr, splits, C, m, w_ptr, invstd_ptr, dw_ptr, db_ptr,
                  coef_ptr, HAS_W: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """dl/dgamma = sum(dy x_hat), dl/dbeta = sum(dy), and per channel the book's coefficients of
    dx = a dy + b x_hat + c: a = gamma invstd, b = -a sum(dy x_hat) / m, c = -a sum(dy) / m,
    stored as (a, b invstd, c) for dx = a dy + (b invstd) (x - mean) + c."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s_dy = tl.zeros([BLOCK_C], tl.float32)
    s_dyx = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, splits, BLOCK_SPLIT):
        sp = s0 + tl.arange(0, BLOCK_SPLIT)
        mask = (sp < splits)[:, None] & cmask[None, :]
        offs = sp[:, None] * C + cols[None, :]
        s_dy += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), 0)
        s_dyx += tl.sum(tl.load(part_ptr + splits * C + offs, mask=mask, other=0.0), 0)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    a = invstd
    if HAS_W:
        a = invstd * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    s_dy_xhat = s_dyx * invstd
    tl.store(dw_ptr + cols, s_dy_xhat, mask=cmask)
    tl.store(db_ptr + cols, s_dy, mask=cmask)
    tl.store(coef_ptr + cols, a, mask=cmask)
    tl.store(coef_ptr + C + cols, -a * invstd * s_dy_xhat / m, mask=cmask)
    tl.store(coef_ptr + 2 * C + cols, -a * s_dy / m, mask=cmask)


@triton.jit
def grad_input(dy_ptr, x_ptr, dx_ptr, mean_ptr, lo_ptr, coef_ptr, numel, C, DIV,
               BLOCK: tl.constexpr):
    """dx = a dy + (b invstd) ((x - hi) - lo) + c per channel; element i is in channel (i // DIV) % C."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    c = (i.to(tl.int32) // DIV) % C  # int32 is exact for the unmasked i (numel < 2^31)
    dy = tl.load(dy_ptr + i, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(mean_ptr + c, mask=mask, other=0.0)
    lo = tl.load(lo_ptr + c, mask=mask, other=0.0)
    a = tl.load(coef_ptr + c, mask=mask, other=0.0)
    b_invstd = tl.load(coef_ptr + C + c, mask=mask, other=0.0)
    const = tl.load(coef_ptr + 2 * C + c, mask=mask, other=0.0)
    dx = a * dy + b_invstd * ((x - hi) - lo) + const
    tl.store(dx_ptr + i, dx.to(dx_ptr.dtype.element_ty), mask=mask)
