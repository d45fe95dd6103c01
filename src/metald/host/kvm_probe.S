/* KVM probe firmware: a 64 KiB flat image loaded with -bios (mapped at 0xFFFF0000).
 *
 * Reset vector -> protected mode -> long mode with paging -> cmpxchg16b, xsave/xrstor,
 * page-table churn -> write 0x2a to isa-debug-exit (QEMU exits with code 85). Any fault
 * triple-faults (QEMU exits 0 with -no-reboot); a KVM emulation failure stops the VM and the
 * caller's deadline expires. Under broken nested KVM the cmpxchg16b is where it stops, just
 * as a Debian kernel does. metald.host.kvm also runs the same image straight through the KVM
 * API (no QEMU), mapped where QEMU maps it, and watches for the same port write.
 *
 * metald/host/kvm.py embeds the assembled bytes; tests/unit/test_kvm_probe.py re-assembles
 * this file (when binutils are installed) and checks they match:
 *   as --64 -o probe.o kvm_probe.S && ld -Ttext=0 -e 0 --oformat binary -o probe.bin probe.o
 */
    .set BASE, 0xFFFF0000
    .set PML4, 0x1000
    .set PDPT, 0x2000
    .set PD,   0x3000           /* four PDs: 0x3000..0x6fff, identity map 0-4 GiB */
    .set SCRATCH, 0x8000
    .set XAREA, 0x9000
    .set EXIT_PORT, 0xf4
    .text
    .code16
start16:
    cli
    cs lgdtl (gdtr - start16)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(BASE + pm32 - start16)

    .code32
pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $0x8000, %esp
    /* zero 0x1000..0x6fff */
    movl $PML4, %edi
    xorl %eax, %eax
    movl $(6 * 1024), %ecx
    rep stosl
    movl $(PDPT + 3), PML4
    movl $(PD + 3), PDPT
    movl $(PD + 0x1000 + 3), PDPT + 8
    movl $(PD + 0x2000 + 3), PDPT + 16
    movl $(PD + 0x3000 + 3), PDPT + 24
    /* PD entries: i<<21 | PS|RW|P, i in 0..2047 */
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, PD(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax
    movl %eax, PD+4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jne 1b
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax    /* PAE, OSFXSR, OSXMMEXCPT */
    movl %eax, %cr4
    movl $PML4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax
    movl %eax, %cr0
    ljmp $0x18, $(BASE + lm64 - start16)

    .code64
lm64:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %ss
    movq $0x8000, %rsp
    /* cmpxchg16b (needs CPUID.1:ECX.CX16) */
    movl $1, %eax
    cpuid
    btl $13, %ecx
    jnc fail
    movl %ecx, %r15d
    xorl %eax, %eax
    xorl %edx, %edx
    movq $0x1122334455667788, %rbx
    movq $0x99aabbccddeeff00, %rcx
    lock cmpxchg16b SCRATCH
    jnz fail
    cmpq %rbx, SCRATCH
    jne fail
    /* xsave/xrstor when the CPU has it */
    btl $26, %r15d
    jnc 2f
    movq %cr4, %rax
    orq $(1 << 18), %rax
    movq %rax, %cr4
    xorl %ecx, %ecx
    movl $3, %eax
    xorl %edx, %edx
    xsetbv
    movl $3, %eax
    xorl %edx, %edx
    xsave XAREA
    xrstor XAREA
2:
    /* SSE and page-table churn: remap a 2 MiB page many times */
    movl $20000, %r12d
3:  movq PD + 8, %rax
    xorq $0x200000, %rax     /* flip between mapping 2M and 0 */
    movq %rax, PD + 8
    invlpg 0x200000
    movl %r12d, 0x200010
    movdqa SCRATCH, %xmm0
    paddq %xmm0, %xmm0
    movq SCRATCH + 16, %rax
    lock cmpxchg16b SCRATCH
    decl %r12d
    jnz 3b
    movb $0x2a, %al
    outb %al, $EXIT_PORT
4:  hlt
    jmp 4b
fail:
    movb $0x15, %al
    outb %al, $EXIT_PORT
5:  hlt
    jmp 5b

    .p2align 3
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF    /* 0x08: 32-bit code */
    .quad 0x00CF92000000FFFF    /* 0x10: data */
    .quad 0x00AF9A000000FFFF    /* 0x18: 64-bit code */
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .long BASE + gdt - start16

    .org 0xFFF0, 0xf4
reset:
    .code16
    jmp start16
    .org 0x10000, 0xf4
