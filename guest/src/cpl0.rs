//! The CPL0 part of the guest: boot entry, descriptor tables, and the interrupt,
//! fault and system-call stubs.
//!
//! All of it is assembly on purpose. On this host (KVM PVM, see PLATFORM.md) guest CPL0
//! code is run by KVM's instruction emulator: about 2 M instructions/s, and SSE (which
//! compiled Rust may use at any time) fails there. So CPL0 only sets up the machine,
//! drops to CPL3 and afterwards runs a handful of general-purpose instructions per
//! interrupt or system call. Every stub saves what it touches: interrupts arrive in the
//! middle of arbitrary CPL3 code.
//!
//! Layout built here:
//! - GDT: `0x08` kernel code64, `0x10` kernel data, `0x18` user data (DPL3),
//!   `0x20` user code64 (DPL3), `0x28` 64-bit TSS (16 bytes).
//! - TSS: `RSP0` = top of the 16 KiB kernel stack; an I/O permission bitmap of 8192 zero
//!   bytes (every port allowed at CPL3, because PVM drops IOPL) and the trailing `0xFF`.
//! - IDT: 256 interrupt gates pointing at 16-byte stubs in `ftvm_vectors`:
//!   0..=31 report the fault to the VMM (port `0x608`); 3 (`int3`, DPL3) is the system
//!   call; 32 counts timer ticks; 33..=95 set bit `vector - 32` in the pending word;
//!   96..=255 are ignored.
//!
//! System calls (`int3` from CPL3, number in `RAX`, every other register preserved):
//! - `0` ([`crate::SYS_HALT`]): `sti; hlt; cli`, returns 0 in `RAX` after the next
//!   interrupt has been handled.
//! - `1` ([`crate::SYS_NOP`]): returns 0 at once (no exit; used to time a round trip).
//! - `0xdead` ([`crate::SYS_TRIPLE_FAULT`]): loads an empty IDT and executes `ud2`.
//! - `0xdeaf` ([`crate::SYS_HANG`]): `cli; hlt` forever.
//! - anything else: returns `u64::MAX` in `RAX`.

use core::arch::global_asm;

