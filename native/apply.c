/* The replica's apply of a delta stream's data frames: decompress, verify, write, without the GIL.
 *
 * Python reads the stream, checks every frame header and the trailer, and plans where each frame's
 * plain bytes go in the image file (VHDX block mapping, allocation). What is left per byte is the
 * heavy part, done here: zstd decompression (each lane's zstd stream continues across its frames),
 * the XXH3-128 check of the plain bytes, and the writes, large aligned ones through O_DIRECT. Each
 * lane's frames run on one thread (a lane's frames must be decompressed in order), so a stream of two
 * lanes keeps two cores and two writes busy. A batch never holds two frames that overlap (the caller's
 * rule), so the order of writes inside it does not matter.
 */
#include "kernels.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <zstd.h>

#if !defined(_WIN32)
#  include <pthread.h>
#  include <unistd.h>
#  define RK_APPLY_THREADS 1
#else
#  define RK_APPLY_THREADS 0
#endif

#define RK_APPLY_MAX_THREADS 16
#define RK_DIRECT_ALIGN 4096
#define RK_DIRECT_MIN ((uint64_t)64 << 10)

struct rk_applier {
    uint32_t lanes;
    uint64_t block_size;
    ZSTD_DCtx **dctx;          /* one per lane */
    int broken;                /* a lane's zstd stream failed: its state is unknown, nothing more runs */
    uint8_t **bufs;            /* aligned frame buffers, kept from batch to batch: fresh pages for every */
    size_t nbufs;              /* batch would cost a page fault per 4 KiB */
};

static size_t buf_cap(const rk_applier *a)
{
    return (size_t)((a->block_size + 1 + RK_DIRECT_ALIGN - 1) / RK_DIRECT_ALIGN * RK_DIRECT_ALIGN);
}

/* At least `want` buffers; 0 when memory ran out. */
static int ensure_bufs(rk_applier *a, size_t want)
{
    if (a->nbufs >= want)
        return 1;
    uint8_t **grown = realloc(a->bufs, want * sizeof *grown);
    if (!grown)
        return 0;
    a->bufs = grown;
    while (a->nbufs < want) {
        if (posix_memalign((void **)&a->bufs[a->nbufs], RK_DIRECT_ALIGN, buf_cap(a)))
            return 0;
        a->nbufs++;
    }
    return 1;
}

rk_applier *rk_applier_new(uint32_t lanes, uint64_t block_size, uint64_t max_window)
{
    if (lanes == 0 || block_size == 0)
        return NULL;
    rk_applier *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->lanes = lanes;
    a->block_size = block_size;
    a->dctx = calloc(lanes, sizeof *a->dctx);
    if (!a->dctx) {
        free(a);
        return NULL;
    }
    int window_log = 10;
    while (window_log < 31 && ((uint64_t)1 << window_log) < max_window)
        window_log++;
    for (uint32_t i = 0; i < lanes; i++) {
        a->dctx[i] = ZSTD_createDCtx();
        if (!a->dctx[i] || ZSTD_isError(ZSTD_DCtx_setParameter(a->dctx[i], ZSTD_d_windowLogMax, window_log))) {
            rk_applier_free(a);
            return NULL;
        }
    }
    return a;
}

void rk_applier_free(rk_applier *a)
{
    if (!a)
        return;
    if (a->dctx)
        for (uint32_t i = 0; i < a->lanes; i++)
            ZSTD_freeDCtx(a->dctx[i]);
    free(a->dctx);
    for (size_t k = 0; k < a->nbufs; k++)
        free(a->bufs[k]);
    free(a->bufs);
    free(a);
}

/* One call: D decoder threads (a lane's frames on one of them, RAW frames in turn), W writer threads
 * taking decoded frames from a queue, and D + W + 2 aligned buffers going round between them. Decoding
 * and writing overlap, and W writes are in flight at once (a virtual disk is several times faster at
 * depth 4 than at depth 1). W = 0: each decoder writes its own frames. */
typedef struct {
    size_t frame;
    uint8_t *buf;
} wjob;

