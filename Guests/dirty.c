/* dirty.c - ring-3 workload that dirties a 32 MiB region many times under a 1 kHz PIT.
 * Why: exercises dirty-page tracking / memory transfer to the secondary.  The values written
 * mix in lk_ticks (read directly from kernel memory, all pages are U/S), so the final memory
 * contents - and the digest over them - depend on exactly when each tick landed.
 * The region is fixed at 32..64 MiB physical (needs -m 256); RAM starts zeroed. */
#include "lk.h"

#define REGION_BASE 0x2000000ul
#define REGION_SIZE (32ul << 20)
#define WORDS (REGION_SIZE / 8)

static uint64_t irq_digest = FNV_OFFSET;
static uint64_t user_digest;

static void on_tick(struct lk_frame *f) { irq_digest = lk_mix(irq_digest, f->rip); }

/* Ring 3.  Strides are in 8-byte words: sequential, cache line, one word per 4 KiB page,
 * and an odd prime stride that lands all over the region. */
static void task(uint64_t arg) {
    volatile uint64_t *m = (volatile uint64_t *)REGION_BASE;
    static const uint64_t strides[] = { 1, 8, 512, 4099, 3 };
    for (uint64_t p = 0; p < sizeof strides / sizeof strides[0]; p++) {
        uint64_t s = strides[p];
        for (uint64_t off = 0; off < s; off++) {
            uint64_t t = lk_ticks;
            for (uint64_t i = off; i < WORDS; i += s)
                m[i] = lk_mix(m[i] + i, p) ^ t;
        }
        uprintf("pass %lu stride %lu done, ticks=%lu\n", p, s * 8, lk_ticks);
    }
    uint64_t d = arg;
    for (uint64_t i = 0; i < WORDS; i++) d = lk_mix(d, m[i]);
    user_digest = d;
    sys_exit(0);
}

static int region_is_ram(void) {
    struct hvm_start_info *si = lk_start_info;
    if (!si || si->magic != HVM_START_MAGIC || si->version < 1) return 1;   /* trust -m */
    struct hvm_memmap_entry *e = (struct hvm_memmap_entry *)si->memmap_paddr;
    for (uint32_t i = 0; i < si->memmap_entries; i++)
        if (e[i].type == 1 && e[i].addr <= REGION_BASE &&
            e[i].addr + e[i].size >= REGION_BASE + REGION_SIZE) return 1;
    return 0;
}

void kmain(void) {
    kprintf("dirty: 5 passes over 32 MiB at 0x%lx in ring 3, PIT at 1 kHz\n", REGION_BASE);
    if (!region_is_ram()) {
        kprintf("dirty: 32..64 MiB is not RAM in the memory map (run with -m 256)\n");
        debug_exit(2);
    }
    tick_start(1000, on_tick);
    uint64_t st = lk_user_run(task, FNV_OFFSET, LK_USER_STACK_TOP);
    kprintf("ticks=%lu\n", lk_ticks);
    lk_result_hex("dirty", lk_mix(lk_mix(irq_digest, user_digest), lk_ticks), (uint8_t)st);
}
