/* hello.c - smallest guest: proves the PVH boot path, serial output and debug-exit work.
 * Also prints what the loader told us in hvm_start_info (informational only). */
#include "lk.h"

void kmain(void) {
    kprintf("hello from a Lockstep guest\n");
    struct hvm_start_info *si = lk_start_info;
    if (si && si->magic == HVM_START_MAGIC) {
        uint64_t ram = 0;
        struct hvm_memmap_entry *e = (struct hvm_memmap_entry *)si->memmap_paddr;
        uint32_t n = si->version >= 1 ? si->memmap_entries : 0;
        for (uint32_t i = 0; i < n && i < 16; i++)
            if (e[i].type == 1) ram += e[i].size;
        kprintf("start_info v%u: %u memmap entries, %lu KiB RAM\n", si->version, n, ram >> 10);
    } else {
        kprintf("start_info missing or bad magic\n");
    }
    lk_result_ok("hello");
}
