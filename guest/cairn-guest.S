/*
 * cairn-guest: the VMM's built-in guest. 64-bit long mode from the first instruction
 * (the VMM sets up the GDT, identity page tables and registers), no interrupts, no IDT.
 *
 * What it does:
 *   vCPU 0: prints a banner on the 16550 serial port, sends a heartbeat, runs the
 *           virtio-blk self-test (write a pattern to the last 4 KiB of the disk, read
 *           it back, compare), brings up the first virtio-net device if there is one,
 *           then loops every tick: heartbeat, answer ARP and ICMP echo requests for
 *           its IPv4 address on the network device, echo what was typed on the
 *           serial port, dirty the number of pages the VMM's rate limiter grants,
 *           poll the command port. Disk I/O commands
 *           (CMD_DISK_IO) write a seeded pattern to, or read and checksum (CRC-32C), a
 *           range of any of its disks; it counts its own requests, bytes and errors per
 *           disk and reports them (PORT_IO_STAT_*) after each command and self-test.
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
    call net_init

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
    call net_poll
    call beacon
    call serial_echo

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
    cmp eax, CMD_DISK_IO
    jne 6f
    call disk_io
    mov eax, CMD_DISK_IO
    mov dx, PORT_ACK
    out dx, eax
    jmp 4f
6:
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

/*
 * Echoes every byte typed into COM1 (`cairn vm console`'s input) back out, a carriage
 * return as CR LF, so a console shows that the guest received what was typed.
 * Clobbers eax, edx.
 */
serial_echo:
    mov dx, PORT_SERIAL + 5         /* line status register */
    in al, dx
    test al, 0x01                   /* data ready */
    jz 2f
    mov dx, PORT_SERIAL
    in al, dx                       /* receive buffer */
    out dx, al                      /* the UART never holds the transmitter busy */
    cmp al, 13
    jne serial_echo
    mov al, 10
    out dx, al
    jmp serial_echo
2:
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
    mov qword ptr [rip + cur_disk], 0
    mov ebx, VIRTIO_BLK_MMIO_BASE
    call blk_init
    cmp eax, IO_NO_DEVICE
    je .Lno_device
    cmp eax, IO_FEATURES_REJECTED
    je .Lfeatures_rejected
    test eax, eax
    jnz .Ldevice_error
    cmp rdx, 8
    jb .Ltoo_small
    lea r8, [rdx - 8]               /* r8 = first sector of the test block */

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
    call block_checksum
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
    push rax                        /* counters first: the result completes the test */
    push rsi
    call report_counters
    pop rsi
    pop rax
    mov dx, PORT_BLOCK_RESULT
    out dx, eax
    call serial_puts
    pop rbp
    pop rbx
    ret

/*
 * Brings up the virtio-blk device at rbx (virtio-mmio version 2, VERSION_1 only, one
 * split virtqueue of VQ_SIZE at VQ_DESC_ADDR; every disk uses the same queue memory
 * and is brought up anew before each use, so only the device in use points at it).
 * Returns eax = 0 and rdx = capacity in 512-byte sectors, or eax = IO_NO_DEVICE,
 * IO_FEATURES_REJECTED or IO_DEVICE_ERROR. Clobbers rcx, rdi.
 */
