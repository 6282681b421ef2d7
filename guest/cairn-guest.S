/*
 * cairn-guest: the VMM's built-in guest. 64-bit long mode from the first instruction
 * (the VMM sets up the GDT, identity page tables and registers), no interrupts, no IDT.
 *
 * What it does:
 *   vCPU 0: prints a banner on the 16550 serial port, sends a heartbeat, runs the
 *           virtio-blk self-test (write a pattern to the last 4 KiB of the disk, read
 *           it back, compare), then loops every tick: heartbeat, dirty the number of
 *           pages the VMM's rate limiter grants, poll the command port.
 *   vCPU n: heartbeat every tick.
 *
 * Entry state (set by the VMM): rip = LOAD_ADDR, rdi = vCPU index,
 * rsp = STACK_TOP - index * STACK_SIZE, flat 64-bit segments, paging on.
 *
 * It deliberately avoids instructions that PVM's emulator cannot handle or that need
 * an IDT: no cmpxchg16b, no xsave/xrstor, no int3, no hlt, no rdtsc, no SSE/AVX.
 * The tick is a VMM-side sleep (PORT_SLEEP_US), so an idle guest costs no CPU.
 */
    .include "abi.inc"
    .intel_syntax noprefix
    .code64

    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rdi                    /* r15 = vCPU index, kept for the whole run */
    xor r12d, r12d                  /* r12 = this vCPU's heartbeat counter */
    mov dx, PORT_TICK_US
    in eax, dx
    mov ebp, eax                    /* ebp = tick in microseconds */
    test r15, r15
    jnz secondary_main

    mov eax, STAGE_ENTERED
    mov dx, PORT_BOOT_STAGE
    out dx, eax
    call heartbeat
    lea rsi, [rip + msg_banner]
    call serial_puts
    call block_self_test

    mov dx, PORT_DIRTY_END
    in eax, dx
    shl rax, 12
    mov r13, rax                    /* r13 = end of the dirty region (exclusive) */
    mov r14, DIRTY_START            /* r14 = dirty cursor */
    mov eax, STAGE_LOOPING
    mov dx, PORT_BOOT_STAGE
    out dx, eax

main_loop:
    call heartbeat

    /* Dirty as many pages as the VMM grants for this tick, round-robin. */
    mov dx, PORT_DIRTY_QUOTA
    in eax, dx
    mov ecx, eax
    mov ebx, eax
    test ecx, ecx
    jz 3f
    mov rax, DIRTY_START
    cmp r13, rax
    jbe 3f                          /* no dirty region (tiny memory): grant ignored */
1:
    mov [r14], r12                  /* a changing value: the page really changes */
    add r14, 4096
    cmp r14, r13
    jb 2f
    mov r14, DIRTY_START
2:
    dec ecx
    jnz 1b
    mov eax, ebx
    mov dx, PORT_DIRTY_DONE
    out dx, eax
3:
    /* Commands from the VMM. */
    mov dx, PORT_COMMAND
    in eax, dx
    cmp eax, CMD_POWER_OFF
    je ack_and_park
    cmp eax, CMD_REBOOT
    je ack_and_park
    cmp eax, CMD_CRASH
    je crash
    cmp eax, CMD_BLOCK_TEST
    jne 4f
    call block_self_test
    mov eax, CMD_BLOCK_TEST
    mov dx, PORT_ACK
    out dx, eax
4:
    mov eax, ebp
    mov dx, PORT_SLEEP_US
    out dx, eax
    jmp main_loop

ack_and_park:
    mov dx, PORT_ACK
    out dx, eax
5:  /* The VMM stops the vCPUs on the ack; should it not, park politely. */
    mov eax, 1000000
    mov dx, PORT_SLEEP_US
    out dx, eax
    jmp 5b

crash:
    ud2                             /* no IDT: #UD -> #DF -> triple fault -> shutdown exit */

secondary_main:
    call heartbeat
    mov eax, ebp
    mov dx, PORT_SLEEP_US
    out dx, eax
    jmp secondary_main

/* Increments and reports this vCPU's heartbeat counter. Clobbers eax, edx. */
heartbeat:
    inc r12
    mov eax, r12d
    mov dx, PORT_HEARTBEAT
    out dx, eax
    ret

/* Writes the NUL-terminated string at rsi to COM1. Clobbers eax, edx, rsi. */
serial_puts:
    mov al, [rsi]
    test al, al
    jz 2f
