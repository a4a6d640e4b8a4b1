#define _GNU_SOURCE  /* ppoll */
#include "shmrt_native.h"

#include <stdatomic.h>
#include <string.h>
#include <time.h>

uint64_t shmrt_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* off + n <= len, written so that it cannot overflow. */
static int in_bounds(uint64_t len, uint64_t off, uint64_t n) {
    return off <= len && n <= len - off;
}

int64_t shmrt_copy_in(uint8_t *dst, uint64_t dst_len, uint64_t dst_off, uintptr_t src, uint64_t n) {
    if (!in_bounds(dst_len, dst_off, n)) return SHMRT_E_BOUNDS;
    uint64_t start = shmrt_now_ns();
    memcpy(dst + dst_off, (const void *)src, (size_t)n);
    return (int64_t)(shmrt_now_ns() - start);
}

/* Header words are shared with an untrusted peer: the only guarantees we need are that
 * the word is read/written in one indivisible access and ordered against the data area
 * (acquire on load, release on store). Misaligned words would break atomicity. */
int shmrt_load_acquire(const uint8_t *base, uint64_t base_len, uint64_t off, uint64_t *value) {
    if (!in_bounds(base_len, off, 8)) return SHMRT_E_BOUNDS;
    if (((uintptr_t)(base + off)) % 8 != 0) return SHMRT_E_ALIGN;
    *value = atomic_load_explicit((const _Atomic uint64_t *)(base + off), memory_order_acquire);
    return SHMRT_OK;
}

int shmrt_store_release(uint8_t *base, uint64_t base_len, uint64_t off, uint64_t value) {
    if (!in_bounds(base_len, off, 8)) return SHMRT_E_BOUNDS;
    if (((uintptr_t)(base + off)) % 8 != 0) return SHMRT_E_ALIGN;
    atomic_store_explicit((_Atomic uint64_t *)(base + off), value, memory_order_release);
    return SHMRT_OK;
}

/* ---- the shared-memory doorbell */

#include <poll.h>
#include <sched.h>
#include <sys/prctl.h>

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int any_changed(const uint64_t *words, const uint64_t *seen, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        const _Atomic uint64_t *w = (const _Atomic uint64_t *)(uintptr_t)words[i];
        if (atomic_load_explicit(w, memory_order_acquire) != seen[i]) return (int)i;
    }
    return -1;
}

/* Sleep up to ns, or until fd (if >= 0) is readable: 1 if it is. */
static int sleep_on(int fd, uint64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    if (fd < 0) {
        nanosleep(&ts, NULL);
        return 0;
    }
    struct pollfd p = {fd, POLLIN, 0};
    return ppoll(&p, 1, &ts, NULL) > 0 && (p.revents & POLLIN);
}

int shmrt_wait_any(const uint64_t *words, const uint64_t *seen, uint32_t n, int fd, const shmrt_backoff *b,
                   uint64_t waited_ns, uint64_t budget_ns) {
    for (uint32_t i = 0; i < n; i++)
        if (words[i] % 8 != 0) return SHMRT_E_ALIGN;
    uint64_t start = shmrt_now_ns();
    for (uint32_t spins = 1;; spins++) {
        int which = any_changed(words, seen, n);
        if (which >= 0) return which;
        uint64_t now = shmrt_now_ns();
        uint64_t here = now - start;
        if (here >= budget_ns) return SHMRT_E_TIMEOUT;
        uint64_t waited = waited_ns + here;
        if (waited < b->spin_ns) {
            cpu_relax();
            /* a socket to look at: every 256 spins (a zero-timeout ppoll). Without one, nothing: sleep_on(-1, 0)
               is a nanosleep, which deschedules the spinner just when it means to see the word change at once.
               (The yield phase keeps it: there handing the core to the other side is the point, on few cores.) */
            if (fd >= 0 && spins % 256 == 0 && sleep_on(fd, 0)) return (int)n;
        } else if (waited < b->yield_ns) {
            sched_yield();
            if (sleep_on(fd, 0)) return (int)n;
        } else {
            uint64_t sleep = waited / 4;
            if (sleep < b->sleep_min_ns) sleep = b->sleep_min_ns;
            if (sleep > b->sleep_max_ns) sleep = b->sleep_max_ns;
            if (sleep > budget_ns - here) sleep = budget_ns - here;
            if (sleep_on(fd, sleep)) return (int)n;
        }
    }
}

