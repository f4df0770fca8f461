/* echo.c - interrupt-driven, idempotent request/reply service on COM1.
 * Why: the failover test drives this from outside.  A client retries after a failover, so a
 * request whose seq was already answered must get the byte-identical cached reply, never a
 * second different one.  RX is IRQ4-driven (FIFO on, trigger 1) and the vCPU sleeps in
 * sti;hlt while idle, with a 100 Hz PIT tick running to exercise interrupts while idle.
 *
 * Protocol (one line each, '\n' terminated, '\r' ignored):
 *   PING              -> PONG
 *   REQ <seq> <text>  -> REP <seq> <n> <hash16>
 *        n = distinct requests processed so far (this one included);
 *        hash16 = FNV-1a 64 chained over every distinct request line ("REQ <seq> <text>"
 *        followed by '\n'), printed as 16 hex digits.
 *        A seq found among the last 256 distinct requests gets its cached reply resent.
 *   PROMPT            -> "> " (no newline: a prompt, which leaves when the guest goes idle)
 *   QUIT              -> RESULT echo <hash16>, exit 0
 *   anything else     -> ERR <reason>
 * Built three times: echo (TICK_HZ 100); echo-tickless (TICK_HZ 0), which sleeps in HLT until a byte
 * arrives, with nothing else to wake it: a primary must still seed a new secondary then; and
 * echo-state (STATE_MIB 48), a service with a large, mostly still memory (a cache, a database):
 * at boot ring 3 fills 48 MiB at 32 MiB physical (needs -m 96), and each distinct request then
 * rewrites one word of it.  Its written memory is large and its write rate small: a re-seed of a
 * secondary that kept its RAM (a delta seed) sends what differs, not the 48 MiB.  echo-state-large
 * (STATE_MIB 96, STATE_WAIT, -m 160) is the same with 96 MiB, and after the fill it spins in ring 3
 * until the first byte arrives: the kick that delivers it writes the first sync point, which carries
 * all 96 MiB, more than one 64 MiB frame could (it crosses the FT link in 256 KiB parts). */
#include "lk.h"

#ifndef TICK_HZ
#define TICK_HZ 100
#endif
#ifndef STATE_MIB
#define STATE_MIB 0
#endif
#ifndef STATE_WAIT
#define STATE_WAIT 0
#endif
#define STATE_BASE 0x2000000ul
#define STATE_WORDS ((uint64_t)STATE_MIB << 17)

#if STATE_MIB
/* Ring 3: the initial state, a function of the index alone (both sides of a pair fill the same). */
static void fill_state(uint64_t seed) {
    volatile uint64_t *m = (volatile uint64_t *)STATE_BASE;
    for (uint64_t i = 0; i < STATE_WORDS; i++) m[i] = lk_mix(seed, i);
    sys_exit(0);
}
#endif
#if STATE_WAIT
/* Ring 3, after the fill, with RX interrupts on: spin until a byte arrives. Nothing exits meanwhile, so
 * the interrupt that brings it needs a kick, and that kick's sync point carries every page filled. */
static void wait_rx(uint64_t unused) {
    (void)unused;
    while (!serial_rx_ready()) barrier();
    sys_exit(0);
}
#endif

#define MAXLINE 200
#define CACHE 256
#define REPLY_MAX 64

struct cached { uint64_t seq; uint8_t len; char text[REPLY_MAX]; };
static struct cached cache[CACHE];          /* ring in insertion order */
static uint64_t cache_count;                /* distinct requests == n */
static uint64_t max_seq;
static uint64_t hash = FNV_OFFSET;

static char line[MAXLINE + 1];
static size_t len;
static int overflow;

static void reply(const char *s, size_t n) { serial_write(s, n); }

static const struct cached *lookup(uint64_t seq) {
    if (cache_count == 0 || seq > max_seq) return NULL;    /* fast path: certainly new */
    uint64_t n = cache_count < CACHE ? cache_count : CACHE;
    for (uint64_t i = 0; i < n; i++) {
        const struct cached *c = &cache[(cache_count - 1 - i) % CACHE];   /* newest first */
        if (c->seq == seq) return c;
    }
    return NULL;
}

