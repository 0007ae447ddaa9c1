/* Native kernels: see kernels.h for the contract of each entry point.
 *
 * Built without -m flags so the module runs on any x86_64; the SIMD variants carry
 * __attribute__((target)) and are picked at load time from __builtin_cpu_supports.
 * Other architectures compile the portable code (and xxHash's own compile-time SIMD choice).
 */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#  define RK_X86 1
#  include <immintrin.h>
/* xxHash 0.8 knows how to emit its SSE2/AVX2/AVX-512 loops side by side in one translation unit. */
#  define XXH_X86DISPATCH 1
#  define XXH_DISPATCH_AVX2 1
#  define XXH_DISPATCH_AVX512 1
#  define XXH_TARGET_SSE2 __attribute__((target("sse2")))
#  define XXH_TARGET_AVX2 __attribute__((target("avx2")))
#  define XXH_TARGET_AVX512 __attribute__((target("avx512f")))
#  define RK_TARGET_SSE42 __attribute__((target("sse4.2")))
#  define RK_TARGET_AVX2 __attribute__((target("avx2")))
#else
#  define RK_X86 0
#endif

#define XXH_INLINE_ALL
#include <xxhash.h>

#if defined(_WIN32)
#  include <errno.h>
#  define RK_THREADS 0
#else
#  define RK_THREADS 1
#  include <errno.h>
#  include <pthread.h>
#  include <time.h>
#  include <unistd.h>
#endif

#define RK_MAX_THREADS 64
/* Below this many bytes per thread, creating a thread costs more than it saves. */
#define RK_MIN_BYTES_PER_THREAD ((size_t)2 << 20)

enum { ISA_PORTABLE = 0, ISA_SSE = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

static int g_isa_max;          /* highest level the CPU (and OS) supports */
static int g_isa_best;         /* fastest level, the default */
static int g_isa;              /* level in use */
static int g_cpu_has_crc32;    /* SSE4.2 crc32 instruction present */

/* ------------------------------------------------------------------------------------------------ */
/* Little-endian loads (memcpy keeps them legal for any alignment).                                  */

static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* ------------------------------------------------------------------------------------------------ */
/* CRC-32C. Internally the raw register is used (no pre/post inversion): that is what the crc32      */
/* instruction computes, and the register is linear, so independent streams can be recombined.      */

#define CRC32C_POLY 0x82F63B78u
#define CRC_SHORT 256u      /* stream length of the 3-way loop for small buffers */
#define CRC_LONG 8192u      /* and for large ones */

static uint32_t crc_table[8][256];        /* slicing-by-8 */
static uint32_t crc_shift_short[4][256];  /* register * x^(8*CRC_SHORT) mod P, per input byte */
static uint32_t crc_shift_long[4][256];

/* a * b mod P, in the reflected representation where bit 31 is x^0. */
static uint32_t gf2_mulmod(uint32_t a, uint32_t b)
{
    uint32_t product = 0;
    for (int i = 0; i < 32; i++) {
        if (a & (0x80000000u >> i))
            product ^= b;
        b = (b >> 1) ^ ((b & 1u) ? CRC32C_POLY : 0u);
    }
    return product;
}

/* x^(8*nbytes) mod P: the operator that advances a register over nbytes zero bytes. */
static uint32_t gf2_x8n(size_t nbytes)
{
    uint32_t result = 0x80000000u, base = 0x00800000u;   /* 1 and x^8 */
    for (; nbytes; nbytes >>= 1) {
        if (nbytes & 1)
            result = gf2_mulmod(result, base);
        base = gf2_mulmod(base, base);
    }
    return result;
}

static void crc_build_shift(uint32_t table[4][256], size_t nbytes)
{
    uint32_t op = gf2_x8n(nbytes);
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++)
            table[k][b] = gf2_mulmod(op, b << (8 * k));
}

static void crc_init_tables(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t r = b;
        for (int i = 0; i < 8; i++)
            r = (r >> 1) ^ ((r & 1u) ? CRC32C_POLY : 0u);
        crc_table[0][b] = r;
    }
    for (int k = 1; k < 8; k++)
        for (int b = 0; b < 256; b++)
            crc_table[k][b] = (crc_table[k - 1][b] >> 8) ^ crc_table[0][crc_table[k - 1][b] & 0xff];
    crc_build_shift(crc_shift_short, CRC_SHORT);
    crc_build_shift(crc_shift_long, CRC_LONG);
}

