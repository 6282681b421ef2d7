/*
 * cairn-linux-probe: a minimal image in the Linux bzImage format (boot protocol 2.15
 * setup header, 64-bit entry at load address + 0x200) that reports, on the serial
 * console, what a Linux kernel would find at entry: the command line, the e820 map, the
 * initrd placement and checksum, the loader type, the code segment and the MP table's
 * processor count and checksum. It lets the
 * VMM's Linux boot path be tested end to end on hosts (PVM) where a real kernel cannot
 * boot. It then acknowledges a power-off on the cairn-guest ACK port, or, with
 * "cairn.probe=stay" on the command line, heartbeats every 10 ms until stopped.
 *
 * Only the setup header is meaningful in the setup sectors; the VMM never runs real-mode
 * code. The protected-mode part starts at file offset (setup_sects + 1) * 512 = 1024.
 */
    .include "abi.inc"
    .intel_syntax noprefix
    .code64
    .section .text
    .globl _start
_start:
    .org 0x1f1
    .byte 1                         /* setup_sects */
    .word 0                         /* root_flags */
    .long 0                         /* syssize */
    .word 0                         /* ram_size */
    .word 0                         /* vid_mode */
    .word 0                         /* root_dev */
    .word 0xAA55                    /* boot_flag */
    .word 0                         /* jump */
    .ascii "HdrS"                   /* header */
    .word 0x020f                    /* version 2.15 */
    .long 0                         /* realmode_swtch */
    .word 0                         /* start_sys_seg */
    .word 0                         /* kernel_version */
    .byte 0                         /* type_of_loader */
    .byte 1                         /* loadflags: LOADED_HIGH */
    .word 0                         /* setup_move_size */
    .long 0x100000                  /* code32_start */
    .long 0                         /* ramdisk_image */
    .long 0                         /* ramdisk_size */
    .long 0                         /* bootsect_kludge */
    .word 0                         /* heap_end_ptr */
    .byte 0                         /* ext_loader_ver */
    .byte 0                         /* ext_loader_type */
    .long 0                         /* cmd_line_ptr */
    .long 0x7fffffff                /* initrd_addr_max */
    .long 0x200000                  /* kernel_alignment */
    .byte 0                         /* relocatable_kernel */
    .byte 0                         /* min_alignment */
    .word 1                         /* xloadflags: XLF_KERNEL_64 */
    .long 2047                      /* cmdline_size */

    .org 1024                       /* the protected-mode image, loaded at 1 MiB */
payload:
    .org 1024 + 0x200               /* startup_64: rsi = zero page */
startup_64:
    lea rsp, [rip + stack_top]
    mov rbx, rsi
    mov eax, STAGE_ENTERED
    mov dx, PORT_BOOT_STAGE
    out dx, eax
    mov eax, 1
    mov dx, PORT_HEARTBEAT
    out dx, eax

    lea rsi, [rip + msg_entered]
    call puts
    lea rsi, [rip + msg_cmdline]
    call puts
    mov esi, [rbx + 0x228]          /* hdr.cmd_line_ptr */
    call puts
    call crlf

    lea rsi, [rip + msg_e820]
    call puts
    movzx eax, byte ptr [rbx + 0x1e8] /* e820_entries */
    mov r12, rax
    call puthex
    lea rsi, [rip + msg_ram]
    call puts
    xor eax, eax                    /* total RAM of type 1 */
    lea rdi, [rbx + 0x2d0]          /* e820_table: {u64 addr, u64 size, u32 type} */
1:
    test r12, r12
    jz 2f
    cmp dword ptr [rdi + 16], 1
    jne 3f
    add rax, [rdi + 8]
3:
    add rdi, 20
    dec r12
    jmp 1b
2:
    call puthex
    call crlf

    lea rsi, [rip + msg_initrd]
    call puts
    mov eax, [rbx + 0x218]          /* hdr.ramdisk_image */
    mov r13, rax
    call puthex
    lea rsi, [rip + msg_size]
    call puts
    mov eax, [rbx + 0x21c]          /* hdr.ramdisk_size */
    mov r14, rax
    call puthex
    lea rsi, [rip + msg_sum]
    call puts
    xor eax, eax                    /* byte sum of the initrd */
    xor ecx, ecx
4:
    cmp rcx, r14
    jae 5f
    movzx edx, byte ptr [r13 + rcx]
    add rax, rdx
    inc rcx
    jmp 4b
5:
    call puthex
    call crlf

    lea rsi, [rip + msg_loader]
    call puts
    movzx eax, byte ptr [rbx + 0x210] /* hdr.type_of_loader */
    call puthex
    lea rsi, [rip + msg_cs]
    call puts
    mov ax, cs
    movzx eax, ax
    call puthex
    call crlf

    /* The MP table: find "_MP_" in the last KiB below 640 KiB, as Linux does, count
     * the enabled processor entries and sum the configuration table's bytes. */
    lea rsi, [rip + msg_mp_cpus]
    call puts
    mov edi, 0x9fc00
