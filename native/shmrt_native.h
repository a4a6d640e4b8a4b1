/* shmrt native helper: timed copies into the ring, atomics on its header words, the shared-memory
 * doorbell's waits and records (shmrt_native.c), a ring's producer (shmrt_ring.c), the daemon's planned calls
 * (shmrt_lane.c, host side only), the enclave's calls (shmrt_call.c) and its one-pass rows (shmrt_rows.c).
 *
 * Plain C11, no Python headers. The build script (build_native.py) reads the declarations
 * below (between the CDEF markers) into cffi's cdef(), so this header is the one source of
 * truth for the ABI.
 *
 * Return codes (mapped in shmrt/wire/native.py, nowhere else: errors to exceptions; TIMEOUT, SLOW, NONE, WAIT,
 * TOO_LARGE and TAIL are answers their callers act on: ring.py words the last three, it knows the ring):
 *   SHMRT_OK             0  done
 *   SHMRT_E_BOUNDS      -1  [offset, offset+n) does not lie inside the buffer
 *   SHMRT_E_ALIGN       -2  a header word is not 8-byte aligned
 *   SHMRT_E_FULL        -3  the fault guard's table has no free slot
 *   SHMRT_E_SYS         -4  a system call failed (errno says which)
 *   SHMRT_E_TIMEOUT     -5  a wait's budget ran out with no word changed
 *   SHMRT_E_SLOW        -6  a doorbell record off the fast path: Python's decoder judges it
 *   SHMRT_E_NONE        -7  no new doorbell record was rung
 *   SHMRT_E_WAIT        -8  a ring is full now: its producer waits and tries again
 *   SHMRT_E_TOO_LARGE   -9  a tensor and the rest of its message can never fit the ring
 *   SHMRT_E_TAIL       -10  the consumer's tail word is outside what the producer allows (a scribbled header)
 *   SHMRT_E_RUN        -11  a planned call's launch, wait, run callback or echo copy failed (shmrt_lane.c)
 *
 * Fault guard: a process that maps a ring it created registers the mapping here. If the host
 * shrinks that segment, the next access to a page past the new end raises SIGBUS; the handler
 * (installed once, SA_SIGINFO) sees that si_addr lies in a registered mapping, writes the line
 * registered with it to stderr, unlinks every registered segment and _exit(2)s (once: threads that
 * fault at the same time wait for the first one's exit, so the line is written once). Only
 * async-signal-safe calls are used: write(2), unlink(2) (a POSIX shm name is a file under
 * /dev/shm on Linux, so unlink of that path is shm_unlink without the library call), _exit(2),
 * pause(2), sigaction(2), raise(3). A SIGBUS anywhere else goes to the previous disposition (a chained
 * handler, such as faulthandler's, or the default action).
 */
#ifndef SHMRT_NATIVE_H
#define SHMRT_NATIVE_H
#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
#define SHMRT_OK 0
#define SHMRT_E_BOUNDS -1
#define SHMRT_E_ALIGN -2
#define SHMRT_E_FULL -3
#define SHMRT_E_SYS -4
#define SHMRT_E_TIMEOUT -5
#define SHMRT_FAULT_SLOTS 16
#define SHMRT_FAULT_PATH_MAX 128
#define SHMRT_FAULT_LINE_MAX 1024

uint64_t shmrt_now_ns(void);

/* Copy n bytes from address src into dst[dst_off .. dst_off+n), dst being dst_len bytes long. */
/* Returns the CLOCK_MONOTONIC ns the copy took (>= 0) or SHMRT_E_BOUNDS; native.py checked the tensor at src. */
int64_t shmrt_copy_in(uint8_t *dst, uint64_t dst_len, uint64_t dst_off, uintptr_t src, uint64_t n);

/* Acquire load / release store of a 64-bit word at base+off (base_len bytes mapped). */
int shmrt_load_acquire(const uint8_t *base, uint64_t base_len, uint64_t off, uint64_t *value);
int shmrt_store_release(uint8_t *base, uint64_t base_len, uint64_t off, uint64_t value);

/* ---- the shared-memory doorbell (shmrt/wire/bell.py) */

