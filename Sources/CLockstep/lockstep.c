// SPDX-License-Identifier: Apache-2.0
#define _GNU_SOURCE
#include "CLockstep.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

// Swift reads these structs field by field through the imported headers; pin the sizes it assumes.
_Static_assert(sizeof(struct kvm_regs) == 144, "kvm_regs layout");
_Static_assert(sizeof(struct kvm_sregs) == 312, "kvm_sregs layout");
_Static_assert(sizeof(struct kvm_fpu) == 416, "kvm_fpu layout");
_Static_assert(sizeof(struct kvm_vcpu_events) == 64, "kvm_vcpu_events layout");
_Static_assert(sizeof(struct kvm_debugregs) == 128, "kvm_debugregs layout");
_Static_assert(sizeof(struct kvm_xsave) == 4096, "kvm_xsave layout");
_Static_assert(sizeof(struct kvm_xcrs) == 392, "kvm_xcrs layout");
_Static_assert(sizeof(struct kvm_msr_entry) == 16, "kvm_msr_entry layout");
_Static_assert(sizeof(struct kvm_msrs) == 8, "kvm_msrs header (entries follow at 8)");
_Static_assert(sizeof(struct kvm_cpuid2) == 8, "kvm_cpuid2 header (entries follow at 8)");
_Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2 layout");
_Static_assert(sizeof(struct kvm_userspace_memory_region) == 32, "memory region layout");
_Static_assert(sizeof(struct kvm_clear_dirty_log) == 24, "kvm_clear_dirty_log layout");
_Static_assert(sizeof(struct kvm_enable_cap) == 104, "kvm_enable_cap layout");


static __thread int lk_errno;

long lk_ioctl(int fd, unsigned long request, void *arg) {
    long r = ioctl(fd, request, arg);
    if (r < 0) { lk_errno = errno; return -errno; }
    return r;
}

long lk_ioctl_int(int fd, unsigned long request, unsigned long arg) {
    long r = ioctl(fd, request, arg);
    if (r < 0) { lk_errno = errno; return -errno; }
    return r;
}

int lk_open(const char *path, int flags, int mode) {
    int r = open(path, flags | O_CLOEXEC, mode);
    if (r < 0) { lk_errno = errno; return -errno; }
    return r;
}

void *lk_mmap(void *addr, size_t len, int prot, int flags, int fd, long off) {
    void *p = mmap(addr, len, prot, flags, fd, off);
    if (p == MAP_FAILED) { lk_errno = errno; return NULL; }
    return p;
}

int lk_last_errno(void) { return lk_errno; }

static __thread void *sys_handler;
void *lk_sys_handler(void) { return sys_handler; }
void lk_set_sys_handler(void *handler) { sys_handler = handler; }

static __thread struct kvm_run *kick_run;

static void kick_handler(int signo) {
    (void)signo;
    // Async-signal-safe: one store. KVM_RUN returns -EINTR now, or at once on the next entry.
    if (kick_run) __atomic_store_n(&kick_run->immediate_exit, 1, __ATOMIC_SEQ_CST);
}

int lk_kick_install(int signo) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
    if (sigaction(signo, &sa, NULL) < 0) return -errno;
    return 0;
}

void lk_unblock_signal(int signo) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signo);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

void lk_kick_bind(struct kvm_run *run, int signo) {
    kick_run = run;
    // Threads inherit their creator's signal mask, and thread pools (Dispatch, test runners) block signals:
    // a blocked kick would stay pending and never interrupt KVM_RUN.
    lk_unblock_signal(signo);
}

int lk_kick(unsigned long pthread_id, int signo) { return -pthread_kill((pthread_t)pthread_id, signo); }

unsigned long lk_thread_self(void) { return (unsigned long)pthread_self(); }

// The cores this process may use, as it started. A thread inherits its creator's mask, and the vCPU thread
// pins itself, so threads it starts would otherwise count (and stay on) its one core.
static cpu_set_t lk_allowed;
static int lk_allowed_ok;

__attribute__((constructor)) static void lk_remember_allowed(void) {
    lk_allowed_ok = sched_getaffinity(0, sizeof lk_allowed, &lk_allowed) == 0;
}

int lk_cpu_count(void) { return lk_allowed_ok ? CPU_COUNT(&lk_allowed) : 1; }

int lk_allowed_cpu(int index) {
    if (!lk_allowed_ok) return -1;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
        if (CPU_ISSET(cpu, &lk_allowed) && index-- == 0) return cpu;
    return -1;
}

int lk_pin_current_thread(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    int r = pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    return -r;
}

void lk_set_thread_name(const char *name) { (void)pthread_setname_np(pthread_self(), name); }

int lk_unpin_current_thread(void) {
    if (!lk_allowed_ok) return 0;
    return -pthread_setaffinity_np(pthread_self(), sizeof lk_allowed, &lk_allowed);
}

int lk_set_realtime_priority(int priority) {
    struct sched_param sp = { .sched_priority = priority };
    return -pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
}

uint64_t lk_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t lk_realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int lk_sleep_until(uint64_t deadline_ns) {
    struct timespec ts = { .tv_sec = (time_t)(deadline_ns / 1000000000ull), .tv_nsec = (long)(deadline_ns % 1000000000ull) };
    int r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
    return -r;
}

