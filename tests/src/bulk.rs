//! `mesh-bulk`: byte-exact data-path checks for same-node redirect. Each
//! scenario has a server side and a client side over real TCP sockets; the
//! binary (src/bin/bulk.rs) runs both in one process (`local`, so both
//! sockets are in the test cgroup) or one side per process (`serve` /
//! `client`, e.g. in two network namespaces). Every scenario checks what
//! arrived against what was sent and reports it as JSON ([`BulkReport`]);
//! nothing here decides pass or fail by time.
//!
//! Every blocking socket gets send/receive timeouts and every loop a
//! deadline, so a lost byte shows up as an error, never as a hang.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// What a scenario saw. `ok` is true only when every check held.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct BulkReport {
    pub scenario: String,
    pub ok: bool,
    /// Why `ok` is false (empty when it is true).
    pub errors: Vec<String>,
    /// Payload bytes the client sent.
    pub bytes: u64,
    pub elapsed_ms: u64,
    /// Scenario-specific observations (e.g. what a read returned after RST),
    /// compared by tests between redirect on and off.
    pub observed: BTreeMap<String, String>,
}

impl BulkReport {
    fn new(scenario: &str) -> Self {
        Self {
            scenario: scenario.into(),
            ..Default::default()
        }
    }

    fn check(&mut self, cond: bool, what: impl FnOnce() -> String) {
        if !cond {
            self.errors.push(what());
        }
    }

    fn observe(&mut self, key: &str, value: impl ToString) {
        self.observed.insert(key.into(), value.to_string());
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Many sizes and patterns echoed back with random partial reads/writes.
    Echo,
    /// writev() with mixed iovec sizes.
    Writev,
    /// sendfile() from a file.
    Sendfile,
    /// splice() from a pipe into the socket.
    SpliceTx,
    /// The receiver splices from the socket into a pipe.
    SpliceRx,
    /// MSG_PEEK before every read.
    Peek,
    /// shutdown(SHUT_WR) after the request; the response still flows.
    HalfClose,
    /// The client resets (SO_LINGER 0) after sending; what the server reads.
    Rst,
    /// Many concurrent non-blocking connections driven by epoll.
    Epoll,
    /// One long transfer, checked against a pattern.
    Bulk,
    /// The server reads with MSG_WAITALL while the client writes in pieces.
    WaitAll,
    /// The server sets SO_RCVLOWAT while the client writes in pieces.
    RcvLowat,
    /// The client sends one byte of urgent data (MSG_OOB) between others.
    Oob,
}

impl Scenario {
    pub const ALL: [(&'static str, Scenario); 13] = [
        ("echo", Scenario::Echo),
        ("writev", Scenario::Writev),
        ("sendfile", Scenario::Sendfile),
        ("splice-tx", Scenario::SpliceTx),
        ("splice-rx", Scenario::SpliceRx),
        ("peek", Scenario::Peek),
        ("half-close", Scenario::HalfClose),
        ("rst", Scenario::Rst),
        ("epoll", Scenario::Epoll),
        ("bulk", Scenario::Bulk),
        ("waitall", Scenario::WaitAll),
        ("rcvlowat", Scenario::RcvLowat),
        ("oob", Scenario::Oob),
    ];

    pub fn parse(s: &str) -> Option<Scenario> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, sc)| *sc)
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, sc)| *sc == self)
            .map_or("?", |(n, _)| n)
    }
}

/// Knobs of a run.
#[derive(Clone, Debug)]
pub struct Params {
    /// Bulk: bytes to send. Others: a scale where it applies.
    pub bytes: u64,
    /// Epoll: concurrent connections.
    pub conns: u32,
    /// Whole-run deadline.
    pub timeout: Duration,
    /// Bulk server: read nothing until this file exists (within the
    /// deadline), so a test can change the node while bytes wait unread.
    pub hold_until: Option<std::path::PathBuf>,
    /// Which ends use MPTCP sockets (the kernel's subflows underneath are
    /// TCP sockets the application never sees).
    pub mptcp: Mptcp,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mptcp {
    #[default]
    Neither,
    Client,
    Server,
    Both,
}

impl Mptcp {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "neither" => Mptcp::Neither,
            "client" => Mptcp::Client,
            "server" => Mptcp::Server,
            "both" => Mptcp::Both,
            _ => return None,
        })
    }

    pub fn client(self) -> bool {
        matches!(self, Mptcp::Client | Mptcp::Both)
    }

    pub fn server(self) -> bool {
        matches!(self, Mptcp::Server | Mptcp::Both)
    }
}

impl Default for Params {
    fn default() -> Self {
        Self {
            bytes: 64 << 20,
            conns: 1000,
            timeout: Duration::from_secs(30),
            hold_until: None,
            mptcp: Mptcp::Neither,
        }
    }
}

/// Network safety: loopback, or anything while in a namespace that is not
/// the host's (only tests make those).
pub fn target_allowed(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback() || in_own_netns()
}

