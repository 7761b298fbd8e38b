//! Steering a multiqueue TAP's frames to their flows' workers in the kernel.
//!
//! Left to itself, the kernel puts a guest's frame on the queue its own flow table names (the
//! queue hubnat last wrote that flow's frames on), or, for a flow it does not know yet, on one
//! chosen by its own hash. The first frame of every flow (a SYN) thus lands on a worker that
//! owns the flow only half the time, and the frames the guest sends while hubnat's first
//! answer is still being delivered (the ACK of a SYN-ACK, a request right behind it) race the
//! kernel's table: in a connect-exchange-close load about one frame in three was read by the
//! other worker and handed over, each hand-over a wake-up of a thread that may be asleep.
//!
//! With a steering program (`TUNSETSTEERINGEBPF`) the kernel asks a socket-filter eBPF program
//! for each frame's queue instead. The program here computes the router's own flow hash
//! (`Router::tuple_hash`'s keys and `router::mix`, with the router's seeds), so every frame of
//! a flow is read by its owner. Frames that are not a worker's (ARP, DHCP, fragments, whatever the
//! router sends to the control thread) may land on any queue, as before.
//!
//! Loading a program needs CAP_BPF or CAP_SYS_ADMIN (or a kernel that lets anyone load socket
//! filters): `hubnat run` attaches it while it still has them, before the sandbox drops them.
//! Where that fails the kernel's own steering stays, and the log says so; so it does on a
//! persistent device, which would keep the program after hubnat.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `TUNSETSTEERINGEBPF`: `_IOR('T', 224, int)`.
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// An array whose values the process may map into its memory.
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `ld_imm64`'s source register when its constant is a map's descriptor.
const BPF_PSEUDO_MAP_FD: u8 = 1;
// Helper functions a socket filter may call.
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_KTIME_GET_NS: i32 = 5;
#[cfg(test)]
const BPF_PROG_TEST_RUN: libc::c_int = 10;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

/// One eBPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Insn {
    code: u8,
    /// Destination register in the low 4 bits, source in the high 4.
    regs: u8,
    off: i16,
    imm: i32,
}

// Instruction classes and fields (linux/bpf_common.h, linux/bpf.h).
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const STX: u8 = 0x03;
const JMP: u8 = 0x05;
const ATOMIC: u8 = 0xc0;
/// The atomic operation `ATOMIC` stands for: compare R0 and exchange, R0 gets the old value.
const CMPXCHG: i32 = 0xf0 | 0x01;
const CALL: u8 = 0x80;
const ALU64: u8 = 0x07;
const W: u8 = 0x00;
const H: u8 = 0x08;
const B: u8 = 0x10;
const DW: u8 = 0x18;
const IMM: u8 = 0x00;
const ABS: u8 = 0x20;
const IND: u8 = 0x40;
const MEM: u8 = 0x60;
const K: u8 = 0x00;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const SUB: u8 = 0x10;
const MUL: u8 = 0x20;
const OR: u8 = 0x40;
const AND: u8 = 0x50;
const LSH: u8 = 0x60;
const RSH: u8 = 0x70;
const XOR: u8 = 0xa0;
const MOV: u8 = 0xb0;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JNE: u8 = 0x50;
const JGE: u8 = 0x30;
const JGT: u8 = 0x20;
const JSET: u8 = 0x40;
const EXIT: u8 = 0x90;

