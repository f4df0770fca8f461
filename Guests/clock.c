/* clock.c - time devices steering control flow.
 * Why: PIT counter latches and RTC registers are nondeterministic inputs; every value read
 * here decides how long a loop runs or which branch is taken, and is folded into the digest.
 * A replay that returns one value differently diverges visibly.  Bounded: a 1 kHz PIT tick
 * deadline caps the RTC wait at 1.5 s, so the guest ends within ~2 s. */
#include "lk.h"

static uint64_t d = FNV_OFFSET;
static void fold(uint64_t v) { d = lk_mix(d, v); }

#define DIV_1KHZ ((PIT_HZ + 500) / 1000)    /* 1193 */

void kmain(void) {
    kprintf("clock: PIT latches and RTC reads steer control flow\n");
    tick_start(1000, NULL);
    sti();

    /* 1. Busy-wait until the ch0 counter (mode 2, counting down from 1193) crosses below a
     *    threshold 10 times; the number of polls depends on each value read. */
    uint64_t polls = 0;
    for (int n = 0; n < 10; n++) {
        uint16_t thr = (uint16_t)(DIV_1KHZ / 4 + n * 50), prev = pit_read0(), cur;
        fold(prev);
        for (;;) {
            cur = pit_read0();
            fold(cur);
            polls++;
            if (prev >= thr && cur < thr) break;        /* crossed downwards */
            if (lk_ticks > 1000) break;                 /* safety bound */
            prev = cur;
        }
    }
    kprintf("pit: 10 threshold crossings after %lu polls, ticks=%lu\n", polls, lk_ticks);
    fold(polls);

    /* 2. Channel 2 (gated via port 0x61): branch on the low bits of what we read. */
    pit_ch2_start(0xFFFF);
    uint64_t odd = 0;
    for (int i = 0; i < 8; i++) {
        uint16_t c = pit_read2();
        fold(c);
        if (c & 1) { odd++; fold(inb(0x61)); }
    }
    kprintf("pit ch2: %lu odd reads\n", odd);

    /* 3. RTC date/time; seconds parity picks a branch. */
    struct rtc_time t;
    rtc_read(&t);
    fold(t.sec); fold(t.min); fold(t.hour); fold(t.day); fold(t.mon); fold(t.year); fold(t.regb);
    kprintf("rtc: 20%02u-%02u-%02u %02u:%02u:%02u (regB=%02x, %s, %s)\n", t.year, t.mon, t.day,
            t.hour, t.min, t.sec, t.regb, (t.regb & 4) ? "binary" : "BCD",
            (t.regb & 2) ? "24h" : "12h");
    if (t.sec & 1) fold(rtc_reg(0x0A));
    else fold(pit_read0());

    /* 4. Wait for the seconds to change, UIP protocol: only read the time registers while
     *    UIP (reg A bit 7) is clear.  Poll once per tick (hlt in between) to keep the number
     *    of logged reads small; the deadline is 1500 ticks. */
    uint64_t start = lk_ticks, waits = 0;
    uint8_t s0 = t.sec, s = s0;
    int changed = 0;
    cli();
    while (lk_ticks - start < 1500) {
        sti_hlt();
        cli();
        waits++;
        uint8_t a = rtc_reg(0x0A);
        fold(a);
        if (a & 0x80) continue;                         /* update in progress */
        rtc_read(&t);
        fold(t.sec);
        s = t.sec;
        if (s != s0) { changed = 1; break; }
    }
    fold(waits);
    kprintf("rtc: seconds %u -> %u after %lu ticks (%s)\n", s0, s, waits,
            changed ? "changed" : "deadline");
    fold(changed);
    kprintf("ticks=%lu\n", lk_ticks);
    lk_result_hex("clock", d, 0);
}