typedef struct {
    rk_applier *a;
    const rk_apply_frame *frames;
    size_t n;
    const rk_apply_seg *segs;
    const size_t *first_seg;   /* index of each frame's first segment */
    int fd, direct_fd;
    uint32_t decoders, writers;
#if RK_APPLY_THREADS
    pthread_mutex_t mu;
    pthread_cond_t cv;         /* every change of the pool or the queue is broadcast */
#endif
    uint8_t **pool;            /* free buffers */
    size_t nfree;
    wjob *queue;               /* decoded frames waiting for a writer (ring) */
    size_t qcap, qhead, qlen;
    uint32_t decoders_left;
    size_t stop_at;            /* the earliest failed frame so far (n: none): later frames are not worth
                                * running, earlier ones still are, so the fault reported is the earliest */
    rk_apply_status status;    /* the failure earliest in the batch */
} batch;

typedef struct {
    batch *b;
    uint32_t index;
} decoder_arg;

/* The batch's one lock and one condition: every change of the pool or the queue is broadcast. */
#if RK_APPLY_THREADS
#  define lock(b) pthread_mutex_lock(&(b)->mu)
#  define unlock(b) pthread_mutex_unlock(&(b)->mu)
#  define unlock_wake(b) (pthread_cond_broadcast(&(b)->cv), pthread_mutex_unlock(&(b)->mu))
#  define wait_change(b) pthread_cond_wait(&(b)->cv, &(b)->mu)
#else
#  define lock(b) ((void)(b))
#  define unlock(b) ((void)(b))
#  define unlock_wake(b) ((void)(b))
#  define wait_change(b) ((void)(b))
#endif

static void fail(batch *b, rk_apply_status st)
{
    lock(b);
    if (b->status.frame < 0 || st.frame < b->status.frame)
        b->status = st;
    if ((size_t)st.frame < b->stop_at)
        b->stop_at = (size_t)st.frame;
    unlock_wake(b);
}

int rk_pwrite_full(int fd, const uint8_t *p, size_t n, uint64_t off)
{
    while (n) {
        ssize_t put = pwrite(fd, p, n, (off_t)off);
        if (put < 0 && errno == EINTR)
            continue;
        if (put < 0)
            return errno;
        if (put == 0)
            return EIO;
        p += put;
        n -= (size_t)put;
        off += (uint64_t)put;
    }
    return 0;
}

/* Which decoder runs frame i: a lane's ZSTD frames all on one, RAW frames in turn. */
static uint32_t owner(const rk_apply_frame *f, uint32_t decoders, size_t *raw_seen)
{
    if (f->kind == RK_FRAME_ZSTD)
        return f->lane % decoders;
    return (uint32_t)((*raw_seen)++ % decoders);
}

/* Decompresses a ZSTD payload into out[0, length]; the code of what was wrong, or 0. One byte of room
 * beyond `length` tells a payload that expands too far from one that fits exactly. */
static int inflate(ZSTD_DCtx *d, const rk_apply_frame *f, uint8_t *out, size_t *zerr, size_t *produced)
{
    ZSTD_inBuffer in = {f->payload, (size_t)f->payload_len, 0};
    ZSTD_outBuffer o = {out, (size_t)f->length + 1, 0};
    while (in.pos < in.size) {
        size_t r = ZSTD_decompressStream(d, &o, &in);
        if (ZSTD_isError(r)) {
            *zerr = r;
            return RK_APPLY_BAD_ZSTD;
        }
        if (o.pos == o.size)
            return RK_APPLY_TOO_LONG;
    }
    *produced = o.pos;
    return o.pos == f->length ? 0 : RK_APPLY_TOO_SHORT;
}