// Registers. LD_ABS/LD_IND read the packet of the context in R6 into R0 and clobber R1-R5;
// the program keeps its values in R7-R9 and on the stack (R10).
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// A small assembler: instructions, and jumps to labels resolved at the end.
#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    /// (instruction index, label) of each jump still to resolve.
    jumps: Vec<(usize, usize)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    fn labels<const N: usize>(&mut self) -> [usize; N] {
        std::array::from_fn(|_| self.label())
    }

    fn here(&mut self, label: usize) {
        self.labels[label] = Some(self.code.len());
    }

    fn op(&mut self, i: Insn) {
        self.code.push(i);
    }

    fn alu_k(&mut self, op: u8, dst: u8, imm: i32) {
        self.op(insn(ALU64 | op | K, dst, 0, 0, imm));
    }

    fn alu_x(&mut self, op: u8, dst: u8, src: u8) {
        self.op(insn(ALU64 | op | X, dst, src, 0, 0));
    }

    /// R0 = the packet's `size` bytes at `off` (network order read as a number).
    fn ld_abs(&mut self, size: u8, off: i32) {
        self.op(insn(LD | ABS | size, 0, 0, 0, off));
    }

    /// R0 = the packet's `size` bytes at `src` + `off`.
    fn ld_ind(&mut self, size: u8, src: u8, off: i32) {
        self.op(insn(LD | IND | size, 0, src, 0, off));
    }

    /// `dst` = a 64-bit constant (two instruction slots).
    fn ld_imm64(&mut self, dst: u8, v: u64) {
        self.op(insn(LD | DW | IMM, dst, 0, 0, v as u32 as i32));
        self.op(insn(0, 0, 0, 0, (v >> 32) as u32 as i32));
    }

    fn store(&mut self, slot: i16, src: u8) {
        self.op(insn(STX | MEM | DW, R10, src, slot, 0));
    }

    fn load(&mut self, dst: u8, slot: i16) {
        self.op(insn(LDX | MEM | DW, dst, R10, slot, 0));
    }

    fn jmp_k(&mut self, op: u8, dst: u8, imm: i32, to: usize) {
        self.jumps.push((self.code.len(), to));
        self.op(insn(JMP | op | K, dst, 0, 0, imm));
    }

    fn jmp_x(&mut self, op: u8, dst: u8, src: u8, to: usize) {
        self.jumps.push((self.code.len(), to));
        self.op(insn(JMP | op | X, dst, src, 0, 0));
    }

    fn goto(&mut self, to: usize) {
        self.jumps.push((self.code.len(), to));
        self.op(insn(JMP | JA, 0, 0, 0, 0));
    }

    fn exit(&mut self) {
        self.op(insn(JMP | EXIT, 0, 0, 0, 0));
    }

    /// `dst` = the map with descriptor `fd` (the kernel puts its address there at load).
    fn ld_map(&mut self, dst: u8, fd: RawFd) {
        self.op(insn(LD | DW | IMM, dst, BPF_PSEUDO_MAP_FD, 0, fd));
        self.op(insn(0, 0, 0, 0, 0));
    }

    fn call(&mut self, helper: i32) {
        self.op(insn(JMP | CALL, 0, 0, 0, helper));
    }

    /// R0 = the address of word `SLOT_KEY` (on the stack) of map `fd`, or 0.
    fn lookup(&mut self, fd: RawFd) {
        self.ld_map(R1, fd);
        self.alu_x(MOV, R2, R10);
        self.alu_k(ADD, R2, SLOT_KEY.into());
        self.call(HELPER_MAP_LOOKUP_ELEM);
    }

    /// R0 = the address of word `index` of map `fd`, or 0.
    fn lookup_at(&mut self, fd: RawFd, index: usize) {
        self.alu_k(MOV, R1, index as i32);
        self.store(SLOT_KEY, R1);
        self.lookup(fd);
    }

    /// `dst` = the 64-bit word at `src` + `off`.
    fn ldx(&mut self, dst: u8, src: u8, off: i16) {
        self.op(insn(LDX | MEM | DW, dst, src, off, 0));
    }

    /// The 64-bit word at `dst` = `src`.
    fn stx(&mut self, dst: u8, src: u8) {
        self.op(insn(STX | MEM | DW, dst, src, 0, 0));
    }

    fn finish(mut self) -> Vec<Insn> {
        for &(at, label) in &self.jumps {
            let target = self.labels[label].expect("every label placed");
            self.code[at].off = (target as isize - at as isize - 1) as i16;
        }
        self.code
    }
}

// Stack slots.
const SLOT_KEY_A: i16 = -8;
const SLOT_PROTO: i16 = -16;
/// A map's key (its first 4 bytes: the slot's index).
const SLOT_KEY: i16 = -24;
/// The TCP flags of the frame, or `NOT_TCP`.
const SLOT_FLAGS: i16 = -32;
/// The queue a placed frame goes to.
const SLOT_QUEUE: i16 = -40;
/// When the guest last ended a connection.
const SLOT_ENDED: i16 = -48;
const NOT_TCP: i32 = 0x100;