size_t lk_bitmap_count(const uint64_t *bitmap, size_t nbits) {
    size_t n = 0;
    for (size_t i = 0; i < (nbits + 63) / 64; i++) n += (size_t)__builtin_popcountll(bitmap[i]);
    return n;
}

size_t lk_bitmap_pages(const uint64_t *bitmap, size_t nbits, uint32_t *out, size_t cap) {
    size_t n = 0;
    for (size_t i = 0; i < (nbits + 63) / 64; i++) {
        uint64_t w = bitmap[i];
        while (w) {
            unsigned b = (unsigned)__builtin_ctzll(w);
            w &= w - 1;
            size_t page = i * 64 + b;
            if (page >= nbits) return n;
            if (n == cap) return n;
            out[n++] = (uint32_t)page;
        }
    }
    return n;
}

void lk_gather_pages(const uint8_t *mem, const uint32_t *pages, size_t n, uint8_t *dst) {
    for (size_t i = 0; i < n; i++) memcpy(dst + i * 4096, mem + (size_t)pages[i] * 4096, 4096);
}

void lk_scatter_pages(uint8_t *mem, const uint32_t *pages, size_t n, const uint8_t *src) {
    for (size_t i = 0; i < n; i++) memcpy(mem + (size_t)pages[i] * 4096, src + i * 4096, 4096);
}

int lk_page_is_zero(const void *page) {
    const uint64_t *w = page;
    uint64_t acc = 0;
    for (size_t i = 0; i < 4096 / 8; i += 8)
        acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
    return acc == 0;
}

// ---- delta encoding of sync points (docs/log-format.md, "Delta stream") ----
// A delta is a list of runs: varint skip (bytes equal to the reference), varint n >= 1, n new bytes.
// Two runs closer than DELTA_GAP equal bytes are merged: a new run costs at least two bytes of lengths.
#define DELTA_GAP 4

static int put_varint(uint8_t *out, size_t cap, size_t *o, size_t v) {
    do {
        if (*o >= cap) return -1;
        uint8_t b = v & 0x7F;
        v >>= 7;
        out[(*o)++] = b | (v ? 0x80 : 0);
    } while (v);
    return 0;
}

long lk_delta_encode(const uint8_t *ref, const uint8_t *cur, size_t len, uint8_t *out, size_t cap) {
    size_t i = 0, o = 0, last = 0;
    while (i < len) {
        while (i + 8 <= len) {
            uint64_t a, b;
            memcpy(&a, ref + i, 8);
            memcpy(&b, cur + i, 8);
            if (a != b) break;
            i += 8;
        }
        while (i < len && ref[i] == cur[i]) i++;
        if (i >= len) break;
        size_t start = i, end = i + 1, equal = 0;
        for (size_t j = i + 1; j < len && equal < DELTA_GAP; j++) {
            if (ref[j] == cur[j]) equal++;
            else { equal = 0; end = j + 1; }
        }
        if (put_varint(out, cap, &o, start - last) || put_varint(out, cap, &o, end - start)) return -1;
        if (end - start > cap - o) return -1;
        memcpy(out + o, cur + start, end - start);
        o += end - start;
        last = i = end;
    }
    return (long)o;
}

static int get_varint(const uint8_t *in, size_t inlen, size_t *p, size_t *v) {
    size_t r = 0;
    for (int shift = 0; shift < 35; shift += 7) {
        if (*p >= inlen) return -1;
        uint8_t b = in[(*p)++];
        r |= (size_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) { *v = r; return 0; }
    }
    return -1;
}

int lk_delta_apply(uint8_t *buf, size_t len, const uint8_t *in, size_t inlen) {
    size_t p = 0, pos = 0;
    while (p < inlen) {
        size_t skip, n;
        if (get_varint(in, inlen, &p, &skip) || get_varint(in, inlen, &p, &n)) return -1;
        if (n == 0 || skip > len - pos || n > len - pos - skip || n > inlen - p) return -1;
        pos += skip;
        memcpy(buf + pos, in + p, n);
        pos += n;
        p += n;
    }
    return 0;
}

// CRC32C (Castagnoli). SSE4.2 crc32 instructions when the CPU has them, else a table.
static uint32_t crc_table[256];
static int crc_ready;
static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[i] = c;
    }
    __atomic_store_n(&crc_ready, 1, __ATOMIC_RELEASE);
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t len) {
    uint64_t c = crc;
    while (len >= 8) { uint64_t v; memcpy(&v, p, 8); c = __builtin_ia32_crc32di(c, v); p += 8; len -= 8; }
    uint32_t c32 = (uint32_t)c;
    while (len--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}

uint32_t lk_crc32c(uint32_t crc, const void *data, size_t len) {
    const uint8_t *p = data;
    crc = ~crc;
    if (__builtin_cpu_supports("sse4.2")) {
        crc = crc32c_hw(crc, p, len);
    } else {
        if (!__atomic_load_n(&crc_ready, __ATOMIC_ACQUIRE)) crc_init();
        while (len--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    }
    return ~crc;
}
