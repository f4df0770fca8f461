/* lk.h - Lockstep guest SDK: the whole API test guests use.
 * Why: guests must be tiny, freestanding and deterministic so the VMM can record/replay them
 * and compare a digest.  Ring-0 code is emulated under PVM (~1.4 us/instr), so helpers here
 * favour few instructions; measured compute runs in ring 3 (lk_user_run) and talks to the
 * kernel through int $0x81.  See docs/guests.md. */
#ifndef LK_H
#define LK_H

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef long int64_t;
typedef unsigned long size_t;
typedef __builtin_va_list va_list;
#define va_start __builtin_va_start
#define va_end __builtin_va_end
#define va_arg __builtin_va_arg

#define NULL ((void *)0)
#define LK_NORETURN __attribute__((noreturn))

/* ---------- PVH start info (Xen public/arch-x86/hvm/start_info.h, version 1) ---------- */
#define HVM_START_MAGIC 0x336ec578u
struct hvm_memmap_entry { uint64_t addr, size; uint32_t type, reserved; };
struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr;
    uint64_t memmap_paddr;      /* version >= 1 */
    uint32_t memmap_entries, reserved;
};
extern struct hvm_start_info *lk_start_info;

/* Every guest defines this; called in ring 0 with IF=0 after serial + PIC init. */
void kmain(void);

/* ---------- port I/O (ring 0 only: faults in ring 3 even with IOPL 3 under PVM) ---------- */
static inline void outb(uint16_t p, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(p)); }
static inline uint8_t inb(uint16_t p) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
/* sti;hlt back to back: the interrupt shadow guarantees no wakeup is lost between them. */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

LK_NORETURN void debug_exit(uint8_t v);   /* write v to isa-debug-exit (0xF4) */

/* ---------- serial (16550 COM1 0x3F8, IRQ 4) ---------- */
#define COM1 0x3F8
void serial_init(int rx_irq);            /* 115200 8N1, FIFO on; rx_irq: IER bit 0 + IRQ4 handler */
void serial_putc(char c);                /* polled: waits for LSR.THRE; no CR added */
void serial_write(const char *s, size_t n);
void serial_puts(const char *s);
int serial_getc(void);                   /* from the IRQ-fed RX ring; -1 if empty */
int serial_rx_ready(void);               /* the RX ring holds a byte (memory only: ring 3 may ask) */
void serial_rx_poll(void);               /* FIFO -> ring while room; call with IF=0 before sleeping */

/* ---------- formatting: %s %c %d %u %x %ld %lu %lx, width + '0' pad (e.g. %016lx) ---------- */
size_t lk_vformat(char *buf, size_t cap, const char *fmt, va_list ap);
size_t lk_format(char *buf, size_t cap, const char *fmt, ...);
void kprintf(const char *fmt, ...);      /* ring 0: straight to the UART */
void uprintf(const char *fmt, ...);      /* ring 3: formats, then SYS_WRITE */

/* ---------- PIC 8259A pair: IRQ0-7 -> 0x20-0x27, IRQ8-15 -> 0x28-0x2F ---------- */
void pic_init(void);                     /* all lines masked afterwards */
void pic_unmask(int irq);
void pic_mask(int irq);
void pic_eoi(int irq);

/* ---------- PIT 8254 (1.193182 MHz) ---------- */
#define PIT_HZ 1193182u
void pit_init(uint32_t hz, int mode);    /* channel 0, lo/hi, mode 2 or 3 */
uint16_t pit_read0(void);                /* latch + read channel 0 counter */
void pit_ch2_start(uint16_t count);      /* gate on via 0x61 (speaker off), mode 2 */
uint16_t pit_read2(void);

/* ---------- RTC MC146818 (0x70/0x71, IRQ 8) ---------- */
struct rtc_time { uint8_t sec, min, hour, day, mon, year, regb; };
uint8_t rtc_reg(uint8_t reg);
void rtc_read(struct rtc_time *t);       /* waits for UIP clear; decodes BCD/binary and 12/24h */

/* ---------- interrupts ---------- */
struct lk_frame {                        /* layout pushed by pvh.S trap_common + the CPU */
    uint64_t r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
    uint64_t vector, error;
    uint64_t rip, cs, rflags, rsp, ss;
};
typedef void (*lk_irq_fn)(struct lk_frame *f);
void irq_set(int irq, lk_irq_fn fn);     /* handler runs with IF=0, then the SDK sends EOI */
static inline int frame_from_user(const struct lk_frame *f) { return (f->cs & 3) == 3; }

/* ---------- PIT tick helper: IRQ0 counts lk_ticks; optional hook runs inside the IRQ ---------- */
extern volatile uint64_t lk_ticks;
void tick_start(uint32_t hz, lk_irq_fn hook);   /* pit_init + irq_set(0) + unmask */

/* ---------- ring 3 ---------- */
#define LK_SYSCALL_VECTOR 0x81 /* int $0x81; see kern.c for PVM */
#define SYS_WRITE 0   /* (buf, len) -> len */
#define SYS_EXIT  1   /* (status): lk_user_run returns status (IF=0) */
#define SYS_TICKS 2   /* () -> lk_ticks */
#define SYS_DEBUG_EXIT 3 /* (v): ends the whole run with status v */
uint64_t lk_user_run(void (*fn)(uint64_t), uint64_t arg, void *stack_top);
extern uint8_t lk_user_stack[];          /* 64 KiB default user stack */
#define LK_USER_STACK_TOP ((void *)(lk_user_stack + 65536))

static inline uint64_t syscall3(uint64_t n, uint64_t a, uint64_t b, uint64_t c) {
    uint64_t r;
    __asm__ volatile("int $0x81" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "memory");
    return r;
}
static inline void sys_write(const char *s, size_t n) { syscall3(SYS_WRITE, (uint64_t)s, n, 0); }
static inline LK_NORETURN void sys_exit(uint64_t st) { syscall3(SYS_EXIT, st, 0, 0); __builtin_unreachable(); }
static inline uint64_t sys_ticks(void) { return syscall3(SYS_TICKS, 0, 0, 0); }

/* ---------- hashing (FNV-1a 64) ---------- */
#define FNV_OFFSET 0xcbf29ce484222325ul
#define FNV_PRIME 0x100000001b3ul
uint64_t fnv1a(uint64_t h, const void *p, size_t n);   /* byte-wise FNV-1a */
/* Word-wise fold, 2 instructions: used in ring-0 IRQ handlers where bytes cost 1.4 us each. */
static inline uint64_t lk_mix(uint64_t h, uint64_t v) { return (h ^ v) * FNV_PRIME; }

/* ---------- tiny libc (gcc may emit calls to these) ---------- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* Print the one machine-readable line and end the run. */
LK_NORETURN void lk_result_hex(const char *name, uint64_t digest, uint8_t status);
LK_NORETURN void lk_result_ok(const char *name);

#endif
