// CLockstep: the thin C layer under Lockstep. Only what Swift cannot do, or cannot do fast:
// KVM ioctl numbers and kvm_run access, the vCPU kick signal, page loops and CRC32C.
// Names are prefixed lk_. Struct layouts Swift relies on are pinned with _Static_assert in lockstep.c.
#ifndef CLOCKSTEP_H
#define CLOCKSTEP_H

#include <stdint.h>
#include <stddef.h>
#include <linux/kvm.h>
#include "CLockstepWait.h"

// ---- socket options newer than this system's headers ----
// TCP_RTO_MIN_US (include/uapi/linux/tcp.h, Linux 6.15+): the floor under TCP's retransmission timeout, per
// socket (µs). Not included from <netinet/tcp.h>, whose copies here predate it. Older kernels refuse it.
static const int LK_TCP_RTO_MIN_US = 45;

// ---- ioctl numbers (Swift cannot import function-like macros) ----
static const unsigned long LK_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long LK_KVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long LK_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long LK_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long LK_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long LK_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long LK_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long LK_KVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long LK_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long LK_KVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
static const unsigned long LK_KVM_CLEAR_DIRTY_LOG = KVM_CLEAR_DIRTY_LOG;
static const unsigned long LK_KVM_RUN = KVM_RUN;
static const unsigned long LK_KVM_GET_REGS = KVM_GET_REGS;
static const unsigned long LK_KVM_SET_REGS = KVM_SET_REGS;
static const unsigned long LK_KVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long LK_KVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long LK_KVM_GET_FPU = KVM_GET_FPU;
static const unsigned long LK_KVM_SET_FPU = KVM_SET_FPU;
static const unsigned long LK_KVM_GET_XSAVE = KVM_GET_XSAVE;
static const unsigned long LK_KVM_SET_XSAVE = KVM_SET_XSAVE;
static const unsigned long LK_KVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long LK_KVM_SET_XCRS = KVM_SET_XCRS;
static const unsigned long LK_KVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long LK_KVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long LK_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long LK_KVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long LK_KVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
static const unsigned long LK_KVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
static const unsigned long LK_KVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long LK_KVM_INTERRUPT = KVM_INTERRUPT;
static const unsigned long LK_KVM_ENABLE_CAP = KVM_ENABLE_CAP;

static const int LK_KVM_CAP_IMMEDIATE_EXIT = KVM_CAP_IMMEDIATE_EXIT;
static const int LK_KVM_CAP_VCPU_EVENTS = KVM_CAP_VCPU_EVENTS;
static const int LK_KVM_CAP_XSAVE = KVM_CAP_XSAVE;
static const int LK_KVM_CAP_XCRS = KVM_CAP_XCRS;
static const int LK_KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
static const uint64_t LK_KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
static const uint32_t LK_KVM_MEM_LOG_DIRTY_PAGES = KVM_MEM_LOG_DIRTY_PAGES;

// Exit reasons the run loop handles.
enum {
    LK_EXIT_UNKNOWN = KVM_EXIT_UNKNOWN,
    LK_EXIT_IO = KVM_EXIT_IO,
    LK_EXIT_HLT = KVM_EXIT_HLT,
    LK_EXIT_MMIO = KVM_EXIT_MMIO,
    LK_EXIT_IRQ_WINDOW_OPEN = KVM_EXIT_IRQ_WINDOW_OPEN,
    LK_EXIT_SHUTDOWN = KVM_EXIT_SHUTDOWN,
    LK_EXIT_FAIL_ENTRY = KVM_EXIT_FAIL_ENTRY,
    LK_EXIT_INTR = KVM_EXIT_INTR,
    LK_EXIT_INTERNAL_ERROR = KVM_EXIT_INTERNAL_ERROR,
    LK_EXIT_DEBUG = KVM_EXIT_DEBUG,
    LK_EXIT_SYSTEM_EVENT = KVM_EXIT_SYSTEM_EVENT,
};

// ---- the syscall chokepoint's primitives: return -errno on failure, never set global state ----
long lk_ioctl(int fd, unsigned long request, void *arg);
long lk_ioctl_int(int fd, unsigned long request, unsigned long arg);
int lk_open(const char *path, int flags, int mode);
void *lk_mmap(void *addr, size_t len, int prot, int flags, int fd, long off); // NULL on failure, errno in *err
int lk_last_errno(void);
// The calling thread's test handler for the chokepoint (an opaque retained Swift object; NULL in production).
// Per thread, so a test's mock never reaches the threads of other tests running in the same process.
void *lk_sys_handler(void);
void lk_set_sys_handler(void *handler);