global_asm!(
    r#"
    .pushsection .text.ftvm_entry, "ax", @progbits

    # ------------------------------------------------------------------------------
    # _start: 64-bit mode, CPL0, IF=0, RDI = boot info address (docs/machine.md).
    .globl _start
    .type _start, @function
_start:
    cli
    lea ftvm_kstack_top(%rip), %rsp
    mov %rdi, %r15                      # boot info address, handed to user code

    # TSS: RSP0, I/O bitmap right after the 104-byte TSS, and its terminating 0xFF.
    lea ftvm_tss(%rip), %rbx
    lea ftvm_kstack_top(%rip), %rax
    mov %rax, 4(%rbx)
    movw $104, 102(%rbx)
    movb $0xff, 104+8192(%rbx)

    # TSS descriptor (GDT 0x28): limit 104+8192, type 0x9 (available 64-bit TSS), P=1.
    lea ftvm_gdt(%rip), %rsi
    mov %rbx, %rax
    and $0xffffff, %eax                 # base[23:0]
    shl $16, %rax
    or $(104 + 8192), %rax              # limit[15:0]
    mov %rbx, %rcx
    shr $24, %rcx
    and $0xff, %ecx                     # base[31:24]
    shl $56, %rcx
    or %rcx, %rax
    movabs $0x0000890000000000, %rcx    # P=1, DPL=0, type=9
    or %rcx, %rax
    mov %rax, 0x28(%rsi)
    mov %rbx, %rax
    shr $32, %rax                       # base[63:32]; the upper dword stays 0
    mov %rax, 0x30(%rsi)

    lgdt ftvm_gdtr(%rip)
    # Reload CS from the new GDT (same selector values as the boot GDT).
    pushq $0x08
    lea 1f(%rip), %rax
    push %rax
    lretq
1:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $0x28, %eax
    ltr %ax

    # IDT: gate i -> ftvm_vectors + 16*i, selector 0x08, interrupt gate (IF cleared on
    # entry), DPL0 except vector 3 (DPL3: the int3 system call).
    lea ftvm_vectors(%rip), %rsi
    lea ftvm_idt(%rip), %rdi
    xor %ecx, %ecx
2:
    mov %esi, %eax
    and $0xffff, %eax
    or $0x00080000, %eax                # offset[15:0], selector 0x08
    mov %eax, (%rdi)
    mov %esi, %eax
    and $0xffff0000, %eax               # offset[31:16]
    or $0x8e00, %eax                    # P=1, DPL0, 64-bit interrupt gate
    cmp $3, %ecx
    jne 3f
    or $0x6000, %eax                    # DPL3
3:
    mov %eax, 4(%rdi)
    mov %rsi, %rax
    shr $32, %rax                       # offset[63:32]; reserved dword 0
    mov %rax, 8(%rdi)
    add $16, %rsi
    add $16, %rdi
    inc %ecx
    cmp $256, %ecx
    jne 2b
    lidt ftvm_idtr(%rip)

    # Drop to CPL3: ftvm_user_entry(boot_info) on the user stack, IF=1 (RFLAGS 0x202).
    # RSP = top - 8 as after a call (SysV alignment); the fake return address is 0.
    mov %r15, %rdi
    xor %r15d, %r15d
    pushq $0x1b
    lea ftvm_ustack_top(%rip), %rax
    sub $8, %rax
    push %rax
    pushq $0x202
    pushq $0x23
    lea ftvm_user_entry(%rip), %rax
    push %rax
    iretq
    .size _start, . - _start

    # ------------------------------------------------------------------------------
    # One 16-byte stub per vector. `.org` makes the assembler fail if a stub outgrows
    # its 16 bytes, since the IDT loop above assumes the fixed stride.
    .balign 16
    .globl ftvm_vectors
ftvm_vectors:
    .set ftvm_vec, 0
    .rept 256
    .org ftvm_vectors + 16 * ftvm_vec, 0xcc
    .if ftvm_vec == 3
    jmp ftvm_syscall
    .elseif ftvm_vec == 32
    incq FTVM_TICKS(%rip)
    iretq
    .elseif ftvm_vec < 32
    # Vectors 8, 10-14, 17, 21, 29, 30 get an error code from the CPU; push a 0
    # for the others so that the frame looks the same.
    .if (ftvm_vec != 8) && (ftvm_vec != 10) && (ftvm_vec != 11) && (ftvm_vec != 12) && (ftvm_vec != 13) && (ftvm_vec != 14) && (ftvm_vec != 17) && (ftvm_vec != 21) && (ftvm_vec != 29) && (ftvm_vec != 30)
    pushq $0
    .endif
    pushq $ftvm_vec
    jmp ftvm_fault
    .elseif ftvm_vec < 96
    # Device interrupt: remember it for CPL3 (no registers touched; bit = vector-32).
    btsq $(ftvm_vec - 32), FTVM_PENDING_IRQS(%rip)
    iretq
    .else
    iretq
    .endif
    .set ftvm_vec, ftvm_vec + 1
    .endr
    .org ftvm_vectors + 16 * 256, 0xcc

    # ------------------------------------------------------------------------------
    # Exception: report it to the VMM and stop. Stack: vector, error code, RIP, CS, ...
    # Port 0x608 gets the vector; RDI = error code, RSI = RIP, RCX = CR2 (RDX has to
    # hold the port number 0x608, so it cannot carry CR2).
ftvm_fault:
    mov (%rsp), %eax
    mov 8(%rsp), %rdi
    mov 16(%rsp), %rsi
    mov %cr2, %rcx
    mov $0x608, %edx
    out %eax, (%dx)
4:
    cli
    hlt
    jmp 4b

    # ------------------------------------------------------------------------------
    # System call (int3 from CPL3). RIP in the frame is already past the int3 byte.
    # Only RAX is changed; iretq restores RFLAGS.
ftvm_syscall:
    test %rax, %rax
    jnz 5f
    # SYS_HALT: sleep until an interrupt. STI's one-instruction shadow makes sure the
    # interrupt is taken while halted (or right at the HLT exit), never lost before it.
    sti
    hlt
    cli
    iretq
5:
    cmp $1, %rax
    jne 6f
    xor %eax, %eax                      # SYS_NOP
    iretq
6:
    cmp $0xdead, %rax
    je ftvm_triple_fault
    cmp $0xdeaf, %rax
    je ftvm_hang
    mov $-1, %rax
    iretq

ftvm_triple_fault:
    # An IDT with limit 0: ud2 cannot be delivered, nor the #GP and #DF that follow.
    lidt ftvm_null_idtr(%rip)
    ud2

ftvm_hang:
    cli
    hlt
    jmp ftvm_hang

    .popsection

    # ------------------------------------------------------------------------------
    .pushsection .rodata.ftvm_tables, "a", @progbits
    .balign 16
ftvm_gdtr:
    .word ftvm_gdt_end - ftvm_gdt - 1
    .quad ftvm_gdt
    .balign 16
ftvm_idtr:
    .word 256 * 16 - 1
    .quad ftvm_idt
    .balign 16
ftvm_null_idtr:
    .word 0
    .quad 0
    .popsection

    .pushsection .data.ftvm_gdt, "aw", @progbits
    .balign 16
ftvm_gdt:
    .quad 0                             # null
    .quad 0x00af9a000000ffff            # 0x08 kernel code64
    .quad 0x00cf92000000ffff            # 0x10 kernel data
    .quad 0x00cff2000000ffff            # 0x18 user data, DPL3
    .quad 0x00affa000000ffff            # 0x20 user code64, DPL3
    .quad 0, 0                          # 0x28 TSS, filled in by _start
ftvm_gdt_end:
    .popsection

    .pushsection .bss.ftvm_tables, "aw", @nobits
    .balign 4096
ftvm_idt:
    .skip 256 * 16
    .balign 16
ftvm_tss:
    .skip 104 + 8192 + 1                # TSS, I/O bitmap, terminating 0xFF
    .popsection

    .pushsection .bss.ftvm_stacks, "aw", @nobits
    .balign 4096
    .skip 16 * 1024
ftvm_kstack_top:
    .skip 64 * 1024
ftvm_ustack_top:
    .popsection
"#,
    options(att_syntax)
);
