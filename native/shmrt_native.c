#define _POSIX_C_SOURCE 200809L
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

int shmrt_copy_in(uint8_t *dst, uint64_t dst_len, uint64_t dst_off,
                  const uint8_t *src, uint64_t n, shmrt_span *span) {
    if (!in_bounds(dst_len, dst_off, n)) return SHMRT_E_BOUNDS;
    span->start_ns = shmrt_now_ns();
    memcpy(dst + dst_off, src, (size_t)n);
    span->end_ns = shmrt_now_ns();
    return SHMRT_OK;
}

int shmrt_copy_out(uint8_t *dst, const uint8_t *src, uint64_t src_len, uint64_t src_off,
                   uint64_t n, shmrt_span *span) {
    if (!in_bounds(src_len, src_off, n)) return SHMRT_E_BOUNDS;
    span->start_ns = shmrt_now_ns();
    memcpy(dst, src + src_off, (size_t)n);
    span->end_ns = shmrt_now_ns();
    return SHMRT_OK;
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