/// True when this process runs in a network namespace a test made: one of
/// `/run/netns/mesh-test-*` (what `TestNetns` creates), or, where PID 1's
/// namespace can be read, any namespace other than the host's.
pub fn in_own_netns() -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &std::path::Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let Some(me) = id(std::path::Path::new("/proc/self/ns/net")) else {
        return false;
    };
    let test_made = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("mesh-test-"))
        .any(|e| id(&e.path()) == Some(me));
    test_made || id(std::path::Path::new("/proc/1/ns/net")).is_some_and(|host| host != me)
}

// ---------------------------------------------------------------- patterns

/// A small deterministic generator (xorshift64*), so both sides agree.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in 1..=max.
    pub fn size(&mut self, max: usize) -> usize {
        (self.next_u64() % max as u64) as usize + 1
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Sizes around every boundary that matters (page, 16 KiB TLS record, 64
/// KiB, sk_msg scatterlist) plus a few MiB.
pub const SIZES: [usize; 17] = [
    1,
    2,
    7,
    100,
    1448,
    4095,
    4096,
    4097,
    16383,
    16384,
    16385,
    65535,
    65536,
    65537,
    262_147,
    1 << 20,
    (3 << 20) + 1,
];

/// Payload of one echo case.
pub fn pattern(kind: usize, size: usize, seed: u64) -> Vec<u8> {
    match kind {
        0 => vec![0u8; size],
        1 => (0..size).map(|i| (i % 251) as u8).collect(),
        _ => {
            let mut v = vec![0u8; size];
            Rng::new(seed).fill(&mut v);
            v
        }
    }
}

/// FNV-1a, for reports (small data only).
pub fn fnv(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// A repeating pattern with a prime period, so any reordering, loss or
/// duplication not a multiple of the period (and thus of any write size)
/// shows up; stored twice so every window is one slice.
pub struct Stream {
    buf: Vec<u8>,
}

pub const STREAM_PERIOD: usize = 1_048_573;

impl Stream {
    pub fn new(seed: u64) -> Self {
        let mut half = vec![0u8; STREAM_PERIOD];
        Rng::new(seed).fill(&mut half);
        let mut buf = half.clone();
        buf.extend_from_slice(&half);
        Self { buf }
    }
    /// The `len` bytes at stream offset `off` (len ≤ period).
    pub fn at(&self, off: u64, len: usize) -> &[u8] {
        let start = (off % STREAM_PERIOD as u64) as usize;
        &self.buf[start..start + len.min(STREAM_PERIOD)]
    }
}

// ---------------------------------------------------------------- helpers

/// Blocking reads that returned EAGAIN before their timeout (see
/// [`Patient`]), over the whole process.
pub static EAGAIN_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A blocking reader that retries EAGAIN until its deadline.
///
/// A socket in a sockmap reads through `tcp_bpf_recvmsg`, which returns
/// EAGAIN from a *blocking* read whenever the socket is woken with nothing
/// queued (e.g. when its own FIN is acknowledged after shutdown(SHUT_WR)).
/// No byte is lost, but applications that treat EAGAIN on a blocking socket
/// as fatal see an error; the count is reported as `eagain_retries`.
pub struct Patient<'a> {
    s: &'a TcpStream,
    deadline: Instant,
}

impl<'a> Patient<'a> {
    pub fn new(s: &'a TcpStream, timeout: Duration) -> Self {
        Self {
            s,
            deadline: Instant::now() + timeout,
        }
    }
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&*self.s).read(buf) {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < self.deadline =>
                {
                    EAGAIN_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                other => return other,
            }
        }
    }
}

/// waitall and rcvlowat: the client writes PIECES pieces of PIECE bytes,
/// pausing between them.
const PIECES: usize = 9;
const PIECE: usize = 1000;

fn check_pieces(r: &mut BulkReport, got: &[u8]) {
    let want = pattern(1, PIECES * PIECE, 0);
    r.check(got == want, || {
        format!("read {} bytes, not the {} sent", got.len(), want.len())
    });
}

/// poll() for POLLIN (readable, or the end) within `timeout`.
fn wait_readable(s: &TcpStream, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd of our own.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    match n {
        1 => Ok(()),
        0 => Err(io::Error::from(io::ErrorKind::TimedOut)),
        _ => Err(io::Error::last_os_error()),
    }
}

fn set_rcvlowat(s: &TcpStream, bytes: usize) -> io::Result<()> {
    let v = bytes as libc::c_int;
    // SAFETY: an int option of our own socket.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(r as isize).map(drop)
}

fn timeouts(s: &TcpStream, t: Duration) -> io::Result<()> {
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))
}

