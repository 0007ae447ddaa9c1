/* The export's reads that wait for the device, on threads of C: a guest's read the page cache cannot answer.
 *
 * Why: handed to a Python thread pool, each such read cost the loop a submit, a future, a thread-safe
 * callback and a reply built in Python, and the worker took the GIL from the loop twice; a guest's cold 4
 * KiB reads ran at 0.3x qemu-nbd's (docs/performance.md). Here rk_nbd_serve queues the read with its reply
 * header already written, a worker reads it with plain preads, and the finished replies wait in a list
 * until the loop takes them, many per call, woken through an eventfd written only when the list was empty.
 *
 * The same threads make a file durable for a guest's FLUSH when that is one fsync (a job of no pieces), so
 * that it too waits neither on the loop nor for Python's threads.
 *
 * A job holds the disk's file descriptor, not a reference to the file: the caller keeps the file open
 * until every job it queued is taken (tracking/nbd.py waits for them before the disks close).
 */
#define _GNU_SOURCE
#include "kernels.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct rk_read_job rk_read_job;

struct rk_read_job {
    struct rk_read_job *next;
    uint64_t token;
    uint64_t cookie;
    uint64_t where[2];
    uint32_t first;                 /* bytes of the first piece (all of them when pieces == 1) */
    uint32_t head, length;          /* reply header bytes, data bytes */
    int fd, pieces, err;
    char reply[];                   /* head + length */
};

struct rk_read_pool {
    pthread_mutex_t lock;
    pthread_cond_t more;
    rk_read_job *todo, *todo_tail, *done, *done_tail;
    uint32_t done_n;                /* read without the lock by rk_read_pool_pending (a hint) */
    int efd, stop, nthreads;
    pthread_t threads[];
};

/* All n bytes at off, retrying short reads and EINTR; zeros past the end of the file (a block cut short),
 * and zeros for off 0 (a block that reads as zeros). 0 or the errno. */
static int pread_full(int fd, char *p, size_t n, uint64_t off)
{
    if (!off) {
        memset(p, 0, n);
        return 0;
    }
    while (n) {
        ssize_t got = pread(fd, p, n, (off_t)off);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return errno;
        if (got == 0) {
            memset(p, 0, n);
            return 0;
        }
        p += got;
        n -= (size_t)got;
        off += (uint64_t)got;
    }
    return 0;
}

/* A worker serves the guest as the loop thread does: it keeps the priority and scheduler slice it inherits
 * from it (the export's other helpers lower theirs: replicator/priority.py). */
static void *worker(void *arg)
{
    rk_read_pool *pool = arg;
    pthread_setname_np(pthread_self(), "nbd-read");
    for (;;) {
        pthread_mutex_lock(&pool->lock);
        while (!pool->todo && !pool->stop)
            pthread_cond_wait(&pool->more, &pool->lock);
        rk_read_job *job = pool->todo;
        if (!job) {                         /* stopping, and nothing left to read */
            pthread_mutex_unlock(&pool->lock);
            return NULL;
        }
        pool->todo = job->next;
        if (!pool->todo)
            pool->todo_tail = NULL;
        pthread_mutex_unlock(&pool->lock);

        char *data = job->reply + job->head;
        if (job->pieces == 0)               /* a flush: the reply once the file's data is durable */
            job->err = fsync(job->fd) ? errno : 0;
        else
            job->err = pread_full(job->fd, data, job->first, job->where[0]);
        if (!job->err && job->pieces == 2)
            job->err = pread_full(job->fd, data + job->first, job->length - job->first, job->where[1]);

        job->next = NULL;
        pthread_mutex_lock(&pool->lock);
        int was_empty = pool->done == NULL;
        if (pool->done_tail)
            pool->done_tail->next = job;
        else
            pool->done = job;
        pool->done_tail = job;
        __atomic_add_fetch(&pool->done_n, 1, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&pool->lock);
        if (was_empty) {                    /* the loop takes everything there is when woken */
            uint64_t one = 1;
            while (write(pool->efd, &one, sizeof one) < 0 && errno == EINTR)
                ;
        }
    }
}