/// `dst` = `mix(dst)`, as `router::mix` computes it; `tmp` is overwritten.
fn emit_mix(a: &mut Asm, dst: u8, tmp: u8) {
    a.alu_x(MOV, tmp, dst);
    a.alu_k(RSH, tmp, 32);
    a.alu_x(XOR, dst, tmp);
    a.ld_imm64(tmp, crate::router::MIX);
    a.alu_x(MUL, dst, tmp);
}

/// Jumps on the transport protocol (in `SLOT_PROTO`): TCP and UDP to `ports`, the family's ICMP
/// (`icmp`) to `no_ports`, anything else to `other`.
fn by_proto(a: &mut Asm, icmp: i32, ports: usize, no_ports: usize, other: usize) {
    a.load(R0, SLOT_PROTO);
    a.jmp_k(JEQ, R0, 6, ports);
    a.jmp_k(JEQ, R0, 17, ports);
    a.jmp_k(JEQ, R0, icmp, no_ports);
    a.goto(other);
}

/// With the flow hash in R0: the queue of a TCP frame by the placement table (in map `fd`), as
/// `Placement::owner` decides it: its bucket's worker (a FIN or RST marks that worker for the
/// guest's next connection), or for a SYN in an empty bucket the worker `Placement::choose`
/// would pick, claimed with a compare-and-swap; anything else keeps the hash.
fn emit_placement(a: &mut Asm, fd: RawFd) {
    use crate::placement::{
        ACK, END_QUEUE, END_TIME, FIN, FOLLOW_MASK, FOLLOW_NS, PREFERRED, RST, SLOTS, SYN, WORKERS,
    };
    let [hash, queue, empty, ended, follow, picked, done] = a.labels();
    let [preferred, turned] = a.labels();
    a.alu_x(MOV, R9, R0);
    a.load(R8, SLOT_FLAGS);
    a.jmp_k(JEQ, R8, NOT_TCP, hash);
    a.alu_x(MOV, R0, R9);
    a.alu_k(AND, R0, SLOTS as i32 - 1);
    a.store(SLOT_KEY, R0);
    a.lookup(fd);
    a.jmp_k(JEQ, R0, 0, hash);
    a.alu_x(MOV, R7, R0);
    a.ldx(R1, R7, 0);
    a.jmp_k(JEQ, R1, 0, empty);

    // Placed: the owner, the slot's high half less one.
    a.alu_k(RSH, R1, 32);
    a.alu_k(SUB, R1, 1);
    a.store(SLOT_QUEUE, R1);
    a.jmp_k(JSET, R8, i32::from(FIN | RST), ended);
    a.goto(queue);
    a.here(ended);
    a.lookup_at(fd, END_QUEUE);
    a.jmp_k(JEQ, R0, 0, queue);
    a.load(R1, SLOT_QUEUE);
    a.stx(R0, R1);
    a.lookup_at(fd, END_TIME);
    a.jmp_k(JEQ, R0, 0, queue);
    a.alu_x(MOV, R7, R0);
    a.call(HELPER_KTIME_GET_NS);
    a.stx(R7, R0);
    a.goto(queue);

    // Empty: a SYN alone claims it, anything else keeps the hash.
    a.here(empty);
    a.alu_k(AND, R8, i32::from(FIN | SYN | RST | ACK));
    a.jmp_k(JNE, R8, i32::from(SYN), hash);
    a.lookup_at(fd, END_TIME);
    a.jmp_k(JEQ, R0, 0, hash);
    // R8: the address of `END_TIME`, cleared when a connection follows the end it records.
    a.alu_x(MOV, R8, R0);
    a.ldx(R1, R8, 0);
    a.store(SLOT_ENDED, R1);
    a.call(HELPER_KTIME_GET_NS);
    a.load(R1, SLOT_ENDED);
    a.alu_x(SUB, R0, R1);
    a.jmp_k(JGE, R0, FOLLOW_NS as i32, preferred);
    // Within the time: the worker the guest last ended a connection on, if `FOLLOW_MASK` has it.
    a.lookup_at(fd, END_QUEUE);
    a.jmp_k(JEQ, R0, 0, hash);
    a.ldx(R1, R0, 0);
    a.jmp_k(JGE, R1, 64, preferred);
    a.store(SLOT_QUEUE, R1);
    a.lookup_at(fd, FOLLOW_MASK);
    a.jmp_k(JEQ, R0, 0, hash);
    a.ldx(R1, R0, 0);
    a.load(R2, SLOT_QUEUE);
    a.alu_x(RSH, R1, R2);
    a.jmp_k(JSET, R1, 1, follow);
    // The preferred worker, and the turn passes to the next (`Placement::choose`).
    a.here(preferred);
    a.lookup_at(fd, WORKERS);
    a.jmp_k(JEQ, R0, 0, hash);
    a.ldx(R1, R0, 0);
    a.store(SLOT_ENDED, R1);
    a.lookup_at(fd, PREFERRED);
    a.jmp_k(JEQ, R0, 0, hash);
    a.ldx(R1, R0, 0);
    a.store(SLOT_QUEUE, R1);
    a.alu_k(ADD, R1, 1);
    a.load(R2, SLOT_ENDED);
    a.jmp_x(JGT, R2, R1, turned);
    a.alu_k(MOV, R1, 0);
    a.here(turned);
    a.stx(R0, R1);
    a.goto(picked);
    a.here(follow);
    a.alu_k(MOV, R1, 0);
    a.stx(R8, R1);
    a.here(picked);
    a.load(R1, SLOT_QUEUE);
    a.alu_k(ADD, R1, 1);
    a.alu_k(LSH, R1, 32);
    a.alu_k(MOV, R0, 0);
    a.op(insn(STX | ATOMIC | DW, R7, R1, 0, CMPXCHG));
    // R0: what the slot held; 0 if the claim is ours, else another's placement won.
    a.jmp_k(JEQ, R0, 0, queue);
    a.alu_k(RSH, R0, 32);
    a.alu_k(SUB, R0, 1);
    a.goto(done);

    a.here(queue);
    a.load(R0, SLOT_QUEUE);
    a.goto(done);
    a.here(hash);
    a.alu_x(MOV, R0, R9);
    a.here(done);
}

