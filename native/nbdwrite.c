/* The export's write path in C: plain NBD_CMD_WRITE requests into blocks a VHDX already holds, each
 * recorded in the active Hyper-V Replica Log's staging buffers (MS-HRL §2.4 entries), with its simple reply.
 *
 * Why: a guest's 4 KiB write cost the export's loop about 15 us of Python around a 3 us pwrite (parse,
 * dispatch, the tracker, the VHDX's block map, the log's entry), on the same CPUs the guest waits for.
 * Everything that is not the common case stays in Python: the call stops at the first request it does not
 * serve, and the caller serves that one and calls again. See replicator/kernels/_nbdwrite.py.
 */
#include "kernels.h"

#include <string.h>
#include <time.h>

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_CMD_WRITE 1
#define NBD_REQ_SIZE 28
#define NBD_SIMPLE_SIZE 16
#define BAT_FULLY_PRESENT 6
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

/* The file offset of each block piece of [offset, offset+length), or 0 when a piece's block is not
 * fully present (the caller then leaves the request to Python, which allocates). */
static int map_pieces(const rk_nbd_writes *w, uint64_t offset, uint64_t length, uint64_t *where, int max)
{
    int n = 0;
    uint64_t pos = offset, end = offset + length;
    while (pos < end) {
        uint64_t block = pos / w->block_size, inblock = pos % w->block_size;
        uint64_t index = block + block / w->chunk_ratio;
        if (n == max || index >= w->bat_len)
            return -1;
        uint64_t entry = w->bat[index];
        if ((entry & 7) != BAT_FULLY_PRESENT || !(entry & BAT_OFFSET_MASK))
            return -1;
        where[n++] = (entry & BAT_OFFSET_MASK) + inblock;
        pos += w->block_size - inblock;
    }
    return n;
}

static int regions_marked(const rk_nbd_writes *w, uint64_t offset, uint64_t length)
{
    uint64_t lo = offset / w->region_size, hi = (offset + length - 1) / w->region_size;
    if (hi >= w->n_regions)
        return 0;
    for (uint64_t r = lo; r <= hi; r++)
        if (!w->marked[r])
            return 0;
    return 1;
}

static void log_entry(rk_nbd_writes *w, uint64_t offset, const char *data, uint32_t length, uint32_t now)
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

size_t rk_nbd_serve_writes(rk_nbd_writes *w, const char *data, size_t len, size_t pos)
{
    const time_t t = time(NULL) - HRL_EPOCH_2000;
    const uint32_t now = t > 0 ? (uint32_t)t : 0;
    w->served = 0;
    w->bytes = 0;
    w->err = 0;
    if (pos > len)
        return pos;
    while (len - pos >= NBD_REQ_SIZE) {
        const unsigned char *req = (const unsigned char *)data + pos;
        uint32_t magic = get_be32(req), length = get_be32(req + 24);
        uint16_t flags = (uint16_t)(req[4] << 8 | req[5]), cmd = (uint16_t)(req[6] << 8 | req[7]);
        uint64_t offset = get_be64(req + 16);
        uint64_t where[2] = {0, 0};
        if (magic != NBD_REQUEST_MAGIC || cmd != NBD_CMD_WRITE || flags != 0 || length == 0
                || length > w->max_len || len - pos - NBD_REQ_SIZE < length
                || offset > w->disk_size || length > w->disk_size - offset)
            break;
        if (w->log_buf != NULL && (w->entries_n >= w->entries_cap || w->log_len + length > w->log_cap))
            break;
        if (w->replies_len + NBD_SIMPLE_SIZE > w->replies_cap || !regions_marked(w, offset, length))
            break;
        int pieces = map_pieces(w, offset, length, where, 2);
        if (pieces < 0)
            break;
        const char *payload = data + pos + NBD_REQ_SIZE;
        uint32_t first = pieces == 1 ? length : (uint32_t)(w->block_size - offset % w->block_size);
        int err = rk_pwrite_full(w->fd, (const uint8_t *)payload, first, where[0]);
        if (!err && pieces == 2)
            err = rk_pwrite_full(w->fd, (const uint8_t *)payload + first, length - first, where[1]);
        if (err) {                          /* Python serves it again and answers with the error */
            w->err = err;
            break;
        }
        if (w->log_buf != NULL)
            log_entry(w, offset, payload, length, now);
        unsigned char *reply = (unsigned char *)w->replies + w->replies_len;
        put_be32(reply, NBD_SIMPLE_REPLY_MAGIC);
        put_be32(reply + 4, 0);
        memcpy(reply + 8, req + 8, 8);      /* the cookie, as it came */
        w->replies_len += NBD_SIMPLE_SIZE;
        w->served++;
        w->bytes += length;
        pos += NBD_REQ_SIZE + length;
    }
    return pos;
}