rk_read_pool *rk_read_pool_new(int threads)
{
    if (threads < 1 || threads > 256)
        return NULL;
    rk_read_pool *pool = calloc(1, sizeof *pool + (size_t)threads * sizeof(pthread_t));
    if (!pool)
        return NULL;
    pool->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (pool->efd < 0) {
        free(pool);
        return NULL;
    }
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->more, NULL);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10);     /* a worker needs only a few frames */
    sigset_t all, before;                   /* signals go to the process's own threads, never to a worker */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &before);
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&pool->threads[i], &attr, worker, pool) != 0)
            break;                          /* fewer threads: still a pool */
        pool->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    pthread_attr_destroy(&attr);
    if (pool->nthreads == 0) {
        rk_read_pool_free(pool);
        return NULL;
    }
    return pool;
}

int rk_read_pool_eventfd(const rk_read_pool *pool)
{
    return pool->efd;
}

uint32_t rk_read_pool_pending(const rk_read_pool *pool)
{
    return __atomic_load_n(&pool->done_n, __ATOMIC_ACQUIRE);
}

int rk_read_pool_submit(rk_read_pool *pool, uint64_t token, int fd, const uint64_t *where, int pieces,
                        uint32_t first, const char *head, uint32_t head_len, uint32_t length)
{
    if (pieces < 0 || pieces > 2 || head_len < 16 || first > length || (pieces < 2 && first != length)
            || (pieces == 0 && length != 0))
        return EINVAL;
    rk_read_job *job = malloc(sizeof *job + (size_t)head_len + length);
    if (!job)
        return ENOMEM;
    job->next = NULL;
    job->token = token;
    job->cookie = 0;
    for (int i = 8; i < 16; i++)            /* both reply forms carry the cookie at 8..15, big-endian */
        job->cookie = job->cookie << 8 | (unsigned char)head[i];
    job->where[0] = pieces ? where[0] : 0;
    job->where[1] = pieces == 2 ? where[1] : 0;
    job->first = first;
    job->head = head_len;
    job->length = length;
    job->fd = fd;
    job->pieces = pieces;
    job->err = 0;
    memcpy(job->reply, head, head_len);
    pthread_mutex_lock(&pool->lock);
    if (pool->todo_tail)
        pool->todo_tail->next = job;
    else
        pool->todo = job;
    pool->todo_tail = job;
    pthread_cond_signal(&pool->more);
    pthread_mutex_unlock(&pool->lock);
    return 0;
}

size_t rk_read_pool_take(rk_read_pool *pool, rk_read_done *done, size_t max, char *out, size_t cap)
{
    uint64_t count;
    while (read(pool->efd, &count, sizeof count) < 0 && errno == EINTR)
        ;                                   /* cleared first: a job finished after this wakes the loop again */
    size_t n = 0, used = 0;
    rk_read_job *taken = NULL, **tail = &taken;
    pthread_mutex_lock(&pool->lock);
    while (pool->done && n < max) {
        rk_read_job *job = pool->done;
        size_t size = job->err ? 0 : (size_t)job->head + job->length;
        if (used + size > cap && n > 0)
            break;
        if (used + size > cap) {            /* cannot fit even alone: answered as an error */
            job->err = ENOBUFS;
            size = 0;
        }
        pool->done = job->next;
        if (!pool->done)
            pool->done_tail = NULL;
        done[n].token = job->token;
        done[n].cookie = job->cookie;
        done[n].size = job->head + job->length;
        done[n].err = job->err;
        done[n].off = (uint32_t)used;
        done[n].len = (uint32_t)size;
        used += size;
        n++;
        *tail = job;
        tail = &job->next;
    }
    *tail = NULL;
    __atomic_sub_fetch(&pool->done_n, (uint32_t)n, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&pool->lock);
    for (size_t i = 0; taken; i++) {        /* copied outside the lock: workers go on meanwhile */
        rk_read_job *next = taken->next;
        if (done[i].len)
            memcpy(out + done[i].off, taken->reply, done[i].len);
        free(taken);
        taken = next;
    }
    return n;
}

void rk_read_pool_free(rk_read_pool *pool)
{
    if (!pool)
        return;
    pthread_mutex_lock(&pool->lock);
    pool->stop = 1;                         /* workers read what is queued first, then end */
    pthread_cond_broadcast(&pool->more);
    pthread_mutex_unlock(&pool->lock);
    for (int i = 0; i < pool->nthreads; i++)
        pthread_join(pool->threads[i], NULL);
    for (rk_read_job *job = pool->done, *next; job; job = next) {
        next = job->next;
        free(job);
    }
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->more);
    close(pool->efd);
    free(pool);
}