/// Builds the program: the queue of each frame is `router::flow_hash` of its flow, modulo the
/// number of queues (the kernel takes the modulo), for the frames the router gives to workers;
/// with `placement` (the descriptor of the `placement` table's array), a guest's TCP frame goes
/// where its bucket was placed, and a SYN in an empty bucket places it (`emit_placement`).
fn program(seeds: [u64; 2], placement: Option<RawFd>) -> Vec<Insn> {
    let mut a = Asm::default();
    let [v4, v6, ports_v4, no_ports, ports_v6, keyed, any] = a.labels();
    a.alu_x(MOV, R6, R1);
    a.alu_k(MOV, R0, NOT_TCP);
    a.store(SLOT_FLAGS, R0);
    a.ld_abs(H, 12);
    a.jmp_k(JEQ, R0, 0x0800, v4);
    a.jmp_k(JEQ, R0, 0x86dd, v6);
    a.goto(any);

    // IPv4: no fragments; TCP, UDP (ports after the header) or ICMP (none).
    a.here(v4);
    a.ld_abs(H, 20);
    a.jmp_k(JSET, R0, 0x3fff, any);
    a.ld_abs(B, 23);
    a.store(SLOT_PROTO, R0);
    // R8 = the source address, R9 = the destination's, as the router's keys take them.
    a.ld_abs(W, 26);
    a.alu_x(MOV, R8, R0);
    a.ld_abs(W, 30);
    a.alu_x(MOV, R9, R0);
    by_proto(&mut a, 1, ports_v4, no_ports, any);
    a.here(ports_v4);
    // R7 = the transport header's offset: 14 + IHL * 4.
    a.ld_abs(B, 14);
    a.alu_k(AND, R0, 0x0f);
    a.alu_k(LSH, R0, 2);
    a.alu_x(MOV, R7, R0);
    a.alu_k(LSH, R8, 16);
    a.ld_ind(H, R7, 14);
    a.alu_x(XOR, R8, R0);
    a.alu_k(LSH, R9, 16);
    a.ld_ind(H, R7, 16);
    a.alu_x(XOR, R9, R0);
    if placement.is_some() {
        let not_tcp = a.label();
        a.load(R0, SLOT_PROTO);
        a.jmp_k(JNE, R0, 6, not_tcp);
        a.ld_ind(B, R7, 14 + 13);
        a.store(SLOT_FLAGS, R0);
        a.here(not_tcp);
    }
    a.goto(keyed);
    a.here(no_ports);
    a.alu_k(LSH, R8, 16);
    a.alu_k(LSH, R9, 16);
    a.goto(keyed);

    // IPv6 (no extension headers): TCP, UDP or ICMPv6 (no ports). An address is folded to
    // 64 bits (high half XOR low half) before its key is made.
    a.here(v6);
    a.ld_abs(B, 20);
    a.store(SLOT_PROTO, R0);
    for (reg, at) in [(R8, 22), (R9, 38)] {
        // reg = w0 << 32 | w1, then XOR (w2 << 32 | w3).
        a.ld_abs(W, at);
        a.alu_x(MOV, reg, R0);
        a.alu_k(LSH, reg, 32);
        a.ld_abs(W, at + 4);
        a.alu_x(OR, reg, R0);
        a.ld_abs(W, at + 8);
        a.alu_x(MOV, R7, R0);
        a.alu_k(LSH, R7, 32);
        a.ld_abs(W, at + 12);
        a.alu_x(OR, R7, R0);
        a.alu_x(XOR, reg, R7);
        a.alu_k(LSH, reg, 16);
    }
    by_proto(&mut a, 58, ports_v6, keyed, any);
    a.here(ports_v6);
    a.ld_abs(H, 54);
    a.alu_x(XOR, R8, R0);
    a.ld_abs(H, 56);
    a.alu_x(XOR, R9, R0);
    if placement.is_some() {
        let not_tcp = a.label();
        a.load(R0, SLOT_PROTO);
        a.jmp_k(JNE, R0, 6, not_tcp);
        a.ld_abs(B, 54 + 13);
        a.store(SLOT_FLAGS, R0);
        a.here(not_tcp);
    }

    // R8, R9: the two ends' keys. The hash takes the smaller first (both directions alike).
    a.here(keyed);
    let ordered = a.label();
    a.jmp_x(JGT, R9, R8, ordered);
    a.alu_x(MOV, R7, R8);
    a.alu_x(MOV, R8, R9);
    a.alu_x(MOV, R9, R7);
    a.here(ordered);
    a.store(SLOT_KEY_A, R9);
    a.ld_imm64(R0, seeds[0]);
    a.alu_x(XOR, R0, R8);
    emit_mix(&mut a, R0, R2);
    a.load(R9, SLOT_KEY_A);
    a.alu_x(XOR, R0, R9);
    emit_mix(&mut a, R0, R2);
    a.load(R9, SLOT_PROTO);
    a.alu_x(XOR, R0, R9);
    a.ld_imm64(R2, seeds[1]);
    a.alu_x(XOR, R0, R2);
    emit_mix(&mut a, R0, R2);
    a.alu_k(RSH, R0, 32);
    if let Some(fd) = placement {
        emit_placement(&mut a, fd);
    }
    a.exit();

    a.here(any);
    a.alu_k(MOV, R0, 0);
    a.exit();
    a.finish()
}