7:
    cmp edi, 0xa0000
    jae 9f
    cmp dword ptr [rdi], 0x5f504d5f /* "_MP_" */
    je 8f
    add edi, 16
    jmp 7b
8:
    mov r12d, [rdi + 4]             /* physical pointer to the configuration table */
    movzx ecx, word ptr [r12 + 34]  /* entry count */
    lea rdi, [r12 + 44]
    xor eax, eax
10:
    test ecx, ecx
    jz 12f
    cmp byte ptr [rdi], 0           /* processor entry (20 bytes) */
    jne 11f
    test byte ptr [rdi + 3], 1      /* enabled */
    jz 13f
    inc eax
13:
    add rdi, 20
    dec ecx
    jmp 10b
11:
    add rdi, 8                      /* every other entry is 8 bytes */
    dec ecx
    jmp 10b
12:
    call puthex
    lea rsi, [rip + msg_mp_sum]
    call puts
    movzx ecx, word ptr [r12 + 4]   /* base table length */
    xor eax, eax
    xor edx, edx
15:
    add al, [r12 + rdx]
    inc rdx
    cmp rdx, rcx
    jb 15b
    movzx eax, al
    call puthex
    jmp 14f
9:
    mov rax, -1                     /* no MP table */
    call puthex
14:
    call crlf

    /* With "cairn.probe=stay" on the command line the probe keeps running instead of
       powering off: it heartbeats every 10 ms (its counter in r13), so a VMM can save,
       migrate and restore a VM on the Linux path (in-kernel irqchip, PIT, clock). */
    mov esi, [rbx + 0x228]
    call find_stay
    test eax, eax
    jz 20f
    mov r13d, 1
21:
    inc r13
    mov eax, r13d
    mov dx, PORT_HEARTBEAT
    out dx, eax
    mov eax, 10000
    mov dx, PORT_SLEEP_US
    out dx, eax
    jmp 21b
20:
    mov eax, CMD_POWER_OFF
    mov dx, PORT_ACK
    out dx, eax
6:
    mov eax, 1000000
    mov dx, PORT_SLEEP_US
    out dx, eax
    jmp 6b

/* eax = 1 when the NUL-terminated string at rsi contains msg_stay, else 0.
   Clobbers rsi, rdi, r8, r10. */
find_stay:
1:
    cmp byte ptr [rsi], 0
    je 4f
    lea rdi, [rip + msg_stay]
    mov r8, rsi
2:
    mov r10b, [rdi]
    test r10b, r10b
    jz 3f
    cmp r10b, [r8]
    jne 5f
    inc rdi
    inc r8
    jmp 2b
5:
    inc rsi
    jmp 1b
3:
    mov eax, 1
    ret
4:
    xor eax, eax
    ret

/* Writes the NUL-terminated string at rsi to COM1. */
puts:
    mov al, [rsi]
    test al, al
    jz 2f
1:
    mov dx, PORT_SERIAL + 5
    in al, dx
    test al, 0x20
    jz 1b
    mov al, [rsi]
    mov dx, PORT_SERIAL
    out dx, al
    inc rsi
    jmp puts
2:
    ret

crlf:
    lea rsi, [rip + msg_crlf]
    jmp puts

/* Writes rax as 0x followed by 16 hex digits. */
puthex:
    push rax
    lea rsi, [rip + msg_0x]
    call puts
    pop rax
    mov ecx, 16
1:
    rol rax, 4
    mov r8, rax
    and eax, 0xf
    lea rsi, [rip + hex_digits]
    mov al, [rsi + rax]
    mov r9, rax
2:
    mov dx, PORT_SERIAL + 5
    in al, dx
    test al, 0x20
    jz 2b
    mov rax, r9
    mov dx, PORT_SERIAL
    out dx, al
    mov rax, r8
    dec ecx
    jnz 1b
    ret

msg_stay:    .asciz "cairn.probe=stay"
msg_entered: .asciz "cairn-linux-probe: entered\r\n"
msg_cmdline: .asciz "cmdline="
msg_e820:    .asciz "e820-entries="
msg_ram:     .asciz " ram="
msg_initrd:  .asciz "initrd="
msg_size:    .asciz " size="
msg_sum:     .asciz " sum="
msg_loader:  .asciz "loader="
msg_cs:      .asciz " cs="
msg_mp_cpus: .asciz "mp-cpus="
msg_mp_sum:  .asciz " mp-sum="
msg_0x:      .asciz "0x"
msg_crlf:    .asciz "\r\n"
hex_digits:  .ascii "0123456789abcdef"

    .balign 16
stack:
    .skip 1024
stack_top:
