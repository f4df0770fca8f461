/* kern.c - ring-0 side of the SDK: boot entry from pvh.S, trap dispatch, syscalls, and the
 * PIC / PIT / RTC drivers.
 * Why: every guest needs the same few devices and a ring-3 task with a syscall path.  All of
 * this runs emulated under PVM (~1.4 us/instr, ~6 us/port access), so paths are short and
 * nothing loops over memory. */
#include "lk.h"

struct hvm_start_info *lk_start_info;
volatile uint64_t lk_ticks;
static lk_irq_fn irq_fns[16];
static lk_irq_fn tick_hook;
/* 64 KiB ring-3 stack in .bss (zeroed by the loader, see docs/guests.md). */
uint8_t lk_user_stack[65536] __attribute__((aligned(16)));

extern void lk_user_return(uint64_t status) LK_NORETURN;

LK_NORETURN void debug_exit(uint8_t v) {
    outb(0xF4, v);
    for (;;) __asm__ volatile("cli; hlt");   /* no debug-exit device: park the vCPU */
}

/* Called from pvh.S in 64-bit mode, IF=0, on the boot stack. */
void lk_start(struct hvm_start_info *si) {
    lk_start_info = si;
    pic_init();
    serial_init(0);
    kmain();
    kprintf("kmain returned without a RESULT\n");
    debug_exit(4);
}

LK_NORETURN void lk_result_hex(const char *name, uint64_t digest, uint8_t status) {
    kprintf("RESULT %s %016lx\n", name, digest);
    debug_exit(status);
}

LK_NORETURN void lk_result_ok(const char *name) {
    kprintf("RESULT %s ok\n", name);
    debug_exit(0);
}

/* ---------------- 8259A PIC ---------------- */
static uint8_t pic_masks[2] = { 0xFF, 0xFF };

void pic_init(void) {
    outb(0x20, 0x11); outb(0xA0, 0x11);     /* ICW1: edge, cascade, ICW4 needed */
    outb(0x21, 0x20); outb(0xA1, 0x28);     /* ICW2: vector bases */
    outb(0x21, 0x04); outb(0xA1, 0x02);     /* ICW3: slave on IRQ2 / cascade identity 2 */
    outb(0x21, 0x01); outb(0xA1, 0x01);     /* ICW4: 8086 mode, normal EOI */
    pic_masks[0] = 0xFB;                    /* everything masked except the cascade line */
    pic_masks[1] = 0xFF;
    outb(0x21, pic_masks[0]); outb(0xA1, pic_masks[1]);
}

void pic_unmask(int irq) {
    int i = irq >> 3;
    pic_masks[i] &= (uint8_t)~(1u << (irq & 7));
    outb(i ? 0xA1 : 0x21, pic_masks[i]);
}

void pic_mask(int irq) {
    int i = irq >> 3;
    pic_masks[i] |= (uint8_t)(1u << (irq & 7));
    outb(i ? 0xA1 : 0x21, pic_masks[i]);
}

void pic_eoi(int irq) {
    if (irq >= 8) outb(0xA0, 0x20);
    outb(0x20, 0x20);
}

/* ---------------- 8254 PIT ---------------- */
void pit_init(uint32_t hz, int mode) {
    uint32_t div = (PIT_HZ + hz / 2) / hz;
    if (div > 65535) div = 0;               /* 0 means 65536 */
    outb(0x43, (uint8_t)(0x30 | ((mode & 7) << 1)));   /* ch0, lo/hi, mode, binary */
    outb(0x40, (uint8_t)div);
    outb(0x40, (uint8_t)(div >> 8));
}

uint16_t pit_read0(void) {
    outb(0x43, 0x00);                       /* counter latch, channel 0 */
    uint8_t lo = inb(0x40);
    return (uint16_t)(lo | (inb(0x40) << 8));
}

void pit_ch2_start(uint16_t count) {
    outb(0x61, (uint8_t)((inb(0x61) & ~0x02) | 0x01));  /* gate 2 on, speaker data off */
    outb(0x43, 0xB4);                       /* ch2, lo/hi, mode 2, binary */
    outb(0x42, (uint8_t)count);
    outb(0x42, (uint8_t)(count >> 8));
}