int shmrt_bell_post(uint8_t *base, uint64_t base_len, uint64_t slot_off, uint64_t slot_cap,
                    const char *msg, uint64_t n, uint64_t seq_off, uint64_t seq,
                    uint64_t flag_off, uint64_t *flag) {
    if (!in_bounds(base_len, slot_off, slot_cap) || slot_cap < 8 || n > slot_cap - 8
        || !in_bounds(base_len, seq_off, 8) || !in_bounds(base_len, flag_off, 8)) return SHMRT_E_BOUNDS;
    if (((uintptr_t)(base + slot_off)) % 8 || ((uintptr_t)(base + seq_off)) % 8
        || ((uintptr_t)(base + flag_off)) % 8) return SHMRT_E_ALIGN;
    memcpy(base + slot_off, &n, 8);
    memcpy(base + slot_off + 8, msg, (size_t)n);
    atomic_store_explicit((_Atomic uint64_t *)(base + seq_off), seq, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    *flag = atomic_load_explicit((const _Atomic uint64_t *)(base + flag_off), memory_order_acquire);
    return SHMRT_OK;
}

int shmrt_bell_take(const uint8_t *base, uint64_t base_len, uint64_t seq_off, uint64_t seen,
                    uint64_t slot_off, uint64_t slot_cap, uint64_t *seq, uint64_t *length,
                    uint8_t *out, uint64_t out_cap) {
    if (!in_bounds(base_len, seq_off, 8) || !in_bounds(base_len, slot_off, slot_cap) || slot_cap < 8)
        return SHMRT_E_BOUNDS;
    if (((uintptr_t)(base + seq_off)) % 8 || ((uintptr_t)(base + slot_off)) % 8) return SHMRT_E_ALIGN;
    *length = 0;
    *seq = atomic_load_explicit((const _Atomic uint64_t *)(base + seq_off), memory_order_acquire);
    if (*seq == seen) return SHMRT_OK;
    uint64_t n;
    memcpy(&n, base + slot_off, 8);
    *length = n;
    if (n <= out_cap && n <= slot_cap - 8) memcpy(out, base + slot_off + 8, (size_t)n);
    return SHMRT_OK;
}

int shmrt_store_fence_load(uint8_t *base, uint64_t base_len, uint64_t store_off, uint64_t value,
                           uint64_t load_off, uint64_t *out) {
    if (!in_bounds(base_len, store_off, 8) || !in_bounds(base_len, load_off, 8)) return SHMRT_E_BOUNDS;
    if (((uintptr_t)(base + store_off)) % 8 || ((uintptr_t)(base + load_off)) % 8) return SHMRT_E_ALIGN;
    atomic_store_explicit((_Atomic uint64_t *)(base + store_off), value, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    *out = atomic_load_explicit((const _Atomic uint64_t *)(base + load_off), memory_order_acquire);
    return SHMRT_OK;
}

/* ---- doorbell records in C (see the header; protocol.py's docstring has the layout) */

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "doorbell records are little-endian: this helper writes and reads them in host order"
#endif

static uint64_t get_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint32_t get_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint16_t get_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

/* Header field offsets (protocol.py's _HEADER) and a descriptor's (its _DESC). */
enum { H_MAGIC = 0, H_VERSION = 4, H_METHOD = 6, H_FLAGS = 7, H_SEQ = 8, H_TOKEN = 16, H_LAYER = 32, H_OP = 36,
       H_POS = 40, H_RING_END = 48, H_WORK_NS = 56, H_NTENSORS = 64, H_TEXT_LEN = 66,
       D_OFFSET = 0, D_NBYTES = 8, D_DTYPE = 16, D_NDIM = 17, D_DIMS = 24 };

int shmrt_record_encode(const shmrt_codec *codec, const uint8_t *token, const uint64_t *words, const char *text,
                        uint64_t text_len, uint8_t *r, uint64_t cap, uint64_t *length) {
    uint64_t ntensors = words[8];
    if (ntensors > SHMRT_MAX_TENSORS || text_len > 0xffff) return SHMRT_E_BOUNDS;
    uint64_t n = SHMRT_HEADER_BYTES + ntensors * SHMRT_DESC_BYTES + text_len;
    if (n > cap) return SHMRT_E_BOUNDS;
    for (uint64_t i = 0; i < ntensors; i++)
        if (words[SHMRT_HEAD_WORDS + i * SHMRT_DESC_WORDS + 3] > SHMRT_MAX_NDIM) return SHMRT_E_BOUNDS;
    memset(r, 0, (size_t)(n - text_len));   /* padding and the dims past ndim are zeros */
    memcpy(r + H_MAGIC, codec->magic, 4);
    put_u16(r + H_VERSION, codec->version);
    r[H_METHOD] = (uint8_t)words[0];
    r[H_FLAGS] = (uint8_t)words[1];
    put_u64(r + H_SEQ, words[2]);
    memcpy(r + H_TOKEN, token, 16);
    put_u32(r + H_LAYER, (uint32_t)words[3]);
    put_u32(r + H_OP, (uint32_t)words[4]);
    put_u64(r + H_POS, words[5]);
    put_u64(r + H_RING_END, words[6]);
    put_u64(r + H_WORK_NS, words[7]);
    put_u16(r + H_NTENSORS, (uint16_t)ntensors);
    put_u16(r + H_TEXT_LEN, (uint16_t)text_len);
    for (uint64_t i = 0; i < ntensors; i++) {
        const uint64_t *d = words + SHMRT_HEAD_WORDS + i * SHMRT_DESC_WORDS;
        uint8_t *o = r + SHMRT_HEADER_BYTES + i * SHMRT_DESC_BYTES;
        put_u64(o + D_OFFSET, d[0]);
        put_u64(o + D_NBYTES, d[1]);
        o[D_DTYPE] = (uint8_t)d[2];
        o[D_NDIM] = (uint8_t)d[3];
        for (uint64_t k = 0; k < d[3]; k++) put_u64(o + D_DIMS + 8 * k, d[4 + k]);
    }
    if (text_len) memcpy(r + n - text_len, text, (size_t)text_len);
    *length = n;
    return SHMRT_OK;
}

int shmrt_bell_post_words(const shmrt_bell *bell, const uint64_t *words, const char *text, uint64_t text_len,
                          uint64_t *flag, uint64_t *length) {
    if (!in_bounds(bell->base_len, bell->slot_off, bell->slot_cap) || bell->slot_cap < 8
        || !in_bounds(bell->base_len, bell->seq_off, 8) || !in_bounds(bell->base_len, bell->flag_off, 8))
        return SHMRT_E_BOUNDS;
    uint8_t *base = bell->base;
    if (((uintptr_t)(base + bell->slot_off)) % 8 || ((uintptr_t)(base + bell->seq_off)) % 8
        || ((uintptr_t)(base + bell->flag_off)) % 8) return SHMRT_E_ALIGN;
    /* Our own slot (we are this ring's producer): written in place, then published by the seq store. (Nothing is
     * published where the record does not fit: the seq stays untouched.) */
    uint64_t n;
    int rc = shmrt_record_encode(bell->codec, bell->token, words, text, text_len, base + bell->slot_off + 8,
                                 bell->slot_cap - 8, &n);
    if (rc != SHMRT_OK) return rc;
    put_u64(base + bell->slot_off, n);
    *length = n;
    atomic_store_explicit((_Atomic uint64_t *)(base + bell->seq_off), words[2], memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    *flag = atomic_load_explicit((const _Atomic uint64_t *)(base + bell->flag_off), memory_order_acquire);
    return SHMRT_OK;
}

int shmrt_record_check(const shmrt_codec *c, const uint8_t *rec, uint64_t n, const uint8_t *token,
                       uint64_t expect_seq, uint32_t expect_method, uint64_t capacity, uint64_t *out) {
    if (n < SHMRT_HEADER_BYTES || memcmp(rec + H_MAGIC, c->magic, 4) || get_u16(rec + H_VERSION) != c->version)
        return SHMRT_E_SLOW;
    uint8_t method = rec[H_METHOD];
    if (!c->rpc[method] || (expect_method && method != expect_method) || rec[H_FLAGS]) return SHMRT_E_SLOW;
    if (get_u64(rec + H_SEQ) != expect_seq || memcmp(rec + H_TOKEN, token, 16)) return SHMRT_E_SLOW;
    int32_t layer = (int32_t)get_u32(rec + H_LAYER);
    int64_t pos = (int64_t)get_u64(rec + H_POS);
    uint64_t ntensors = get_u16(rec + H_NTENSORS), text_len = get_u16(rec + H_TEXT_LEN);
    if (layer < -1 || pos < 0 || ntensors > SHMRT_MAX_TENSORS
        || n != SHMRT_HEADER_BYTES + ntensors * SHMRT_DESC_BYTES + text_len) return SHMRT_E_SLOW;
    out[0] = method;
    out[1] = 0;
    out[2] = expect_seq;
    out[3] = (uint64_t)(int64_t)layer;
    out[4] = get_u32(rec + H_OP);
    out[5] = (uint64_t)pos;
    out[6] = get_u64(rec + H_RING_END);
    out[7] = get_u64(rec + H_WORK_NS);
    out[8] = ntensors;
    out[9] = text_len;
    for (uint64_t i = 0; i < ntensors; i++) {
        const uint8_t *d = rec + SHMRT_HEADER_BYTES + i * SHMRT_DESC_BYTES;
        uint64_t *o = out + SHMRT_HEAD_WORDS + i * SHMRT_DESC_WORDS;
        uint64_t offset = get_u64(d + D_OFFSET), nbytes = get_u64(d + D_NBYTES);
        uint8_t code = d[D_DTYPE], ndim = d[D_NDIM];
        uint64_t itemsize = c->itemsize[code];
        if (!itemsize || ndim > SHMRT_MAX_NDIM) return SHMRT_E_SLOW;
        /* Every dim in [1, max_dim] and their product too (a zero dim, zero elements: the slow path), */
        /* checked as it grows so that it cannot overflow; the dims past ndim zero. */
        uint64_t elements = 1;
        for (unsigned j = 0; j < SHMRT_MAX_NDIM; j++) {
            uint64_t dim = get_u64(d + D_DIMS + 8 * j);
            o[4 + j] = dim;
            if (j >= ndim) {
                if (dim) return SHMRT_E_SLOW;
                continue;
            }
            if (dim == 0 || dim > c->max_dim || elements > c->max_dim / dim) return SHMRT_E_SLOW;
            elements *= dim;
        }
        /* elements <= max_dim (2^40) and itemsize <= 255: the product cannot overflow */
        if (nbytes != elements * itemsize || offset % c->align || !in_bounds(capacity, offset, nbytes))
            return SHMRT_E_SLOW;
        o[0] = offset;
        o[1] = nbytes;
        o[2] = code;
        o[3] = ndim;
    }
    return SHMRT_OK;
}

int shmrt_bell_take_record(shmrt_bell *bell, uint64_t expect_seq, uint32_t expect_method, uint64_t *out) {
    uint64_t seq, length;
    int rc = shmrt_bell_take(bell->base, bell->base_len, bell->seq_off, bell->seen, bell->slot_off, bell->slot_cap,
                             &seq, &length, bell->record, bell->record_cap);
    if (rc != SHMRT_OK) return rc;
    bell->taken_seq = seq;
    bell->taken_length = length;
    if (seq == bell->seen) return SHMRT_E_NONE;
    if (seq != expect_seq || length > bell->record_cap || length > bell->slot_cap - 8) return SHMRT_E_SLOW;
    bell->seen = seq;
    return shmrt_record_check(bell->codec, bell->record, length, bell->token, expect_seq, expect_method,
                              bell->capacity, out);
}

int shmrt_bell_await_record(shmrt_bell *bell, uint64_t expect_seq, uint32_t expect_method, const shmrt_backoff *b,
                            uint64_t waited_ns, uint64_t budget_ns, uint64_t *out) {
    if (!in_bounds(bell->base_len, bell->seq_off, 8)) return SHMRT_E_BOUNDS;
    uint64_t word = (uint64_t)(uintptr_t)(bell->base + bell->seq_off);
    uint64_t seen = bell->seen;
    int rc = shmrt_wait_any(&word, &seen, 1, -1, b, waited_ns, budget_ns);
    if (rc < 0) return rc;
    return shmrt_bell_take_record(bell, expect_seq, expect_method, out);
}

int shmrt_set_timer_slack(uint64_t ns) {
    return prctl(PR_SET_TIMERSLACK, (unsigned long)ns, 0, 0, 0) == 0 ? SHMRT_OK : SHMRT_E_SYS;
}

/* ---- fault guard (see the header): a truncated ring ends the process with one line, not a core */

#include <signal.h>
#include <unistd.h>

typedef struct {
    _Atomic int live;                      /* 1 once every field below is written */
    uintptr_t addr;
    uint64_t len;
    char path[SHMRT_FAULT_PATH_MAX];
    char line[SHMRT_FAULT_LINE_MAX];
    uint64_t line_len;
} fault_slot;

static fault_slot slots[SHMRT_FAULT_SLOTS];
static struct sigaction previous;
static _Atomic int installed;
static _Atomic int ending;  /* a thread's fault is ending the process */

static void write_all(const char *buf, uint64_t n) {
    while (n > 0) {
        ssize_t w = write(2, buf, (size_t)n);
        if (w <= 0) return;  /* EINTR cannot matter here: we are about to exit anyway */
        buf += w;
        n -= (uint64_t)w;
    }
}

static void on_sigbus(int sig, siginfo_t *info, void *ucontext) {
    /* si_code > 0: raised by the kernel for a memory access, so si_addr is the faulting address.
     * (kill -BUS from another process has si_code <= 0 and no meaningful address.) */
    if (info != NULL && info->si_code > 0) {
        uintptr_t at = (uintptr_t)info->si_addr;
        for (int i = 0; i < SHMRT_FAULT_SLOTS; i++) {
            fault_slot *s = &slots[i];
            if (atomic_load_explicit(&s->live, memory_order_acquire) && at - s->addr < s->len) {
                /* Several threads may fault on the shrunk segment at once (torch's intra-op threads
                 * reading one view): the first writes the one line, unlinks and exits; the others wait
                 * here for that _exit, which ends them too. */
                if (atomic_exchange_explicit(&ending, 1, memory_order_acq_rel))
                    for (;;) pause();
                write_all(s->line, s->line_len);
                for (int j = 0; j < SHMRT_FAULT_SLOTS; j++) {
                    if (atomic_load_explicit(&slots[j].live, memory_order_acquire) && slots[j].path[0])
                        unlink(slots[j].path);
                }
                _exit(2);
            }
        }
    }
    /* Not a guarded mapping: whatever was there before us decides. */
    if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction != NULL) {
        previous.sa_sigaction(sig, info, ucontext);
        return;
    }
    if (!(previous.sa_flags & SA_SIGINFO) && previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* Default action: reset, then let the faulting instruction run again (or re-raise a sent signal). */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, NULL);
    if (info == NULL || info->si_code <= 0) raise(SIGBUS);
}

int shmrt_fault_install(void) {
    int expected = 0;
    if (!atomic_compare_exchange_strong(&installed, &expected, 1)) return SHMRT_OK;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) != 0) {
        atomic_store(&installed, 0);
        return SHMRT_E_SYS;
    }
    return SHMRT_OK;
}

int shmrt_fault_register(const uint8_t *addr, uint64_t len, const char *path, const char *line, uint64_t line_len) {
    size_t path_len = strlen(path);
    if (path_len >= SHMRT_FAULT_PATH_MAX || line_len > SHMRT_FAULT_LINE_MAX) return SHMRT_E_BOUNDS;
    /* Registration happens on one thread (the client's); the handler only reads live slots. */
    for (int i = 0; i < SHMRT_FAULT_SLOTS; i++) {
        fault_slot *s = &slots[i];
        if (atomic_load_explicit(&s->live, memory_order_acquire)) continue;
        s->addr = (uintptr_t)addr;
        s->len = len;
        memcpy(s->path, path, path_len + 1);
        memcpy(s->line, line, (size_t)line_len);
        s->line_len = line_len;
        atomic_store_explicit(&s->live, 1, memory_order_release);
        return i;
    }
    return SHMRT_E_FULL;
}

void shmrt_fault_unregister(int slot) {
    if (slot >= 0 && slot < SHMRT_FAULT_SLOTS)
        atomic_store_explicit(&slots[slot].live, 0, memory_order_release);
}