blk_init:
    mov eax, [rbx + 0x000]          /* MagicValue */
    cmp eax, 0x74726976
    jne .Linit_no_device
    mov eax, [rbx + 0x004]          /* Version */
    cmp eax, 2
    jne .Linit_no_device
    mov eax, [rbx + 0x008]          /* DeviceID: 2 = block */
    cmp eax, 2
    jne .Linit_no_device

    mov dword ptr [rbx + 0x070], 0  /* Status: reset */
    mov dword ptr [rbx + 0x070], 1  /* ACKNOWLEDGE */
    mov dword ptr [rbx + 0x070], 3  /* | DRIVER */
    mov dword ptr [rbx + 0x014], 1  /* DeviceFeaturesSel = 1 (bits 32..63) */
    mov eax, [rbx + 0x010]
    test eax, 1                     /* VIRTIO_F_VERSION_1 */
    jz .Linit_features_rejected
    mov dword ptr [rbx + 0x024], 1  /* DriverFeaturesSel = 1 */
    mov dword ptr [rbx + 0x020], 1  /* VERSION_1 */
    mov dword ptr [rbx + 0x024], 0
    mov dword ptr [rbx + 0x020], 0  /* no optional block features */
    mov dword ptr [rbx + 0x070], 0xB /* | FEATURES_OK */
    mov eax, [rbx + 0x070]
    test eax, 8
    jz .Linit_features_rejected

    mov dword ptr [rbx + 0x030], 0  /* QueueSel = 0 */
    mov eax, [rbx + 0x034]          /* QueueNumMax */
    cmp eax, VQ_SIZE
    jb .Linit_device_error
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
    or rdx, rax
    xor eax, eax
    ret
.Linit_no_device:
    mov eax, IO_NO_DEVICE
    ret
.Linit_features_rejected:
    mov eax, IO_FEATURES_REJECTED
    ret
.Linit_device_error:
    mov eax, IO_DEVICE_ERROR
    ret

/*
 * CMD_DISK_IO: reads the command's arguments (PORT_IO_*), brings up that disk, and
 * writes the seeded pattern to (IO_OP_WRITE_PATTERN) or reads (IO_OP_READ_CHECKSUM)
 * its sectors in requests of up to IO_BUF_SIZE bytes, computing the CRC-32C of the
 * bytes written or read. Reports the checksum, the disk's counters and the result.
 * Preserves r12-r15, rbx and rbp.
 */
disk_io:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov dx, PORT_IO_OP
    in eax, dx
    mov r12d, eax                   /* r12 = operation */
    mov dx, PORT_IO_DISK
    in eax, dx
    mov r13d, eax                   /* r13 = disk index */
    mov dx, PORT_IO_SECTOR_HI
    in eax, dx
    mov r8d, eax
    shl r8, 32
    mov dx, PORT_IO_SECTOR_LO
    in eax, dx
    or r8, rax                      /* r8 = current sector */
    mov dx, PORT_IO_SECTORS
    in eax, dx
    mov r14d, eax                   /* r14 = sectors left */
    mov dx, PORT_IO_SEED_HI
    in eax, dx
    mov r15d, eax
    shl r15, 32
    mov dx, PORT_IO_SEED_LO
    in eax, dx
    or r15, rax                     /* r15 = seed */

    mov eax, IO_BAD_REQUEST
    cmp r13, IO_MAX_DISKS
    jae .Lio_done                   /* no counters to report for a disk that cannot be */
    mov [rip + cur_disk], r13
    cmp r12d, IO_OP_WRITE_PATTERN
    je 1f
    cmp r12d, IO_OP_READ_CHECKSUM
    jne .Lio_report
1:
    mov ebx, r13d
    shl ebx, 12                     /* VIRTIO_MMIO_SIZE = 0x1000 */
    add ebx, VIRTIO_BLK_MMIO_BASE
    call blk_init
    test eax, eax
    jnz .Lio_report
    mov eax, IO_OUT_OF_RANGE
    mov rcx, r8
    add rcx, r14
    jc .Lio_report
    cmp rcx, rdx
    ja .Lio_report

    cmp byte ptr [rip + crc_ready], 0
    jne 7f
    call crc_init
    mov byte ptr [rip + crc_ready], 1
7:
    mov ebp, 0xFFFFFFFF             /* ebp = CRC-32C so far */
    mov r10d, IO_BUF_ADDR
2:
    test r14, r14
    jz 4f
    mov r11, r14                    /* this request: min(left, IO_BUF_SIZE / 512) sectors */
    cmp r11, IO_BUF_SIZE / 512
    jbe 3f
    mov r11d, IO_BUF_SIZE / 512