1:
    mov dx, PORT_SERIAL + 5         /* line status register */
    in al, dx
    test al, 0x20                   /* transmitter holding register empty */
    jz 1b
    mov al, [rsi]
    mov dx, PORT_SERIAL
    out dx, al
    inc rsi
    jmp serial_puts
2:
    ret

/*
 * virtio-blk self-test over virtio-mmio (version 2, one split virtqueue of VQ_SIZE).
 * Writes an 8-sector pattern to the last 4 KiB of the disk, clears the buffer, reads
 * it back and compares. Reports the result on PORT_BLOCK_RESULT and the serial port.
 * Preserves r12-r15 and rbp.
 */
block_self_test:
    push rbx
    push rbp
    mov ebx, VIRTIO_BLK_MMIO_BASE
    mov eax, [rbx + 0x000]          /* MagicValue */
    cmp eax, 0x74726976
    jne .Lno_device
    mov eax, [rbx + 0x004]          /* Version */
    cmp eax, 2
    jne .Lno_device
    mov eax, [rbx + 0x008]          /* DeviceID: 2 = block */
    cmp eax, 2
    jne .Lno_device

    mov dword ptr [rbx + 0x070], 0  /* Status: reset */
    mov dword ptr [rbx + 0x070], 1  /* ACKNOWLEDGE */
    mov dword ptr [rbx + 0x070], 3  /* | DRIVER */
    mov dword ptr [rbx + 0x014], 1  /* DeviceFeaturesSel = 1 (bits 32..63) */
    mov eax, [rbx + 0x010]
    test eax, 1                     /* VIRTIO_F_VERSION_1 */
    jz .Lfeatures_rejected
    mov dword ptr [rbx + 0x024], 1  /* DriverFeaturesSel = 1 */
    mov dword ptr [rbx + 0x020], 1  /* VERSION_1 */
    mov dword ptr [rbx + 0x024], 0
    mov dword ptr [rbx + 0x020], 0  /* no optional block features */
    mov dword ptr [rbx + 0x070], 0xB /* | FEATURES_OK */
    mov eax, [rbx + 0x070]
    test eax, 8
    jz .Lfeatures_rejected

    mov dword ptr [rbx + 0x030], 0  /* QueueSel = 0 */
    mov eax, [rbx + 0x034]          /* QueueNumMax */
    cmp eax, VQ_SIZE
    jb .Ldevice_error
    mov dword ptr [rbx + 0x038], VQ_SIZE
    mov edi, VQ_DESC_ADDR           /* clear descriptors and both rings */
    xor eax, eax
    mov ecx, 0x300 / 8
    rep stosq
    mov dword ptr [rbx + 0x080], VQ_DESC_ADDR
    mov dword ptr [rbx + 0x084], 0
    mov dword ptr [rbx + 0x090], VQ_AVAIL_ADDR
    mov dword ptr [rbx + 0x094], 0
    mov dword ptr [rbx + 0x0a0], VQ_USED_ADDR
    mov dword ptr [rbx + 0x0a4], 0
    mov dword ptr [rbx + 0x044], 1  /* QueueReady */
    mov dword ptr [rbx + 0x070], 0xF /* | DRIVER_OK */

    mov eax, [rbx + 0x100]          /* capacity in 512-byte sectors, two 32-bit reads */
    mov edx, [rbx + 0x104]
    shl rdx, 32
    or rax, rdx
    cmp rax, 8
    jb .Ltoo_small
    sub rax, 8
    mov r8, rax                     /* r8 = first sector of the test block */

    inc qword ptr [rip + test_round]
    call fill_pattern
    mov edi, 1                      /* VIRTIO_BLK_T_OUT */
    call blk_request
    test eax, eax
    jnz .Ldevice_error
    mov edi, BLK_BUF_ADDR           /* clear the buffer so the read must refill it */
    xor eax, eax
    mov ecx, 512
    rep stosq
    xor edi, edi                    /* VIRTIO_BLK_T_IN */
    call blk_request
    test eax, eax
    jnz .Ldevice_error
    call check_pattern
    test eax, eax
    jnz .Lmismatch
    mov eax, BLOCK_PASS
    lea rsi, [rip + msg_block_pass]
    jmp .Lreport
.Lno_device:
    mov eax, BLOCK_NO_DEVICE
    lea rsi, [rip + msg_block_none]
    jmp .Lreport
.Lfeatures_rejected:
    mov eax, BLOCK_FEATURES_REJECTED
    lea rsi, [rip + msg_block_fail]
    jmp .Lreport
.Ldevice_error:
    mov eax, BLOCK_DEVICE_ERROR
    lea rsi, [rip + msg_block_fail]
    jmp .Lreport
.Ltoo_small:
    mov eax, BLOCK_TOO_SMALL
    lea rsi, [rip + msg_block_fail]
    jmp .Lreport
.Lmismatch:
    mov eax, BLOCK_MISMATCH
    lea rsi, [rip + msg_block_fail]
.Lreport:
    mov dx, PORT_BLOCK_RESULT
    out dx, eax
    call serial_puts
    pop rbp
    pop rbx
    ret

/* Pattern qword i = (round << 48) ^ (sector + i) * golden ratio constant. */
pattern_value:                      /* in: rcx = i; out: rax; clobbers rdx */
    lea rax, [r8 + rcx]
    mov rdx, 0x9E3779B97F4A7C15
    imul rax, rdx
    mov rdx, [rip + test_round]
    shl rdx, 48
    xor rax, rdx
    ret

fill_pattern:
    xor ecx, ecx
1:
    call pattern_value
    mov [BLK_BUF_ADDR + rcx * 8], rax
    inc ecx
    cmp ecx, 512
    jb 1b
    ret

check_pattern:                      /* out: eax = 0 when the buffer holds the pattern */
    xor ecx, ecx
1:
    call pattern_value
    cmp [BLK_BUF_ADDR + rcx * 8], rax
    jne 2f
    inc ecx
    cmp ecx, 512
    jb 1b
    xor eax, eax
    ret
2:
    mov eax, 1
    ret

/*
 * One virtio-blk request of 4 KiB at sector r8. edi = request type (0 in, 1 out).
 * Returns eax = virtio status byte (0 = OK), or 0xFF when the device did not complete
 * the request synchronously (the VMM completes it during the notify exit).
 */
blk_request:
    mov esi, BLK_REQ_ADDR
    mov [rsi], edi                  /* type */
    mov dword ptr [rsi + 4], 0      /* reserved */
    mov [rsi + 8], r8               /* sector */
    mov byte ptr [BLK_STATUS_ADDR], 0xFF

    mov esi, VQ_DESC_ADDR
    mov qword ptr [rsi + 0], BLK_REQ_ADDR
    mov dword ptr [rsi + 8], 16
    mov word ptr [rsi + 12], 1      /* NEXT */
    mov word ptr [rsi + 14], 1
    mov qword ptr [rsi + 16], BLK_BUF_ADDR
    mov dword ptr [rsi + 24], 4096
    mov eax, 1                      /* NEXT, and WRITE (device writes) for reads */
    test edi, edi
    jnz 1f
    or eax, 2
1:
    mov [rsi + 28], ax
    mov word ptr [rsi + 30], 2
    mov qword ptr [rsi + 32], BLK_STATUS_ADDR
    mov dword ptr [rsi + 40], 1
    mov word ptr [rsi + 44], 2      /* WRITE */
    mov word ptr [rsi + 46], 0

    mov esi, VQ_AVAIL_ADDR
    movzx eax, word ptr [rsi + 2]   /* avail idx */
    mov ecx, eax
    and ecx, VQ_SIZE - 1
    mov word ptr [rsi + 4 + rcx * 2], 0 /* head descriptor 0 */
    inc eax
    mov [rsi + 2], ax
    mov r9d, eax
    mov dword ptr [rbx + 0x050], 0  /* QueueNotify: the VMM processes the queue now */
    mov esi, VQ_USED_ADDR
    movzx eax, word ptr [rsi + 2]   /* used idx must have caught up */
    cmp ax, r9w
    jne 2f
    movzx eax, byte ptr [BLK_STATUS_ADDR]
    ret
2:
    mov eax, 0xFF
    ret

    .section .rodata
msg_banner:     .asciz "cairn-guest: up\r\n"
msg_block_pass: .asciz "cairn-guest: block self-test pass\r\n"
msg_block_fail: .asciz "cairn-guest: block self-test FAIL\r\n"
msg_block_none: .asciz "cairn-guest: no block device\r\n"

    .section .data
    .balign 8
test_round:     .quad 0
