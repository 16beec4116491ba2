//! The load generator and the backends: hidden subcommands
//! (`bench-client`, `bench-server`) that the scenarios re-exec inside their
//! network namespaces (and, for the client, the cgroup under test).
//!
//! Protocol: the client writes 64-byte requests and the server answers each
//! with 64 bytes; a request starting with `B` switches the connection to
//! bulk mode: the server reads until EOF and answers with the byte count.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const MSG: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const BULK_CHUNK: usize = 128 * 1024;

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum Mode {
    /// New connection, one request/response, close (RST, so no TIME_WAIT).
    Connect,
    /// One connection per thread, request/response round trips.
    Rr,
    /// One connection per thread, one-way bulk send.
    Bulk,
}

#[derive(Args, Debug)]
pub struct ClientArgs {
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// First target address; targets are `first`, `first+1`, … (IPv4 + n).
    #[arg(long)]
    pub first: SocketAddrV4,
    /// How many consecutive addresses to spread over (uniformly at random).
    #[arg(long, default_value_t = 1)]
    pub targets: u32,
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// Stop after this long…
    #[arg(long)]
    pub duration_ms: u64,
    /// …or after this many operations per thread, whichever comes first.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_ops: u64,
    /// Run on this CPU only (the scheduler's choice when absent).
    #[arg(long)]
    pub cpu: Option<usize>,
}

/// What `bench-client` prints: one JSON object.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ClientReport {
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_ns: u64,
    pub bytes: u64,
    /// Latency histogram (ns): recorded (value, count) pairs.
    pub hist: Vec<(u64, u64)>,
}

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

impl ClientReport {
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(v, c) in &self.hist {
            let _ = h.record_n(v, c);
        }
    }
}

pub fn client(args: ClientArgs) -> Result<()> {
    if let Some(cpu) = args.cpu {
        // Before any worker starts: threads inherit it.
        pin(0, Some(cpu)).with_context(|| format!("bench-client: cannot pin to CPU {cpu}"))?;
    }
    let started = Instant::now();
    let deadline = started + Duration::from_millis(args.duration_ms);
    let workers: Vec<_> = (0..args.threads)
        .map(|t| {
            let first = args.first;
            let (n, mode, max_ops) = (args.targets.max(1), args.mode, args.max_ops);
            thread::spawn(move || worker(mode, first, n, deadline, max_ops, t))
        })
        .collect();
    let mut hist = new_hist();
    let mut report = ClientReport::default();
    for w in workers {
        let r = w
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        report.ops += r.ops;
        report.errors += r.errors;
        report.bytes += r.bytes;
        report.first_error = report.first_error.or(r.first_error);
        hist.add(&r.hist).context("merging histograms")?;
    }
    report.elapsed_ns = started.elapsed().as_nanos() as u64;
    report.hist = hist
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect();
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

struct WorkerResult {
    ops: u64,
    errors: u64,
    bytes: u64,
    first_error: Option<String>,
    hist: Histogram<u64>,
}

fn worker(
    mode: Mode,
    first: SocketAddrV4,
    targets: u32,
    deadline: Instant,
    max_ops: u64,
    seed: u32,
) -> WorkerResult {
    let mut r = WorkerResult {
        ops: 0,
        errors: 0,
        bytes: 0,
        first_error: None,
        hist: new_hist(),
    };
    // xorshift: cheap and good enough to spread over targets.
    let mut x: u64 =
        0x9E37_79B9_7F4A_7C15 ^ (u64::from(seed) << 32 | u64::from(std::process::id()));
    let mut pick = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let ip = u32::from(*first.ip()) + (x % u64::from(targets)) as u32;
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), first.port()))
    };
    let fail = |r: &mut WorkerResult, e: io::Error| {
        r.errors += 1;
        if r.first_error.is_none() {
            r.first_error = Some(e.to_string());
        }
        // Back off so a broken path does not spin.
        thread::sleep(Duration::from_millis(1));
    };
    match mode {
        Mode::Connect => {
            let req = [b'C'; MSG];
            let mut resp = [0u8; MSG];
            while r.ops < max_ops && Instant::now() < deadline {
                let t = Instant::now();
                match connect_rr(pick(), &req, &mut resp) {
                    Ok(()) => {
                        let _ = r.hist.record(t.elapsed().as_nanos() as u64);
                        r.ops += 1;
                    }
                    Err(e) => fail(&mut r, e),
                }
            }
        }
        Mode::Rr => {
            let mut conn = match open(pick()) {
                Ok(c) => TcpStream::from(c),
                Err(e) => {
                    fail(&mut r, e);
                    return r;
                }
            };
            let req = [b'P'; MSG];
            let mut resp = [0u8; MSG];
            while r.ops < max_ops && Instant::now() < deadline {
                let t = Instant::now();
                let res = conn
                    .write_all(&req)
                    .and_then(|()| conn.read_exact(&mut resp));
                match res {
                    Ok(()) => {
                        let _ = r.hist.record(t.elapsed().as_nanos() as u64);
                        r.ops += 1;
                    }
                    Err(e) => {
                        fail(&mut r, e);
                        return r;
                    }
                }
            }
        }
        Mode::Bulk => {
            let res = (|| -> io::Result<u64> {
                let mut conn = TcpStream::from(open(pick())?);
                conn.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut buf = vec![b'B'; BULK_CHUNK];
                buf[0] = b'B';
                let mut sent = 0u64;
                while Instant::now() < deadline && r.ops < max_ops {
                    conn.write_all(&buf)?;
                    sent += buf.len() as u64;
                    r.ops += 1;
                }
                conn.shutdown(std::net::Shutdown::Write)?;
                let mut count = [0u8; 8];
                conn.read_exact(&mut count)?;
                let received = u64::from_be_bytes(count);
                if received != sent {
                    return Err(io::Error::other(format!(
                        "sent {sent} bytes, server counted {received}"
                    )));
                }
                Ok(received)
            })();
            match res {
                Ok(bytes) => r.bytes = bytes,
                Err(e) => fail(&mut r, e),
            }
        }
    }
    r
}