/* How a waiter backs off, by the time it has waited so far: spin (a pause instruction between */
/* loads) until spin_ns, then sched_yield until yield_ns, then sleep, each sleep a quarter of the */
/* time waited so far (so a late wake-up costs at most ~25% of the wait), within */
/* [sleep_min_ns, sleep_max_ns]. */
typedef struct {
    uint64_t spin_ns;
    uint64_t yield_ns;
    uint64_t sleep_min_ns;
    uint64_t sleep_max_ns;
} shmrt_backoff;

/* Wait until one of n 64-bit words differs from its seen[i], or fd (if >= 0) is readable, or */
/* budget_ns passes. words[i] is the address of an 8-byte-aligned word of a live mapping (the */
/* caller checked it); fd is a ZeroMQ socket's ZMQ_FD (looked at between spins, after each */
/* yield, and slept on in the sleep phase). waited_ns: how long the caller has waited already */
/* (picks the backoff phase to resume in). Returns the index of a changed word (acquire load: */
/* what its writer stored before it is visible), n when fd is readable, or SHMRT_E_TIMEOUT. */
int shmrt_wait_any(const uint64_t *words, const uint64_t *seen, uint32_t n, int fd, const shmrt_backoff *b,
                   uint64_t waited_ns, uint64_t budget_ns);

/* Publish a doorbell record: its length (8 bytes) and n bytes of msg at base+slot_off (slot_cap */
/* bytes there), then release-store seq at base+seq_off, then a full fence, then load the word */
/* at base+flag_off into *flag (the reader's "asleep" flag: a store-fence-load on each side, so */
/* a reader that went to sleep after its last look at seq is always seen here). */
int shmrt_bell_post(uint8_t *base, uint64_t base_len, uint64_t slot_off, uint64_t slot_cap,
                    const char *msg, uint64_t n, uint64_t seq_off, uint64_t seq,
                    uint64_t flag_off, uint64_t *flag);

/* Take a doorbell record in one call: acquire-load the word at base+seq_off into *seq; if it differs */
/* from `seen`, load the record's length (the slot's first word, at base+slot_off) into *length and, */
/* when it fits out_cap (and the slot), copy the record into out. Each shared word is loaded once and */
/* the record copied once; the caller validates *seq, *length and the copy (never the slot again). */
int shmrt_bell_take(const uint8_t *base, uint64_t base_len, uint64_t seq_off, uint64_t seen,
                    uint64_t slot_off, uint64_t slot_cap, uint64_t *seq, uint64_t *length,
                    uint8_t *out, uint64_t out_cap);

/* The reader's side of that handshake: store value at base+store_off, full fence, load the word */
/* at base+load_off into *out. */
int shmrt_store_fence_load(uint8_t *base, uint64_t base_len, uint64_t store_off, uint64_t value,
                           uint64_t load_off, uint64_t *out);

/* ---- doorbell records in C (the fast path; shmrt/wire/protocol.py documents the layout and fills */
/* shmrt_codec from its constants, bell.py drives these). A record the fast path accepts is fully */
/* validated here; one it does not (an Error, a control message, a zero-sized tensor, anything */
/* malformed) is SHMRT_E_SLOW: Python's decoder judges the private copy, names what is wrong, or accepts */
/* the rare legal case. The fast path accepts a strict subset of what protocol.decode accepts. */
#define SHMRT_E_SLOW -6
#define SHMRT_E_NONE -7
#define SHMRT_HEADER_BYTES 72
#define SHMRT_DESC_BYTES 72
#define SHMRT_MAX_TENSORS 8
#define SHMRT_MAX_NDIM 6
#define SHMRT_DESC_WORDS 10
#define SHMRT_HEAD_WORDS 10
#define SHMRT_RECORD_WORDS 90

/* What protocol.py says a record may hold. */
typedef struct {
    uint8_t magic[4];
    uint16_t version;
    uint8_t rpc[256];        /* 1 where a method code is a model RPC (the fast path's methods) */
    uint8_t itemsize[256];   /* bytes per element by dtype code; 0: not a dtype */
    uint64_t max_dim;        /* elements of one tensor at most */
    uint64_t align;          /* descriptor offsets are multiples of it */
} shmrt_codec;