3:
    sub r14, r11
    shl r11d, 9                     /* r11 = bytes */
    xor edi, edi                    /* VIRTIO_BLK_T_IN */
    cmp r12d, IO_OP_WRITE_PATTERN
    jne 5f
    call fill_io_pattern
    mov edi, 1                      /* VIRTIO_BLK_T_OUT */
5:
    call blk_rw
    test eax, eax
    jnz 6f
    call crc_update
    mov rax, r11
    shr rax, 9
    add r8, rax
    jmp 2b
6:
    mov eax, IO_DEVICE_ERROR
    jmp .Lio_report
4:
    mov eax, ebp
    not eax
    mov dx, PORT_IO_CHECKSUM
    out dx, eax
    mov eax, IO_OK
.Lio_report:
    mov ebx, eax
    call report_counters
    mov eax, ebx
.Lio_done:
    mov dx, PORT_IO_DONE
    out dx, eax
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

/* Fills r11 bytes of the I/O buffer with the pattern of the sectors from r8: the qword
   at disk byte offset 8q is splitmix64 output q + 1 for seed r15, i.e. mix(r15 + (q + 1)
   * 0x9E3779B97F4A7C15). Clobbers rax, rcx, rdx, rsi. */
fill_io_pattern:
    mov rsi, r8
    shl rsi, 6                      /* q of the first qword = sector * 64 */
    xor ecx, ecx
1:
    lea rax, [rsi + 1]
    mov rdx, 0x9E3779B97F4A7C15
    imul rax, rdx
    add rax, r15
    mov rdx, rax
    shr rdx, 30
    xor rax, rdx
    mov rdx, 0xBF58476D1CE4E5B9
    imul rax, rdx
    mov rdx, rax
    shr rdx, 27
    xor rax, rdx
    mov rdx, 0x94D049BB133111EB
    imul rax, rdx
    mov rdx, rax
    shr rdx, 31
    xor rax, rdx
    mov [IO_BUF_ADDR + rcx], rax
    inc rsi
    add ecx, 8
    cmp ecx, r11d
    jb 1b
    ret

/* Builds the CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) tables for slicing
   by 8 at CRC_TABLES_ADDR: table 0 is the byte table, table k entry i is table k-1
   entry i advanced by one zero byte. Clobbers rax, rcx, rdx, rsi, rdi. */
crc_init:
    mov edi, CRC_TABLES_ADDR
    xor ecx, ecx
1:
    mov eax, ecx
    mov edx, 8
2:
    shr eax, 1
    jnc 3f
    xor eax, 0x82F63B78
3:
    dec edx
    jnz 2b
    mov [rdi + rcx * 4], eax
    inc ecx
    cmp ecx, 256
    jb 1b
    xor ecx, ecx                    /* ecx = entry of tables 1..7, 256 * 7 of them */
4:
    mov eax, [rdi + rcx * 4]        /* the entry 256 earlier (same i, table k - 1) */
    movzx edx, al
    shr eax, 8
    xor eax, [rdi + rdx * 4]
    mov [rdi + rcx * 4 + 1024], eax
    inc ecx
    cmp ecx, 256 * 7
    jb 4b
    ret

/* ebp = CRC-32C register updated over r11 bytes (a multiple of 8) at r10, 8 bytes per
   step (slicing by 8). Clobbers rax, rcx, rdx, rsi, rdi. */
crc_update:
    mov esi, CRC_TABLES_ADDR
    xor ecx, ecx
1:
    mov eax, [r10 + rcx]
    xor eax, ebp
    mov edx, [r10 + rcx + 4]
    movzx edi, al
    mov ebp, [rsi + rdi * 4 + 7 * 1024]
    movzx edi, ah
    xor ebp, [rsi + rdi * 4 + 6 * 1024]
    shr eax, 16
    movzx edi, al
    xor ebp, [rsi + rdi * 4 + 5 * 1024]
    movzx edi, ah
    xor ebp, [rsi + rdi * 4 + 4 * 1024]
    movzx edi, dl
    xor ebp, [rsi + rdi * 4 + 3 * 1024]
    movzx edi, dh
    xor ebp, [rsi + rdi * 4 + 2 * 1024]
    shr edx, 16
    movzx edi, dl
    xor ebp, [rsi + rdi * 4 + 1024]
    movzx edi, dh
    xor ebp, [rsi + rdi * 4]
    add ecx, 8
    cmp ecx, r11d
    jb 1b
    ret