static void handle_req(const char *p, size_t n) {
    /* p points after "REQ ", n bytes remain */
    uint64_t seq = 0; size_t i = 0;
    while (i < n && p[i] >= '0' && p[i] <= '9' && i < 19) seq = seq * 10 + (uint64_t)(p[i++] - '0');
    if (i == 0 || (i < n && p[i] != ' ')) { reply("ERR bad-seq\n", 12); return; }
    const struct cached *c = lookup(seq);
    if (c) { reply(c->text, c->len); return; }             /* retry: identical answer */
    hash = fnv1a(fnv1a(hash, line, len), "\n", 1);
#if STATE_MIB
    ((volatile uint64_t *)STATE_BASE)[seq % STATE_WORDS] ^= hash;
#endif
    struct cached *e = &cache[cache_count % CACHE];
    cache_count++;
    if (seq > max_seq) max_seq = seq;
    e->seq = seq;
    e->len = (uint8_t)lk_format(e->text, REPLY_MAX, "REP %lu %lu %016lx\n", seq, cache_count, hash);
    reply(e->text, e->len);
}

static int starts(const char *pfx) {
    size_t k = strlen(pfx);
    return len >= k && memcmp(line, pfx, k) == 0;
}

static void handle_line(void) {
    if (len == 4 && starts("PING")) { reply("PONG\n", 5); return; }
    if (len == 6 && starts("PROMPT")) { reply("> ", 2); return; }
    if (len == 4 && starts("QUIT")) {
        kprintf("echo: %lu distinct requests, ticks=%lu\n", cache_count, lk_ticks);
        lk_result_hex("echo", hash, 0);
    }
    if (starts("REQ ")) { handle_req(line + 4, len - 4); return; }
    if (len == 0) return;
    reply("ERR unknown\n", 12);
}

void kmain(void) {
    /* The state first, with no interrupt on: nothing a client sends lands in the middle of it. */
#if STATE_MIB
    {
        struct hvm_start_info *si = lk_start_info;
        struct hvm_memmap_entry *e = si ? (struct hvm_memmap_entry *)si->memmap_paddr : 0;
        int ram = 0;
        for (uint32_t i = 0; e && i < si->memmap_entries; i++)
            if (e[i].type == 1 && e[i].addr <= STATE_BASE && e[i].addr + e[i].size >= STATE_BASE + (STATE_WORDS << 3)) ram = 1;
        if (!ram) { kprintf("echo: the state at 32 MiB is not RAM in the memory map (run with -m %lu)\n", 32ul + STATE_MIB + 16); debug_exit(2); }
        lk_user_run(fill_state, FNV_OFFSET, LK_USER_STACK_TOP);
    }
#endif
    serial_init(1);                         /* re-init with the RX interrupt on */
#if STATE_WAIT
    kprintf("READY\n");
    lk_user_run(wait_rx, 0, LK_USER_STACK_TOP);
    if (TICK_HZ) tick_start(TICK_HZ, NULL);
#else
    if (TICK_HZ) tick_start(TICK_HZ, NULL);
    kprintf("READY\n");
#endif
    for (;;) {
        cli();
        int c = serial_getc();
        if (c < 0) {                        /* checked with IF=0: no lost wakeup */
            serial_rx_poll();               /* bytes left in the FIFO when the ring was full */
            c = serial_getc();
            if (c < 0) { sti_hlt(); continue; }
        }
        sti();
        if (c == '\r') continue;
        if (c == '\n') {
            if (overflow) reply("ERR too-long\n", 13);
            else { line[len] = 0; handle_line(); }
            len = 0; overflow = 0;
            continue;
        }
        if (len < MAXLINE) line[len++] = (char)c; else overflow = 1;
    }
}