/* A record as words: [0..10) method, flags, seq, layer (two's complement), op, pos, ring_end, work_ns, */
/* ntensors, text_len; then per tensor SHMRT_DESC_WORDS: offset, nbytes, dtype code, ndim, 6 dims. */

/* One side of one ring's doorbell, set up once: the slot, the seq word and (posting) the asleep word. */
typedef struct {
    uint8_t *base;
    uint64_t base_len;
    uint64_t seq_off;
    uint64_t slot_off;
    uint64_t slot_cap;
    uint64_t flag_off;        /* writer: the consumer's asleep word */
    const shmrt_codec *codec;
    const uint8_t *token;     /* the session's 16 bytes: written (writer), required (reader) */
    uint64_t capacity;        /* reader: the sender's ring data bytes (offsets are checked against it) */
    uint8_t *record;          /* reader: private memory a record is copied into, record_cap bytes */
    uint64_t record_cap;
    uint64_t seen;            /* reader: the last seq taken */
    uint64_t taken_seq;       /* reader: what the last take loaded (for Python's slow path) */
    uint64_t taken_length;
} shmrt_bell;

/* Encode a record from words (as above; ntensors descriptors follow the header words) with the bell's token */
/* and text into its slot, release-store its seq (words[2]), fence, load the asleep word into *flag. */
/* *length: the record's bytes. SHMRT_E_BOUNDS where it does not fit the slot. */
int shmrt_bell_post_words(const shmrt_bell *bell, const uint64_t *words, const char *text, uint64_t text_len,
                          uint64_t *flag, uint64_t *length);

/* Encode a record from words (as above) with `token` into out (cap bytes): *length its bytes. SHMRT_E_BOUNDS where */
/* it does not fit (or a descriptor's ndim is past SHMRT_MAX_NDIM). */
int shmrt_record_encode(const shmrt_codec *codec, const uint8_t *token, const uint64_t *words, const char *text,
                        uint64_t text_len, uint8_t *out, uint64_t cap, uint64_t *length);

/* Check a record of n bytes (a private copy) on the fast path: the session's token, seq expect_seq, */
/* method expect_method (0: any model RPC), flags 0, every descriptor inside `capacity`. SHMRT_OK with */
/* out (SHMRT_RECORD_WORDS) filled, or SHMRT_E_SLOW. */
int shmrt_record_check(const shmrt_codec *c, const uint8_t *rec, uint64_t n, const uint8_t *token,
                       uint64_t expect_seq, uint32_t expect_method, uint64_t capacity, uint64_t *out);

/* Take the next record if one was rung: SHMRT_E_NONE (the seq word is still `seen`); SHMRT_OK (seq */
/* expect_seq, the record copied and checked: out filled, seen updated); SHMRT_E_SLOW (anything else: */
/* taken_seq, taken_length and, where the length fits, the copy in record tell Python what came; seen is */
/* updated where the seq was expect_seq and the record fit). Each shared word is loaded once. */
int shmrt_bell_take_record(shmrt_bell *bell, uint64_t expect_seq, uint32_t expect_method, uint64_t *out);

/* Wait for the next record as shmrt_wait_any waits (one word, no descriptor), then take it as */
/* shmrt_bell_take_record. SHMRT_E_TIMEOUT when budget_ns passed with nothing rung. */
int shmrt_bell_await_record(shmrt_bell *bell, uint64_t expect_seq, uint32_t expect_method, const shmrt_backoff *b,
                            uint64_t waited_ns, uint64_t budget_ns, uint64_t *out);

/* ---- a ring's producer (shmrt_ring.c; shmrt/wire/ring.py documents positions and laps) */
#define SHMRT_E_WAIT -8        /* the ring is full now: wait for the consumer, then try again */
#define SHMRT_E_TOO_LARGE -9   /* the tensor and the rest of its message can never fit the ring */
#define SHMRT_E_TAIL -10       /* the consumer's tail word lies outside [known_tail, published] */
#define SHMRT_SMALL_ALIGN 64          /* where a reservation starts: a multiple of this, */
#define SHMRT_LARGE_ALIGN 4096        /* or of this from SHMRT_LARGE_TENSOR bytes on (DMA-friendly) */
#define SHMRT_LARGE_TENSOR 1048576