/* Reports the IO_STATS counters of disk [cur_disk] (PORT_IO_STAT_*). Clobbers rax,
   rcx, rdx, rsi, rdi. */
report_counters:
    mov rcx, [rip + cur_disk]
    mov rsi, rcx
    shl rsi, 5                      /* IO_STATS * 8 bytes per disk */
    lea rax, [rip + disk_counters]
    add rsi, rax
    shl ecx, 2                      /* PORT_IO_STAT_SELECT of counter 0 */
    xor edi, edi
1:
    lea eax, [rcx + rdi]
    mov dx, PORT_IO_STAT_SELECT
    out dx, eax
    mov rax, [rsi + rdi * 8]
    mov dx, PORT_IO_STAT_LO
    out dx, eax
    shr rax, 32
    mov dx, PORT_IO_STAT_HI
    out dx, eax
    inc edi
    cmp edi, IO_STATS
    jb 1b
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

/* Reports on PORT_BLOCK_CHECKSUM the checksum of the 4 KiB buffer: the low 32 bits of
   the wrapping sum of its 512 qwords, qword i rotated left by i. Clobbers rax, rcx, rdx. */
block_checksum:
    xor eax, eax
    xor ecx, ecx
1:
    mov rdx, [BLK_BUF_ADDR + rcx * 8]
    rol rdx, cl
    add rax, rdx
    inc ecx
    cmp ecx, 512
    jb 1b
    mov dx, PORT_BLOCK_CHECKSUM
    out dx, eax
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

/* One virtio-blk request of 4 KiB at sector r8 from/to BLK_BUF_ADDR (see blk_rw). */
blk_request:
    mov r10d, BLK_BUF_ADDR
    mov r11d, 4096
    /* fall through */

/*
 * One virtio-blk request of r11 bytes (a multiple of 512) at sector r8 from/to the
 * buffer at r10, on the device at rbx. edi = request type (0 in, 1 out). Returns eax =
 * virtio status byte (0 = OK), or 0xFF when the device did not complete the request
 * synchronously (the VMM completes it during the notify exit). Counts the request,
 * its bytes or its failure in the counters of disk [cur_disk]. Clobbers rcx, rdx, rsi, r9.
 */
blk_rw:
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
    mov [rsi + 16], r10
    mov [rsi + 24], r11d
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
    mov eax, 0xFF
    jne 2f
    movzx eax, byte ptr [BLK_STATUS_ADDR]
2:
    mov rsi, [rip + cur_disk]       /* this disk's counters */
    shl rsi, 5
    lea rcx, [rip + disk_counters]
    add rsi, rcx
    inc qword ptr [rsi]             /* IO_STAT_REQUESTS */
    test eax, eax
    jnz 3f
    lea rdx, [rsi + 8]              /* IO_STAT_BYTES_READ */
    test edi, edi
    jz 4f
    lea rdx, [rsi + 16]             /* IO_STAT_BYTES_WRITTEN */
4:
    add [rdx], r11
    ret
3:
    inc qword ptr [rsi + 24]        /* IO_STAT_ERRORS */
    ret

/*
 * virtio-net bring-up over virtio-mmio: VERSION_1 and MAC only, receive queue 0 with
 * VQ_SIZE buffers of NET_RX_BUF_SIZE posted, transmit queue 1. Records the MAC (from
 * config space) and the IPv4 address (from PORT_NET_IPV4) in NET_STATE_ADDR and marks
 * the device up there. No device, or a device that refuses: the guest runs without.
 * Preserves r12-r15 and rbp.
 */