/// The bpf(2) command `cmd` with `attr` as its `union bpf_attr`; its result, or the error.
///
/// # Safety
/// Every pointer `attr` holds must be valid, for the lengths `attr` gives beside it, for the
/// call, and writable where the command writes.
unsafe fn bpf(cmd: libc::c_int, attr: &mut [u8]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is live and writable for its length; the caller answers for the pointers
    // inside it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// A loaded program's descriptor, or why the kernel refused it (with its verifier's words).
fn load(code: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 16 * 1024];
    // union bpf_attr for BPF_PROG_LOAD, the fields up to the log buffer; the rest zero.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SOCKET_FILTER.to_ne_bytes());
    attr[4..8].copy_from_slice(&(code.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(code.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&1u32.to_ne_bytes());
    attr[28..32].copy_from_slice(&(log.len() as u32).to_ne_bytes());
    attr[32..40].copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: `attr` is a bpf_attr for BPF_PROG_LOAD whose pointers (the instructions, the
    // license, the log buffer with its length) are live for the call; the kernel writes only
    // into the log buffer.
    let fd = unsafe { bpf(BPF_PROG_LOAD, &mut attr) }.map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let words = String::from_utf8_lossy(&log[..end]);
        match words.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(l) => io::Error::new(e.kind(), format!("{e} (verifier: {l})")),
            None => e,
        }
    })?;
    // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// An eBPF array of 64-bit words mapped into this process: the flow placement table
/// (`placement`), read and written here with atomics and in the kernel by the steering program.
pub struct FlowMap {
    fd: OwnedFd,
    words: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
    mapped: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics; it lives as long as the
// FlowMap, whichever thread holds it.
unsafe impl Send for FlowMap {}
// SAFETY: as above: every access is an atomic operation on the shared words.
unsafe impl Sync for FlowMap {}

impl FlowMap {
    /// An array of `len` words, zeroed, mapped here.
    pub fn create(len: usize) -> io::Result<FlowMap> {
        let mut attr = [0u8; 72];
        attr[0..4].copy_from_slice(&BPF_MAP_TYPE_ARRAY.to_ne_bytes());
        attr[4..8].copy_from_slice(&4u32.to_ne_bytes());
        attr[8..12].copy_from_slice(&8u32.to_ne_bytes());
        attr[12..16].copy_from_slice(&(len as u32).to_ne_bytes());
        attr[16..20].copy_from_slice(&BPF_F_MMAPABLE.to_ne_bytes());
        // SAFETY: a bpf_attr for BPF_MAP_CREATE: plain numbers, no pointers.
        let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr) }?;
        // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let page = 4096;
        let mapped = (len * 8).div_ceil(page) * page;
        // SAFETY: maps the array's values (an mmapable array maps them from offset 0, a whole
        // number of pages); the mapping is owned by the FlowMap and unmapped in its drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let words = std::ptr::NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(FlowMap {
            fd,
            words,
            len,
            mapped,
        })
    }

    /// The words, shared with the kernel.
    pub fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping holds `len` 8-byte words, page-aligned, live while `self` is;
        // AtomicU64 has the layout of a u64, and the kernel's side uses atomic accesses or
        // single aligned 64-bit loads and stores.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.len) }
    }
}