fn errno_of(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::EPIPE) => "EPIPE".into(),
        Some(libc::EAGAIN) => "EAGAIN(timeout)".into(),
        Some(n) => format!("errno {n}"),
        None => format!("{:?}", e.kind()),
    }
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Reads to EOF; returns (bytes, fnv).
fn read_all_hash(s: &mut TcpStream, rng: &mut Rng) -> io::Result<(u64, u64, Vec<u8>)> {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let timeout = s.read_timeout()?.unwrap_or(Duration::from_secs(30));
    let mut r = Patient::new(s, timeout);
    loop {
        let want = rng.size(buf.len());
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    Ok((all.len() as u64, fnv(&all), all))
}

/// The sink reply: 8 bytes count, 8 bytes fnv.
fn sink_reply(s: &mut TcpStream, seed: u64) -> io::Result<()> {
    let (n, h, _) = read_all_hash(s, &mut Rng::new(seed))?;
    s.write_all(&n.to_le_bytes())?;
    s.write_all(&h.to_le_bytes())?;
    s.shutdown(Shutdown::Write)
}

fn read_sink_reply(s: &mut TcpStream) -> io::Result<(u64, u64)> {
    let mut b = [0u8; 16];
    let timeout = s.read_timeout()?.unwrap_or(Duration::from_secs(30));
    Patient::new(s, timeout).read_exact(&mut b)?;
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let h = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
    Ok((n, h))
}

// ---------------------------------------------------------------- sides

/// The server side of one scenario on an accepted connection (all but epoll).
pub fn serve_one(sc: Scenario, mut s: TcpStream, p: &Params) -> Result<BulkReport> {
    let mut r = BulkReport::new(sc.name());
    timeouts(&s, p.timeout)?;
    match sc {
        Scenario::Echo => {
            // Echo with random read sizes and random write splits until EOF.
            let mut rng = Rng::new(7);
            let mut buf = vec![0u8; 1 << 17];
            let mut total = 0u64;
            let reader = s.try_clone()?;
            let mut reader = Patient::new(&reader, p.timeout);
            loop {
                let want = rng.size(buf.len());
                let n = reader.read(&mut buf[..want])?;
                if n == 0 {
                    break;
                }
                let mut off = 0;
                while off < n {
                    let k = rng.size(n - off);
                    s.write_all(&buf[off..off + k])?;
                    off += k;
                }
                total += n as u64;
            }
            s.shutdown(Shutdown::Write)?;
            r.observe("server_bytes", total);
        }
        Scenario::Writev | Scenario::Sendfile | Scenario::SpliceTx => sink_reply(&mut s, 3)?,
        Scenario::SpliceRx => {
            // socket → pipe → memory.
            let mut fds = [0; 2];
            // SAFETY: pipe2 fills two fds we own from here on.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                bail!("pipe2: {}", io::Error::last_os_error());
            }
            let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            let mut all = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            let deadline = Instant::now() + p.timeout;
            loop {
                if Instant::now() > deadline {
                    bail!("splice-rx: deadline passed after {} bytes", all.len());
                }
                // SAFETY: valid fds; null offsets for a socket and a pipe.
                let n = cvt(unsafe {
                    libc::splice(
                        s.as_raw_fd(),
                        std::ptr::null_mut(),
                        wr.as_raw_fd(),
                        std::ptr::null_mut(),
                        1 << 16,
                        0,
                    )
                })?;
                if n == 0 {
                    break;
                }
                let mut left = n;
                while left > 0 {
                    // SAFETY: reading into our own buffer.
                    let k = cvt(unsafe {
                        libc::read(rd.as_raw_fd(), buf.as_mut_ptr().cast(), left.min(buf.len()))
                    })?;
                    all.extend_from_slice(&buf[..k]);
                    left -= k;
                }
            }
            s.write_all(&(all.len() as u64).to_le_bytes())?;
            s.write_all(&fnv(&all).to_le_bytes())?;
            s.shutdown(Shutdown::Write)?;
        }
        Scenario::Peek => {
            let mut all = Vec::new();
            let mut peek = vec![0u8; 8192];
            let mut buf = vec![0u8; 8192];
            let mut rng = Rng::new(11);
            let mut mismatches = 0u64;
            loop {
                let want = rng.size(peek.len());
                let np = peek_retry(&s, &mut peek[..want], p.timeout)?;
                if np == 0 {
                    break;
                }
                // A second peek must see the same bytes again.
                let np2 = peek_retry(&s, &mut buf[..np.max(1)], p.timeout)?;
                if np2 < np.min(1) || buf[..np2.min(np)] != peek[..np2.min(np)] {
                    mismatches += 1;
                }
                // Then the real read returns what was peeked, first.
                let n = Patient::new(&s, p.timeout).read(&mut buf[..np])?;
                if n == 0 || buf[..n] != peek[..n] {
                    mismatches += 1;
                }
                all.extend_from_slice(&buf[..n]);
            }
            r.observe("peek_mismatches", mismatches);
            s.write_all(&(all.len() as u64).to_le_bytes())?;
            s.write_all(&fnv(&all).to_le_bytes())?;
            s.shutdown(Shutdown::Write)?;
        }
        Scenario::HalfClose => {
            let (n, h, _) = read_all_hash(&mut s, &mut Rng::new(5))?;
            // The client's write side is closed; ours still works.
            let resp = pattern(2, 300_001, n ^ h);
            s.write_all(&n.to_le_bytes())?;
            s.write_all(&h.to_le_bytes())?;
            s.write_all(&resp)?;
            s.shutdown(Shutdown::Write)?;
            r.observe("server_read_bytes", n);
        }
        Scenario::Rst => {
            // Wait until the client has reset, then drain and record what
            // reads return: the data that was delivered, then the error.
            let mut got = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            // The client resets right after writing; give the reset time to
            // arrive so the reads below see data and reset together.
            std::thread::sleep(Duration::from_millis(300));
            let outcome = loop {
                match s.read(&mut buf) {
                    Ok(0) => break "EOF".to_string(),
                    Ok(n) => got += n as u64,
                    Err(e) => break errno_of(&e),
                }
            };
            r.observe("server_read_before_end", got);
            r.observe("server_end", outcome);
            let w = s
                .write(b"x")
                .map_or_else(|e| errno_of(&e), |n| format!("wrote {n}"));
            r.observe("server_write_after", w);
        }
        Scenario::WaitAll => {
            // One recv() for everything: TCP returns once all of it is in.
            let want = PIECES * PIECE;
            let mut all = Vec::new();
            let mut reads = Vec::new();
            let mut buf = vec![0u8; want];
            while all.len() < want {
                let n = recv_retry(
                    &s,
                    &mut buf[..want - all.len()],
                    libc::MSG_WAITALL,
                    p.timeout,
                )?;
                if n == 0 {
                    break;
                }
                reads.push(n);
                all.extend_from_slice(&buf[..n]);
            }
            r.observe("first_read", reads.first().copied().unwrap_or(0));
            r.observe("reads", reads.len());
            check_pieces(&mut r, &all);
            s.write_all(b"k")?;
        }
        Scenario::RcvLowat => {
            // An event loop's way: poll() says readable once the low-water
            // mark is queued (or at EOF), then read what is there.
            let lowat = 3 * PIECE;
            set_rcvlowat(&s, lowat)?;
            let mut all = Vec::new();
            let mut first = None;
            let mut buf = vec![0u8; PIECES * PIECE];
            loop {
                wait_readable(&s, p.timeout)?;
                let n = recv_retry(&s, &mut buf, libc::MSG_DONTWAIT, p.timeout)?;
                if n == 0 {
                    break;
                }
                first.get_or_insert(n);
                all.extend_from_slice(&buf[..n]);
            }
            r.observe("first_read_reached_lowat", first.unwrap_or(0) >= lowat);
            check_pieces(&mut r, &all);
            s.write_all(b"k")?;
        }
        Scenario::Oob => {
            // Let all of it, the urgent byte included, arrive first.
            std::thread::sleep(Duration::from_millis(200));
            let mut b = [0u8; 1];
            let urgent = recv_retry(&s, &mut b, libc::MSG_OOB, p.timeout).map_or_else(
                |e| errno_of(&e),
                |n| String::from_utf8_lossy(&b[..n]).into_owned(),
            );
            let mut inline = Vec::new();
            Patient::new(&s, p.timeout).read_to_end(&mut inline)?;
            let inline = String::from_utf8_lossy(&inline).into_owned();
            r.check(urgent == "!" && inline == "xyzend", || {
                format!("urgent byte {urgent:?} and {inline:?} in line; sent xyz, urgent !, end")
            });
            r.observe("urgent_byte", urgent);
            r.observe("inline", inline);
        }
        Scenario::Bulk => {
            if let Some(go) = &p.hold_until {
                let deadline = Instant::now() + p.timeout;
                while !go.exists() {
                    if Instant::now() > deadline {
                        bail!("{} did not appear within {:?}", go.display(), p.timeout);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let stream = Stream::new(99);
            let mut buf = vec![0u8; 1 << 18];
            let mut off = 0u64;
            let mut bad_at = None;
            let reader = s.try_clone()?;
            let mut reader = Patient::new(&reader, p.timeout);
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                if bad_at.is_none() {
                    let mut checked = 0;
                    while checked < n {
                        let k = (n - checked).min(STREAM_PERIOD);
                        if buf[checked..checked + k] != *stream.at(off + checked as u64, k) {
                            bad_at = Some(off + checked as u64);
                            break;
                        }
                        checked += k;
                    }
                }
                off += n as u64;
            }
            s.write_all(&off.to_le_bytes())?;
            s.write_all(&bad_at.map_or(u64::MAX, |b| b).to_le_bytes())?;
            s.shutdown(Shutdown::Write)?;
        }
        Scenario::Epoll => bail!("epoll is served by serve_epoll"),
    }
    r.ok = r.errors.is_empty();
    Ok(r)
}

/// A stream socket of `addr`'s family, TCP or MPTCP.
fn stream_socket(addr: &SocketAddr, mptcp: bool) -> io::Result<socket2::Socket> {
    let protocol = if mptcp {
        socket2::Protocol::MPTCP
    } else {
        socket2::Protocol::TCP
    };
    socket2::Socket::new(
        socket2::Domain::for_address(*addr),
        socket2::Type::STREAM,
        Some(protocol),
    )
}

/// A listener on `bind`, MPTCP when `mptcp`.
pub fn listen(bind: SocketAddr, mptcp: bool) -> Result<TcpListener> {
    let s = stream_socket(&bind, mptcp)?;
    s.set_reuse_address(true)?;
    s.bind(&bind.into())
        .with_context(|| format!("binding {bind}"))?;
    s.listen(1024)?;
    Ok(s.into())
}

/// The client side of one scenario (all but epoll).
pub fn client_one(sc: Scenario, target: SocketAddr, p: &Params) -> Result<BulkReport> {
    let mut r = BulkReport::new(sc.name());
    let start = Instant::now();
    let s = stream_socket(&target, p.mptcp.client())?;
    s.connect_timeout(&target.into(), p.timeout)
        .with_context(|| format!("connecting to {target}"))?;
    let mut s = TcpStream::from(s);
    timeouts(&s, p.timeout)?;
    match sc {
        Scenario::Echo => {
            let mut sent = Vec::new();
            for kind in 0..3 {
                for (i, size) in SIZES.iter().enumerate() {
                    sent.extend_from_slice(&pattern(kind, *size, (kind * 100 + i) as u64 + 1));
                }
            }
            let mut reader = s.try_clone()?;
            let expected = sent.clone();
            let writer = std::thread::spawn(move || -> io::Result<()> {
                let mut rng = Rng::new(13);
                let mut off = 0;
                while off < sent.len() {
                    let k = rng.size((sent.len() - off).min(1 << 18));
                    s.write_all(&sent[off..off + k])?;
                    off += k;
                }
                s.shutdown(Shutdown::Write)
            });
            let (n, h, got) = read_all_hash(&mut reader, &mut Rng::new(17))?;
            writer.join().expect("writer thread")?;
            r.bytes = expected.len() as u64;
            r.check(n == expected.len() as u64, || {
                format!("echoed {n} bytes, sent {}", expected.len())
            });
            let first_diff = got.iter().zip(&expected).position(|(a, b)| a != b);
            r.check(first_diff.is_none(), || {
                format!("echo differs first at byte {first_diff:?}")
            });
            r.check(h == fnv(&expected), || "echo checksum differs".into());
        }
        Scenario::Writev => {
            let mut rng = Rng::new(21);
            let mut sent = Vec::new();
            for round in 0..64 {
                let parts: Vec<Vec<u8>> = [1usize, 100, 4096, 70_000, 3, 16_385]
                    .iter()
                    .map(|&n| pattern(2, rng.size(n), round * 7 + n as u64))
                    .collect();
                let iov: Vec<libc::iovec> = parts
                    .iter()
                    .map(|b| libc::iovec {
                        iov_base: b.as_ptr() as *mut _,
                        iov_len: b.len(),
                    })
                    .collect();
                let total: usize = parts.iter().map(Vec::len).sum();
                // SAFETY: the iovecs point into `parts`, alive for the call.
                let n =
                    cvt(unsafe { libc::writev(s.as_raw_fd(), iov.as_ptr(), iov.len() as i32) })?;
                let flat: Vec<u8> = parts.concat();
                // A short writev: send the rest plainly.
                s.write_all(&flat[n..])?;
                sent.extend_from_slice(&flat);
                let _ = total;
            }
            finish_sink(&mut r, &mut s, &sent)?;
        }
        Scenario::Sendfile => {
            let data = pattern(2, (5 << 20) + 7, 77);
            let path = std::env::temp_dir().join(format!(
                "mesh-bulk-sendfile-{}-{}",
                std::process::id(),
                crate::next_id()
            ));
            std::fs::write(&path, &data)?;
            let file = File::open(&path);
            let _ = std::fs::remove_file(&path);
            let file = file?;
            let mut off: libc::off_t = 0;
            let deadline = Instant::now() + p.timeout;
            while (off as usize) < data.len() {
                if Instant::now() > deadline {
                    bail!("sendfile: deadline passed at {off}");
                }
                let left = data.len() - off as usize;
                // SAFETY: valid fds and our own offset variable.
                cvt(unsafe {
                    libc::sendfile(s.as_raw_fd(), file.as_raw_fd(), &mut off, left.min(1 << 20))
                })?;
            }
            finish_sink(&mut r, &mut s, &data)?;
        }
        Scenario::SpliceTx | Scenario::SpliceRx | Scenario::Peek => {
            let data = pattern(2, (3 << 20) + 3, 55);
            if sc == Scenario::SpliceTx {
                splice_send(&s, &data, p.timeout)?;
            } else {
                let mut rng = Rng::new(31);
                let mut off = 0;
                while off < data.len() {
                    let k = rng.size((data.len() - off).min(100_000));
                    s.write_all(&data[off..off + k])?;
                    off += k;
                }
            }
            finish_sink(&mut r, &mut s, &data)?;
        }
        Scenario::HalfClose => {
            let data = pattern(2, 1_000_003, 9);
            s.write_all(&data)?;
            s.shutdown(Shutdown::Write)?;
            let (n, h) = read_sink_reply(&mut s)?;
            r.check(n == data.len() as u64 && h == fnv(&data), || {
                format!("server read {n} bytes (hash {h:x}), sent {}", data.len())
            });
            let mut resp = Vec::new();
            Patient::new(&s, p.timeout).read_to_end(&mut resp)?;
            let want = pattern(2, 300_001, n ^ h);
            r.check(resp == want, || {
                format!(
                    "response after half-close: {} bytes, want {}",
                    resp.len(),
                    want.len()
                )
            });
            r.observe("client_response_bytes", resp.len());
            r.bytes = data.len() as u64;
        }
        Scenario::WaitAll | Scenario::RcvLowat => {
            let data = pattern(1, PIECES * PIECE, 0);
            for piece in data.chunks(PIECE) {
                s.write_all(piece)?;
                std::thread::sleep(Duration::from_millis(20));
            }
            // The end makes the rest readable whatever the low-water mark.
            s.shutdown(Shutdown::Write)?;
            let mut done = [0u8; 1];
            Patient::new(&s, p.timeout).read_exact(&mut done)?;
            r.bytes = data.len() as u64;
        }
        Scenario::Oob => {
            s.write_all(b"xyz")?;
            // SAFETY: a one-byte buffer of our own.
            cvt(unsafe { libc::send(s.as_raw_fd(), b"!".as_ptr().cast(), 1, libc::MSG_OOB) })?;
            s.write_all(b"end")?;
            s.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            Patient::new(&s, p.timeout).read_to_end(&mut rest)?;
            r.bytes = 7;
        }
        Scenario::Rst => {
            let data = pattern(1, 100_000, 1);
            s.write_all(&data)?;
            // Abortive close: RST instead of FIN.
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            drop(s);
            r.bytes = data.len() as u64;
        }
        Scenario::Bulk => {
            let stream = Stream::new(99);
            let mut rng = Rng::new(41);
            let mut off = 0u64;
            let deadline = Instant::now() + p.timeout;
            while off < p.bytes {
                if Instant::now() > deadline {
                    r.errors.push(format!("deadline passed after {off} bytes"));
                    break;
                }
                let k = (rng.size(1 << 19) as u64).min(p.bytes - off) as usize;
                let mut done = 0;
                while done < k {
                    let chunk = (k - done).min(STREAM_PERIOD);
                    s.write_all(stream.at(off + done as u64, chunk))?;
                    done += chunk;
                }
                off += k as u64;
            }
            s.shutdown(Shutdown::Write)?;
            let mut b = [0u8; 16];
            Patient::new(&s, p.timeout).read_exact(&mut b)?;
            let got = u64::from_le_bytes(b[..8].try_into().expect("8"));
            let bad = u64::from_le_bytes(b[8..].try_into().expect("8"));
            r.check(got == off, || format!("server got {got} bytes, sent {off}"));
            r.check(bad == u64::MAX, || {
                format!("stream differs at offset {bad}")
            });
            r.bytes = off;
        }
        Scenario::Epoll => bail!("epoll runs through client_epoll"),
    }
    r.elapsed_ms = start.elapsed().as_millis() as u64;
    r.ok = r.errors.is_empty();
    Ok(r)
}

/// recv(MSG_PEEK), retrying EAGAIN like [`Patient`].
fn peek_retry(s: &TcpStream, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
    recv_retry(s, buf, libc::MSG_PEEK, timeout)
}

/// recv() with `flags`, retrying EAGAIN (counted) until `timeout`.
fn recv_retry(s: &TcpStream, buf: &mut [u8], flags: i32, timeout: Duration) -> io::Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: our own buffer, with its length.
        let r =
            cvt(unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) });
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                EAGAIN_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            other => return other,
        }
    }
}