fn open(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    // Blocking connect() honours SO_SNDTIMEO on Linux: a bounded connect
    // without the poll() round trip of connect_timeout.
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_tcp_nodelay(true)?;
    s.connect(&SockAddr::from(addr))?;
    Ok(s)
}

fn connect_rr(addr: SocketAddr, req: &[u8], resp: &mut [u8]) -> io::Result<()> {
    let s = open(addr)?;
    // RST on close: no TIME_WAIT, so ports never run out in a long run.
    s.set_linger(Some(Duration::ZERO))?;
    let mut conn = TcpStream::from(s);
    conn.write_all(req)?;
    conn.read_exact(resp)
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on; repeatable.
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
    /// Accepting threads per address.
    #[arg(long, default_value_t = 4)]
    pub threads: u32,
    /// Created once every address is listening.
    #[arg(long)]
    pub ready_file: std::path::PathBuf,
    /// Exit after this many seconds even if nobody stops us.
    #[arg(long, default_value_t = 3600)]
    pub max_secs: u64,
}

pub fn server(args: ServerArgs) -> Result<()> {
    let mut listeners = Vec::new();
    for addr in &args.listen {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(*addr))
            .with_context(|| format!("bench-server: cannot bind {addr}"))?;
        s.listen(4096)?;
        listeners.push(TcpListener::from(s));
    }
    for l in &listeners {
        for _ in 0..args.threads {
            let l = l.try_clone()?;
            thread::spawn(move || {
                for conn in l.incoming().flatten() {
                    let _ = serve(conn);
                }
            });
        }
    }
    std::fs::write(&args.ready_file, "ready\n")?;
    // The parent kills us; this only bounds a forgotten server.
    thread::sleep(Duration::from_secs(args.max_secs));
    bail!("bench-server: stopped after --max-secs {}", args.max_secs)
}

fn serve(mut conn: TcpStream) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut req = [0u8; MSG];
    let resp = [b'R'; MSG];
    loop {
        match conn.read_exact(&mut req) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if req[0] == b'B' {
            let mut total = MSG as u64;
            let mut buf = vec![0u8; BULK_CHUNK];
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            return conn.write_all(&total.to_be_bytes());
        }
        conn.write_all(&resp)?;
    }
}

/// Restricts thread `tid` (0: the caller) to `cpu`, or frees it to run on
/// every CPU with None.
pub fn pin(tid: libc::pid_t, cpu: Option<usize>) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain bits; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // Every CPU: the kernel keeps the ones that exist.
    let all = 0..libc::CPU_SETSIZE as usize;
    for c in cpu.map_or(all.clone(), |c| c..c + 1) {
        if all.contains(&c) {
            // SAFETY: c is below CPU_SETSIZE, so inside the set.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    }
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
