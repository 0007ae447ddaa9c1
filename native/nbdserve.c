/* The export's request path in C: plain NBD_CMD_WRITE requests into blocks a VHDX already holds, each
 * recorded in the active Hyper-V Replica Log's staging buffers (MS-HRL §2.4 entries), with its simple reply;
 * and NBD_CMD_READ requests of such blocks whose pages the page cache holds, with their data reply.
 *
 * Why: a guest's 4 KiB write cost the export's loop about 15 us of Python around a 3 us pwrite (parse,
 * dispatch, the tracker, the VHDX's block map, the log's entry), on the same CPUs the guest waits for; a
 * warm read about as much around a 1 us copy. Everything that is not the common case stays in Python: the
 * call stops at the first request it does not serve, and the caller serves that one and calls again. See
 * replicator/kernels/_nbdserve.py.
 */
#define _GNU_SOURCE                         /* preadv2, RWF_NOWAIT */
#include "kernels.h"

#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_FLAG_DF (1 << 2)
#define NBD_REPLY_FLAG_DONE 1
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REQ_SIZE 28
#define NBD_SIMPLE_SIZE 16
#define NBD_DATA_HEAD 28                    /* a structured reply's chunk header and the data's offset */
#define BAT_FULLY_PRESENT 6
#define BAT_PARTIALLY_PRESENT 7
#define BAT_OFFSET_MASK (~(uint64_t)0xFFFFF)
#define HRL_ENTRY_SIZE 32
#define HRL_EPOCH_2000 946684800
#define HRL_META_WRITE 1

static uint32_t get_be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get_be64(const unsigned char *p)
{
    return (uint64_t)get_be32(p) << 32 | get_be32(p + 4);
}

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}