static inline uint32_t crc_shift(const uint32_t table[4][256], uint32_t reg)
{
    return table[0][reg & 0xff] ^ table[1][(reg >> 8) & 0xff]
         ^ table[2][(reg >> 16) & 0xff] ^ table[3][reg >> 24];
}

static uint32_t crc_sw(uint32_t reg, const uint8_t *p, size_t n)
{
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t w = load_le64(p) ^ reg;
        reg = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff]
            ^ crc_table[5][(w >> 16) & 0xff] ^ crc_table[4][(w >> 24) & 0xff]
            ^ crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff]
            ^ crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
    }
    for (; n; p++, n--)
        reg = (reg >> 8) ^ crc_table[0][(reg ^ *p) & 0xff];
    return reg;
}

#if RK_X86
/* Three independent crc32 chains hide the instruction's 3-cycle latency; the partial registers of
 * streams 1 and 2 are then folded in with the zero-advance tables. */
RK_TARGET_SSE42 static inline uint32_t crc_hw_3way(uint32_t reg, const uint8_t *p, size_t stream,
                                                   const uint32_t shift[4][256])
{
    uint64_t a = reg, b = 0, c = 0;
    for (size_t i = 0; i < stream; i += 8) {
        a = _mm_crc32_u64(a, load_le64(p + i));
        b = _mm_crc32_u64(b, load_le64(p + stream + i));
        c = _mm_crc32_u64(c, load_le64(p + 2 * stream + i));
    }
    reg = crc_shift(shift, (uint32_t)a) ^ (uint32_t)b;
    return crc_shift(shift, reg) ^ (uint32_t)c;
}

RK_TARGET_SSE42 static uint32_t crc_hw(uint32_t reg, const uint8_t *p, size_t n)
{
    for (; n && ((uintptr_t)p & 7); p++, n--)
        reg = _mm_crc32_u8(reg, *p);
    for (; n >= 3 * CRC_LONG; p += 3 * CRC_LONG, n -= 3 * CRC_LONG)
        reg = crc_hw_3way(reg, p, CRC_LONG, crc_shift_long);
    for (; n >= 3 * CRC_SHORT; p += 3 * CRC_SHORT, n -= 3 * CRC_SHORT)
        reg = crc_hw_3way(reg, p, CRC_SHORT, crc_shift_short);
    uint64_t r64 = reg;
    for (; n >= 8; p += 8, n -= 8)
        r64 = _mm_crc32_u64(r64, load_le64(p));
    reg = (uint32_t)r64;
    for (; n; p++, n--)
        reg = _mm_crc32_u8(reg, *p);
    return reg;
}
#endif

uint32_t rk_crc32c(uint32_t crc, const char *data, size_t len)
{
    const uint8_t *p = (const uint8_t *)data;
#if RK_X86
    if (g_cpu_has_crc32 && g_isa >= ISA_SSE)
        return ~crc_hw(~crc, p, len);
#endif
    return ~crc_sw(~crc, p, len);
}

/* ------------------------------------------------------------------------------------------------ */
/* XXH3-128. Inputs up to 240 bytes take xxHash's scalar short paths; longer ones the SIMD loop.     */

typedef XXH128_hash_t (*long128_fn)(const void *, size_t);
typedef void (*update_fn)(XXH3_state_t *, const void *, size_t);