/* The producer's private state; only the tail word at base+tail_off is read from shared memory. */
typedef struct {
    uint8_t *base;            /* the mapping (header page, then the data area); NULL once unmapped */
    uint64_t base_len;
    uint64_t capacity;        /* data bytes */
    uint64_t head_off;        /* the head word (stored at publish) */
    uint64_t tail_off;        /* the consumer's tail word */
    uint64_t starts[2];       /* the lap starts (data offsets) a message that finds the ring empty goes to */
    uint32_t n_starts;        /* 1 or 2 */
    uint32_t next_start;      /* which of them is next */
    uint32_t in_message;      /* a tensor of the message being built was reserved */
    uint64_t laps_until;      /* positions from here on grow by bytes only */
    uint64_t head;            /* bytes ever reserved */
    uint64_t known_tail;      /* the last tail validated */
    uint64_t floor;           /* where the last message that found the ring empty began */
    uint64_t published;       /* head at the last publish */
    uint64_t message_start;   /* where the message being built begins */
    uint64_t seen_tail;       /* the tail word as last loaded (SHMRT_E_TAIL's message) */
    uint64_t released;        /* the position released up to, at the last SHMRT_E_WAIT */
} shmrt_producer;

/* Reserve nbytes for the message being built (its first reservation begins it): returns their data offset (>= 0; */
/* an offset is below the capacity), or SHMRT_E_WAIT (full now: call again later), SHMRT_E_TOO_LARGE, SHMRT_E_TAIL, */
/* or SHMRT_E_BOUNDS (unmapped). */
int64_t shmrt_reserve(shmrt_producer *p, uint64_t nbytes);
/* End the message: release-store head into the head word. */
int shmrt_publish(shmrt_producer *p);

/* ---- a ring's consumer: its private positions (ring.py's Consumer drives it; the daemon's planned calls use it) */
typedef struct {
    uint64_t accepted_end;    /* the end of the last message accepted */
    uint64_t tail;            /* bytes released (the last tail stored) */
    uint64_t outstanding;     /* messages accepted and not released yet */
} shmrt_consumer;

/* Whether a message ending at `end` may be accepted as the consumer's only message out: none is out, and end lies in */
/* [accepted_end, tail + 2 laps of `capacity`] (ring.py's Consumer.accept; anything else is Python's to word). */
int shmrt_consumer_takes_only(const shmrt_consumer *k, uint64_t end, uint64_t capacity);
/* Release the consumer's only message out, ending at `end`, from the mapping [base, base + len): where `poison`, its */
/* n tensors' bytes (descs: n descriptors of SHMRT_DESC_WORDS words, offsets into the data area at data_off) */
/* overwritten with 0xFF first; then accepted_end = tail = end, none out, and tail release-stored into the word at */
/* tail_off. SHMRT_OK, or SHMRT_E_BOUNDS (nothing changed) where a word or a tensor lies outside the mapping. */
int shmrt_consumer_release_only(shmrt_consumer *k, uint8_t *base, uint64_t len, uint64_t data_off, uint64_t tail_off,
                                const uint64_t *descs, uint64_t n, uint32_t poison, uint64_t end);

/* ---- the daemon's planned calls (shmrt_lane.c; shmrt/host/lane.py fills the plans from host/graphs.py's): a */
/* request whose record a plan knows is served in one C call from the take to the reply's post, without Python: */
/* the record taken and checked, its plan found by the record's fixed words, what the record does not fix checked */
/* (the K/V store's counts and buffer generations, an Embedding's id, where the reply lands), the graph launched and */
/* waited for (or, where there is no CUDA, the run callback), the request released, the reply published and rung. */
/* Anything a plan does not answer leaves the record taken and checked for Python (SHMRT_OK), the rings as they were. */
#define SHMRT_LANE_SERVED 1
#define SHMRT_E_RUN -11            /* the launch, the wait, the run callback or an echo's copy failed (run_rc) */
#define SHMRT_KEY_WORDS 84         /* method, layer, op, ntensors, then SHMRT_MAX_TENSORS descriptors' words */
#define SHMRT_PLAN_PLAIN 0         /* nothing but the record to check */
#define SHMRT_PLAN_SCORES 1        /* padded AttentionScores: K and V end at pos, below the width; kept to pos + 1 */
#define SHMRT_PLAN_OUTPUT 2        /* AttentionOutput with P alone: 0 < the cache's rows <= the width */
#define SHMRT_PLAN_EMBEDDING 3     /* a decode step's id, read once from the ring, below the vocabulary */
#define SHMRT_PLAN_ECHO 4          /* the echo daemon's (tests, micro bench): each request tensor copied into the reply's */

typedef struct {
    uint64_t key[SHMRT_KEY_WORDS];
    uint32_t nkey;                 /* words of key in use; 0: a free entry */
    uint32_t kind;
    uint32_t places;               /* reply places known (the response ring's lap starts): 1 or 2 */
    uint64_t reply_nbytes;         /* the reply's one reservation */
    uint64_t reply_offset[2];
    uint64_t reply_words[2][SHMRT_RECORD_WORDS];   /* per place; seq, ring_end and work_ns are set per call */
    void *exec[2];                 /* per place: the CUDA graph to launch; NULL: the run callback with handle */
    uint64_t handle[2];
    uint64_t width;
    int64_t *filled[2];            /* SCORES: the layer's K and V counts; OUTPUT: [0] the cache's */
    const uint64_t *generation[2]; /* the store's buffer generations for those, and what they were at the plan */
    uint64_t expect_generation[2];
    int64_t *word;                 /* SCORES: the position the graph reads; EMBEDDING: the id it looks up */
    uint64_t id_offset;            /* EMBEDDING: the id's data offset in the request ring, its bytes (4 or 8), */
    uint64_t id_bytes;             /* and the vocabulary */
    uint64_t vocab;
} shmrt_plan;

typedef int (*shmrt_launch_fn)(void *exec, void *stream);   /* cudaGraphLaunch */
typedef int (*shmrt_sync_fn)(void *stream);                 /* cudaStreamSynchronize */
typedef int (*shmrt_run_fn)(uint64_t handle);               /* where there is no CUDA: runs the plan's body */

typedef struct {
    shmrt_bell *requests;          /* the request ring's doorbell (its reader; NULL: detached, nothing is served) */
    uint64_t *request_words;       /* the words its takes fill (the checked record Python reads when a plan declines) */
    shmrt_bell *replies;           /* the response ring's doorbell (its writer) */
    shmrt_consumer *consumer;      /* the request ring's consumer state, */
    uint8_t *request_base;         /* its mapping, */
    uint64_t request_len;
    uint64_t request_data;         /* where its data area begins, */
    uint64_t request_tail_off;     /* its tail word, */
    uint32_t poison;               /* whether a released request's bytes are overwritten with 0xFF */
    shmrt_producer *producer;      /* the response ring's producer, and where its data area begins in its mapping */
    uint64_t reply_data;
    shmrt_plan *plans;
    uint32_t n_plans;
    shmrt_launch_fn launch;        /* with CUDA: the runtime's, and the daemon's stream (every run is waited for) */
    shmrt_sync_fn sync;
    void *stream;
    shmrt_run_fn run;              /* an entry without a graph to launch: runs it (a replay, waited for as above) */
    int64_t run_rc;                /* the failing return code of SHMRT_E_RUN */
    uint64_t served;               /* calls served, and of them launched as CUDA graphs */
    uint64_t launched;
} shmrt_lane;

