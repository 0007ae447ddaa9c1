/* Native hot loops of replicator: CRC-32C, XXH3-128 (one-shot, per block, streaming), zero-block scan,
 * the replica's apply of a delta stream's data frames (apply.c), and the export's write path (nbdserve.c).
 *
 * Everything between CDEF-BEGIN and CDEF-END is also fed to cffi's cdef() by native/build_kernels.py,
 * so that part must stay plain C declarations (no preprocessor lines, no macros).
 */
#ifndef REPLICATOR_KERNELS_H
#define REPLICATOR_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
typedef struct rk_xxh3_state rk_xxh3_state;

/* CRC-32C (Castagnoli). `crc` is a previous result (0 to start): rk_crc32c(rk_crc32c(0, a), b) == crc of a||b. */
uint32_t rk_crc32c(uint32_t crc, const char *data, size_t len);

/* XXH3-128, seed 0: out[0] = low64, out[1] = high64. */
void rk_xxh3_128(const char *data, size_t len, uint64_t *out);

/* XXH3-128 of each block_size chunk (the last one may be short) into out[2*i], out[2*i+1].
 * Uses up to `threads` POSIX threads when the buffer is large enough to pay for them. */
void rk_xxh3_128_blocks(const char *data, size_t len, size_t block_size, uint64_t *out, int threads);

/* Same rows for bytes [offset, offset + len) of an open file, read with pread() by each thread into its
 * own buffer (no mmap: mapping a file costs page-table work that can exceed the hashing itself).
 * Returns 0, or the errno of the first failed read (ENODATA: the file ended before offset + len). */
int rk_xxh3_128_fd_blocks(int fd, uint64_t offset, uint64_t len, uint64_t block_size, uint64_t *out,
                          int threads);

/* out[i] = 1 when block i holds only zero bytes, else 0. */
void rk_zero_blocks(const char *data, size_t len, size_t block_size, uint8_t *out, int threads);

/* Sum of all bytes, as an unsigned 64-bit integer: the core of the MS-HRL one's-complement checksums. */
uint64_t rk_byte_sum(const char *data, size_t len);

/* Streaming XXH3-128 (seed 0). new() returns NULL when out of memory. */
rk_xxh3_state *rk_xxh3_new(void);
void rk_xxh3_free(rk_xxh3_state *state);
void rk_xxh3_copy(rk_xxh3_state *dst, const rk_xxh3_state *src);
void rk_xxh3_update(rk_xxh3_state *state, const char *data, size_t len);
void rk_xxh3_digest(const rk_xxh3_state *state, uint64_t *out);

/* Instruction sets: 0 portable, 1 SSE2 (+SSE4.2 crc32), 2 AVX2, 3 AVX-512F.
 * rk_isa_max() is what the CPU offers, rk_isa_best() the fastest of those (AVX-512 is not always faster
 * than AVX2: a short timing at load decides); rk_set_isa(level) switches, for tests (-1: back to best). */
int rk_isa_max(void);
int rk_isa_best(void);
int rk_isa(void);
int rk_set_isa(int level);
int rk_crc32c_hw(void);
int rk_min_bytes_per_thread(void);

/* Test hook: sets flags[1] = 1, then waits up to timeout_ms for flags[0] != 0; returns 1 if it came.
 * Only another Python thread can set flags[0], so 1 proves the call ran without the GIL. */
int rk_debug_wait_flag(volatile uint32_t *flags, uint32_t timeout_ms);
/* The replica's apply (apply.c): decompress each data frame of a delta stream (a lane's zstd stream
 * continuing across its frames), check its XXH3-128, and write its plain bytes where the caller planned.
 * new() returns NULL when out of memory or given zero lanes. */
typedef struct rk_applier rk_applier;

enum { RK_FRAME_RAW = 1, RK_FRAME_ZSTD = 2 };
enum { RK_APPLY_OK = 0, RK_APPLY_BAD_ZSTD = 1, RK_APPLY_TOO_LONG = 2, RK_APPLY_TOO_SHORT = 3,
       RK_APPLY_DIGEST = 4, RK_APPLY_WRITE = 5, RK_APPLY_BAD_PLAN = 6, RK_APPLY_NO_MEMORY = 7,
       RK_APPLY_BROKEN = 8 };

typedef struct {
    const char *payload;       /* as it is in the stream */
    uint64_t payload_len;
    uint64_t length;           /* plain bytes the frame declares (at most the applier's block size) */
    unsigned char digest[16];  /* XXH3-128 of the plain bytes, canonical (big-endian) form */
    uint32_t kind;             /* RK_FRAME_RAW or RK_FRAME_ZSTD */
    uint32_t lane;             /* ZSTD: the lane whose zstd stream this payload continues */
    uint32_t nsegs;            /* the frame's segments, next in the segment array */
} rk_apply_frame;

typedef struct {
    uint64_t file_offset;      /* where in the file */
    uint64_t frame_offset;     /* which of the frame's plain bytes */
    uint64_t length;
} rk_apply_seg;

typedef struct {
    int64_t frame;             /* index of the failed frame, -1: none */
    int code;                  /* RK_APPLY_* */
    int err;                   /* errno of a failed write */
    uint64_t zstd_error;       /* zstd's error code (RK_APPLY_BAD_ZSTD): rk_zstd_error_name() */
    uint64_t produced;         /* plain bytes the payload gave (RK_APPLY_TOO_SHORT) */
} rk_apply_status;