net_init:
    push rbx
    mov dword ptr [NET_STATE_ADDR], 0
    mov ebx, VIRTIO_NET_MMIO_BASE
    mov eax, [rbx + 0x000]
    cmp eax, 0x74726976
    jne .Lnet_out
    mov eax, [rbx + 0x004]
    cmp eax, 2
    jne .Lnet_out
    mov eax, [rbx + 0x008]          /* DeviceID: 1 = network */
    cmp eax, 1
    jne .Lnet_out
    mov dword ptr [rbx + 0x070], 0  /* reset */
    mov dword ptr [rbx + 0x070], 3  /* ACKNOWLEDGE | DRIVER */
    mov dword ptr [rbx + 0x014], 1
    mov eax, [rbx + 0x010]
    test eax, 1                     /* VIRTIO_F_VERSION_1 */
    jz .Lnet_failed
    mov dword ptr [rbx + 0x014], 0
    mov eax, [rbx + 0x010]
    test eax, 0x20                  /* VIRTIO_NET_F_MAC */
    jz .Lnet_failed
    mov dword ptr [rbx + 0x024], 1
    mov dword ptr [rbx + 0x020], 1
    mov dword ptr [rbx + 0x024], 0
    mov dword ptr [rbx + 0x020], 0x20
    mov dword ptr [rbx + 0x070], 0xB /* | FEATURES_OK */
    mov eax, [rbx + 0x070]
    test eax, 8
    jz .Lnet_failed

    mov edi, NET_RXQ_ADDR           /* clear both queues' descriptors and rings */
    xor eax, eax
    mov ecx, 0x2000 / 8
    rep stosq
    xor ecx, ecx                    /* queue 0 (receive) at NET_RXQ_ADDR */
    mov edx, NET_RXQ_ADDR
    call net_setup_queue
    jc .Lnet_failed
    mov ecx, 1                      /* queue 1 (transmit) at NET_TXQ_ADDR */
    mov edx, NET_TXQ_ADDR
    call net_setup_queue
    jc .Lnet_failed

    xor ecx, ecx                    /* receive descriptor i: buffer i, device-writable */
1:
    mov eax, ecx
    shl eax, 4
    lea rdi, [NET_RXQ_ADDR + rax]
    mov eax, ecx
    shl eax, 11                     /* NET_RX_BUF_SIZE = 0x800 */
    add eax, NET_RX_BUF_ADDR
    mov [rdi], rax
    mov dword ptr [rdi + 8], NET_RX_BUF_SIZE
    mov word ptr [rdi + 12], 2      /* WRITE */
    mov word ptr [rdi + 14], 0
    mov [NET_RXQ_ADDR + 0x104 + rcx * 2], cx /* avail ring entry i = descriptor i */
    inc ecx
    cmp ecx, VQ_SIZE
    jb 1b
    mov word ptr [NET_RXQ_ADDR + 0x102], VQ_SIZE /* avail idx */
    mov dword ptr [rbx + 0x070], 0xF /* | DRIVER_OK */
    mov dword ptr [rbx + 0x050], 0  /* notify: receive buffers are posted */

    mov eax, [rbx + 0x100]          /* MAC, bytes 0..3 */
    mov [NET_STATE_ADDR + 8], eax
    movzx eax, word ptr [rbx + 0x104] /* bytes 4..5 */
    mov [NET_STATE_ADDR + 12], ax
    mov dx, PORT_NET_IPV4
    in eax, dx
    mov [NET_STATE_ADDR + 4], eax
    mov word ptr [NET_STATE_ADDR + 16], 0
    mov dword ptr [NET_STATE_ADDR], 1
    lea rsi, [rip + msg_net_up]
    call serial_puts
    jmp .Lnet_out
.Lnet_failed:
    mov dword ptr [rbx + 0x070], 0x80 /* FAILED */
    lea rsi, [rip + msg_net_fail]
    call serial_puts
.Lnet_out:
    pop rbx
    ret

/* Sets up queue ecx with VQ_SIZE entries at edx (desc, avail +0x100, used +0x200) on
 * the device at rbx. Carry set when the device cannot take VQ_SIZE entries. */