static void put_le(unsigned char *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* The file offset of each block piece of [offset, offset+length) and the first piece's length; -1 when a
 * piece's block is not fully present (the caller then leaves the request to Python, which allocates), or,
 * with `zeros`, where 0 for a block that reads as zeros (any state but fully or partially present: this is
 * never a differencing disk) and -1 only for a partly present one. */
static int map_pieces(const rk_nbd_export *w, uint64_t offset, uint64_t length, uint64_t *where, int max,
                      uint32_t *first, int zeros)
{
    int n = 0;
    uint64_t pos = offset, end = offset + length;
    while (pos < end) {
        uint64_t block = pos / w->block_size, inblock = pos % w->block_size;
        uint64_t index = block + block / w->chunk_ratio;
        if (n == max || index >= w->bat_len)
            return -1;
        uint64_t entry = w->bat[index], state = entry & 7;
        if (zeros && state != BAT_FULLY_PRESENT && state != BAT_PARTIALLY_PRESENT)
            where[n++] = 0;
        else if (state != BAT_FULLY_PRESENT || !(entry & BAT_OFFSET_MASK))
            return -1;
        else
            where[n++] = (entry & BAT_OFFSET_MASK) + inblock;
        pos += w->block_size - inblock;
    }
    *first = n == 1 ? (uint32_t)length : (uint32_t)(w->block_size - offset % w->block_size);
    return n;
}

/* The simple reply to the request at req: no error, its cookie as it came. */
static void put_simple_reply(unsigned char *reply, const unsigned char *req)
{
    put_be32(reply, NBD_SIMPLE_REPLY_MAGIC);
    put_be32(reply + 4, 0);
    memcpy(reply + 8, req + 8, 8);
}

static int regions_marked(const rk_nbd_export *w, uint64_t offset, uint64_t length)
{
    uint64_t lo = offset / w->region_size, hi = (offset + length - 1) / w->region_size;
    if (hi >= w->n_regions)
        return 0;
    for (uint64_t r = lo; r <= hi; r++)
        if (!w->marked[r])
            return 0;
    return 1;
}

static void log_entry(rk_nbd_export *w, uint64_t offset, const char *data, uint32_t length, uint32_t now)
{
    unsigned char *e = (unsigned char *)w->entries + (size_t)w->entries_n * HRL_ENTRY_SIZE;
    uint32_t data_checksum = ~(uint32_t)rk_byte_sum(data, length);
    memset(e, 0, HRL_ENTRY_SIZE);
    put_le(e, offset, 8);                   /* ByteOffset */
    put_le(e + 12, length, 4);              /* DataLength */
    put_le(e + 16, now, 4);                 /* Timestamp */
    e[20] = HRL_META_WRITE;                 /* MetaOperation */
    put_le(e + 21, data_checksum, 4);       /* DataChecksum */
    uint64_t sum = 0;
    for (int i = 0; i < HRL_ENTRY_SIZE; i++)    /* the entry's own checksum field (8..11) is still zero */
        sum += e[i];
    put_le(e + 8, ~(uint32_t)sum, 4);
    memcpy(w->log_buf + w->log_len, data, length);
    w->log_len += length;
    w->entries_n++;
}

/* 1: all n bytes at off came from the page cache (off 0: a block that reads as zeros); 0: not all of them
 * are cached (RWF_NOWAIT), or the file ends within them (the reading thread gives zeros past the end); -1: an
 * error (Python serves the read and answers with it). A file system that refuses RWF_NOWAIT turns native
 * reads off for good, as tracking/reads.py does for its own. */
static int read_cached(rk_nbd_export *w, char *dst, size_t n, uint64_t off)
{
    if (!off) {
        memset(dst, 0, n);
        return 1;
    }
    struct iovec iov = {dst, n};
    ssize_t got = preadv2(w->fd, &iov, 1, (off_t)off, RWF_NOWAIT);
    if (got == (ssize_t)n)
        return 1;
    if (got >= 0 || errno == EAGAIN)
        return 0;
    if (errno == EOPNOTSUPP || errno == EINVAL)
        w->nowait_refused = 1;
    return -1;
}

/* A read's reply header at reply: one OFFSET_DATA chunk's (structured) or the simple reply's. */
static void put_read_head(const rk_nbd_export *w, unsigned char *reply, const unsigned char *req, uint64_t offset,
                          uint32_t length)
{
    if (!w->structured) {
        put_simple_reply(reply, req);
        return;
    }
    put_be32(reply, NBD_STRUCTURED_REPLY_MAGIC);
    reply[4] = 0;
    reply[5] = NBD_REPLY_FLAG_DONE;
    reply[6] = 0;
    reply[7] = NBD_REPLY_TYPE_OFFSET_DATA;
    memcpy(reply + 8, req + 8, 8);
    put_be32(reply + 16, 8 + length);
    put_be32(reply + 20, (uint32_t)(offset >> 32));
    put_be32(reply + 24, (uint32_t)offset);
}

static int serve_write(rk_nbd_export *w, const unsigned char *req, uint16_t flags, uint64_t offset,
                       uint32_t length, size_t avail, uint32_t now)
{
    uint64_t where[2] = {0, 0};
    if (!w->writes || flags != 0 || length == 0 || length > w->max_len || avail < length)
        return 0;
    if (w->log_buf != NULL && (w->entries_n >= w->entries_cap || w->log_len + length > w->log_cap))
        return 0;
    if (w->replies_len + NBD_SIMPLE_SIZE > w->replies_cap) {
        w->full = 1;
        return 0;
    }
    if (!regions_marked(w, offset, length))
        return 0;
    uint32_t first;
    int pieces = map_pieces(w, offset, length, where, 2, &first, 0);
    if (pieces < 0)
        return 0;
    const char *payload = (const char *)req + NBD_REQ_SIZE;
    int err = rk_pwrite_full(w->fd, (const uint8_t *)payload, first, where[0]);
    if (!err && pieces == 2)
        err = rk_pwrite_full(w->fd, (const uint8_t *)payload + first, length - first, where[1]);
    if (err) {                              /* Python serves it again and answers with the error */
        w->err = err;
        return 0;
    }
    if (w->log_buf != NULL)
        log_entry(w, offset, payload, length, now);
    put_simple_reply((unsigned char *)w->replies + w->replies_len, req);
    w->replies_len += NBD_SIMPLE_SIZE;
    return 1;
}

static int serve_read(rk_nbd_export *w, const unsigned char *req, uint16_t flags, uint64_t offset,
                      uint32_t length)
{
    uint64_t where[2] = {0, 0};
    /* DF (one chunk) is met by the one data chunk sent; it needs structured replies, as FUA is Python's */
    if (!w->reads || w->nowait_refused || length == 0 || length > w->max_read || (flags & ~NBD_CMD_FLAG_DF)
            || (flags && !w->structured))
        return 0;
    uint32_t head = w->structured ? NBD_DATA_HEAD : NBD_SIMPLE_SIZE;
    if ((uint64_t)w->replies_len + head + length > w->replies_cap) {
        w->full = 1;
        return 0;
    }
    uint32_t first;
    int pieces = map_pieces(w, offset, length, where, 2, &first, 1);
    if (pieces < 0)
        return 0;
    /* a long structured read with zeros in it is sent as data and hole chunks: Python's (nbd.py) */
    if (w->structured && length >= w->sparse_from && !(flags & NBD_CMD_FLAG_DF) && (!where[0] || !where[pieces - 1]))
        return 0;
    unsigned char *reply = (unsigned char *)w->replies + w->replies_len;
    char *dst = (char *)reply + head;
    put_read_head(w, reply, req, offset, length);
    int got = read_cached(w, dst, first, where[0]);
    if (got > 0 && pieces == 2)
        got = read_cached(w, dst + first, length - first, where[1]);
    if (got > 0) {
        w->replies_len += head + length;
        return 1;
    }
    /* not all cached: a thread of the pool reads it, and its reply goes out when the loop takes it */
    if (got < 0 || !w->pool || w->queued >= w->queue_max || w->queued_bytes >= w->queue_bytes_max
            || rk_read_pool_submit(w->pool, w->token, w->fd, where, pieces, first, (const char *)reply, head, length))
        return 0;
    w->queued++;
    w->queued_bytes += head + length;
    return 1;
}

size_t rk_nbd_serve(rk_nbd_export *w, const char *data, size_t len, size_t pos)
{
    const time_t t = time(NULL) - HRL_EPOCH_2000;
    const uint32_t now = t > 0 ? (uint32_t)t : 0;
    w->served = 0;
    w->bytes = 0;
    w->reads_served = 0;
    w->queued = 0;
    w->queued_bytes = 0;
    w->err = 0;
    w->full = 0;
    if (pos > len)
        return pos;
    while (len - pos >= NBD_REQ_SIZE) {
        const unsigned char *req = (const unsigned char *)data + pos;
        uint32_t magic = get_be32(req), length = get_be32(req + 24);
        uint16_t flags = (uint16_t)(req[4] << 8 | req[5]), cmd = (uint16_t)(req[6] << 8 | req[7]);
        uint64_t offset = get_be64(req + 16);
        if (magic != NBD_REQUEST_MAGIC || offset > w->disk_size || length > w->disk_size - offset)
            break;
        if (cmd == NBD_CMD_WRITE) {
            if (!serve_write(w, req, flags, offset, length, len - pos - NBD_REQ_SIZE, now))
                break;
            w->bytes += length;
            pos += NBD_REQ_SIZE + length;
        } else if (cmd == NBD_CMD_READ) {
            if (!serve_read(w, req, flags, offset, length))
                break;
            w->reads_served++;
            pos += NBD_REQ_SIZE;
        } else {
            break;
        }
        w->served++;
    }
    return pos;
}