/* The frame's plain bytes into buf, verified; a status with frame < 0 when all is well. */
static rk_apply_status decode(batch *b, size_t i, uint8_t *buf)
{
    const rk_apply_frame *f = &b->frames[i];
    int code = 0;
    size_t zerr = 0, produced = 0;
    if (f->length > b->a->block_size) {
        code = RK_APPLY_BAD_PLAN;
    } else if (f->kind == RK_FRAME_ZSTD) {
        code = f->lane < b->a->lanes ? inflate(b->a->dctx[f->lane], f, buf, &zerr, &produced) : RK_APPLY_BAD_PLAN;
    } else if (f->kind == RK_FRAME_RAW) {
        if (f->payload_len != f->length) {
            code = RK_APPLY_TOO_SHORT;
            produced = (size_t)f->payload_len;
        } else {
            memcpy(buf, f->payload, (size_t)f->length);   /* aligned, for O_DIRECT */
        }
    } else {
        code = RK_APPLY_BAD_PLAN;
    }
    if (!code) {
        uint64_t h[2];                  /* low64, high64: canonical is high64 then low64, big-endian */
        unsigned char c[16];
        rk_xxh3_128((const char *)buf, (size_t)f->length, h);     /* kernels.c: the CPU's best SIMD */
        for (int k = 0; k < 8; k++) {
            c[k] = (unsigned char)(h[1] >> (56 - 8 * k));
            c[8 + k] = (unsigned char)(h[0] >> (56 - 8 * k));
        }
        if (memcmp(c, f->digest, 16) != 0)
            code = RK_APPLY_DIGEST;
    }
    return (rk_apply_status){code ? (int64_t)i : -1, code, 0, (uint64_t)zerr, (uint64_t)produced};
}

static rk_apply_status write_frame(const batch *b, size_t i, const uint8_t *plain)
{
    const rk_apply_frame *f = &b->frames[i];
    for (uint32_t k = 0; k < f->nsegs; k++) {
        const rk_apply_seg *s = &b->segs[b->first_seg[i] + k];
        if (s->frame_offset > f->length || s->length > f->length - s->frame_offset)
            return (rk_apply_status){(int64_t)i, RK_APPLY_BAD_PLAN, 0, 0, 0};
        const uint8_t *p = plain + s->frame_offset;
        int direct = b->direct_fd >= 0 && s->length >= RK_DIRECT_MIN && s->length % RK_DIRECT_ALIGN == 0
                     && s->file_offset % RK_DIRECT_ALIGN == 0 && (uintptr_t)p % RK_DIRECT_ALIGN == 0;
        int e = rk_pwrite_full(direct ? b->direct_fd : b->fd, p, (size_t)s->length, s->file_offset);
        if (e)
            return (rk_apply_status){(int64_t)i, RK_APPLY_WRITE, e, 0, 0};
    }
    return (rk_apply_status){-1, 0, 0, 0, 0};
}

static void run_decoder(batch *b, uint32_t index)
{
    size_t raw_seen = 0;
    for (size_t i = 0; i < b->n; i++) {
        if (owner(&b->frames[i], b->decoders, &raw_seen) != index)
            continue;
        lock(b);
        while (!b->nfree && i < b->stop_at)
            wait_change(b);
        if (i >= b->stop_at) {      /* a decoder's frames come in stream order: the rest are later still */
            unlock(b);
            break;
        }
        uint8_t *buf = b->pool[--b->nfree];
        unlock(b);
        rk_apply_status st = decode(b, i, buf);
        if (st.frame < 0 && !b->writers)
            st = write_frame(b, i, buf);
        lock(b);
        if (st.frame < 0 && b->writers) {
            b->queue[(b->qhead + b->qlen++) % b->qcap] = (wjob){i, buf};
        } else {
            b->pool[b->nfree++] = buf;
        }
        unlock_wake(b);
        if (st.frame >= 0) {
            fail(b, st);
            break;
        }
    }
    lock(b);
    b->decoders_left--;
    unlock_wake(b);
}

static void run_writer(batch *b)
{
    for (;;) {
        lock(b);
        while (!b->qlen && b->decoders_left)
            wait_change(b);
        if (!b->qlen) {
            unlock(b);
            return;
        }
        wjob job = b->queue[b->qhead];
        b->qhead = (b->qhead + 1) % b->qcap;
        b->qlen--;
        int later = job.frame >= b->stop_at;
        unlock(b);
        rk_apply_status st = later ? (rk_apply_status){-1, 0, 0, 0, 0} : write_frame(b, job.frame, job.buf);
        lock(b);
        b->pool[b->nfree++] = job.buf;
        unlock_wake(b);
        if (st.frame >= 0)
            fail(b, st);
    }
}