net_setup_queue:
    mov [rbx + 0x030], ecx          /* QueueSel */
    mov eax, [rbx + 0x034]          /* QueueNumMax */
    cmp eax, VQ_SIZE
    jb 1f
    mov dword ptr [rbx + 0x038], VQ_SIZE
    mov [rbx + 0x080], edx
    mov dword ptr [rbx + 0x084], 0
    lea eax, [rdx + 0x100]
    mov [rbx + 0x090], eax
    mov dword ptr [rbx + 0x094], 0
    lea eax, [rdx + 0x200]
    mov [rbx + 0x0a0], eax
    mov dword ptr [rbx + 0x0a4], 0
    mov dword ptr [rbx + 0x044], 1  /* QueueReady */
    clc
    ret
1:
    stc
    ret

/*
 * Takes every frame the device returned on the receive queue, answers it if it is an
 * ARP request or ICMP echo request for our address, and posts its buffer again.
 * Preserves r12-r15 and rbp.
 */
net_poll:
    cmp dword ptr [NET_STATE_ADDR], 1
    jne 9f
    push rbx
    mov ebx, VIRTIO_NET_MMIO_BASE
1:
    movzx eax, word ptr [NET_RXQ_ADDR + 0x202]  /* used idx */
    movzx ecx, word ptr [NET_STATE_ADDR + 16]   /* the next one we have not taken */
    cmp ax, cx
    je 2f
    mov edx, ecx
    and edx, VQ_SIZE - 1
    mov r8d, [NET_RXQ_ADDR + 0x204 + rdx * 8]   /* descriptor (= buffer) index */
    and r8d, VQ_SIZE - 1
    mov r9d, [NET_RXQ_ADDR + 0x208 + rdx * 8]   /* bytes written, header included */
    inc ecx
    mov [NET_STATE_ADDR + 16], cx
    mov r10d, r8d
    shl r10d, 11
    add r10d, NET_RX_BUF_ADDR
    cmp r9d, NET_RX_BUF_SIZE
    ja 3f
    call net_answer
3:
    movzx eax, word ptr [NET_RXQ_ADDR + 0x102]  /* post the buffer again */
    mov edx, eax
    and edx, VQ_SIZE - 1
    mov [NET_RXQ_ADDR + 0x104 + rdx * 2], r8w
    inc eax
    mov [NET_RXQ_ADDR + 0x102], ax
    mov dword ptr [rbx + 0x050], 0
    jmp 1b
2:
    pop rbx
9:
    ret

/*
 * r10 = receive buffer (12-byte virtio header, then the Ethernet frame), r9d = its
 * length. Turns an ARP request or ICMP echo request for our IPv4 address into the reply,
 * in place, and transmits it (the VMM sends it during the notify exit, so the buffer
 * is free again on return). Anything else is left alone. Preserves rbx, r8, r12-r15.
 */
net_answer:
    mov eax, [NET_STATE_ADDR + 4]
    test eax, eax
    jz 9f                           /* no address: answer nothing */
    lea rdi, [r10 + 12]             /* Ethernet frame */
    cmp r9d, 12 + 14 + 28
    jb 9f
    movzx eax, word ptr [rdi + 12]  /* EtherType, big-endian in memory */
    cmp ax, 0x0608                  /* ARP */
    je 1f
    cmp ax, 0x0008                  /* IPv4 */
    je 2f
9:
    ret
