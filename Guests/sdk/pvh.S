/* pvh.S - PVH boot stub, descriptor tables and trap entry for Lockstep test guests.
 * Why: every guest must boot identically under QEMU and the Lockstep VMM (PVM mode), where
 * ring-0 instructions are emulated (~1.4 us each).  So the stub does the minimum: all tables
 * (GDT, page tables, IDT, TSS) are initialised data laid out at link time; the 32-bit part
 * only loads registers, and interrupts are first enabled by C code in 64-bit mode (the
 * emulator has no 32-bit iret).  Memory map of the image: see docs/guests.md. */

#define KCODE 0x08
#define KDATA 0x10
#define UDATA 0x1b
#define UCODE 0x23
#define TSSSEL 0x28

/* ---------- PVH ELF note: name "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY) ---------- */
        .section .note.Xen, "a"
        .p2align 2
        .long 4                 /* namesz ("Xen\0") */
        .long 4                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long pvh_start32       /* 32-bit physical entry */

/* ---------- 32-bit entry: flat protected mode, paging off, IF=0, EBX=hvm_start_info ---------- */
        .section .text.boot, "ax"
        .code32
        .globl pvh_start32
pvh_start32:
        lgdt    gdt_ptr
        movl    %cr4, %eax
        orl     $0x20, %eax             /* CR4.PAE */
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $0xC0000080, %ecx       /* IA32_EFER */
        rdmsr
        orl     $0x100, %eax            /* LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax       /* PG | PE */
        movl    %eax, %cr0
        ljmp    $KCODE, $start64        /* compatibility mode -> 64-bit CS */

        .code64
start64:
        movl    $KDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        xorl    %eax, %eax
        movl    %eax, %fs
        movl    %eax, %gs
        movq    $kstack_top, %rsp
        movw    $TSSSEL, %ax
        ltr     %ax
        lidt    idt_ptr
        movl    %ebx, %edi              /* arg0: struct hvm_start_info * (below 4 GiB) */
        call    lk_start                /* C: serial/PIC init, then kmain */
1:      cli
        hlt
        jmp     1b

/* ---------- trap entry: 256 stubs of 16 bytes at 0x100000 (IDT precomputed from this) ---------- */
        .section .isr, "ax"
        .globl isr_stubs
isr_stubs:
        .set vec, 0
        .rept 256
        .balign 16
        /* CPU pushes an error code for 8, 10-14, 17, 21, 29, 30; push 0 for the others */
        .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq   $0
        .endif
        pushq   $vec
        jmp     trap_common
        .set vec, vec + 1
        .endr
        .balign 16

        .text
/* Saves only the caller-saved registers: lk_trap is C and preserves the rest.  Keeping this
 * path short matters because every instruction here is emulated under PVM. */
trap_common:
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        movq    %rsp, %rdi
        call    lk_trap
        popq    %r11
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rax
        addq    $16, %rsp               /* vector, error code */
        iretq

/* uint64_t lk_user_run(void (*fn)(uint64_t), uint64_t arg, void *stack_top)
 * Enters fn(arg) in ring 3 with IF=1.  Returns when the task calls SYS_EXIT (status in rax).
 * SAFETY: TSS.RSP0 is set to the current stack pointer *below* the saved callee-saved
 * registers, so ring-3 interrupts/syscalls push their frames under them and
 * lk_user_return can unwind to here.  Not reentrant (one user task at a time). */
        .globl lk_user_run
lk_user_run:
        pushq   %rbx
        pushq   %rbp
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        movq    %rsp, lk_saved_ksp
        movq    %rsp, tss + 4           /* TSS.RSP0 */
        andq    $-16, %rdx
        subq    $8, %rdx                /* ABI: rsp+8 16-aligned at function entry */
        movq    $lk_user_exit_tramp, (%rdx)  /* fn returning lands in SYS_EXIT(0) */
        pushq   $UDATA                  /* SS */
        pushq   %rdx                    /* RSP */
        pushq   $0x202                  /* RFLAGS: IF */
        pushq   $UCODE                  /* CS */
        pushq   %rdi                    /* RIP */
        movq    %rsi, %rdi
        xorl    %esi, %esi
        xorl    %edx, %edx
        xorl    %ebp, %ebp
        iretq