/* Take the request ring's next record and serve it by its plan: SHMRT_LANE_SERVED (the reply rung), SHMRT_OK */
/* (taken and checked, no plan answers it: words hold it, the rings are as they were), SHMRT_E_NONE, SHMRT_E_SLOW */
/* (as shmrt_bell_take_record), SHMRT_E_RUN, or another error of a take or a post. */
int shmrt_lane_serve(shmrt_lane *lane, uint64_t expect_seq);
/* The same for a request whose record came over ZeroMQ (`--doorbell zmq`: rec, n bytes, a private copy): checked as */
/* a take checks it (SHMRT_E_SLOW: not the fast path's, for Python's decoder), served by its plan, and the reply's */
/* record encoded into out (out_cap bytes; *length) for the caller to send: SHMRT_LANE_SERVED, SHMRT_OK (no plan */
/* answers it: the request words hold it checked), SHMRT_E_SLOW, SHMRT_E_RUN, or another error. */
int shmrt_lane_serve_record(shmrt_lane *lane, const uint8_t *rec, uint64_t n, uint64_t expect_seq, uint8_t *out,
                            uint64_t out_cap, uint64_t *length);

/* ---- the enclave's calls (shmrt_call.c; shmrt/wire/shm_transport.py's ShmClient drives it): a call's inputs */
/* reserved and copied into the request ring, the message published, its record encoded and rung, the reply's */
/* record awaited, taken and checked, in one C call. */
#define SHMRT_CALL_ASLEEP 2        /* rung, and the daemon sleeps on ZeroMQ: the caller sends a Wake, then waits */

typedef struct {
    shmrt_producer *producer;      /* the request ring's producer, */
    uint64_t request_data;         /* where its data area begins in the mapping, */
    shmrt_bell *requests;          /* its doorbell (the writer's side) */
    shmrt_bell *replies;           /* the response ring's doorbell (the reader's side), and the words its takes fill */
    uint64_t *reply_words;
    shmrt_backoff backoff;         /* how a call waits: so, or after a wait longer than long_ns so (native.WaitPolicy) */
    shmrt_backoff after_long;
    uint64_t long_ns;
    uint32_t last_wait_long;
    shmrt_consumer *reply_consumer;   /* the response ring's consumer (NULL: Python accepts every reply), where its */
    uint64_t reply_tail_off;          /* tail word and data area lie in the replies' mapping, */
    uint64_t reply_data_off;
    uint32_t poison;                  /* and whether a release overwrites the reply's tensor bytes with 0xFF (tests); */
    uint32_t adopted_count;           /* the end and descriptors of the reply accepted in C (its release; the */
    uint64_t adopted_end;             /* descriptors for that poison) */
    uint64_t adopted_descs[SHMRT_MAX_TENSORS * SHMRT_DESC_WORDS];
} shmrt_caller;

typedef struct {
    uint64_t t_encoded;            /* CLOCK_MONOTONIC ns: the copies done, the record rung, the reply taken */
    uint64_t t_sent;
    uint64_t t_replied;
    uint64_t copy_ns;              /* of it, the copies */
    uint64_t sent_length;          /* the request record's bytes */
    uint64_t same_reply;           /* SHMRT_OK: 1 or 2 where the reply fixes what expect_reply's first or second */
                                   /* record fixed (and has no text), else 0; its ring end */
    uint64_t ring_end;             /* and the daemon's work */
    uint64_t work_ns;
    uint64_t received;             /* the reply record's bytes */
    uint64_t accepted;             /* same_reply where that reply was accepted as the consumer's only message out */
} shmrt_call_times;

/* `words`: the request's record (protocol.to_words' layout) but for seq, pos and ring_end, which this sets; sources[i]: */
/* the address of input i's bytes (words give their count), copied into a reservation whose offset this writes into */
/* the descriptor, or 0 for an input staged in the ring already (its offset given). Then publish, ring, and wait up */
/* to budget_ns for the reply (method words[0], seq `seq`) as shmrt_bell_await_record does, with the caller's */
/* backoff, or its after_long one where the last wait took longer than long_ns. Returns SHMRT_OK (the */
/* reply's record checked into the caller's reply_words; t says whether it is shaped as one of expect_reply's two, */
/* the words of earlier replies (2 * SHMRT_RECORD_WORDS; zeros match nothing), or NULL), SHMRT_E_SLOW (taken, for */
/* Python's decoder), */
/* SHMRT_E_TIMEOUT (rung, nothing back yet: also where the seq word changed and changed back), SHMRT_CALL_ASLEEP */
/* (rung; wake the daemon), SHMRT_E_WAIT, */
/* SHMRT_E_TOO_LARGE or SHMRT_E_TAIL (nothing reserved, written or rung: the producer as it was), or an error. */
int shmrt_call(shmrt_caller *c, uint64_t *words, const uint64_t *sources, uint64_t seq, uint64_t pos,
               const uint64_t *expect_reply, uint64_t budget_ns, shmrt_call_times *t);