1:  /* ARP: Ethernet/IPv4, request, for our address */
    cmp dword ptr [rdi + 14], 0x00080100
    jne 9b
    cmp dword ptr [rdi + 18], 0x01000406
    jne 9b
    mov eax, [NET_STATE_ADDR + 4]
    cmp eax, [rdi + 38]
    jne 9b
    mov byte ptr [rdi + 21], 2      /* reply */
    mov eax, [rdi + 22]             /* target hardware address = the asker's */
    mov [rdi + 32], eax
    mov ax, [rdi + 26]
    mov [rdi + 36], ax
    mov eax, [rdi + 28]             /* target protocol address = the asker's */
    mov [rdi + 38], eax
    mov eax, [NET_STATE_ADDR + 8]   /* sender = us */
    mov [rdi + 22], eax
    mov ax, [NET_STATE_ADDR + 12]
    mov [rdi + 26], ax
    mov eax, [NET_STATE_ADDR + 4]
    mov [rdi + 28], eax
    mov eax, [rdi + 32]             /* Ethernet destination = the asker */
    mov [rdi], eax
    mov ax, [rdi + 36]
    mov [rdi + 4], ax
    mov r9d, 12 + 14 + 28
    jmp 5f
2:  /* IPv4: version 4, protocol ICMP, for our address, echo request */
    movzx ecx, byte ptr [rdi + 14]
    mov edx, ecx
    shr edx, 4
    cmp edx, 4
    jne 9b
    and ecx, 0xF
    shl ecx, 2                      /* header length in bytes */
    cmp ecx, 20
    jb 9b
    lea edx, [ecx + 12 + 14 + 8]    /* the ICMP header must be inside the frame */
    cmp r9d, edx
    jb 9b
    cmp byte ptr [rdi + 14 + 9], 1
    jne 9b
    mov eax, [NET_STATE_ADDR + 4]
    cmp eax, [rdi + 30]
    jne 9b
    lea rsi, [rdi + 14 + rcx]       /* ICMP header */
    cmp byte ptr [rsi], 8
    jne 9b
    mov byte ptr [rsi], 0           /* echo reply */
    movzx eax, word ptr [rsi + 2]   /* checksum: type 8 -> 0 adds 0x0800 (RFC 1624) */
    rol ax, 8
    add ax, 0x0800
    adc ax, 0
    rol ax, 8
    mov [rsi + 2], ax
    mov eax, [rdi + 26]             /* swap source and destination addresses; the */
    mov edx, [rdi + 30]             /* header checksum does not change */
    mov [rdi + 26], edx
    mov [rdi + 30], eax
    mov eax, [rdi + 6]              /* Ethernet destination = the sender */
    mov [rdi], eax
    mov ax, [rdi + 10]
    mov [rdi + 4], ax
5:  /* Ethernet source = us; clean virtio header; transmit on queue 1 */
    mov eax, [NET_STATE_ADDR + 8]
    mov [rdi + 6], eax
    mov ax, [NET_STATE_ADDR + 12]
    mov [rdi + 10], ax
    mov qword ptr [r10], 0
    mov dword ptr [r10 + 8], 0
    mov [NET_TXQ_ADDR], r10
    mov [NET_TXQ_ADDR + 8], r9d
    mov dword ptr [NET_TXQ_ADDR + 12], 0 /* flags 0, next 0 */
    movzx eax, word ptr [NET_TXQ_ADDR + 0x102]
    mov edx, eax
    and edx, VQ_SIZE - 1
    mov word ptr [NET_TXQ_ADDR + 0x104 + rdx * 2], 0
    inc eax
    mov [NET_TXQ_ADDR + 0x102], ax
    mov dword ptr [rbx + 0x050], 1  /* notify queue 1 */
    mov eax, 1
    mov dx, PORT_NET_REPLIED
    out dx, eax
    ret


/*
 * The beacon: when the VMM names a target (PORT_BEACON_IPV4, PORT_BEACON_PORT) and the
 * network device is up, sends one UDP datagram to it, Ethernet broadcast, carrying
 * BEACON_MAGIC and the beacon counter (incremented first: 1, 2, 3, ...). The counter
 * lives in guest memory, so a VM resumed from an older state would send old numbers
 * again: fault-tolerance tests read it on the host. Preserves rbx, r12-r15, rbp.
 */