/* void lk_user_return(uint64_t status): called from the SYS_EXIT handler (ring 0). */
        .globl lk_user_return
lk_user_return:
        movq    lk_saved_ksp, %rsp
        movl    $KDATA, %eax
        movl    %eax, %ss               /* the ring-3 -> ring-0 transition left SS = null */
        movq    %rdi, %rax
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %rbp
        popq    %rbx
        ret

/* Ring-3 trampoline: a user task whose function returns exits with status 0. */
        .globl lk_user_exit_tramp
lk_user_exit_tramp:
        movl    $1, %eax                /* SYS_EXIT */
        xorl    %edi, %edi
        int     $0x81
        ud2

/* ---------- data: GDT, IDT, TSS, page tables (all initialised, nothing built at run time) ---------- */
        .data
        .p2align 4
gdt:
        .quad 0                         /* 0x00 null */
        .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
        .quad 0x00cf92000000ffff        /* 0x10 kernel data */
        .quad 0x00cff2000000ffff        /* 0x18 user data, DPL3 */
        .quad 0x00affa000000ffff        /* 0x20 user code, 64-bit, DPL3 */
        .quad __tss_desc_lo             /* 0x28 TSS (linker-computed, see linker.ld) */
        .quad __tss_desc_hi
gdt_end:
        .p2align 3
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt                       /* lgdt in 32-bit mode reads the low 4 bytes only */

/* IDT: interrupt gates (IF cleared on entry) to stub i at 0x100000 + 16*i, DPL0, except
 * vector 0x81 (syscall) which is DPL3 so ring 3 may `int $0x81`. */
        .p2align 4
idt:
        .set vec, 0
        .rept 256
        .word 0x0000 + 16 * vec         /* offset 15:0 (stubs at 0x100000, linker asserts) */
        .word KCODE
        .byte 0                         /* IST */
        .if vec == 0x81
        .byte 0xEE                      /* present, DPL3, 64-bit interrupt gate */
        .else
        .byte 0x8E                      /* present, DPL0, 64-bit interrupt gate */
        .endif
        .word 0x0010                    /* offset 31:16 */
        .long 0                         /* offset 63:32 */
        .long 0
        .set vec, vec + 1
        .endr
idt_end:
        .p2align 3
idt_ptr:
        .word idt_end - idt - 1
        .quad idt

/* TSS: RSP0 = kernel stack top until lk_user_run moves it; no I/O bitmap (base = limit). */
        .section .tss, "aw"
        .p2align 4
        .globl tss
tss:
        .long 0
        .quad kstack_top                /* RSP0 */
        .quad 0, 0                      /* RSP1, RSP2 */
        .quad 0                         /* reserved */
        .quad 0, 0, 0, 0, 0, 0, 0       /* IST1-7 */
        .quad 0
        .word 0
        .word 104                       /* I/O map base beyond the limit: all ports deny in ring 3 */

/* Page tables: identity map 0..1 GiB with 2 MiB pages, all user-accessible (U/S) so ring-3
 * tasks can run SDK code and touch shared variables.  PML4[0] -> PDPT[0] -> PD.
 * SAFETY: no isolation between rings; these are test guests, not an OS. */
        .section .data.pagetables, "aw"
        .p2align 12
        .globl pml4
pml4:
        .quad pdpt + 0x7                /* P | RW | US */
        .fill 511, 8, 0
pdpt:
        .quad pd + 0x7
        .fill 511, 8, 0
pd:
        .set i, 0
        .rept 512
        .quad (i << 21) + 0x87          /* P | RW | US | PS (2 MiB) */
        .set i, i + 1
        .endr

        .bss
        .p2align 4
        .globl lk_saved_ksp
lk_saved_ksp:
        .quad 0
        .p2align 12
kstack:
        .skip 16384
        .globl kstack_top
kstack_top:
        .section .note.GNU-stack, "", @progbits