#if RK_APPLY_THREADS
static void *decoder_thread(void *arg)
{
    decoder_arg *d = arg;
    run_decoder(d->b, d->index);
    return NULL;
}

static void *writer_thread(void *arg)
{
    run_writer(arg);
    return NULL;
}
#endif

int rk_apply_frames(rk_applier *a, const rk_apply_frame *frames, size_t n, const rk_apply_seg *segs,
                    size_t nsegs, int fd, int direct_fd, int threads, int writers, rk_apply_status *status)
{
    *status = (rk_apply_status){-1, 0, 0, 0, 0};
    if (a->broken) {
        *status = (rk_apply_status){0, RK_APPLY_BROKEN, 0, 0, 0};
        return RK_APPLY_BROKEN;
    }
    if (!n)
        return 0;
    uint32_t d = threads < 1 ? 1 : (uint32_t)threads;
    if (d > a->lanes + 1)           /* more decoders than lanes only help RAW frames: bound the buffers */
        d = a->lanes + 1;
    if (d > n)
        d = (uint32_t)n;
    if (d > RK_APPLY_MAX_THREADS)
        d = RK_APPLY_MAX_THREADS;
    uint32_t w = writers < 0 ? 0 : (uint32_t)writers;
    if (w > RK_APPLY_MAX_THREADS)
        w = RK_APPLY_MAX_THREADS;
    if (!RK_APPLY_THREADS)
        d = 1, w = 0;
    batch b = {a, frames, n, segs, NULL, fd, direct_fd, d, w};
    size_t nbufs = d + w + 2;
    size_t *first = malloc(n * sizeof *first);
    b.pool = calloc(nbufs, sizeof *b.pool);
    b.queue = calloc(nbufs, sizeof *b.queue);
    if (!first || !b.pool || !b.queue || !ensure_bufs(a, nbufs)) {
        *status = (rk_apply_status){0, RK_APPLY_NO_MEMORY, ENOMEM, 0, 0};
        goto out;
    }
    memcpy(b.pool, a->bufs, nbufs * sizeof *b.pool);
    b.nfree = nbufs;
    b.qcap = nbufs;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        first[i] = at;
        at += frames[i].nsegs;
    }
    if (at > nsegs) {
        *status = (rk_apply_status){0, RK_APPLY_BAD_PLAN, 0, 0, 0};
        goto out;
    }
    b.first_seg = first;
    b.stop_at = n;
    b.decoders_left = d;
    b.status = (rk_apply_status){-1, 0, 0, 0, 0};
#if RK_APPLY_THREADS
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    pthread_t wt[RK_APPLY_MAX_THREADS], dt[RK_APPLY_MAX_THREADS];
    decoder_arg da[RK_APPLY_MAX_THREADS];
    uint32_t started_w = 0;
    for (uint32_t k = 0; k < w; k++)
        if (pthread_create(&wt[started_w], NULL, writer_thread, &b) == 0)
            started_w++;
    lock(&b);
    b.writers = started_w;          /* none to be had: the decoders write */
    unlock(&b);
    int dstarted[RK_APPLY_MAX_THREADS] = {0};
    for (uint32_t k = 1; k < d; k++) {
        da[k] = (decoder_arg){&b, k};
        dstarted[k] = pthread_create(&dt[k], NULL, decoder_thread, &da[k]) == 0;
    }
    run_decoder(&b, 0);
    for (uint32_t k = 1; k < d; k++) {
        if (dstarted[k])
            pthread_join(dt[k], NULL);
        else
            run_decoder(&b, k);     /* no thread to be had: its share runs here, in order */
    }
    for (uint32_t k = 0; k < started_w; k++)
        pthread_join(wt[k], NULL);
    pthread_cond_destroy(&b.cv);
    pthread_mutex_destroy(&b.mu);
#else
    run_decoder(&b, 0);
#endif
    *status = b.status;
out:
    free(b.pool);
    free(b.queue);
    free(first);
    if (status->code)       /* the other lanes stopped anywhere: their zstd state is not the stream's */
        a->broken = 1;
    return status->code;
}

const char *rk_zstd_error_name(uint64_t code)
{
    return ZSTD_getErrorName((size_t)code);
}