// ---- kvm_run access (static inline: no call overhead from Swift) ----
static inline uint32_t lk_run_exit_reason(const struct kvm_run *r) { return r->exit_reason; }
static inline uint8_t lk_run_ready_for_injection(const struct kvm_run *r) { return r->ready_for_interrupt_injection; }
static inline uint8_t lk_run_if_flag(const struct kvm_run *r) { return r->if_flag; }
static inline void lk_run_set_request_window(struct kvm_run *r, uint8_t v) { r->request_interrupt_window = v; }
static inline void lk_run_set_immediate_exit(struct kvm_run *r, uint8_t v) { __atomic_store_n(&r->immediate_exit, v, __ATOMIC_SEQ_CST); }
static inline uint8_t lk_run_immediate_exit(const struct kvm_run *r) { return __atomic_load_n(&r->immediate_exit, __ATOMIC_SEQ_CST); }
static inline uint8_t lk_run_io_direction(const struct kvm_run *r) { return r->io.direction; } // 0 in, 1 out
static inline uint8_t lk_run_io_size(const struct kvm_run *r) { return r->io.size; }
static inline uint16_t lk_run_io_port(const struct kvm_run *r) { return r->io.port; }
static inline uint32_t lk_run_io_count(const struct kvm_run *r) { return r->io.count; }
static inline uint8_t *lk_run_io_data(struct kvm_run *r) { return (uint8_t *)r + r->io.data_offset; }
static inline uint64_t lk_run_mmio_addr(const struct kvm_run *r) { return r->mmio.phys_addr; }
static inline uint8_t *lk_run_mmio_data(struct kvm_run *r) { return r->mmio.data; }
static inline uint32_t lk_run_mmio_len(const struct kvm_run *r) { return r->mmio.len; }
static inline uint8_t lk_run_mmio_is_write(const struct kvm_run *r) { return r->mmio.is_write; }
static inline uint32_t lk_run_internal_suberror(const struct kvm_run *r) { return r->internal.suberror; }
static inline uint64_t lk_run_fail_entry_reason(const struct kvm_run *r) { return r->fail_entry.hardware_entry_failure_reason; }
// Sync regs: KVM copies the GPRs into kvm_run on every exit, so the signature's RIP costs no ioctl.
// KVM copies these into kvm_run on every return from KVM_RUN (EINTR included): the engine reads RIP there,
// and a sync point takes regs, sregs and events from it instead of three ioctls (~6 µs each under PVM).
static inline void lk_run_enable_sync_regs(struct kvm_run *r) {
    r->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
    r->kvm_dirty_regs = 0;
}
static inline uint64_t lk_run_rip(const struct kvm_run *r) { return r->s.regs.regs.rip; }
static inline const struct kvm_regs *lk_run_regs(const struct kvm_run *r) { return &r->s.regs.regs; }
static inline const struct kvm_sregs *lk_run_sregs(const struct kvm_run *r) { return &r->s.regs.sregs; }
static inline const struct kvm_vcpu_events *lk_run_events(const struct kvm_run *r) { return &r->s.regs.events; }
static inline uint32_t lk_run_system_event_type(const struct kvm_run *r) { return r->system_event.type; }

// ---- the vCPU kick ----
// Installs a handler (no SA_RESTART) for signo that sets immediate_exit on the calling thread's kvm_run,
// so a kick that lands between two KVM_RUN calls is not lost.
int lk_kick_install(int signo);
void lk_kick_bind(struct kvm_run *run, int signo); // per vCPU thread; also unblocks signo on it
void lk_unblock_signal(int signo);                 // on the calling thread (and the threads it starts)
int lk_kick(unsigned long pthread_id, int signo);
unsigned long lk_thread_self(void);
int lk_pin_current_thread(int cpu); // 0 or -errno; the calling thread runs on `cpu` only
int lk_allowed_cpu(int index);      // the index-th core the process started with, or -1
int lk_unpin_current_thread(void);  // 0 or -errno; back to every core the process started with
void lk_set_thread_name(const char *name); // the kernel's name (/proc, top -H, perf): at most 15 bytes
// 0 or -errno (EPERM without CAP_SYS_NICE): SCHED_FIFO for the FT link threads, which only block on I/O and
// must preempt a vCPU thread stuck in an emulated guest on the same core.
int lk_set_realtime_priority(int priority);
int lk_cpu_count(void); // cores the process started with (threads inherit a pinned creator's mask)

// ---- time (host; reaches guests only through the recording hooks) ----
uint64_t lk_monotonic_ns(void);
uint64_t lk_realtime_ns(void);
// Sleeps until the CLOCK_MONOTONIC deadline (absolute ns); returns early with -EINTR.
int lk_sleep_until(uint64_t deadline_ns);

// ---- pages ----
// Returns the number of set bits in a dirty bitmap of nbits.
size_t lk_bitmap_count(const uint64_t *bitmap, size_t nbits);
// Writes the page numbers of set bits into out (capacity cap), returns how many were written.
size_t lk_bitmap_pages(const uint64_t *bitmap, size_t nbits, uint32_t *out, size_t cap);
// Gathers pages[i] (page numbers) from mem into dst, 4096 bytes each.
void lk_gather_pages(const uint8_t *mem, const uint32_t *pages, size_t n, uint8_t *dst);
// Scatters 4096-byte pages from src into mem at page numbers pages[i].
void lk_scatter_pages(uint8_t *mem, const uint32_t *pages, size_t n, const uint8_t *src);
// 1 when the 4096-byte page holds only zero bytes (most of a fresh guest's RAM: hashed as a constant).
int lk_page_is_zero(const void *page);

// Delta of cur against ref (len bytes each) into out: the encoded size, or -1 when it needs more than cap.
long lk_delta_encode(const uint8_t *ref, const uint8_t *cur, size_t len, uint8_t *out, size_t cap);
// Applies a delta (in, inlen bytes) to buf (len bytes, holding the reference): 0, or -1 when the delta is
// malformed or reaches past len (buf may then be partly written).
int lk_delta_apply(uint8_t *buf, size_t len, const uint8_t *in, size_t inlen);

// ---- checksums ----
uint32_t lk_crc32c(uint32_t crc, const void *data, size_t len); // Castagnoli, hardware when available

#endif