beacon:
    cmp dword ptr [NET_STATE_ADDR], 1
    jne 9f
    mov dx, PORT_BEACON_IPV4
    in eax, dx
    test eax, eax
    jz 9f
    mov r11d, eax                   /* destination address, packet order */
    mov dx, PORT_BEACON_PORT
    in eax, dx
    rol ax, 8                       /* to network order */
    mov r9d, eax
    mov edi, BEACON_BUF_ADDR
    mov qword ptr [rdi], 0          /* virtio header: 12 bytes of zero */
    mov dword ptr [rdi + 8], 0
    mov dword ptr [rdi + 12], 0xFFFFFFFF /* Ethernet destination: broadcast */
    mov word ptr [rdi + 16], 0xFFFF
    mov eax, [NET_STATE_ADDR + 8]   /* Ethernet source: us */
    mov [rdi + 18], eax
    mov ax, [NET_STATE_ADDR + 12]
    mov [rdi + 22], ax
    mov word ptr [rdi + 24], 0x0008 /* IPv4 */
    mov word ptr [rdi + 26], 0x0045 /* version 4, header 20 bytes, TOS 0 */
    mov word ptr [rdi + 28], 0x2C00 /* total length 44 */
    mov word ptr [rdi + 30], 0      /* identification */
    mov word ptr [rdi + 32], 0x0040 /* don't fragment */
    mov word ptr [rdi + 34], 0x1140 /* TTL 64, protocol UDP */
    mov word ptr [rdi + 36], 0      /* header checksum, below */
    mov eax, [NET_STATE_ADDR + 4]   /* source address: ours (0 when none) */
    mov [rdi + 38], eax
    mov [rdi + 42], r11d
    xor eax, eax                    /* one's complement sum of the ten header words */
    xor ecx, ecx
1:
    movzx edx, word ptr [rdi + 26 + rcx * 2]
    add eax, edx
    inc ecx
    cmp ecx, 10
    jb 1b
    mov edx, eax
    shr edx, 16
    and eax, 0xFFFF
    add eax, edx
    mov edx, eax
    shr edx, 16
    add eax, edx
    not eax
    mov [rdi + 36], ax
    mov [rdi + 46], r9w             /* UDP source port */
    mov [rdi + 48], r9w             /* UDP destination port */
    mov word ptr [rdi + 50], 0x1800 /* UDP length 24 */
    mov word ptr [rdi + 52], 0      /* no UDP checksum */
    mov rax, BEACON_MAGIC
    mov [rdi + 54], rax
    mov rax, [rip + beacon_counter]
    inc rax
    mov [rip + beacon_counter], rax
    mov [rdi + 62], rax
    mov [NET_TXQ_ADDR], rdi         /* transmit on queue 1, descriptor 0 */
    mov dword ptr [NET_TXQ_ADDR + 8], BEACON_FRAME_LEN
    mov dword ptr [NET_TXQ_ADDR + 12], 0
    movzx eax, word ptr [NET_TXQ_ADDR + 0x102]
    mov edx, eax
    and edx, VQ_SIZE - 1
    mov word ptr [NET_TXQ_ADDR + 0x104 + rdx * 2], 0
    inc eax
    mov [NET_TXQ_ADDR + 0x102], ax
    mov r11d, VIRTIO_NET_MMIO_BASE
    mov dword ptr [r11 + 0x050], 1  /* notify queue 1: the VMM sends it now */
9:
    ret

    .section .rodata
msg_banner:     .asciz "cairn-guest: up\r\n"
msg_block_pass: .asciz "cairn-guest: block self-test pass\r\n"
msg_block_fail: .asciz "cairn-guest: block self-test FAIL\r\n"
msg_block_none: .asciz "cairn-guest: no block device\r\n"
msg_net_up:     .asciz "cairn-guest: network device up\r\n"
msg_net_fail:   .asciz "cairn-guest: network device FAILED\r\n"

    .section .data
    .balign 8
test_round:     .quad 0
cur_disk:       .quad 0             /* the disk whose counters requests update */
disk_counters:  .fill IO_MAX_DISKS * IO_STATS, 8, 0
beacon_counter: .quad 0            /* the last beacon's number */
crc_ready:      .byte 0             /* the CRC-32C tables are built */