rk_applier *rk_applier_new(uint32_t lanes, uint64_t block_size, uint64_t max_window);
void rk_applier_free(rk_applier *applier);
/* Frames that overlap must not share a call. `threads` decoders, `writers` writes in flight (0: each
 * decoder writes its own frames). Returns status->code; after a failure the applier refuses every later
 * call (RK_APPLY_BROKEN): the lanes' zstd streams are no longer where the stream is. */
int rk_apply_frames(rk_applier *applier, const rk_apply_frame *frames, size_t n, const rk_apply_seg *segs,
                    size_t nsegs, int fd, int direct_fd, int threads, int writers, rk_apply_status *status);
const char *rk_zstd_error_name(uint64_t code);
/* The export's request path (nbdserve.c): serve the requests at data[pos..len) it can, stopping at the
 * first it does not serve (returned: where that one starts).
 * - NBD_CMD_WRITE (when `writes`): plain writes whose blocks the VHDX holds and whose regions are marked.
 *   Each is written to fd, staged for the log (when log_buf is not NULL: its data at log_buf + log_len, its
 *   MS-HRL metadata entry at entries + 32 * entries_n) and answered with a simple reply.
 * - NBD_CMD_READ (when `reads`): reads of at most max_read bytes of blocks the VHDX holds or that read as
 *   zeros (but not structured reads of sparse_from bytes or more with zeros in them, which go as hole
 *   chunks), from the page cache, answered with their data (one OFFSET_DATA chunk when `structured`, else a
 *   simple reply).
 * Replies go at replies + replies_len; the counters move on. full: the last call stopped for want of reply
 * room (call again once the replies are taken). err: the errno of a failed write (that request is not
 * served: the caller serves it again and answers with the error). A file that refuses RWF_NOWAIT sets
 * nowait_refused, and reads are left to the caller from then on.
 * A read whose pages are not all cached is queued on `pool` (when not NULL, and while queued < queue_max and
 * queued_bytes < queue_bytes_max) with `token`, its reply to be taken from the pool when read; such reads
 * count in served and reads_served, and in queued and queued_bytes (their replies' bytes). */
typedef struct rk_read_pool rk_read_pool;
typedef struct {
    int fd;                    /* the VHDX file */
    uint64_t disk_size;        /* virtual size */
    const uint64_t *bat;       /* the BAT as in the file (MS-VHDX 2.5), bat_len entries */
    uint64_t bat_len;
    uint64_t block_size;
    uint64_t chunk_ratio;      /* payload blocks per sector bitmap block */
    const uint8_t *marked;     /* nonzero: region r is marked in this cycle's and the dirty bitmaps */
    uint64_t n_regions;
    uint64_t region_size;
    uint32_t max_len;          /* longest write served here */
    uint32_t max_read;         /* longest read served here */
    uint32_t sparse_from;      /* structured reads this long with zeros in them are left to the caller */
    int writes;                /* serve writes (0: every write goes to Python) */
    int reads;                 /* serve reads */
    int structured;            /* the connection negotiated structured replies */
    char *log_buf;             /* the log's staged data (NULL: no log) */
    uint64_t log_cap;
    uint64_t log_len;
    char *entries;             /* the log's pending metadata entries, 32 bytes each */
    uint32_t entries_cap;
    uint32_t entries_n;
    char *replies;
    uint32_t replies_cap;
    uint32_t replies_len;
    uint32_t served;           /* out: requests served by the last call (reads_served of them reads), the
                                  bytes written */
    uint32_t reads_served;
    uint64_t bytes;
    int err;
    int full;
    int nowait_refused;        /* the file refused RWF_NOWAIT once: no more reads here (sticky) */
    rk_read_pool *pool;        /* where reads that wait for the device go (NULL: to the caller) */
    uint64_t token;            /* the connection's, carried to the reads' completions */
    uint32_t queue_max;        /* in: how many reads may be queued by this call, and the reply bytes */
    uint64_t queue_bytes_max;
    uint32_t queued;           /* out: reads queued by the last call, and their replies' bytes */
    uint64_t queued_bytes;
} rk_nbd_export;

size_t rk_nbd_serve(rk_nbd_export *w, const char *data, size_t len, size_t pos);

/* The pool of threads reading for rk_nbd_serve (readpool.c). A finished read waits until taken; the
 * eventfd becomes readable when the list of finished ones was empty and one arrives. take() clears the
 * eventfd and moves up to max finished reads: each one's reply (header and data) into out at off (len
 * bytes; 0 when err, an errno: the caller answers with an error), size the bytes counted when queued.
 * free() waits for every queued read to finish. */
typedef struct {
    uint64_t token;
    uint64_t cookie;
    uint32_t off;
    uint32_t len;
    uint32_t size;
    int err;
} rk_read_done;
rk_read_pool *rk_read_pool_new(int threads);
int rk_read_pool_eventfd(const rk_read_pool *pool);
uint32_t rk_read_pool_pending(const rk_read_pool *pool);
/* where: each piece's file offset, 0 for zeros. No pieces (and length 0): fsync(fd), then the reply head. */
int rk_read_pool_submit(rk_read_pool *pool, uint64_t token, int fd, const uint64_t *where, int pieces,
                        uint32_t first, const char *head, uint32_t head_len, uint32_t length);
size_t rk_read_pool_take(rk_read_pool *pool, rk_read_done *done, size_t max, char *out, size_t cap);
void rk_read_pool_free(rk_read_pool *pool);
/* CDEF-END */

/* Internal to the C sources (not for cffi): write all n bytes at off, retrying short writes and EINTR;
 * 0 or the errno. */
int rk_pwrite_full(int fd, const uint8_t *p, size_t n, uint64_t off);

#endif