impl Drop for FlowMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create`, of that length, no longer referenced (`words`
        // borrows `self`).
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.mapped) };
    }
}

/// Nanoseconds of the monotonic clock, the clock the kernel's `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a pointer to a live one.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Has the multiqueue TAP whose first queue is `tap` steer every frame of a flow to the queue
/// of its worker under `router` (queue i is worker i's), unless the device is persistent, and
/// logs what came of it: where the kernel refuses, its own steering stays.
pub fn steer_queues(tap: &crate::port::tap::Tap, router: &crate::router::Router) {
    let kernels = "TAP queues: steered by the kernel's flow table";
    if tap.persistent() {
        tracing::info!(
            "{kernels} (a persistent device would keep a steering program after hubnat)"
        );
        return;
    }
    let map = router.placement().and_then(|p| p.kernel_map());
    match attach(tap, router.steering_seeds(), map) {
        Ok(()) if map.is_some() => {
            if let Some(p) = router.placement() {
                p.set_steered();
            }
            tracing::debug!(
                "TAP queues: each flow's frames steered to its worker (eBPF, new TCP flows placed)"
            )
        }
        Ok(()) => tracing::debug!("TAP queues: each flow's frames steered to its worker (eBPF)"),
        Err(e) => tracing::info!(
            "{kernels}, a flow's first frames sometimes read by another worker and handed over \
             (no steering program: {e})"
        ),
    }
}