uint16_t pit_read2(void) {
    outb(0x43, 0x80);                       /* counter latch, channel 2 */
    uint8_t lo = inb(0x42);
    return (uint16_t)(lo | (inb(0x42) << 8));
}

static void tick_irq(struct lk_frame *f) {
    lk_ticks++;
    if (tick_hook) tick_hook(f);
}

void tick_start(uint32_t hz, lk_irq_fn hook) {
    tick_hook = hook;
    pit_init(hz, 2);
    irq_set(0, tick_irq);
    pic_unmask(0);
}

/* ---------------- MC146818 RTC ---------------- */
uint8_t rtc_reg(uint8_t reg) {
    outb(0x70, reg);
    return inb(0x71);
}

static uint8_t bcd(uint8_t v) { return (uint8_t)((v & 0x0F) + (v >> 4) * 10); }

void rtc_read(struct rtc_time *t) {
    /* UIP set means an update is within 244 us: wait for it to clear (bounded). */
    for (int spin = 0; spin < 100000 && (rtc_reg(0x0A) & 0x80); spin++) { }
    t->sec = rtc_reg(0x00); t->min = rtc_reg(0x02); t->hour = rtc_reg(0x04);
    t->day = rtc_reg(0x07); t->mon = rtc_reg(0x08); t->year = rtc_reg(0x09);
    t->regb = rtc_reg(0x0B);
    uint8_t pm = t->hour & 0x80;
    t->hour &= 0x7F;
    if (!(t->regb & 0x04)) {                /* DM=0: BCD */
        t->sec = bcd(t->sec); t->min = bcd(t->min); t->hour = bcd(t->hour);
        t->day = bcd(t->day); t->mon = bcd(t->mon); t->year = bcd(t->year);
    }
    if (!(t->regb & 0x02))                  /* 12-hour mode: 12 AM = 0, 12 PM = 12 */
        t->hour = (uint8_t)(t->hour % 12 + (pm ? 12 : 0));
}

/* ---------------- traps ---------------- */
void irq_set(int irq, lk_irq_fn fn) { irq_fns[irq & 15] = fn; }

static uint64_t do_syscall(struct lk_frame *f) {
    switch (f->rax) {
    case SYS_WRITE: serial_write((const char *)f->rdi, f->rsi); return f->rsi;
    case SYS_EXIT: lk_user_return(f->rdi);
    case SYS_TICKS: return lk_ticks;
    case SYS_DEBUG_EXIT: debug_exit((uint8_t)f->rdi);
    default: return (uint64_t)-1;
    }
}

/* Called by trap_common (pvh.S) with IF=0 for every vector. */
void lk_trap(struct lk_frame *f) {
    uint64_t v = f->vector;
    if (v - 0x20 < 16) {
        int irq = (int)(v - 0x20);
        if ((irq & 7) == 7) {               /* spurious IRQ7/15: ISR bit clear -> no EOI */
            uint16_t base = irq == 7 ? 0x20 : 0xA0;
            outb(base, 0x0B);
            if (!(inb(base) & 0x80)) { if (irq == 15) outb(0x20, 0x20); return; }
        }
        lk_irq_fn fn = irq_fns[irq];
        if (fn) fn(f);
        pic_eoi(irq);
        return;
    }
    if (v == LK_SYSCALL_VECTOR) { f->rax = do_syscall(f); return; }
    /* PVM runs ring 3 natively and raises #UD for any `int n` there (SYSCALL does not reach
     * CPL 0 either), so a #UD on the `int $0x81` bytes (CD 81) is that same syscall. */
    if (v == 6 && frame_from_user(f) && *(const volatile uint8_t *)f->rip == 0xCD &&
        *(const volatile uint8_t *)(f->rip + 1) == LK_SYSCALL_VECTOR) {
        f->rip += 2;
        f->rax = do_syscall(f);
        return;
    }
    uint64_t cr2 = 0;
    if (v == 14) __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    kprintf("EXCEPTION vector=%lu error=%lx rip=%lx cs=%lx rsp=%lx cr2=%lx%s\n", v, f->error,
            f->rip, f->cs, f->rsp, cr2, frame_from_user(f) ? " (ring 3)" : "");
    debug_exit(3);
}