/* The wait of shmrt_call alone, for the reply of call `seq` of `method` rung at rung_ns (CLOCK_MONOTONIC): its */
/* answers are shmrt_call's from SHMRT_OK to SHMRT_E_TIMEOUT (t's t_replied, same_reply, ring_end and work_ns set). */
int shmrt_call_await(shmrt_caller *c, uint64_t seq, uint32_t method, const uint64_t *expect_reply, uint64_t rung_ns,
                     uint64_t budget_ns, shmrt_call_times *t);
/* With the ZeroMQ doorbell: shmrt_call's first half, the record encoded into out (out_cap bytes; t's sent_length) */
/* for the caller to send (SHMRT_OK, or what the reservations or the encoder answered); and the reply's record (rec, */
/* n bytes, a private copy: what came over the socket) checked as shmrt_call checks it: SHMRT_OK or SHMRT_E_SLOW. */
int shmrt_call_encode(shmrt_caller *c, uint64_t *words, const uint64_t *sources, uint64_t seq, uint64_t pos,
                      uint8_t *out, uint64_t out_cap, shmrt_call_times *t);
int shmrt_call_check(shmrt_caller *c, const uint8_t *rec, uint64_t n, uint64_t seq, uint32_t method,
                     const uint64_t *expect_reply, shmrt_call_times *t);
/* A reply shaped as expected (same_reply) is accepted here as ring.py's Consumer.accept would accept it where the */
/* consumer has no other message out and its end lies in [accepted_end, tail + 2 laps] (t's accepted: its same_reply; */
/* else 0, Python's to accept or refuse; the consumer's accepted_end is its end then). Its release: SHMRT_OK where it */
/* still is the only message out (its tensors' bytes poisoned where the caller poisons, the tail set to its end and */
/* release-stored), else SHMRT_E_NONE (another message was accepted since: ring.py's Consumer tracks both then, and */
/* releases this one itself). */
int shmrt_call_release(shmrt_caller *c);

/* ---- the enclave's rows (shmrt_rows.c): one decode step's residual and RMSNorm in one pass */

/* h[i] += delta[i] (delta 0: nothing added), then, out not 0, out[i] = (h[i] * weight[i]) * s with */
/* s = 1/sqrt(mean(h^2) + eps) as a float (HF's LlamaRMSNorm of one row, its arithmetic rounded in this order; */
/* the mean taken in double). Each an address of n floats (a tensor's data_ptr, checked by native.py); h and */
/* out may not overlap delta. Returns 1 if every h[i] is finite, else 0 (out is written either way). */
int shmrt_residual_rms_norm(uint64_t h_at, uint64_t delta_at, uint64_t weight_at, uint64_t out_at, uint64_t n,
                            double eps);

/* Timer slack of the calling thread in ns (prctl PR_SET_TIMERSLACK): short sleeps end on time. */
int shmrt_set_timer_slack(uint64_t ns);

/* Install the SIGBUS handler (idempotent). SHMRT_OK or SHMRT_E_SYS. */
int shmrt_fault_install(void);
/* Guard [addr, addr+len): a fault there writes `line` (line_len bytes) to fd 2, unlinks every */
/* guarded `path` ("" for none) and _exit(2)s. Returns the slot (>= 0), SHMRT_E_FULL, or */
/* SHMRT_E_BOUNDS if path or line do not fit the table. */
int shmrt_fault_register(const uint8_t *addr, uint64_t len, const char *path, const char *line, uint64_t line_len);
/* Stop guarding a slot (before its mapping is unmapped). */
void shmrt_fault_unregister(int slot);
/* CDEF-END */

#endif
