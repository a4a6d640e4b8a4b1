/* A ring's producer (shmrt/wire/ring.py documents the layout, the positions and the lap rule): one C call reserves
 * a tensor's room, one publishes a message. The state is private memory (shmrt_producer); the only shared word
 * read is the consumer's tail, loaded once per decision and validated against the state before any use. */
#include "shmrt_native.h"

#include <stdatomic.h>
#include <string.h>

static uint64_t align_up(uint64_t value, uint64_t alignment) {
    return (value + alignment - 1) / alignment * alignment;
}

static int word_ok(const shmrt_producer *p, uint64_t off) {
    return p->base != NULL && off <= p->base_len && 8 <= p->base_len - off && (((uintptr_t)(p->base + off)) % 8) == 0;
}

/* The consumer's tail, loaded once: never behind the last one validated, never past what was published (a message
 * being built is not the consumer's to release). */
static int load_tail(shmrt_producer *p, uint64_t *tail) {
    if (!word_ok(p, p->tail_off)) return SHMRT_E_BOUNDS;
    uint64_t t = atomic_load_explicit((const _Atomic uint64_t *)(p->base + p->tail_off), memory_order_acquire);
    p->seen_tail = t;
    if (t < p->known_tail || t > p->published) return SHMRT_E_TAIL;
    p->known_tail = t;
    *tail = t;
    return SHMRT_OK;
}

/* Every byte released: head moves to the next lap start, or to the lap's beginning where the first tensor would not
 * fit between that start and the end (the start stays next then). */
static void to_lap_start(shmrt_producer *p, uint64_t nbytes, uint64_t alignment) {
    uint64_t cap = p->capacity;
    uint64_t target = p->starts[p->next_start];
    if (align_up(target, alignment) + nbytes > cap)
        target = 0;
    else
        p->next_start = (p->next_start + 1) % p->n_starts;
    p->head += (target + cap - p->head % cap) % cap;
    p->floor = p->message_start = p->head;
}

int64_t shmrt_reserve(shmrt_producer *p, uint64_t nbytes) {
    uint64_t cap = p->capacity;
    if (cap == 0 || nbytes > cap || p->n_starts < 1 || p->n_starts > 2) return SHMRT_E_TOO_LARGE;
    uint64_t alignment = nbytes >= SHMRT_LARGE_TENSOR ? SHMRT_LARGE_ALIGN : SHMRT_SMALL_ALIGN;
    uint64_t tail;
    int found_empty = 0;
    if (!p->in_message) {   /* a message's first tensor: an empty ring starts it at a lap start */
        p->in_message = 1;
        p->message_start = p->head;
        if (p->head < p->laps_until) {
            int rc = load_tail(p, &tail);
            if (rc != SHMRT_OK) return rc;
            if (tail == p->head) {
                to_lap_start(p, nbytes, alignment);
                found_empty = 1;
            }
        }
    }
    for (;;) {
        uint64_t lap_offset = p->head % cap, at = align_up(lap_offset, alignment), start;
        if (at + nbytes > cap) {   /* no room before the end: the next lap */
            start = p->head + (cap - lap_offset);
            at = 0;
        } else {
            start = p->head + (at - lap_offset);
        }
        uint64_t end = start + nbytes, released = p->floor;
        if (!found_empty) {   /* (an empty ring's tail was loaded just now) */
            int rc = load_tail(p, &tail);
            if (rc != SHMRT_OK) return rc;
            if (tail > released) released = tail;
        }
        found_empty = 0;
        if (end - released <= cap) {
            p->head = end;
            return (int64_t)at;
        }
        if (released >= p->message_start) {
            /* Nothing but this message is in the ring: waiting cannot make room. Its first tensor, which found the
               ring in use and saw it empty meanwhile, starts over at a lap start. */
            if (p->head == p->message_start && p->floor != p->head && p->head < p->laps_until) {
                to_lap_start(p, nbytes, alignment);
                continue;
            }
            return SHMRT_E_TOO_LARGE;
        }
        p->released = released;
        return SHMRT_E_WAIT;
    }
}

int shmrt_publish(shmrt_producer *p) {
    if (!word_ok(p, p->head_off)) return SHMRT_E_BOUNDS;
    p->in_message = 0;
    p->published = p->head;
    atomic_store_explicit((_Atomic uint64_t *)(p->base + p->head_off), p->head, memory_order_release);
    return SHMRT_OK;
}

/* ---- the consumer's only message out (shmrt_native.h): the daemon's planned calls and the client's known replies */

int shmrt_consumer_takes_only(const shmrt_consumer *k, uint64_t end, uint64_t capacity) {
    return k->outstanding == 0 && end >= k->accepted_end && end - k->tail <= 2 * capacity;
}

int shmrt_consumer_release_only(shmrt_consumer *k, uint8_t *base, uint64_t len, uint64_t data_off, uint64_t tail_off,
                                const uint64_t *descs, uint64_t n, uint32_t poison, uint64_t end) {
    if (tail_off % 8 || len < 8 || tail_off > len - 8 || data_off > len) return SHMRT_E_BOUNDS;
    for (uint64_t i = 0; poison && i < n; i++) {   /* (the descriptors were checked against the capacity) */
        const uint64_t *d = descs + i * SHMRT_DESC_WORDS;
        if (d[0] > len - data_off || d[1] > len - data_off - d[0]) return SHMRT_E_BOUNDS;
    }
    for (uint64_t i = 0; poison && i < n; i++) {
        const uint64_t *d = descs + i * SHMRT_DESC_WORDS;
        memset(base + data_off + d[0], 0xFF, (size_t)d[1]);
    }
    k->accepted_end = k->tail = end;
    k->outstanding = 0;
    atomic_store_explicit((_Atomic uint64_t *)(base + tail_off), end, memory_order_release);
    return SHMRT_OK;
}