fn finish_sink(r: &mut BulkReport, s: &mut TcpStream, sent: &[u8]) -> Result<()> {
    s.shutdown(Shutdown::Write)?;
    let (n, h) = read_sink_reply(s)?;
    r.bytes = sent.len() as u64;
    r.check(n == sent.len() as u64, || {
        format!("server received {n} bytes, sent {}", sent.len())
    });
    r.check(h == fnv(sent), || {
        "server's checksum differs from what was sent".into()
    });
    Ok(())
}

/// memory → pipe → socket with splice.
fn splice_send(s: &TcpStream, data: &[u8], timeout: Duration) -> Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we own from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", io::Error::last_os_error());
    }
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let deadline = Instant::now() + timeout;
    let mut off = 0;
    while off < data.len() {
        let k = (data.len() - off).min(1 << 16);
        // SAFETY: writing our own bytes into our pipe.
        let mut n = cvt(unsafe { libc::write(wr.as_raw_fd(), data[off..].as_ptr().cast(), k) })?;
        off += n;
        while n > 0 {
            if Instant::now() > deadline {
                bail!("splice: deadline passed at {off}");
            }
            // SAFETY: valid fds, null offsets for pipe and socket.
            let m = cvt(unsafe {
                libc::splice(
                    rd.as_raw_fd(),
                    std::ptr::null_mut(),
                    s.as_raw_fd(),
                    std::ptr::null_mut(),
                    n,
                    libc::SPLICE_F_MOVE,
                )
            })?;
            n -= m;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- epoll

struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: returns a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: valid epoll fd and event.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: as above.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn wait(&self, events: &mut [libc::epoll_event], ms: i32) -> io::Result<usize> {
        // SAFETY: the buffer and its length.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize)
    }
}

const EV_IN: u32 = libc::EPOLLIN as u32;
const EV_OUT: u32 = libc::EPOLLOUT as u32;

/// Echo server for `conns` connections, all non-blocking, one epoll loop.
pub fn serve_epoll(listener: TcpListener, p: &Params) -> Result<BulkReport> {
    let mut r = BulkReport::new("epoll");
    listener.set_nonblocking(true)?;
    let ep = Epoll::new()?;
    ep.add(listener.as_raw_fd(), EV_IN, u64::MAX)?;
    // Per connection: socket, bytes waiting to be echoed, closed by peer,
    // finished (HUP is reported even with no events asked for).
    let mut conns: Vec<(TcpStream, Vec<u8>, bool, bool)> = Vec::new();
    let mut done = 0u32;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + p.timeout;
    while done < p.conns {
        if Instant::now() > deadline {
            bail!(
                "epoll server: deadline passed with {done}/{} connections done",
                p.conns
            );
        }
        let n = ep.wait(&mut events, 100)?;
        for ev in &events[..n] {
            let token = ev.u64;
            if token == u64::MAX {
                loop {
                    match listener.accept() {
                        Ok((c, _)) => {
                            c.set_nonblocking(true)?;
                            ep.add(c.as_raw_fd(), EV_IN, conns.len() as u64)?;
                            conns.push((c, Vec::new(), false, false));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                continue;
            }
            let (c, pending, eof, finished) = &mut conns[token as usize];
            if *finished {
                continue;
            }
            if !*eof {
                loop {
                    match c.read(&mut buf) {
                        Ok(0) => {
                            *eof = true;
                            break;
                        }
                        Ok(k) => pending.extend_from_slice(&buf[..k]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            while !pending.is_empty() {
                match c.write(pending) {
                    Ok(k) => {
                        pending.drain(..k);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
            if pending.is_empty() && *eof {
                c.shutdown(Shutdown::Write)?;
                ep.modify(c.as_raw_fd(), 0, token)?;
                *finished = true;
                done += 1;
            } else {
                let want = if pending.is_empty() {
                    EV_IN
                } else {
                    EV_IN | EV_OUT
                };
                ep.modify(c.as_raw_fd(), want, token)?;
            }
        }
    }
    r.observe("served", done);
    r.ok = true;
    Ok(r)
}

/// `conns` concurrent connections, each sending a random-sized message and
/// checking the echo, all driven by one epoll loop.
pub fn client_epoll(target: SocketAddr, p: &Params) -> Result<BulkReport> {
    let mut r = BulkReport::new("epoll");
    let start = Instant::now();
    struct Conn {
        s: TcpStream,
        msg: Vec<u8>,
        sent: usize,
        got: Vec<u8>,
        finished: bool,
    }
    let mut rng = Rng::new(61);
    let mut conns = Vec::new();
    let ep = Epoll::new()?;
    // Open them all first, so they are all live at once.
    for i in 0..p.conns {
        let s = TcpStream::connect_timeout(&target, p.timeout)
            .with_context(|| format!("connection {i} to {target}"))?;
        s.set_nonblocking(true)?;
        let size = rng.size(if i % 10 == 0 { 200_000 } else { 3000 });
        let msg = pattern(2, size, u64::from(i) + 1);
        ep.add(s.as_raw_fd(), EV_IN | EV_OUT, u64::from(i))?;
        conns.push(Conn {
            s,
            msg,
            sent: 0,
            got: Vec::new(),
            finished: false,
        });
    }
    r.observe("opened", conns.len());
    let mut finished = 0u32;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + p.timeout;
    while finished < p.conns {
        if Instant::now() > deadline {
            r.errors
                .push(format!("deadline passed with {finished}/{} done", p.conns));
            break;
        }
        let n = ep.wait(&mut events, 100)?;
        for ev in &events[..n] {
            let c = &mut conns[ev.u64 as usize];
            if c.finished {
                continue;
            }
            while c.sent < c.msg.len() {
                match c.s.write(&c.msg[c.sent..]) {
                    Ok(k) => c.sent += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
                if c.sent == c.msg.len() {
                    c.s.shutdown(Shutdown::Write)?;
                }
            }
            loop {
                match c.s.read(&mut buf) {
                    Ok(0) => {
                        c.finished = true;
                        finished += 1;
                        break;
                    }
                    Ok(k) => c.got.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
            let want = if c.finished {
                0
            } else if c.sent < c.msg.len() {
                EV_IN | EV_OUT
            } else {
                EV_IN
            };
            ep.modify(c.s.as_raw_fd(), want, ev.u64)?;
        }
    }
    let bad: Vec<usize> = conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.got != c.msg)
        .map(|(i, _)| i)
        .collect();
    r.check(bad.is_empty(), || {
        format!(
            "{} connections got a different echo (first: {:?})",
            bad.len(),
            bad.first()
        )
    });
    r.bytes = conns.iter().map(|c| c.msg.len() as u64).sum();
    r.elapsed_ms = start.elapsed().as_millis() as u64;
    r.ok = r.errors.is_empty();
    Ok(r)
}

/// Both sides in this process: a listener on `bind`, the server in a thread.
/// The client connects to `target` (a service VIP balanced to `bind`), or
/// to the listener itself. The server's report is merged into the client's
/// (observations prefixed by nothing: keys do not overlap).
pub fn run_local(
    sc: Scenario,
    bind: SocketAddr,
    target: Option<SocketAddr>,
    p: &Params,
) -> Result<BulkReport> {
    for a in [Some(bind), target].into_iter().flatten() {
        if !target_allowed(&a) {
            bail!("{a} is not loopback and this is the host's network namespace");
        }
    }
    let listener = listen(bind, p.mptcp.server())?;
    let addr = target.unwrap_or(listener.local_addr()?);
    let params = p.clone();
    let server = std::thread::spawn(move || -> Result<BulkReport> {
        if sc == Scenario::Epoll {
            return serve_epoll(listener, &params);
        }
        let (s, _) = accept_within(&listener, params.timeout)?;
        serve_one(sc, s, &params)
    });
    let client = if sc == Scenario::Epoll {
        client_epoll(addr, p)
    } else {
        client_one(sc, addr, p)
    };
    let server = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))?;
    merge(client, server)
}

pub fn merge(client: Result<BulkReport>, server: Result<BulkReport>) -> Result<BulkReport> {
    let mut r = client.context("client side")?;
    match server {
        Ok(s) => {
            r.errors.extend(s.errors);
            r.observed.extend(s.observed);
        }
        Err(e) => r.errors.push(format!("server side: {e:#}")),
    }
    r.observe(
        "eagain_retries",
        EAGAIN_RETRIES.load(std::sync::atomic::Ordering::Relaxed),
    );
    r.ok = r.errors.is_empty();
    Ok(r)
}

/// accept() bounded by `timeout`.
pub fn accept_within(l: &TcpListener, timeout: Duration) -> Result<(TcpStream, SocketAddr)> {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe {
        libc::poll(
            &mut pfd,
            1,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        )
    };
    if n <= 0 {
        bail!("no connection within {timeout:?}");
    }
    Ok(l.accept()?)
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one (epoll with thousands
/// of connections needs two fds each in `local` mode).
pub fn raise_fd_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on our own limits.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The scenarios on plain loopback, no mesh: they must pass on the
    //! normal TCP path (and so check the checks).
    use super::*;

    fn local(sc: Scenario) -> BulkReport {
        let p = Params {
            bytes: 8 << 20,
            conns: 50,
            timeout: Duration::from_secs(20),
            ..Params::default()
        };
        run_local(sc, "127.0.0.1:0".parse().unwrap(), None, &p).unwrap()
    }

    #[test]
    fn every_scenario_passes_on_plain_tcp() {
        for (name, sc) in Scenario::ALL {
            let r = local(sc);
            assert!(r.ok, "{name}: {r:?}");
        }
    }

    #[test]
    fn stream_windows_wrap() {
        let s = Stream::new(1);
        let p = STREAM_PERIOD as u64;
        assert_eq!(s.at(p - 2, 4), [s.at(p - 2, 2), s.at(0, 2)].concat());
    }

    #[test]
    fn non_loopback_refused_on_the_host() {
        if in_own_netns() {
            return;
        }
        assert!(!target_allowed(&"10.1.1.1:80".parse().unwrap()));
        assert!(target_allowed(&"[::1]:80".parse().unwrap()));
    }
}