/// Has the multiqueue TAP whose queue `tap` is steer every frame of a flow to the queue of its
/// worker under a router with `seeds` (queue i is worker i's), new TCP flows placed by the
/// table in `placement` if given.
pub fn attach(tap: &impl AsRawFd, seeds: [u64; 2], placement: Option<&FlowMap>) -> io::Result<()> {
    let prog = load(&program(seeds, placement.map(|m| m.fd.as_raw_fd())))?;
    let fd: libc::c_int = prog.as_raw_fd();
    // SAFETY: TUNSETSTEERINGEBPF reads one int (the program's descriptor) from the pointer,
    // which points at a live c_int; the TAP takes its own reference to the program.
    let r = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETSTEERINGEBPF, &fd) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Router;
    use hubnat_core::testing::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

    /// The program's answer for `frame`, run by the kernel (BPF_PROG_TEST_RUN). The test run
    /// takes an Ethernet header off the data before the program sees it, where a TAP's steering
    /// program sees the frame from its Ethernet header: a spare header goes first.
    fn run(prog: &OwnedFd, frame: &[u8]) -> u32 {
        let mut data = vec![0u8; 14];
        data[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        data.extend_from_slice(frame);
        let mut attr = [0u8; 80];
        attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        attr[16..24].copy_from_slice(&(data.as_ptr() as u64).to_ne_bytes());
        attr[32..36].copy_from_slice(&1u32.to_ne_bytes());
        // SAFETY: a bpf_attr for BPF_PROG_TEST_RUN whose input pointer and size describe
        // `data`, live for the call; no output buffer is given.
        if let Err(e) = unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) } {
            panic!("test run: {e}");
        }
        u32::from_ne_bytes(attr[4..8].try_into().unwrap())
    }

    #[test]
    fn the_program_steers_every_frame_of_a_flow_to_the_routers_worker() {
        let router = Router::with_seeds(2, [11, 22, 33, 44]);
        let prog = match load(&program(router.steering_seeds(), None)) {
            Ok(p) => p,
            // Not root, or a kernel without eBPF: nothing to check here.
            Err(e) => {
                eprintln!("skipped: cannot load the program: {e}");
                return;
            }
        };
        let cfg = hubnat_core::Config::defaults();
        let queues = 3u32;
        let mut seen = [0usize; 3];
        for i in 0..200u16 {
            let g = SocketAddrV4::new(GUEST_IP, 20000 + i);
            let r = SocketAddrV4::new(Ipv4Addr::new(10, 79, (i % 7) as u8, 2), 80 + i % 3);
            for (frame, proto, a, b) in [
                (
                    syn_frame(g, r, 1),
                    smoltcp::wire::IpProtocol::Tcp,
                    SocketAddr::from(g),
                    SocketAddr::from(r),
                ),
                (
                    udp_frame(g, r, b"hello"),
                    smoltcp::wire::IpProtocol::Udp,
                    g.into(),
                    r.into(),
                ),
            ] {
                let want = router.flow_hash_of(proto, a, b);
                let got = run(&prog, &frame);
                assert_eq!(got, want, "{a} -> {b} ({proto})");
                assert_eq!(
                    router.route(&frame, &cfg, HOST_MAC),
                    want as usize % 2,
                    "the router's own choice"
                );
                seen[(got % queues) as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n > 50), "spread: {seen:?}");
        // IPv6, both ways round.
        let g6 = SocketAddrV6::new(guest_ip6(), 40000, 0, 0);
        let r6 = SocketAddrV6::new("2001:db8:77::2".parse::<Ipv6Addr>().unwrap(), 443, 0, 0);
        let f = syn6_frame(g6, r6, 7);
        let want = router.flow_hash_of(smoltcp::wire::IpProtocol::Tcp, r6.into(), g6.into());
        assert_eq!(run(&prog, &f), want);
        // Not a worker's: queue 0.
        assert_eq!(run(&prog, &[0u8; 60]), 0);
    }

    #[test]
    fn the_program_places_tcp_flows_as_the_router_does() {
        use crate::placement::*;
        use std::sync::Arc;
        let placement = Arc::new(Placement::new(2));
        let Some(map) = placement.kernel_map() else {
            eprintln!("skipped: no eBPF array (not root?)");
            return;
        };
        let router = Router::with_seeds(2, [5, 6, 7, 8]).with_placement(placement.clone());
        let prog = match load(&program(router.steering_seeds(), Some(map.fd.as_raw_fd()))) {
            Ok(p) => p,
            Err(e) => panic!("the placing program is refused: {e}"),
        };
        let cfg = hubnat_core::Config::defaults();
        let remote = SocketAddrV4::new(Ipv4Addr::new(10, 79, 0, 2), 7000);
        let guest = |port| SocketAddrV4::new(GUEST_IP, port);
        // The flags of a guest's segment (its SYN frame, rewritten: the program and the router
        // read no checksum).
        let seg = |port, flags: u8| {
            let mut f = syn_frame(guest(port), remote, 1);
            f[14 + 20 + 13] = flags;
            f
        };
        let hash = |port| {
            router.flow_hash_of(
                smoltcp::wire::IpProtocol::Tcp,
                guest(port).into(),
                remote.into(),
            )
        };
        placement.set_word(PREFERRED, 1);
        // A SYN places its flow on the preferred worker; the router reads the same.
        assert_eq!(run(&prog, &seg(1000, SYN)), 1);
        assert_eq!(placement.slot_state(hash(1000)), Some((1, 0)));
        assert_eq!(router.route(&seg(1000, SYN), &cfg, HOST_MAC), 1);
        assert_eq!(run(&prog, &seg(1000, ACK)), 1);
        assert_eq!(router.route(&seg(1000, ACK), &cfg, HOST_MAC), 1);
        // Not a SYN, unplaced: the hash, as the router's.
        assert_eq!(run(&prog, &seg(1001, ACK)), hash(1001));
        assert_eq!(
            router.route(&seg(1001, ACK), &cfg, HOST_MAC),
            hash(1001) as usize % 2
        );
        assert_eq!(placement.slot_state(hash(1001)), None);
        // Not TCP: the hash.
        let u = udp_frame(guest(1000), remote, b"x");
        let uh = router.flow_hash_of(
            smoltcp::wire::IpProtocol::Udp,
            guest(1000).into(),
            remote.into(),
        );
        assert_eq!(run(&prog, &u), uh);
        // The guest ends the flow: its next new one goes to the same worker, whatever is
        // preferred, for a while, if that worker is not loaded beyond the others.
        placement.set_word(PREFERRED, 0);
        placement.set_word(FOLLOW_MASK, 0b01);
        assert_eq!(run(&prog, &seg(1000, FIN | ACK)), 1);
        assert_eq!(
            run(&prog, &seg(1005, SYN)),
            0,
            "worker 1 loaded: not followed"
        );
        placement.set_word(FOLLOW_MASK, 0b11);
        assert_eq!(run(&prog, &seg(1000, FIN | ACK)), 1);
        assert_eq!(placement.word(END_QUEUE), 1);
        let ended = placement.word(END_TIME);
        assert!(monotonic_ns().abs_diff(ended) < 1_000_000_000, "{ended}");
        assert_eq!(run(&prog, &seg(1002, SYN)), 1);
        assert_eq!(router.route(&seg(1002, ACK), &cfg, HOST_MAC), 1);
        assert_eq!(
            placement.word(END_TIME),
            0,
            "one connection follows one end"
        );
        placement.set_word(END_TIME, ended - 2 * FOLLOW_NS);
        placement.set_word(PREFERRED, 0);
        assert_eq!(run(&prog, &seg(1003, SYN)), 0);
        // A burst of SYNs placed before any worker counted them takes the workers in turn.
        assert_eq!(placement.word(PREFERRED), 1);
        assert_eq!(run(&prog, &seg(1006, SYN)), 1);
        assert_eq!(run(&prog, &seg(1007, SYN)), 0);
        assert_eq!(router.route(&seg(1008, SYN), &cfg, HOST_MAC), 1);
        // The router's own claims (a forward's flow) hold in the kernel.
        let h = hash(1004);
        assert_eq!(placement.claim(h, 1), 1);
        assert_eq!(run(&prog, &seg(1004, SYN)), 1);
        // IPv6 alike.
        let g6 = SocketAddrV6::new(guest_ip6(), 40000, 0, 0);
        let r6 = SocketAddrV6::new("2001:db8:77::2".parse::<Ipv6Addr>().unwrap(), 443, 0, 0);
        placement.set_word(PREFERRED, 1);
        assert_eq!(run(&prog, &syn6_frame(g6, r6, 7)), 1);
        assert_eq!(router.route(&syn6_frame(g6, r6, 7), &cfg, HOST_MAC), 1);
    }
}