#define RK_XXH_VARIANT(sfx, attr)                                                              \
    attr static XXH128_hash_t long128_##sfx(const void *p, size_t n)                           \
    {                                                                                          \
        return XXH3_hashLong_128b_internal(p, n, XXH3_kSecret, sizeof(XXH3_kSecret),           \
                                           XXH3_accumulate_512_##sfx, XXH3_scrambleAcc_##sfx); \
    }                                                                                          \
    attr static void update_##sfx(XXH3_state_t *s, const void *p, size_t n)                    \
    {                                                                                          \
        (void)XXH3_update(s, (const xxh_u8 *)p, n,                                             \
                          XXH3_accumulate_512_##sfx, XXH3_scrambleAcc_##sfx);                  \
    }

#if RK_X86
RK_XXH_VARIANT(scalar, )
RK_XXH_VARIANT(sse2, XXH_TARGET_SSE2)
RK_XXH_VARIANT(avx2, XXH_TARGET_AVX2)
RK_XXH_VARIANT(avx512, XXH_TARGET_AVX512)
#else
/* xxHash picked the best vector unit at compile time (NEON, VSX or scalar). */
static XXH128_hash_t long128_default(const void *p, size_t n) { return XXH3_128bits(p, n); }
static void update_default(XXH3_state_t *s, const void *p, size_t n) { (void)XXH3_128bits_update(s, p, n); }
#endif

static long128_fn g_long128;
static update_fn g_update;

static inline void xxh3_128_into(const uint8_t *p, size_t n, long128_fn long128, uint64_t *out)
{
    XXH128_hash_t h = n > XXH3_MIDSIZE_MAX ? long128(p, n) : XXH3_128bits(p, n);
    out[0] = h.low64;
    out[1] = h.high64;
}

void rk_xxh3_128(const char *data, size_t len, uint64_t *out)
{
    xxh3_128_into((const uint8_t *)data, len, g_long128, out);
}

/* ------------------------------------------------------------------------------------------------ */
/* Zero-block scan: OR 256 bytes at a time (the compiler vectorizes it), stop at the first nonzero. */

#define RK_ZERO_BODY                                                  \
    {                                                                 \
        for (; n >= 256; p += 256, n -= 256) {                        \
            uint64_t acc = 0;                                         \
            for (int i = 0; i < 32; i++) {                            \
                uint64_t w;                                           \
                memcpy(&w, p + 8 * i, 8);                             \
                acc |= w;                                             \
            }                                                         \
            if (acc)                                                  \
                return 0;                                             \
        }                                                             \
        uint8_t acc = 0;                                              \
        for (; n; p++, n--)                                           \
            acc |= *p;                                                \
        return acc == 0;                                              \
    }

typedef int (*zero_fn)(const uint8_t *, size_t);

static int is_zero_portable(const uint8_t *p, size_t n) RK_ZERO_BODY
#if RK_X86
/* No AVX-512 variant: the 256-byte OR reduction gained nothing from it (slower on Zen 4). */
RK_TARGET_AVX2 static int is_zero_avx2(const uint8_t *p, size_t n) RK_ZERO_BODY
#endif

static zero_fn g_is_zero;

/* Most nonzero blocks differ in their first bytes: look there before scanning the whole block. */
static inline uint8_t block_is_zero(const uint8_t *p, size_t n, zero_fn is_zero)
{
    if (n >= 16) {
        uint64_t a, b;
        memcpy(&a, p, 8);
        memcpy(&b, p + 8, 8);
        if (a | b)
            return 0;
    }
    return (uint8_t)is_zero(p, n);
}

/* ------------------------------------------------------------------------------------------------ */
/* Block-parallel driver: blocks [first, last) per thread; each thread writes only its own rows.    */

enum { JOB_XXH3, JOB_ZERO, JOB_XXH3_FD };

typedef struct {
    int kind;
    const uint8_t *data;        /* JOB_XXH3, JOB_ZERO */
    int fd;                     /* JOB_XXH3_FD: bytes [offset, offset + len) of this file */
    uint64_t offset;
    uint64_t len, block_size, first, last;
    void *out;
    long128_fn long128;
    update_fn update;
    zero_fn is_zero;
    int err;                    /* errno of a failed read, 0 if none */
} rk_job;

static inline size_t block_len(const rk_job *j, uint64_t i)
{
    uint64_t rest = j->len - i * j->block_size;
    return (size_t)(rest < j->block_size ? rest : j->block_size);
}

static void run_memory_job(rk_job *j)
{
    for (uint64_t i = j->first; i < j->last; i++) {
        const uint8_t *p = j->data + i * j->block_size;
        if (j->kind == JOB_XXH3)
            xxh3_128_into(p, block_len(j, i), j->long128, (uint64_t *)j->out + 2 * i);
        else
            ((uint8_t *)j->out)[i] = block_is_zero(p, block_len(j, i), j->is_zero);
    }
}

#if RK_THREADS
/* Per-thread read buffer of the file kernel: big enough to amortize the syscall, small enough to
 * stay in L2/L3 between the copy out of the page cache and the hash that reads it back. */
#define RK_FD_CHUNK ((size_t)1 << 20)

static int pread_full(int fd, uint8_t *buf, size_t n, uint64_t off)
{
    while (n) {
        ssize_t got = pread(fd, buf, n, (off_t)off);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return errno;
        if (got == 0)
            return ENODATA;     /* the file is shorter than the caller said */
        buf += got;
        n -= (size_t)got;
        off += (uint64_t)got;
    }
    return 0;
}

/* Blocks that fit the buffer: read several at once, hash each. */
static int fd_small_blocks(rk_job *j, uint8_t *buf)
{
    uint64_t per_read = RK_FD_CHUNK / j->block_size;
    for (uint64_t i = j->first; i < j->last; i += per_read) {
        uint64_t count = j->last - i < per_read ? j->last - i : per_read;
        size_t n = (size_t)((count - 1) * j->block_size) + block_len(j, i + count - 1);
        int err = pread_full(j->fd, buf, n, j->offset + i * j->block_size);
        if (err)
            return err;
        for (uint64_t b = 0; b < count; b++)
            xxh3_128_into(buf + b * j->block_size, block_len(j, i + b), j->long128,
                          (uint64_t *)j->out + 2 * (i + b));
    }
    return 0;
}

/* Blocks larger than the buffer: stream each through an XXH3 state. */
static int fd_large_blocks(rk_job *j, uint8_t *buf)
{
    XXH3_state_t *st = XXH3_createState();
    if (!st)
        return ENOMEM;
    int err = 0;
    for (uint64_t i = j->first; i < j->last && !err; i++) {
        uint64_t off = i * j->block_size, end = off + block_len(j, i);
        XXH3_128bits_reset(st);
        for (; off < end && !err; off += RK_FD_CHUNK) {
            size_t n = end - off < RK_FD_CHUNK ? (size_t)(end - off) : RK_FD_CHUNK;
            err = pread_full(j->fd, buf, n, j->offset + off);
            if (!err)
                j->update(st, buf, n);
        }
        XXH128_hash_t h = XXH3_128bits_digest(st);
        ((uint64_t *)j->out)[2 * i] = h.low64;
        ((uint64_t *)j->out)[2 * i + 1] = h.high64;
    }
    XXH3_freeState(st);
    return err;
}

static void run_fd_job(rk_job *j)
{
    uint8_t *buf = malloc(RK_FD_CHUNK);
    if (!buf) {
        j->err = ENOMEM;
        return;
    }
    j->err = j->block_size <= RK_FD_CHUNK ? fd_small_blocks(j, buf) : fd_large_blocks(j, buf);
    free(buf);
}
#endif

static void run_job(rk_job *j)
{
#if RK_THREADS
    if (j->kind == JOB_XXH3_FD) {
        run_fd_job(j);
        return;
    }
#endif
    run_memory_job(j);
}

#if RK_THREADS
static void *job_thread(void *arg)
{
    run_job((rk_job *)arg);
    return NULL;
}
#endif

static size_t thread_count(uint64_t len, uint64_t nblocks, int threads)
{
    uint64_t t = threads < 1 ? 1 : (uint64_t)threads;
    uint64_t by_size = len / RK_MIN_BYTES_PER_THREAD;
    if (t > by_size) t = by_size;
    if (t > nblocks) t = nblocks;
    if (t > RK_MAX_THREADS) t = RK_MAX_THREADS;
    return t ? (size_t)t : 1;
}

/* Splits the blocks into one contiguous range per thread; returns the first thread's error. */
static int run_blocks(rk_job proto, int threads)
{
    if (proto.len == 0 || proto.block_size == 0)
        return 0;
    uint64_t nblocks = proto.len / proto.block_size + (proto.len % proto.block_size != 0);
    size_t t = RK_THREADS ? thread_count(proto.len, nblocks, threads) : 1;
    rk_job jobs[RK_MAX_THREADS];
    uint64_t per = nblocks / t, extra = nblocks % t, next = 0;
    for (size_t k = 0; k < t; k++) {
        jobs[k] = proto;
        jobs[k].first = next;
        next += per + (k < extra);
        jobs[k].last = next;
    }
#if RK_THREADS
    pthread_t tids[RK_MAX_THREADS];
    int started[RK_MAX_THREADS] = {0};
    for (size_t k = 1; k < t; k++) {
        started[k] = pthread_create(&tids[k], NULL, job_thread, &jobs[k]) == 0;
        if (!started[k])
            run_job(&jobs[k]);          /* no thread to be had: do that share here */
    }
    run_job(&jobs[0]);
    for (size_t k = 1; k < t; k++)
        if (started[k])
            pthread_join(tids[k], NULL);
#else
    run_job(&jobs[0]);
#endif
    for (size_t k = 0; k < t; k++)
        if (jobs[k].err)
            return jobs[k].err;
    return 0;
}

void rk_xxh3_128_blocks(const char *data, size_t len, size_t block_size, uint64_t *out, int threads)
{
    rk_job j = {.kind = JOB_XXH3, .data = (const uint8_t *)data, .len = len, .block_size = block_size,
                .out = out, .long128 = g_long128};
    run_blocks(j, threads);
}

void rk_zero_blocks(const char *data, size_t len, size_t block_size, uint8_t *out, int threads)
{
    rk_job j = {.kind = JOB_ZERO, .data = (const uint8_t *)data, .len = len, .block_size = block_size,
                .out = out, .is_zero = g_is_zero};
    run_blocks(j, threads);
}

int rk_xxh3_128_fd_blocks(int fd, uint64_t offset, uint64_t len, uint64_t block_size, uint64_t *out,
                          int threads)
{
#if RK_THREADS
    rk_job j = {.kind = JOB_XXH3_FD, .fd = fd, .offset = offset, .len = len, .block_size = block_size,
                .out = out, .long128 = g_long128, .update = g_update};
    return run_blocks(j, threads);
#else
    (void)fd; (void)offset; (void)len; (void)block_size; (void)out; (void)threads;
    return ENOSYS;
#endif
}

/* ------------------------------------------------------------------------------------------------ */
/* Streaming XXH3-128: xxHash's state, updated with the dispatched accumulate loop.                 */

struct rk_xxh3_state {
    XXH3_state_t st;
};

rk_xxh3_state *rk_xxh3_new(void)
{
    XXH3_state_t *st = XXH3_createState();   /* 64-byte aligned, as the SIMD loops need */
    if (st)
        XXH3_128bits_reset(st);
    return (rk_xxh3_state *)st;
}

void rk_xxh3_free(rk_xxh3_state *state)
{
    XXH3_freeState(&state->st);
}

void rk_xxh3_copy(rk_xxh3_state *dst, const rk_xxh3_state *src)
{
    XXH3_copyState(&dst->st, &src->st);
}

void rk_xxh3_update(rk_xxh3_state *state, const char *data, size_t len)
{
    if (len)
        g_update(&state->st, data, len);
}

void rk_xxh3_digest(const rk_xxh3_state *state, uint64_t *out)
{
    XXH128_hash_t h = XXH3_128bits_digest(&state->st);
    out[0] = h.low64;
    out[1] = h.high64;
}

/* ------------------------------------------------------------------------------------------------ */
/* Instruction-set selection.                                                                       */

static int detect_isa(void)
{
#if RK_X86
    __builtin_cpu_init();
    g_cpu_has_crc32 = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    if (__builtin_cpu_supports("avx512f")) return ISA_AVX512;
    if (__builtin_cpu_supports("avx2")) return ISA_AVX2;
    return ISA_SSE;
#else
    return ISA_PORTABLE;
#endif
}

int rk_set_isa(int level)
{
    if (level < ISA_PORTABLE || level > g_isa_max)
        level = g_isa_best;
    g_isa = level;
#if RK_X86
    static const long128_fn longs[] = {long128_scalar, long128_sse2, long128_avx2, long128_avx512};
    static const update_fn updates[] = {update_scalar, update_sse2, update_avx2, update_avx512};
    static const zero_fn zeros[] = {is_zero_portable, is_zero_portable, is_zero_avx2, is_zero_avx2};
    g_long128 = longs[level];
    g_update = updates[level];
    g_is_zero = zeros[level];
#else
    g_long128 = long128_default;
    g_update = update_default;
    g_is_zero = is_zero_portable;
#endif
    return g_isa;
}

#if RK_X86 && RK_THREADS
static double best_seconds(long128_fn f, const uint8_t *buf, size_t n)
{
    double best = 1e9;
    for (int round = 0; round < 5; round++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        XXH128_hash_t h = f(buf, n);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        __asm__ volatile("" : : "r"(h.low64) : "memory");   /* keep the call */
        double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        if (s < best)
            best = s;
    }
    return best;
}

/* AVX-512 does not win everywhere (cores that split 512-bit operations in two, or lower their clock
 * for them). Time both loops on 32 KiB (about 10 microseconds in all); keep AVX-512 only if clearly faster. */
static int pick_isa(int max)
{
    static uint8_t sample[32768];
    if (max < ISA_AVX512)
        return max;
    double avx2 = best_seconds(long128_avx2, sample, sizeof sample);
    double avx512 = best_seconds(long128_avx512, sample, sizeof sample);
    return avx512 < 0.95 * avx2 ? ISA_AVX512 : ISA_AVX2;
}
#else
static int pick_isa(int max) { return max; }
#endif

int rk_isa_max(void) { return g_isa_max; }
int rk_isa_best(void) { return g_isa_best; }
int rk_isa(void) { return g_isa; }
int rk_crc32c_hw(void) { return g_cpu_has_crc32 && g_isa >= ISA_SSE; }
int rk_min_bytes_per_thread(void) { return (int)RK_MIN_BYTES_PER_THREAD; }

/* Runs when the shared object is loaded, before Python can call anything. */
__attribute__((constructor)) static void rk_init(void)
{
    crc_init_tables();
    g_isa_max = detect_isa();
    g_isa_best = pick_isa(g_isa_max);
    rk_set_isa(g_isa_best);
}

/* ------------------------------------------------------------------------------------------------ */

int rk_debug_wait_flag(volatile uint32_t *flags, uint32_t timeout_ms)
{
    __atomic_store_n(&flags[1], 1u, __ATOMIC_SEQ_CST);
    for (uint32_t tick = 0; tick < timeout_ms; tick++) {
        if (__atomic_load_n(&flags[0], __ATOMIC_SEQ_CST))
            return 1;
#if RK_THREADS
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
#endif
    }
    return __atomic_load_n(&flags[0], __ATOMIC_SEQ_CST) != 0;
}

/* ---------------------------------------------------------------------------------------------------
 * Byte sum (MS-HRL checksums are the one's complement of the sum of all bytes). On x86-64 SSE2 is always
 * present: psadbw adds 16 bytes into two 64-bit lanes per instruction. */
uint64_t rk_byte_sum(const char *data, size_t len)
{
    const unsigned char *p = (const unsigned char *)data;
    uint64_t total = 0;
    size_t i = 0;
#if RK_X86
    __m128i zero = _mm_setzero_si128(), acc = _mm_setzero_si128();
    for (; i + 64 <= len; i += 64) {
        acc = _mm_add_epi64(acc, _mm_sad_epu8(_mm_loadu_si128((const __m128i *)(p + i)), zero));
        acc = _mm_add_epi64(acc, _mm_sad_epu8(_mm_loadu_si128((const __m128i *)(p + i + 16)), zero));
        acc = _mm_add_epi64(acc, _mm_sad_epu8(_mm_loadu_si128((const __m128i *)(p + i + 32)), zero));
        acc = _mm_add_epi64(acc, _mm_sad_epu8(_mm_loadu_si128((const __m128i *)(p + i + 48)), zero));
    }
    total = (uint64_t)_mm_cvtsi128_si64(acc) + (uint64_t)_mm_cvtsi128_si64(_mm_unpackhi_epi64(acc, acc));
#endif
    for (; i < len; i++)
        total += p[i];
    return total;
}
