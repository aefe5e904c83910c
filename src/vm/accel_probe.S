/* Accelerator probe "BIOS": prints R, P, L on COM1 as it enters real, 32-bit protected
   and 64-bit long mode (with paging), then halts. Linked at 0 and mapped at 0xF0000 (64 KiB). */
    .code16
    .globl _start
_start:
    cli
    movw $0x3f8, %dx
    movb $'R', %al
    outb %al, %dx
    lgdtl %cs:gdt_ptr
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(pm32 + 0xf0000)

    .code32
pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x3f8, %dx
    movb $'P', %al
    outb %al, %dx
    /* identity-map the first 2 MiB: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 (2 MiB page) */
    movl $0x1000, %edi
    xorl %eax, %eax
    movl $0xc00, %ecx
    rep stosl
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    movl $0x83, 0x3000
    movl $0x1000, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax
    movl %eax, %cr0
    ljmp $0x18, $(lm64 + 0xf0000)

    .code64
lm64:
    movw $0x3f8, %dx
    movb $'L', %al
    outb %al, %dx
1:  hlt
    jmp 1b

    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
gdt_ptr:
    .word gdt_ptr - gdt - 1
    .long gdt + 0xf0000

    /* reset vector: 0xFFFF0 */
    .org 0xfff0
    .code16
    ljmp $0xf000, $_start
    .org 0x10000
